//! The client's MQTT session state, with no I/O: packets and store rows go in, packets
//! to write and store effects come out.
//!
//! The event loop (`client.rs`) owns the socket and the store; it feeds this state
//! with what it read ([`Session::handle`]), with rows fetched from the store
//! ([`Session::offer`]) and with the clock ([`Session::on_timer`]), then writes
//! [`Session::take_outbox`] and carries out [`Session::take_effects`].
//!
//! Invariants:
//! - A row leaves the inflight window only through [`Effect::Delete`] (PUBACK for QoS 1,
//!   PUBCOMP for QoS 2, written for QoS 0) or [`Effect::Drop`] (a message the broker can
//!   never take: too large, invalid topic, refused with an error reason code). Nothing
//!   else deletes a row.
//! - Inflight slots are indexed by packet id and survive reconnects: the flows the
//!   broker's session holds are resumed (PUBLISH with DUP, or PUBREL) before any new
//!   packet id is handed out. If the broker answers `session present = 0` every slot
//!   starts over as a fresh PUBLISH.
//! - A QoS 2 row's packet id is a function of its row id (`pkid_for_row`), so a flow
//!   interrupted by a crash before anything was persisted resumes under the same id and
//!   the broker deduplicates it. PUBREL goes out only after the store has persisted
//!   `pubrec` ([`Effect::PersistFlow`] then [`Session::flow_persisted`]); that record is
//!   what makes QoS 2 exactly-once across a restart of the process.
//! - Packet ids the store reports as possibly open after a crash ([`Session::sweep`]:
//!   QoS 2 flows of rows that lived in memory only, see `store/mod.rs`) get a PUBREL
//!   first thing on the first connection that resumes the broker session, and stay in
//!   use until their PUBCOMP; then [`Effect::Swept`]. A broker that holds such a flow
//!   delivers it and forgets the id, one that does not answers PUBCOMP; either way no
//!   new PUBLISH under that id can be taken for a duplicate. Without the session
//!   (`session present = 0`) there is nothing to release.
//! - Persisted flow state is trusted only while the broker session it was recorded in
//!   lives: after `session present = 0` a row that comes back with `pubrec` is first reset
//!   in the store, then published afresh (never released into a session that forgot it).
//! - PUBRELs go out in the order the PUBLISHes were first sent: a slot whose `pubrec`
//!   was persisted waits while an older slot's persist is still running. A broker that
//!   delivers QoS 2 on PUBREL (mosquitto does) forwards in PUBREL order, and the
//!   store's persists may finish in any order.
//! - The number of QoS 1/2 flows open at the broker never exceeds its receive maximum;
//!   the window for new rows is the configured size capped by it. After a reconnect the
//!   broker's open flows (PUBREC'd, not yet released) count from the start, and the
//!   resumed flows go out before the birth message and anything new (mosquitto counts
//!   a resumed session's unreleased QoS 2 flows against the new connection's quota).
//! - A transient refusal (0x97, 0x91) keeps the message in its slot and ends the
//!   connection; from then on one flow at a time is on the wire until every slot that
//!   was open at the refusal is through, so the refused message still goes out before
//!   everything younger.
//! - Topic aliases (5.0) live for one network connection and are handed out first come,
//!   up to the broker's topic alias maximum.
//! - With a payload format ([`Format`], Sparkplug B) the session is clean, the format's
//!   will replaces the status will, its subscriptions go out first and its opening
//!   messages next (once its host is online, when it waits for one), before any row;
//!   each row is formatted when it enters the window and again for each new connection
//!   or rebirth before it is sent, in window order.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::mqtt::{
    self, Ack, ConnAck, Connect, Disconnect, Packet, Properties, Protocol, Publish, QoS,
    ReasonCode, Subscribe, Subscription, SubscriptionOptions, Will,
};
use crate::store::{pkid_for_row, Stored};

use super::config::{Password, MAX_WINDOW};
use super::error::SessionError;
use super::format::{Format, Incoming};
use super::status::Counters;

/// Settings of the session, fixed for the life of the uplink.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub protocol: Protocol,
    pub client_id: String,
    pub username: Option<String>,
    pub keep_alive: u16,
    /// 5.0 session expiry interval sent in CONNECT.
    pub session_expiry: u32,
    /// The configured inflight window.
    pub inflight: u16,
    pub status_topic: String,
    pub online_payload: Bytes,
    pub offline_payload: Bytes,
    pub subscribe: Vec<String>,
    /// Largest packet we accept (announced to a 5.0 broker).
    pub max_incoming_packet: u32,
    /// How many unacknowledged QoS 1/2 publishes the broker may send us.
    pub incoming_receive_maximum: u16,
}

/// What the broker announced in CONNACK (5.0) or the 3.1.1 defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BrokerLimits {
    pub receive_maximum: u16,
    /// Largest packet the broker accepts, in bytes.
    pub maximum_packet_size: usize,
    pub maximum_qos: QoS,
    pub retain_available: bool,
    pub topic_alias_maximum: u16,
    /// Keepalive in effect: ours, or the broker's override.
    pub keep_alive: u16,
}

impl BrokerLimits {
    /// What a CONNACK's properties announce; 3.1.1 (no properties) gets the defaults.
    fn announced(p: &Properties, keep_alive: u16) -> BrokerLimits {
        BrokerLimits {
            receive_maximum: p.receive_maximum.filter(|&m| m > 0).unwrap_or(u16::MAX),
            maximum_packet_size: p
                .maximum_packet_size
                .map_or(mqtt::MAX_PACKET_SIZE, |m| m as usize),
            maximum_qos: p
                .maximum_qos
                .and_then(QoS::from_u8)
                .unwrap_or(QoS::ExactlyOnce),
            retain_available: p.retain_available.unwrap_or(true),
            topic_alias_maximum: p.topic_alias_maximum.unwrap_or(0),
            keep_alive: p.server_keep_alive.unwrap_or(keep_alive),
        }
    }

