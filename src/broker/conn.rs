//! The protocol of one client connection, with no I/O: packets in, bytes out.
//!
//! The socket task (`server.rs`) decodes packets, hands them to [`Conn::handle`],
//! asks [`Conn::drain`] for queued messages, and writes whatever was appended to its
//! output buffer. Everything here can be driven by a test without sockets.
//!
//! Invariants:
//! - At most `window` QoS 1/2 messages are unacknowledged towards the client (its 5.0
//!   receive maximum, capped by `max_inflight_messages`); QoS 0 messages behind them
//!   wait, so the order of messages is the order of the mailbox.
//! - An inbound QoS 2 message is routed once: its packet id is kept until PUBREL, and a
//!   repeated PUBLISH with that id is only acknowledged again.
//! - On resume, unacknowledged messages go out first, in their original order, with
//!   DUP set (and PUBREL for those already received).
//! - A message larger than the client's 5.0 maximum packet size is dropped, counted.
//! - Access is checked against the policy in force. A reload wakes every connection,
//!   which applies it before anything else it does: a client whose credentials the
//!   new policy does not readmit is disconnected (its will discarded); subscriptions
//!   the new ACL does not grant are dropped, with the queued messages it no longer lets
//!   the client read, and a will it no longer lets the client publish. A resumed
//!   session is held to the policy in force the same way.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::time::Instant;

use super::auth::{Identity, Policy, Refusal};
use super::registry::Opened;
use super::router::{Counters, Router, Settings};
use super::session::{Delivery, Kick, Message, Session, Slot, NEVER_EXPIRES};
use super::tap::Tapped;
use crate::mqtt::{
    self, Ack, ConnAck, Connect, Disconnect, Packet, Properties, Protocol, Publish, QoS,
    ReasonCode, SubAck, UnsubAck, Will,
};

/// Why a connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Close {
    /// DISCONNECT from the client: the will is discarded.
    Normal,
    /// 5.0 DISCONNECT with reason 0x04: the will is published.
    WithWill,
    /// The client broke the protocol; a 5.0 client is told this reason.
    Protocol(ReasonCode),
    /// The broker ends the connection (takeover, shutdown).
    Kicked(Kick),
    /// Nothing received within 1.5 times the keepalive.
    KeepAliveTimeout,
    /// A reload withdrew the client's credentials: the will is discarded.
    Revoked,
    /// The network connection failed or the client closed it.
    Lost,
}

impl Close {
    /// The DISCONNECT reason sent to a 5.0 client, if any.
    pub fn reason(self) -> Option<ReasonCode> {
        match self {
            Close::Protocol(code) => Some(code),
            Close::Kicked(Kick::TakenOver) => Some(ReasonCode::SESSION_TAKEN_OVER),
            Close::Kicked(Kick::Shutdown) => Some(ReasonCode::SERVER_SHUTTING_DOWN),
            Close::KeepAliveTimeout | Close::Kicked(Kick::KeepAlive) => {
                Some(ReasonCode::KEEP_ALIVE_TIMEOUT)
            }
            Close::Revoked => Some(ReasonCode::NOT_AUTHORIZED),
            Close::Normal | Close::WithWill | Close::Lost => None,
        }
    }
}

/// A connected client.
#[derive(Debug)]
pub(crate) struct Conn {
    router: Arc<Router>,
    session: Session,
    generation: u64,
    protocol: Protocol,
    username: Option<Box<str>>,
    will: Option<Box<Will>>,
    /// Inbound topic aliases (5.0), index = alias - 1.
    aliases: Vec<Option<String>>,
    window: usize,
    max_out_packet: usize,
    policy: Arc<Policy>,
    policy_generation: u64,
    /// Whether acknowledgements may carry reason strings (5.0 request problem
    /// information).
    problem_info: bool,
    /// Messages received and sent since the counters were last flushed.
    pub received: u64,
    pub sent: u64,
}

/// The CONNACK refusing `code`, saying why to a 5.0 client.
fn refusal(code: ReasonCode, why: &str) -> Packet {
    Packet::ConnAck(ConnAck {
        session_present: false,
        code,
        properties: Properties {
            reason_string: Some(why.to_string()),
            ..Properties::default()
        },
    })
}