    fn defaults(keep_alive: u16) -> BrokerLimits {
        BrokerLimits {
            receive_maximum: u16::MAX,
            maximum_packet_size: mqtt::MAX_PACKET_SIZE,
            maximum_qos: QoS::ExactlyOnce,
            retain_available: true,
            topic_alias_maximum: 0,
            keep_alive,
        }
    }
}

/// Why a row was deleted without the broker having accepted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DropReason {
    /// Larger than the broker's maximum packet size.
    TooLarge { size: usize, max: usize },
    /// The topic is not a valid MQTT topic name.
    InvalidTopic(mqtt::Error),
    /// The broker answered with an error reason code (5.0).
    Rejected(ReasonCode),
}

/// Work for the event loop, in the order it must happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// The row is delivered: delete it from the store.
    Delete(i64),
    /// The row can never be delivered: delete it and count why.
    Drop { id: i64, reason: DropReason },
    /// Persist the QoS 2 flow state of a row, then call [`Session::flow_persisted`].
    PersistFlow { id: i64, pkid: u16, pubrec: bool },
    /// A message on one of the configured subscriptions.
    Incoming(Box<Publish>),
    /// The packet ids given to [`Session::sweep`] are released: tell the store.
    Swept,
}

/// The message a slot carries.
#[derive(Debug, Clone)]
struct Outgoing {
    topic: String,
    payload: Bytes,
    qos: QoS,
    retain: bool,
}

/// A row as stored, kept beside its formatted message so a payload format can format
/// it again for another connection.
#[derive(Debug, Clone)]
struct Raw {
    topic: String,
    payload: Bytes,
    created_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Row(i64),
    Birth,
    Offline,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// PUBLISH to (re)send or sent; waiting for PUBACK or PUBREC.
    Publish,
    /// PUBREC received; `pubrec` is being persisted before PUBREL may go out.
    Persisting,
    /// PUBREL to (re)send or sent; waiting for PUBCOMP.
    Release,
    /// A stale persisted `pubrec` is being cleared before a fresh PUBLISH.
    Resetting,
}

#[derive(Debug, Clone)]
struct Slot {
    /// Order of first transmission; resends keep it.
    seq: u64,
    origin: Origin,
    message: Outgoing,
    /// With a payload format: the row as stored.
    raw: Option<Raw>,
    stage: Stage,
    /// Sent (or resent) on the current connection, so it counts against the broker's
    /// receive maximum.
    on_wire: bool,
    /// Sent before, on an earlier connection or by an earlier process: set DUP.
    sent_before: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Disconnected,
    AwaitConnAck,
    Connected,
}

/// 5.0 topic aliases for one connection.
#[derive(Debug, Default)]
struct TopicAliases {
    maximum: u16,
    by_topic: HashMap<String, u16>,
}

impl TopicAliases {
    fn reset(&mut self, maximum: u16) {
        self.maximum = maximum;
        self.by_topic.clear();
    }

    /// The alias for `topic` and whether it is new (the packet must carry the topic).
    fn lookup(&mut self, topic: &str) -> Option<(u16, bool)> {
        if let Some(&alias) = self.by_topic.get(topic) {
            return Some((alias, false));
        }
        let next = u16::try_from(self.by_topic.len() + 1).ok()?;
        if next > self.maximum {
            return None;
        }
        self.by_topic.insert(topic.to_owned(), next);
        Some((next, true))
    }

    fn forget(&mut self, topic: &str) {
        self.by_topic.remove(topic);
    }
}

/// Keepalive bookkeeping for one connection.
#[derive(Debug, Clone, Copy)]
struct Keepalive {
    interval: Duration,
    last_sent: Instant,
    last_received: Instant,
    ping_sent: Option<Instant>,
}

impl Keepalive {
    fn new(interval: Duration, now: Instant) -> Keepalive {
        Keepalive {
            interval,
            last_sent: now,
            last_received: now,
            ping_sent: None,
        }
    }

    fn deadline(&self) -> Instant {
        match self.ping_sent {
            Some(at) => at + self.interval,
            None => self.last_sent.min(self.last_received) + self.interval,
        }
    }
}

/// Packet ids [`Session::room`] leaves free for status messages and SUBSCRIBE.
const FREE_PKIDS_KEPT: usize = 16;

/// A refusal that says "not now" rather than "never": 0x97 (quota exceeded) or 0x91
/// (packet identifier in use).
fn is_transient(code: ReasonCode) -> bool {
    matches!(
        code,
        ReasonCode::QUOTA_EXCEEDED | ReasonCode::PACKET_IDENTIFIER_IN_USE
    )
}

/// The packet id of a row: the one persisted with it, or the one its row id gives.
fn row_pkid(row: &Stored) -> u16 {
    row.pkid
        .filter(|&p| p != 0)
        .unwrap_or_else(|| pkid_for_row(row.id))
}

/// The upstream session: inflight window, flows, aliases, keepalive.
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    stats: Arc<Counters>,
    phase: Phase,
    limits: BrokerLimits,
    /// False once any CONNACK said `session present = 0`: flow state persisted before
    /// that is stale.
    session_continuous: bool,
    /// What the last CONNACK said.
    session_present: bool,
    /// Will flags the broker refused (0x9A / 0x9B), remembered for the next CONNECT.
    will_retain: bool,
    will_qos: QoS,
    slots: HashMap<u16, Slot>,
    seq: u64,
    on_wire: usize,
    /// QoS 2 rows whose packet id is taken by another slot; they wait for it.
    deferred: VecDeque<Stored>,
    /// Slots to (re)transmit once the broker's receive maximum allows, by `seq`.
    waiting: VecDeque<u16>,
    /// `seq` of the slots on the wire whose `pubrec` is being persisted: no younger
    /// slot's PUBREL may go out before theirs.
    persisting: BTreeSet<u64>,
    /// PUBRELs ready but held for an older persist, by `seq`.
    held_releases: BTreeMap<u64, u16>,
    /// After a transient refusal: the youngest `seq` open then. While a slot up to it
    /// remains, one flow at a time.
    throttled_through: Option<u64>,
    /// Incoming QoS 2 packet ids whose PUBREL has not arrived.
    incoming_rel: HashSet<u16>,
    /// Packet ids to release after a crash, until their PUBCOMP ([`Session::sweep`]).
    sweeping: BTreeSet<u16>,
    aliases: TopicAliases,
    keepalive: Option<Keepalive>,
    next_status_pkid: u16,
    subscribe_pkid: Option<u16>,
    /// Reason codes already logged on this connection (one line per reason).
    logged_rejections: HashSet<u8>,
    outbox: Vec<Packet>,
    effects: VecDeque<Effect>,
    /// A payload format other than JSON (Sparkplug B).
    format: Option<Box<dyn Format>>,
    /// Connected, the format's host not online yet: nothing is published.
    awaiting_host: bool,
}

impl Session {
    pub fn new(config: SessionConfig, stats: Arc<Counters>) -> Session {
        let limits = BrokerLimits::defaults(config.keep_alive);
        Session {
            config,
            stats,
            phase: Phase::Disconnected,
            limits,
            session_continuous: true,
            session_present: false,
            will_retain: true,
            will_qos: QoS::AtLeastOnce,
            slots: HashMap::new(),
            seq: 0,
            on_wire: 0,
            deferred: VecDeque::new(),
            waiting: VecDeque::new(),
            persisting: BTreeSet::new(),
            held_releases: BTreeMap::new(),
            throttled_through: None,
            incoming_rel: HashSet::new(),
            sweeping: BTreeSet::new(),
            aliases: TopicAliases::default(),
            keepalive: None,
            next_status_pkid: u16::MAX,
            subscribe_pkid: None,
            logged_rejections: HashSet::new(),
            outbox: Vec::new(),
            effects: VecDeque::new(),
            format: None,
            awaiting_host: false,
        }
    }

    /// Packet ids that QoS 2 flows cut by a crash may hold at the broker: released
    /// (PUBREL) on the first connection that resumes the session, before anything else.
    /// At most all ids but a few (the store gives far fewer), so some stay free.
    pub fn sweep(&mut self, mut pkids: Vec<u16>) {
        pkids.truncate(usize::from(u16::MAX) - 2 * FREE_PKIDS_KEPT);
        self.sweeping.extend(pkids);
    }

    /// Sends rows in `format` instead of as stored (see the module invariants).
    pub fn set_format(&mut self, format: Box<dyn Format>) {
        self.format = Some(format);
    }

    /// The CONNECT packet for a new connection: persistent session, will, credentials.
    pub fn connect(&mut self, password: Option<Password>) -> Packet {
        self.phase = Phase::AwaitConnAck;
        let v5 = self.config.protocol == Protocol::V5;
        let clean = self.format.is_some();
        let mut properties = Properties::default();
        if v5 {
            properties.session_expiry_interval =
                Some(if clean { 0 } else { self.config.session_expiry });
            properties.receive_maximum = Some(self.config.incoming_receive_maximum);
            properties.maximum_packet_size = Some(self.config.max_incoming_packet);
        }
        let will = match &mut self.format {
            Some(format) => format.will(),
            None => Will {
                topic: self.config.status_topic.clone(),
                payload: self.config.offline_payload.clone(),
                qos: self.will_qos,
                retain: self.will_retain,
                properties: Properties::default(),
            },
        };
        Packet::Connect(Connect {
            protocol: self.config.protocol,
            clean_start: clean,
            keep_alive: self.config.keep_alive,
            client_id: self.config.client_id.clone(),
            will: Some(will),
            username: self.config.username.clone(),
            password: password.map(Password::into_bytes),
            properties,
        })
    }

    /// Feeds one packet read from the broker.
    ///
    /// # Errors
    /// The connection must be closed: CONNACK refused, DISCONNECT from the broker, or a
    /// packet that breaks the protocol.
    pub fn handle(&mut self, packet: Packet, now: Instant) -> Result<(), SessionError> {
        if let Some(keepalive) = &mut self.keepalive {
            keepalive.last_received = now;
        }
        match packet {
            Packet::ConnAck(ack) => self.on_connack(ack, now),
            _ if self.phase != Phase::Connected => Err(SessionError::Protocol(
                "the broker sent a packet before CONNACK",
            )),
            Packet::PubAck(ack) => self.on_puback(ack, now),
            Packet::PubRec(ack) => self.on_pubrec(ack, now),
            Packet::PubComp(ack) => {
                self.on_pubcomp(ack, now);
                Ok(())
            }
            Packet::PubRel(ack) => {
                self.incoming_rel.remove(&ack.pkid);
                self.send(Packet::PubComp(Ack::new(ack.pkid)), now);
                Ok(())
            }
            Packet::Publish(publish) => self.on_publish(publish, now),
            Packet::SubAck(ack) => {
                if self.subscribe_pkid == Some(ack.pkid) {
                    self.subscribe_pkid = None;
                    for (filter, code) in self.config.subscribe.iter().zip(&ack.reasons) {
                        if !code.is_success() {
                            tracing::warn!(
                                filter,
                                reason = code.0,
                                "the upstream broker refused a subscription"
                            );
                        }
                    }
                }
                Ok(())
            }
            Packet::PingResp => {
                if let Some(keepalive) = &mut self.keepalive {
                    keepalive.ping_sent = None;
                }
                Ok(())
            }
            Packet::Disconnect(Disconnect { reason, properties }) => {
                Err(SessionError::ServerDisconnect {
                    code: reason.0,
                    reason: properties.reason_string.unwrap_or_default(),
                })
            }
            Packet::UnsubAck(_) => Ok(()),
            Packet::Auth(_) => Err(SessionError::Protocol(
                "the broker started enhanced authentication, which is not configured",
            )),
            Packet::Connect(_)
            | Packet::Subscribe(_)
            | Packet::Unsubscribe(_)
            | Packet::PingReq => Err(SessionError::Protocol(
                "the broker sent a packet only clients send",
            )),
        }
    }