fn write(packet: &Packet, protocol: Protocol, out: &mut BytesMut) -> Result<(), Close> {
    mqtt::encode(packet, protocol, out).map_err(|e| {
        tracing::warn!(error = %e, "cannot encode a packet for the client");
        Close::Protocol(ReasonCode::IMPLEMENTATION_SPECIFIC_ERROR)
    })
}

/// A client id for a client that sent none.
fn assign_client_id() -> String {
    format!("fb-{:016x}", fastrand::u64(..))
}

/// 5.0 properties a PUBLISH forwards to subscribers; `None` when there are none.
fn forwarded(p: &Properties) -> Option<Box<Properties>> {
    let kept = Properties {
        payload_format_indicator: p.payload_format_indicator,
        content_type: p.content_type.clone(),
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.clone(),
        user_properties: p.user_properties.clone(),
        ..Properties::default()
    };
    (!kept.is_empty()).then(|| Box::new(kept))
}

fn expires_at(p: &Properties, now: Instant) -> Option<Instant> {
    p.message_expiry_interval
        .map(|s| now + Duration::from_secs(u64::from(s)))
}

/// The CONNACK accepting a client; 5.0 clients also learn the broker's limits.
fn connack(
    session_present: bool,
    mut properties: Properties,
    settings: &Settings,
    protocol: Protocol,
) -> Packet {
    if protocol == Protocol::V5 {
        properties.receive_maximum = Some(settings.max_inflight);
        properties.maximum_packet_size = Some(settings.max_packet_size);
        properties.topic_alias_maximum = Some(settings.max_topic_alias);
    }
    Packet::ConnAck(ConnAck {
        session_present,
        code: ReasonCode::SUCCESS,
        properties,
    })
}