    fn on_connack(&mut self, ack: ConnAck, now: Instant) -> Result<(), SessionError> {
        if self.phase != Phase::AwaitConnAck {
            return Err(SessionError::Protocol("a second CONNACK"));
        }
        if !ack.code.is_success() {
            self.phase = Phase::Disconnected;
            match ack.code {
                ReasonCode::RETAIN_NOT_SUPPORTED => self.will_retain = false,
                ReasonCode::QOS_NOT_SUPPORTED => self.will_qos = QoS::AtMostOnce,
                _ => {}
            }
            return Err(SessionError::Refused {
                code: ack.code.0,
                reason: ack.properties.reason_string.unwrap_or_default(),
                v5: self.config.protocol == Protocol::V5,
            });
        }
        self.limits = BrokerLimits::announced(&ack.properties, self.config.keep_alive);
        let keep_alive = self.limits.keep_alive;
        self.phase = Phase::Connected;
        self.aliases.reset(self.limits.topic_alias_maximum);
        self.logged_rejections.clear();
        self.keepalive =
            (keep_alive > 0).then(|| Keepalive::new(Duration::from_secs(keep_alive.into()), now));
        self.on_wire = 0;
        self.session_present = ack.session_present;
        if !ack.session_present {
            self.session_continuous = false;
            self.incoming_rel.clear();
        }
        self.slots
            .retain(|_, slot| matches!(slot.origin, Origin::Row(_)));
        self.release_swept(ack.session_present, now);
        self.resume_slots(ack.session_present);
        if let Some(format) = &self.format {
            self.awaiting_host = format.waits_for_host();
            self.subscribe(now);
            if !self.awaiting_host {
                self.births(now);
            }
        } else {
            self.transmit_waiting(now);
            self.publish_status(Origin::Birth, now);
            self.subscribe(now);
        }
        self.retry_deferred(now);
        Ok(())
    }

    /// PUBREL for every packet id a crash may have left open, ahead of every other
    /// packet: the broker takes them in order, so each open flow is released before a
    /// PUBLISH could reuse its id. Without the session there is nothing to release.
    fn release_swept(&mut self, session_present: bool, now: Instant) {
        if self.sweeping.is_empty() {
            return;
        }
        if !session_present {
            self.sweeping.clear();
            self.effects.push_back(Effect::Swept);
            return;
        }
        tracing::info!(
            packet_ids = self.sweeping.len(),
            "releasing the QoS 2 flows the agent may have left open upstream when it stopped \
             without a shutdown"
        );
        let pkids: Vec<u16> = self.sweeping.iter().copied().collect();
        for pkid in pkids {
            self.send(Packet::PubRel(Ack::new(pkid)), now);
        }
    }

    /// The format's opening messages (QoS 0), then the waiting rows formatted for them.
    fn births(&mut self, now: Instant) {
        let Some(format) = &mut self.format else {
            return;
        };
        for (topic, payload) in format.births() {
            let message = Outgoing {
                topic,
                payload,
                qos: QoS::AtMostOnce,
                retain: false,
            };
            self.publish_now(&message, 0, false, None, now);
        }
        self.reformat_waiting();
        self.transmit_waiting(now);
    }

    /// Formats the rows not on the wire again, in the order they will go out.
    fn reformat_waiting(&mut self) {
        let Some(format) = &mut self.format else {
            return;
        };
        for &pkid in &self.waiting {
            let Some(slot) = self.slots.get_mut(&pkid) else {
                continue;
            };
            let (Origin::Row(id), Some(raw)) = (slot.origin, &slot.raw) else {
                continue;
            };
            match format.row(&raw.topic, &raw.payload, raw.created_ms) {
                Some((topic, payload)) => {
                    slot.message.topic = topic;
                    slot.message.payload = payload;
                }
                None => {
                    self.slots.remove(&pkid);
                    self.effects.push_back(Effect::Delete(id));
                }
            }
        }
    }

    /// Queues every slot for the new connection, oldest first. With the session
    /// present, flows the broker holds past PUBREC count against its quota at once;
    /// without it, persisted `pubrec`s are reset before a fresh PUBLISH.
    fn resume_slots(&mut self, session_present: bool) {
        let mut resend: Vec<(u64, u16)> = self
            .slots
            .iter()
            .map(|(&pkid, slot)| (slot.seq, pkid))
            .collect();
        resend.sort_unstable();
        self.waiting.clear();
        for (_, pkid) in resend {
            let Some(slot) = self.slots.get_mut(&pkid) else {
                continue;
            };
            match (session_present, slot.stage, slot.origin) {
                (true, Stage::Persisting, _) if slot.sent_before => {
                    slot.on_wire = true;
                    self.on_wire += 1;
                    self.persisting.insert(slot.seq);
                    continue;
                }
                (true, _, _) => {}
                (false, Stage::Release | Stage::Persisting, Origin::Row(id)) => {
                    slot.sent_before = false;
                    slot.stage = Stage::Resetting;
                    self.effects.push_back(Effect::PersistFlow {
                        id,
                        pkid,
                        pubrec: false,
                    });
                }
                (false, _, _) => slot.sent_before = false,
            }
            self.waiting.push_back(pkid);
        }
    }