/// Why a CONNECT is refused: the CONNACK's reason code and the reason string.
type Refused = (ReasonCode, &'static str);

/// The checks of a CONNECT before a session is opened, in the order clients are told
/// about them. Fills in the CONNACK properties that answer what the client asked for
/// (assigned client id, server keepalive) and returns the keepalive in force.
fn admit(
    connect: &mut Connect,
    settings: &Settings,
    policy: &Policy,
    peer: SocketAddr,
    properties: &mut Properties,
) -> Result<u16, Refused> {
    check_properties(connect)?;
    assign_missing_client_id(connect, properties)?;
    let keep_alive = negotiate_keep_alive(connect, settings, properties)?;
    authenticate(connect, policy, peer)?;
    check_will(connect, policy)?;
    Ok(keep_alive)
}

fn check_properties(connect: &Connect) -> Result<(), Refused> {
    if connect.properties.authentication_method.is_some() {
        return Err((
            ReasonCode::BAD_AUTHENTICATION_METHOD,
            "enhanced authentication is not supported",
        ));
    }
    if connect.properties.receive_maximum == Some(0)
        || connect.properties.maximum_packet_size == Some(0)
    {
        return Err((
            ReasonCode::PROTOCOL_ERROR,
            "receive maximum and maximum packet size must not be 0",
        ));
    }
    Ok(())
}

fn assign_missing_client_id(
    connect: &mut Connect,
    properties: &mut Properties,
) -> Result<(), Refused> {
    if !connect.client_id.is_empty() {
        return Ok(());
    }
    if connect.protocol == Protocol::V311 && !connect.clean_start {
        return Err((
            ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
            "an empty client id needs a clean session",
        ));
    }
    connect.client_id = assign_client_id();
    if connect.protocol == Protocol::V5 {
        properties.assigned_client_identifier = Some(connect.client_id.clone());
    }
    Ok(())
}

/// The client's keepalive, lowered to the broker's maximum (5.0 is told so).
fn negotiate_keep_alive(
    connect: &Connect,
    settings: &Settings,
    properties: &mut Properties,
) -> Result<u16, Refused> {
    let keep_alive = connect.keep_alive;
    let Some(max) = settings.max_keep_alive else {
        return Ok(keep_alive);
    };
    if keep_alive != 0 && keep_alive <= max {
        return Ok(keep_alive);
    }
    if connect.protocol == Protocol::V311 {
        // 3.1.1 cannot be told another keepalive (mosquitto does the same).
        return Err((
            ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
            "keepalive above the broker's maximum",
        ));
    }
    properties.server_keep_alive = Some(max);
    Ok(max)
}

fn authenticate(connect: &Connect, policy: &Policy, peer: SocketAddr) -> Result<(), Refused> {
    let username = connect.username.as_deref();
    let Err(refused) = policy.authenticate(username, connect.password.as_deref()) else {
        return Ok(());
    };
    tracing::info!(client_id = %connect.client_id, %peer, username = username.unwrap_or(""), ?refused, "connection refused");
    Err(match refused {
        Refusal::BadCredentials => (
            ReasonCode::BAD_USER_NAME_OR_PASSWORD,
            "bad user name or password",
        ),
        Refusal::NotAuthorized => (
            ReasonCode::NOT_AUTHORIZED,
            "anonymous clients are not allowed",
        ),
    })
}

fn check_will(connect: &Connect, policy: &Policy) -> Result<(), Refused> {
    let Some(will) = &connect.will else {
        return Ok(());
    };
    let who = Identity {
        client_id: &connect.client_id,
        username: connect.username.as_deref(),
    };
    if mqtt::topic::validate_topic_name(&will.topic).is_err() {
        return Err((ReasonCode::TOPIC_NAME_INVALID, "invalid will topic"));
    }
    if policy.restricts_publish() && !policy.can_publish(who, &will.topic) {
        tracing::info!(client_id = %connect.client_id, topic = %will.topic, "will topic denied");
        return Err((
            ReasonCode::NOT_AUTHORIZED,
            "not authorized to publish the will topic",
        ));
    }
    Ok(())
}

/// The session expiry asked for, capped by the broker (5.0 is told the cap).
fn session_expiry(connect: &Connect, settings: &Settings, properties: &mut Properties) -> u32 {
    let expiry = match connect.protocol {
        Protocol::V311 if connect.clean_start => 0,
        Protocol::V311 => NEVER_EXPIRES,
        Protocol::V5 => connect.properties.session_expiry_interval.unwrap_or(0),
    };
    let capped = expiry.min(settings.max_session_expiry);
    if capped != expiry && connect.protocol == Protocol::V5 {
        properties.session_expiry_interval = Some(capped);
    }
    capped
}

impl Conn {
    /// Handles CONNECT: checks credentials and limits, opens or takes over the session,
    /// writes CONNACK (and the messages a resumed session still owes). `None` when the
    /// client was refused; the CONNACK saying why is in `out`.
    pub async fn connect(
        router: &Arc<Router>,
        mut connect: Connect,
        peer: SocketAddr,
        out: &mut BytesMut,
    ) -> Option<Conn> {
        let protocol = connect.protocol;
        let settings = &router.settings;
        // The generation first: the policy read after it is at least as new.
        let policy_generation = router.policy_generation();
        let (policy, _) = router.policy();
        let mut properties = Properties::default();
        let keep_alive = match admit(&mut connect, settings, &policy, peer, &mut properties) {
            Ok(keep_alive) => keep_alive,
            Err((code, why)) => {
                let _ = write(&refusal(code, why), protocol, out);
                return None;
            }
        };
        let expiry = session_expiry(&connect, settings, &mut properties);
        let opened = router
            .open_session(&connect.client_id, connect.clean_start, protocol)
            .await;
        tracing::info!(
            client_id = %connect.client_id,
            %peer,
            username = connect.username.as_deref().unwrap_or(""),
            protocol = protocol.level(),
            clean_start = connect.clean_start,
            session_present = opened.present,
            keep_alive,
            "client connected"
        );
        let connack = connack(opened.present, properties, settings, protocol);
        let resumed = opened.present;
        let mut conn = Conn::new(router, connect, opened, (policy, policy_generation));
        if resumed {
            // Parked sessions kept their subscriptions through any reload since.
            conn.enforce_acl();
        }
        conn.session.expiry = expiry;
        let keep_alive_timeout =
            (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
        conn.session
            .mailbox
            .set_keep_alive(keep_alive_timeout, router.now_ms());
        if write(&connack, protocol, out).is_err() {
            conn.close(Close::Lost);
            return None;
        }
        conn.resend(out);
        Some(conn)
    }

    /// The connected state for an admitted CONNECT and the session it opened.
    fn new(
        router: &Arc<Router>,
        connect: Connect,
        opened: Opened,
        (policy, policy_generation): (Arc<Policy>, u64),
    ) -> Conn {
        let protocol = connect.protocol;
        let settings = &router.settings;
        let window = usize::from(
            connect
                .properties
                .receive_maximum
                .unwrap_or(u16::MAX)
                .min(settings.max_inflight),
        );
        let max_out_packet = connect
            .properties
            .maximum_packet_size
            .map_or(usize::MAX, |m| m as usize);
        Conn {
            router: router.clone(),
            session: opened.session,
            generation: opened.generation,
            protocol,
            username: connect.username.map(String::into_boxed_str),
            will: connect.will.map(Box::new),
            aliases: Vec::new(),
            window,
            max_out_packet,
            policy,
            policy_generation,
            problem_info: protocol == Protocol::V5
                && connect.properties.request_problem_information != Some(0),
            received: 0,
            sent: 0,
        }
    }

    pub fn client_id(&self) -> &str {
        self.session.client_id()
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// Bytes arrived from the client: the keepalive starts over.
    pub fn touch(&self) {
        self.session.mailbox.touch(self.router.now_ms());
    }

    /// Whether the inflight window has room for another QoS 1/2 message.
    pub fn has_room(&self) -> bool {
        self.session.inflight.len() < self.window
    }

    /// The mailbox, to wait for messages.
    pub fn mailbox(&self) -> &Arc<super::session::Mailbox> {
        &self.session.mailbox
    }

    /// Properties carrying `why` as the reason string, when the client wants them.
    fn reason(&self, why: &str) -> Properties {
        Properties {
            reason_string: self.problem_info.then(|| why.to_string()),
            ..Properties::default()
        }
    }

    fn who(&self) -> Identity<'_> {
        Identity {
            client_id: self.session.client_id(),
            username: self.username.as_deref(),
        }
    }

    /// Whether a reload happened that this connection has not applied yet.
    pub fn reload_pending(&self) -> bool {
        self.router.policy_generation() != self.policy_generation
    }

    /// Applies a reload, if there was one since the last look: ends the connection when
    /// the new policy does not readmit its credentials, else holds it to the new ACL.
    fn refresh_policy(&mut self) -> Result<(), Close> {
        let generation = self.router.policy_generation();
        if generation == self.policy_generation {
            return Ok(());
        }
        let (policy, _) = self.router.policy();
        if !policy.readmits(&self.policy, self.username.as_deref()) {
            tracing::info!(
                client_id = %self.client_id(),
                username = self.username.as_deref().unwrap_or(""),
                "credentials withdrawn by a reload; disconnecting"
            );
            return Err(Close::Revoked);
        }
        (self.policy, self.policy_generation) = (policy, generation);
        self.enforce_acl();
        Ok(())
    }

    /// Drops what the ACL in force does not grant: subscriptions, queued messages the
    /// client may not read, a will it may not publish. One log line per client.
    fn enforce_acl(&mut self) {
        if self.policy.acl.is_none() {
            // Without an ACL every topic is readable, and the will was checked against
            // the protected trees, which a reload does not change.
            return;
        }
        let policy = self.policy.clone();
        let client_id = self.session.client_id().clone();
        let who = Identity {
            client_id: &client_id,
            username: self.username.as_deref(),
        };
        let withdrawn: Vec<String> = self
            .session
            .subscriptions
            .iter()
            .filter(|(filter, _)| {
                super::router::split_shared(filter)
                    .is_some_and(|(_, filter)| !policy.can_subscribe(who, filter))
            })
            .map(|(filter, _)| filter.to_string())
            .collect();
        let purged = self
            .session
            .mailbox
            .lock()
            .retain(|d| policy.can_subscribe(who, &d.msg.topic));
        let will_dropped = self
            .will
            .as_ref()
            .is_some_and(|w| policy.restricts_publish() && !policy.can_publish(who, &w.topic));
        if will_dropped {
            self.will = None;
        }
        if withdrawn.is_empty() && purged == 0 && !will_dropped {
            return;
        }
        tracing::info!(
            client_id = %client_id,
            filters = ?withdrawn,
            queued_messages = purged,
            will = will_dropped,
            "subscriptions withdrawn: the ACL in force no longer grants them"
        );
        if !withdrawn.is_empty() {
            let unsubscribe = mqtt::Unsubscribe {
                pkid: 0,
                filters: withdrawn,
                properties: Properties::default(),
            };
            self.router.unsubscribe(&mut self.session, &unsubscribe);
        }
    }

    /// Resends what the session still owes the client, oldest first.
    fn resend(&mut self, out: &mut BytesMut) {
        let now = Instant::now();
        let slots: Vec<(u16, Slot)> = self.session.inflight.iter().cloned().collect();
        for (pkid, slot) in slots {
            match slot {
                Slot::Sent(d) => {
                    if !self.write_publish(&d, pkid, true, now, out) {
                        self.session.inflight.remove(pkid);
                    }
                }
                Slot::Released => {
                    let _ = write(&Packet::PubRel(Ack::new(pkid)), self.protocol, out);
                }
            }
        }
    }

    /// Handles one packet from the client.
    pub fn handle(&mut self, packet: Packet, out: &mut BytesMut) -> Result<(), Close> {
        match packet {
            Packet::Publish(p) => self.on_publish(p, out),
            Packet::PubAck(ack) => {
                if !self.session.inflight.puback(ack.pkid) {
                    tracing::debug!(client_id = %self.client_id(), pkid = ack.pkid, "PUBACK for no message");
                }
                Ok(())
            }
            Packet::PubRec(ack) => {
                if !ack.reason.is_success() {
                    self.session.inflight.remove(ack.pkid);
                    return Ok(());
                }
                let mut rel = Ack::new(ack.pkid);
                if !self.session.inflight.pubrec(ack.pkid) {
                    rel.reason = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND;
                    rel.properties = self.reason("no message with this packet identifier");
                }
                write(&Packet::PubRel(rel), self.protocol, out)
            }
            Packet::PubComp(ack) => {
                self.session.inflight.complete(ack.pkid);
                Ok(())
            }
            Packet::PubRel(ack) => {
                let mut comp = Ack::new(ack.pkid);
                match self.session.incoming.iter().position(|p| *p == ack.pkid) {
                    Some(at) => {
                        self.session.incoming.swap_remove(at);
                    }
                    None => {
                        comp.reason = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND;
                        comp.properties = self.reason("no message with this packet identifier");
                    }
                }
                write(&Packet::PubComp(comp), self.protocol, out)
            }
            Packet::Subscribe(sub) => {
                self.refresh_policy()?;
                let sub_id = sub
                    .properties
                    .subscription_identifiers
                    .first()
                    .copied()
                    .unwrap_or(0);
                let policy = self.policy.clone();
                let who = Identity {
                    client_id: &self.session.mailbox.client_id.clone(),
                    username: self.username.as_deref(),
                };
                let reasons =
                    self.router
                        .subscribe(&mut self.session, who, &policy, &sub.filters, sub_id);
                let properties = match reasons.iter().find(|r| !r.is_success()) {
                    Some(&ReasonCode::NOT_AUTHORIZED) => {
                        self.reason("a filter is not allowed by the ACL")
                    }
                    Some(&ReasonCode::QUOTA_EXCEEDED) => {
                        self.reason("too many subscriptions for one client")
                    }
                    Some(_) => self.reason("a filter is not valid"),
                    None => Properties::default(),
                };
                let ack = SubAck {
                    pkid: sub.pkid,
                    reasons,
                    properties,
                };
                write(&Packet::SubAck(ack), self.protocol, out)
            }
            Packet::Unsubscribe(unsub) => {
                let reasons = self.router.unsubscribe(&mut self.session, &unsub);
                let ack = UnsubAck {
                    pkid: unsub.pkid,
                    reasons,
                    properties: Properties::default(),
                };
                write(&Packet::UnsubAck(ack), self.protocol, out)
            }
            Packet::PingReq => write(&Packet::PingResp, self.protocol, out),
            Packet::Disconnect(d) => self.on_disconnect(&d),
            Packet::Connect(_) => Err(Close::Protocol(ReasonCode::PROTOCOL_ERROR)),
            Packet::Auth(_) => Err(Close::Protocol(ReasonCode::PROTOCOL_ERROR)),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                Err(Close::Protocol(ReasonCode::PROTOCOL_ERROR))
            }
        }
    }

    fn on_disconnect(&mut self, d: &Disconnect) -> Result<(), Close> {
        if let Some(expiry) = d.properties.session_expiry_interval {
            if self.session.expiry == 0 && expiry != 0 {
                return Err(Close::Protocol(ReasonCode::PROTOCOL_ERROR));
            }
            self.session.expiry = expiry.min(self.router.settings.max_session_expiry);
        }
        if d.reason == ReasonCode::DISCONNECT_WITH_WILL {
            Err(Close::WithWill)
        } else {
            Err(Close::Normal)
        }
    }

    fn on_publish(&mut self, mut p: Publish, out: &mut BytesMut) -> Result<(), Close> {
        if let Some(alias) = p.properties.topic_alias {
            if alias == 0 || alias > self.router.settings.max_topic_alias {
                return Err(Close::Protocol(ReasonCode::TOPIC_ALIAS_INVALID));
            }
            let at = usize::from(alias - 1);
            if p.topic.is_empty() {
                match self.aliases.get(at).and_then(Option::as_ref) {
                    Some(topic) => p.topic.clone_from(topic),
                    None => return Err(Close::Protocol(ReasonCode::PROTOCOL_ERROR)),
                }
            } else {
                if self.aliases.len() <= at {
                    self.aliases.resize(at + 1, None);
                }
                self.aliases[at] = Some(p.topic.clone());
            }
        }
        if mqtt::topic::validate_topic_name(&p.topic).is_err() {
            return Err(Close::Protocol(ReasonCode::TOPIC_NAME_INVALID));
        }
        self.received += 1;
        if p.qos == QoS::ExactlyOnce {
            if self.session.incoming.contains(&p.pkid) {
                // A resend of a message routed already.
                return write(&Packet::PubRec(Ack::new(p.pkid)), self.protocol, out);
            }
            if self.protocol == Protocol::V5
                && self.session.incoming.len() >= usize::from(self.router.settings.max_inflight)
            {
                return Err(Close::Protocol(ReasonCode::RECEIVE_MAXIMUM_EXCEEDED));
            }
        }
        self.refresh_policy()?;
        let allowed =
            !self.policy.restricts_publish() || self.policy.can_publish(self.who(), &p.topic);
        let mut reason = ReasonCode::SUCCESS;
        if allowed {
            let now = Instant::now();
            if self.router.taps.wants(&p.topic) {
                self.router.taps.offer(&Tapped {
                    topic: p.topic.clone(),
                    payload: p.payload.clone(),
                    qos: p.qos,
                    dup: p.dup,
                    pkid: p.pkid,
                    response_topic: p.properties.response_topic.clone(),
                    correlation_data: p.properties.correlation_data.clone(),
                    expiry_secs: p.properties.message_expiry_interval,
                    client_id: self.client_id().to_string(),
                    username: self.username.as_deref().map(str::to_string),
                    arrived: now,
                });
            }
            let msg = Message {
                expires_at: expires_at(&p.properties, now),
                properties: forwarded(&p.properties),
                topic: p.topic,
                payload: p.payload,
                qos: p.qos,
                retain: p.retain,
                origin: self.session.mailbox.id,
            };
            if self.router.publish(msg) == 0 {
                reason = ReasonCode::NO_MATCHING_SUBSCRIBERS;
            }
        } else {
            tracing::debug!(client_id = %self.client_id(), topic = %p.topic, "publish denied");
            Counters::add(&self.router.counters.denied, 1);
            reason = ReasonCode::NOT_AUTHORIZED;
        }
        let ack = Ack {
            pkid: p.pkid,
            reason,
            properties: if allowed {
                Properties::default()
            } else {
                self.reason("not authorized to publish to this topic")
            },
        };
        match p.qos {
            QoS::AtMostOnce => Ok(()),
            QoS::AtLeastOnce => write(&Packet::PubAck(ack), self.protocol, out),
            QoS::ExactlyOnce => {
                // A 5.0 refusal ends the flow at PUBREC; 3.1.1 cannot refuse, so the flow
                // runs as usual with nothing delivered.
                if allowed || self.protocol == Protocol::V311 {
                    self.session.incoming.push(p.pkid);
                }
                write(&Packet::PubRec(ack), self.protocol, out)
            }
        }
    }

    /// Appends queued messages to `out` while the inflight window has room and `out` is
    /// shorter than `budget`, after applying a reload. An error when the broker wants
    /// this connection gone; at a broker shutdown what is already queued is appended
    /// first, so a status published just before the shutdown still reaches the
    /// connected clients.
    pub fn drain(&mut self, out: &mut BytesMut, budget: usize) -> Result<(), Close> {
        let mailbox = self.session.mailbox.clone();
        let kick = mailbox.lock().kick();
        let shutdown = match kick {
            Some(Kick::KeepAlive) => return Err(Close::KeepAliveTimeout),
            Some(Kick::Shutdown) => true,
            Some(kick) => return Err(Close::Kicked(kick)),
            None => false,
        };
        self.refresh_policy()?;
        let mut queue = mailbox.lock();
        let now = Instant::now();
        let mut expired = 0;
        while out.len() < budget {
            match queue.items.front() {
                None => break,
                Some(d)
                    if d.qos != QoS::AtMostOnce && self.session.inflight.len() >= self.window =>
                {
                    break
                }
                Some(_) => {}
            }
            let Some(d) = queue.pop() else { break };
            if d.msg.expired(now) {
                expired += 1;
                continue;
            }
            if d.qos == QoS::AtMostOnce {
                self.write_publish(&d, 0, false, now, out);
            } else {
                let pkid = self.session.inflight.next_id();
                if self.write_publish(&d, pkid, false, now, out) {
                    self.session.inflight.push(pkid, Slot::Sent(d));
                }
            }
        }
        drop(queue);
        Counters::add(&self.router.counters.expired, expired);
        if shutdown {
            return Err(Close::Kicked(Kick::Shutdown));
        }
        Ok(())
    }

    /// Appends one PUBLISH; drops (and counts) it when it exceeds the client's maximum.
    /// True when it was written.
    fn write_publish(
        &mut self,
        d: &Delivery,
        pkid: u16,
        dup: bool,
        now: Instant,
        out: &mut BytesMut,
    ) -> bool {
        match &d.wire {
            Some(wire) if d.wire_protocol == self.protocol => {
                if wire.len() > self.max_out_packet {
                    Counters::add(&self.router.counters.dropped, 1);
                    return false;
                }
                wire.write_with_retain(pkid, dup, d.retain, out);
            }
            _ => {
                let mut publish = d.msg.to_publish(d.qos, d.retain, &d.sub_ids, now);
                publish.pkid = pkid;
                publish.dup = dup;
                let start = out.len();
                if write(&Packet::Publish(publish), self.protocol, out).is_err()
                    || out.len() - start > self.max_out_packet
                {
                    out.truncate(start);
                    Counters::add(&self.router.counters.dropped, 1);
                    return false;
                }
            }
        }
        self.sent += 1;
        true
    }

    /// Appends the DISCONNECT a 5.0 client gets for `why`.
    /// `detail` says more than the reason code (a decoding error).
    pub fn goodbye(&self, why: Close, detail: Option<&str>, out: &mut BytesMut) {
        if self.protocol == Protocol::V5 {
            if let Some(reason) = why.reason() {
                let text = match (why, detail) {
                    (_, Some(detail)) => detail,
                    (Close::Kicked(Kick::TakenOver), _) => {
                        "another connection took the session over"
                    }
                    (Close::Kicked(Kick::Shutdown), _) => "the broker is shutting down",
                    (Close::KeepAliveTimeout | Close::Kicked(Kick::KeepAlive), _) => {
                        "nothing received within 1.5 times the keepalive"
                    }
                    (Close::Revoked, _) => "credentials withdrawn by a reload",
                    _ => "protocol error",
                };
                // Allowed on DISCONNECT whatever the client asked for.
                let d = Disconnect {
                    reason,
                    properties: Properties {
                        reason_string: Some(text.to_string()),
                        ..Properties::default()
                    },
                };
                let _ = write(&Packet::Disconnect(d), self.protocol, out);
            }
        }
    }

    /// Ends the connection: parks or ends the session, publishes the will if `why` calls
    /// for it.
    pub fn close(mut self, why: Close) {
        let will = match why {
            // The client said goodbye, or the broker itself is going away: a will is
            // for a client that vanished. A client whose credentials were withdrawn no
            // longer publishes anything.
            Close::Normal | Close::Kicked(Kick::Shutdown) | Close::Revoked => None,
            _ => self.will.take(),
        };
        let will = will.map(|w| {
            let w = *w;
            let delay = w.properties.will_delay_interval.unwrap_or(0);
            let now = Instant::now();
            let msg = Message {
                expires_at: expires_at(&w.properties, now),
                properties: forwarded(&w.properties),
                topic: w.topic,
                payload: w.payload,
                qos: w.qos,
                retain: w.retain,
                origin: self.session.mailbox.id,
            };
            (
                msg,
                if self.protocol == Protocol::V5 {
                    delay
                } else {
                    0
                },
            )
        });
        tracing::info!(client_id = %self.client_id(), reason = ?why, will = will.is_some(), "client disconnected");
        self.router
            .close_session(self.session, self.generation, will);
    }
}