    /// SUBSCRIBE to the configured filters, at QoS 1.
    fn subscribe(&mut self, now: Instant) {
        if self.config.subscribe.is_empty() {
            return;
        }
        let pkid = self.free_pkid();
        self.subscribe_pkid = Some(pkid);
        let filters = self
            .config
            .subscribe
            .iter()
            .map(|filter| Subscription {
                filter: filter.clone(),
                options: SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    ..SubscriptionOptions::default()
                },
            })
            .collect();
        self.send(
            Packet::Subscribe(Subscribe {
                pkid,
                filters,
                properties: Properties::default(),
            }),
            now,
        );
    }

    /// The connection is gone. Slots stay for the next connection; aliases and
    /// keepalive die with this one.
    pub fn disconnected(&mut self) {
        self.phase = Phase::Disconnected;
        self.awaiting_host = false;
        self.keepalive = None;
        self.on_wire = 0;
        self.subscribe_pkid = None;
        self.waiting.clear();
        self.persisting.clear();
        self.held_releases.clear();
        self.outbox.clear();
        for slot in self.slots.values_mut() {
            if slot.on_wire {
                slot.sent_before = true;
            }
            slot.on_wire = false;
        }
    }

    /// True between a successful CONNACK and the loss of the connection.
    pub fn is_connected(&self) -> bool {
        self.phase == Phase::Connected
    }

    /// Whether the broker resumed our session at the last CONNACK.
    pub fn session_present(&self) -> bool {
        self.session_present
    }

    /// What the broker announced on the current (or last) connection.
    pub fn limits(&self) -> BrokerLimits {
        self.limits
    }

    /// How many more rows [`Session::offer`] may take now.
    pub fn room(&self) -> usize {
        if self.phase != Phase::Connected || self.awaiting_host {
            return 0;
        }
        let window = usize::from(
            self.config
                .inflight
                .min(self.limits.receive_maximum)
                .min(MAX_WINDOW),
        );
        let held = self.slots.len() + self.deferred.len();
        // Packet ids stay free for the status messages and SUBSCRIBE whatever is
        // being swept, so `free_pkid` always finds one.
        let ids_left =
            usize::from(u16::MAX).saturating_sub(held + self.sweeping.len() + FREE_PKIDS_KEPT);
        window.saturating_sub(held).min(ids_left)
    }

    /// Rows the session holds (in the window or deferred), for release on shutdown.
    pub fn held_rows(&self) -> Vec<i64> {
        let mut rows: Vec<(u64, i64)> = self
            .slots
            .values()
            .filter_map(|slot| match slot.origin {
                Origin::Row(id) => Some((slot.seq, id)),
                _ => None,
            })
            .collect();
        rows.sort_unstable();
        rows.into_iter()
            .map(|(_, id)| id)
            .chain(self.deferred.iter().map(|row| row.id))
            .collect()
    }

    /// Takes a row fetched from the store into the window and publishes it (or its
    /// PUBREL, when its QoS 2 flow resumes past PUBREC).
    pub fn offer(&mut self, row: Stored, now: Instant) {
        if let Err(e) = mqtt::topic::validate_topic_name(&row.message.topic) {
            self.effects.push_back(Effect::Drop {
                id: row.id,
                reason: DropReason::InvalidTopic(e),
            });
            return;
        }
        let qos = row.message.qos.min(self.limits.maximum_qos);
        let mut message = Outgoing {
            topic: row.message.topic.clone(),
            payload: row.message.payload.clone(),
            qos,
            retain: row.message.retain && self.limits.retain_available,
        };
        let raw = match &mut self.format {
            None => None,
            Some(format) => {
                let stored = &row.message;
                match format.row(&stored.topic, &stored.payload, stored.created_ms) {
                    Some((topic, payload)) => {
                        message.topic = topic;
                        message.payload = payload;
                    }
                    None => {
                        self.effects.push_back(Effect::Delete(row.id));
                        return;
                    }
                }
                Some(Raw {
                    topic: stored.topic.clone(),
                    payload: stored.payload.clone(),
                    created_ms: stored.created_ms,
                })
            }
        };
        let resumable = self.session_continuous && row.pkid.is_some_and(|p| p != 0);
        if qos == QoS::AtMostOnce && !(row.pubrec && resumable) {
            if self.publish_now(&message, 0, false, Some(row.id), now) {
                self.stats.published.fetch_add(1, Ordering::Relaxed);
                self.effects.push_back(Effect::Delete(row.id));
            }
            return;
        }
        let pkid = row_pkid(&row);
        let pkid = if !self.pkid_in_use(pkid) {
            pkid
        } else if qos == QoS::AtLeastOnce && !row.pubrec {
            self.free_pkid()
        } else {
            // The broker may hold a QoS 2 flow under this id; wait for our slot with
            // the same id to finish rather than collide.
            self.deferred.push_back(row);
            return;
        };
        let stage = match (row.pubrec, resumable) {
            (true, true) => Stage::Release,
            (true, false) => Stage::Resetting,
            (false, _) => Stage::Publish,
        };
        self.seq += 1;
        self.slots.insert(
            pkid,
            Slot {
                seq: self.seq,
                origin: Origin::Row(row.id),
                message,
                raw,
                stage,
                on_wire: false,
                sent_before: resumable,
            },
        );
        if stage == Stage::Resetting {
            self.effects.push_back(Effect::PersistFlow {
                id: row.id,
                pkid,
                pubrec: false,
            });
            return;
        }
        if self.can_transmit() {
            self.transmit(pkid, now);
        } else {
            self.waiting.push_back(pkid);
        }
    }

    /// The store has persisted what [`Effect::PersistFlow`] asked for.
    pub fn flow_persisted(&mut self, pkid: u16, pubrec: bool, now: Instant) {
        let Some(slot) = self.slots.get_mut(&pkid) else {
            return;
        };
        match (slot.stage, pubrec) {
            (Stage::Persisting, true) => {
                slot.stage = Stage::Release;
                self.persisting.remove(&slot.seq);
            }
            (Stage::Resetting, false) => {
                slot.stage = Stage::Publish;
                slot.sent_before = false;
            }
            _ => return,
        }
        if self.phase != Phase::Connected {
            return;
        }
        if slot.on_wire && slot.stage == Stage::Release {
            self.held_releases.insert(slot.seq, pkid);
            self.release_in_order(now);
        } else if self.can_transmit() {
            self.transmit(pkid, now);
        } else {
            self.waiting.push_back(pkid);
        }
    }

    /// Sends the held PUBRELs that no older persist is waiting for, oldest first.
    fn release_in_order(&mut self, now: Instant) {
        while let Some((&seq, &pkid)) = self.held_releases.first_key_value() {
            if self.persisting.first().is_some_and(|&older| older < seq) {
                return;
            }
            self.held_releases.pop_first();
            let live = self
                .slots
                .get(&pkid)
                .is_some_and(|slot| slot.seq == seq && slot.stage == Stage::Release);
            if live {
                self.send(Packet::PubRel(Ack::new(pkid)), now);
            }
        }
    }

    /// Whether the PUBREL of `slot` went out on this connection (or is due to).
    fn released(&self, slot: &Slot) -> bool {
        slot.on_wire && slot.stage == Stage::Release && !self.held_releases.contains_key(&slot.seq)
    }

    /// Publishes the offline status (graceful shutdown); its packet id, to wait for
    /// with [`Session::is_pending`]. `None` when not connected or it cannot be sent.
    pub fn publish_offline(&mut self, now: Instant) -> Option<u16> {
        if self.phase != Phase::Connected {
            return None;
        }
        self.publish_status(Origin::Offline, now)
    }

    /// Whether the slot `pkid` still waits for its acknowledgement.
    pub fn is_pending(&self, pkid: u16) -> bool {
        self.slots.contains_key(&pkid)
    }

    /// The DISCONNECT of a graceful shutdown (the broker discards the will).
    pub fn disconnect(&mut self) -> Packet {
        self.phase = Phase::Disconnected;
        Packet::Disconnect(Disconnect::default())
    }

    /// When [`Session::on_timer`] must run next.
    pub fn next_timer(&self) -> Option<Instant> {
        self.keepalive.map(|k| k.deadline())
    }

    /// Sends PINGREQ when the connection has been quiet for the keepalive interval.
    ///
    /// # Errors
    /// [`SessionError::PingTimeout`] when a PINGREQ got no answer within the interval: the
    /// connection is half-open.
    pub fn on_timer(&mut self, now: Instant) -> Result<(), SessionError> {
        let Some(keepalive) = self.keepalive else {
            return Ok(());
        };
        if now < keepalive.deadline() {
            return Ok(());
        }
        if keepalive.ping_sent.is_some() {
            return Err(SessionError::PingTimeout(keepalive.interval));
        }
        self.send(Packet::PingReq, now);
        if let Some(keepalive) = &mut self.keepalive {
            keepalive.ping_sent = Some(now);
        }
        Ok(())
    }

    /// Packets to write, in order.
    pub fn take_outbox(&mut self) -> std::vec::Drain<'_, Packet> {
        self.outbox.drain(..)
    }

    /// Store work, in order.
    pub fn take_effects(&mut self) -> std::collections::vec_deque::Drain<'_, Effect> {
        self.effects.drain(..)
    }

    fn send(&mut self, packet: Packet, now: Instant) {
        self.outbox.push(packet);
        if let Some(keepalive) = &mut self.keepalive {
            keepalive.last_sent = now;
        }
    }

    fn can_transmit(&self) -> bool {
        if self.awaiting_host {
            return false;
        }
        let limit = if self.throttled_through.is_some() {
            1
        } else {
            usize::from(self.limits.receive_maximum)
        };
        self.on_wire < limit
    }

    /// A transient refusal of slot `pkid`: it stays for the next connection, and one
    /// flow at a time goes out until everything open now is through.
    fn throttle(&mut self, pkid: u16, code: ReasonCode) -> SessionError {
        self.stats.throttled.fetch_add(1, Ordering::Relaxed);
        if self.throttled_through.is_none() {
            tracing::warn!(
                pkid,
                reason = code.0,
                "the upstream broker refused a message for now; reconnecting and sending \
                 one message at a time until the refused ones are through"
            );
        }
        self.throttled_through = Some(self.seq);
        SessionError::Throttled { code: code.0 }
    }

    /// Ends the one-at-a-time mode once no slot open at the refusal remains.
    fn lift_throttle(&mut self) {
        if let Some(through) = self.throttled_through {
            if self.slots.values().all(|slot| slot.seq > through) {
                self.throttled_through = None;
                tracing::info!("the refused messages are through; the full window is back");
            }
        }
    }

    fn pkid_in_use(&self, pkid: u16) -> bool {
        self.slots.contains_key(&pkid)
            || self.subscribe_pkid == Some(pkid)
            || self.sweeping.contains(&pkid)
    }

    /// A packet id nothing uses, for colliding QoS 1 rows, status messages and
    /// SUBSCRIBE. Counting down from 65535 keeps clear of the ids young row ids map to.
    /// The loop ends: the window holds fewer than 65535 slots.
    fn free_pkid(&mut self) -> u16 {
        loop {
            let pkid = self.next_status_pkid;
            self.next_status_pkid = match self.next_status_pkid {
                1 => u16::MAX,
                n => n - 1,
            };
            if !self.pkid_in_use(pkid) {
                return pkid;
            }
        }
    }

    fn publish_status(&mut self, origin: Origin, now: Instant) -> Option<u16> {
        let payload = match origin {
            Origin::Offline => self.config.offline_payload.clone(),
            _ => self.config.online_payload.clone(),
        };
        let mut message = Outgoing {
            topic: self.config.status_topic.clone(),
            payload,
            qos: QoS::AtLeastOnce.min(self.limits.maximum_qos),
            retain: self.limits.retain_available,
        };
        if let Some(format) = &mut self.format {
            (message.topic, message.payload) = format.farewell();
            message.retain = false;
        }
        if message.qos == QoS::AtMostOnce {
            self.publish_now(&message, 0, false, None, now);
            return None;
        }
        let pkid = self.free_pkid();
        self.seq += 1;
        self.slots.insert(
            pkid,
            Slot {
                seq: self.seq,
                origin,
                message,
                raw: None,
                stage: Stage::Publish,
                on_wire: false,
                sent_before: false,
            },
        );
        if self.can_transmit() {
            self.transmit(pkid, now);
        } else {
            self.waiting.push_back(pkid);
        }
        self.slots.contains_key(&pkid).then_some(pkid)
    }

    /// Puts a slot's next packet on the wire.
    fn transmit(&mut self, pkid: u16, now: Instant) {
        let Some(slot) = self.slots.get(&pkid) else {
            return;
        };
        match slot.stage {
            Stage::Publish => {
                let (message, dup, origin) = (slot.message.clone(), slot.sent_before, slot.origin);
                let row = match origin {
                    Origin::Row(id) => Some(id),
                    _ => None,
                };
                if !self.publish_now(&message, pkid, dup, row, now) {
                    self.slots.remove(&pkid);
                    self.retry_deferred(now);
                    return;
                }
                if row.is_some() {
                    let counter = if dup {
                        &self.stats.resent
                    } else {
                        &self.stats.published
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }
            Stage::Release => {
                // Through the same queue as a fresh PUBREL: an older flow still
                // persisting its `pubrec` goes first.
                let seq = slot.seq;
                self.held_releases.insert(seq, pkid);
            }
            Stage::Persisting | Stage::Resetting => return,
        }
        if let Some(slot) = self.slots.get_mut(&pkid) {
            slot.on_wire = true;
            self.on_wire += 1;
        }
        self.release_in_order(now);
    }

    /// Builds and queues a PUBLISH, with a topic alias when one fits. False (and the
    /// row dropped) when it exceeds the broker's maximum packet size.
    fn publish_now(
        &mut self,
        message: &Outgoing,
        pkid: u16,
        dup: bool,
        row: Option<i64>,
        now: Instant,
    ) -> bool {
        let alias = if self.config.protocol == Protocol::V5 {
            self.aliases.lookup(&message.topic)
        } else {
            None
        };
        let publish = Publish {
            dup,
            qos: message.qos,
            retain: message.retain,
            topic: match alias {
                Some((_, false)) => String::new(),
                _ => message.topic.clone(),
            },
            pkid,
            payload: message.payload.clone(),
            properties: Properties {
                topic_alias: alias.map(|(alias, _)| alias),
                ..Properties::default()
            },
        };
        // Only a topic alias is set, and that property is always valid in PUBLISH.
        let size = mqtt::publish_size(&publish, self.config.protocol).unwrap_or(usize::MAX);
        let max = self.limits.maximum_packet_size.min(mqtt::MAX_PACKET_SIZE);
        if size > max {
            if let Some((_, true)) = alias {
                self.aliases.forget(&message.topic);
            }
            if let Some(id) = row {
                self.effects.push_back(Effect::Drop {
                    id,
                    reason: DropReason::TooLarge { size, max },
                });
            }
            return false;
        }
        self.send(Packet::Publish(publish), now);
        true
    }

    fn transmit_waiting(&mut self, now: Instant) {
        while self.can_transmit() {
            let Some(pkid) = self.waiting.pop_front() else {
                break;
            };
            self.transmit(pkid, now);
        }
    }

    fn retry_deferred(&mut self, now: Instant) {
        for _ in 0..self.deferred.len() {
            let Some(row) = self.deferred.pop_front() else {
                break;
            };
            if self.pkid_in_use(row_pkid(&row)) {
                self.deferred.push_back(row);
            } else {
                self.offer(row, now);
            }
        }
    }

    /// Removes a finished slot and lets waiting work move up.
    fn finish(&mut self, pkid: u16, now: Instant) -> Option<Slot> {
        let slot = self.slots.remove(&pkid)?;
        if slot.on_wire {
            self.on_wire -= 1;
        }
        self.lift_throttle();
        self.transmit_waiting(now);
        self.retry_deferred(now);
        Some(slot)
    }

    fn row_done(&mut self, slot: &Slot, code: ReasonCode) {
        let Origin::Row(id) = slot.origin else {
            return;
        };
        if code.is_success() {
            self.effects.push_back(Effect::Delete(id));
            return;
        }
        if self.logged_rejections.insert(code.0) {
            tracing::warn!(
                topic = %slot.message.topic,
                reason = code.0,
                "the upstream broker refused a message; such messages are dropped and counted"
            );
        }
        self.effects.push_back(Effect::Drop {
            id,
            reason: DropReason::Rejected(code),
        });
    }

    fn on_puback(&mut self, ack: Ack, now: Instant) -> Result<(), SessionError> {
        let expected = self.slots.get(&ack.pkid).is_some_and(|slot| {
            slot.on_wire && slot.stage == Stage::Publish && slot.message.qos == QoS::AtLeastOnce
        });
        if !expected {
            tracing::debug!(pkid = ack.pkid, "PUBACK for no QoS 1 publish in flight");
            return Ok(());
        }
        if is_transient(ack.reason) {
            return Err(self.throttle(ack.pkid, ack.reason));
        }
        if let Some(slot) = self.finish(ack.pkid, now) {
            self.row_done(&slot, ack.reason);
        }
        Ok(())
    }

    fn on_pubrec(&mut self, ack: Ack, now: Instant) -> Result<(), SessionError> {
        let Some(slot) = self.slots.get_mut(&ack.pkid) else {
            // Let the broker finish a flow we no longer know.
            let mut rel = Ack::new(ack.pkid);
            if self.config.protocol == Protocol::V5 {
                rel.reason = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND;
            }
            self.send(Packet::PubRel(rel), now);
            return Ok(());
        };
        match slot.stage {
            Stage::Publish if slot.on_wire && slot.message.qos == QoS::ExactlyOnce => {
                if is_transient(ack.reason) {
                    return Err(self.throttle(ack.pkid, ack.reason));
                }
                if !ack.reason.is_success() {
                    if let Some(slot) = self.finish(ack.pkid, now) {
                        self.row_done(&slot, ack.reason);
                    }
                    return Ok(());
                }
                slot.stage = Stage::Persisting;
                self.persisting.insert(slot.seq);
                if let Origin::Row(id) = slot.origin {
                    self.effects.push_back(Effect::PersistFlow {
                        id,
                        pkid: ack.pkid,
                        pubrec: true,
                    });
                }
            }
            Stage::Release if slot.on_wire => {
                // A repeated PUBREC: answer it, unless the PUBREL is still held.
                if !self.held_releases.contains_key(&slot.seq) {
                    self.send(Packet::PubRel(Ack::new(ack.pkid)), now);
                }
            }
            _ => tracing::debug!(pkid = ack.pkid, "PUBREC out of order, ignored"),
        }
        Ok(())
    }

    fn on_pubcomp(&mut self, ack: Ack, now: Instant) {
        if self.sweeping.remove(&ack.pkid) {
            if self.sweeping.is_empty() {
                self.effects.push_back(Effect::Swept);
            }
            self.retry_deferred(now);
            return;
        }
        let expected = self
            .slots
            .get(&ack.pkid)
            .is_some_and(|slot| self.released(slot));
        if !expected {
            tracing::debug!(pkid = ack.pkid, "PUBCOMP for no PUBREL in flight");
            return;
        }
        if ack.reason == ReasonCode::PACKET_IDENTIFIER_NOT_FOUND
            && self.logged_rejections.insert(ack.reason.0)
        {
            tracing::warn!(
                pkid = ack.pkid,
                "the upstream broker had no record of a QoS 2 flow being released; its \
                 session state was lost"
            );
        }
        if let Some(slot) = self.finish(ack.pkid, now) {
            // Whatever the reason code, the flow is over and the broker has the message
            // or never will: PUBCOMP ends it.
            self.row_done(&slot, ReasonCode::SUCCESS);
        }
    }

    fn on_publish(&mut self, publish: Publish, now: Instant) -> Result<(), SessionError> {
        let (pkid, qos) = (publish.pkid, publish.qos);
        let fresh = qos != QoS::ExactlyOnce || !self.incoming_rel.contains(&pkid);
        if qos == QoS::ExactlyOnce && fresh {
            if self.incoming_rel.len() >= usize::from(self.config.incoming_receive_maximum) {
                return Err(SessionError::Protocol(
                    "the broker exceeded our receive maximum",
                ));
            }
            self.incoming_rel.insert(pkid);
        }
        let delivered = if fresh {
            self.deliver(publish, now)
        } else {
            Ok(())
        };
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.send(Packet::PubAck(Ack::new(pkid)), now),
            QoS::ExactlyOnce => self.send(Packet::PubRec(Ack::new(pkid)), now),
        }
        delivered
    }

    /// Hands a new incoming message to the agent, or to the format when it is one of its.
    fn deliver(&mut self, publish: Publish, now: Instant) -> Result<(), SessionError> {
        let action = match &mut self.format {
            Some(format) => format.incoming(&publish),
            None => Incoming::Forward,
        };
        match action {
            Incoming::Forward => self.effects.push_back(Effect::Incoming(Box::new(publish))),
            Incoming::Consumed => {}
            // While waiting for the host nothing is born, not even on request; an
            // offline host (its retained STATE) is what the session waits out.
            Incoming::Rebirth | Incoming::HostOffline if self.awaiting_host => {}
            Incoming::Rebirth => self.births(now),
            Incoming::HostOnline => {
                if self.awaiting_host {
                    self.awaiting_host = false;
                    self.births(now);
                    self.retry_deferred(now);
                }
            }
            Incoming::HostOffline => return Err(SessionError::HostOffline),
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "format_tests.rs"]
mod format_tests;
