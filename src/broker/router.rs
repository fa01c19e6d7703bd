//! Routing, the broker's shared state: the subscription tree, the retained store, the
//! access policy and the counters, plus the [`Registry`] of sessions. Connections and
//! the in-process publisher call into it; it does no socket I/O.
//!
//! The registry keeps the sessions; this file does what a session's start and end mean
//! for routing: subscriptions in and out of the tree, wills published (now or by their
//! delay timer), persisted records written and cleared.
//!
//! Invariants:
//! - Routing a message never waits on a subscriber: it matches under a read lock of the
//!   tree, releases it, then pushes into each target's bounded mailbox.
//! - A client gets one copy of a message however many of its filters match, at the
//!   highest granted QoS, with every matching subscription identifier (3.1.1 requires
//!   it, 5.0 allows it). A shared group contributes one member per message.
//! - A session's subscriptions are in the tree as long as the session exists, online or
//!   parked, so an offline persistent session keeps queueing.
//! - A message is encoded once per distinct wire form (protocol, QoS, retain) and the
//!   bytes are shared among subscribers.
//! - With a persistence file, a persistent session's record is written when it
//!   subscribes and when it goes offline, and its mailbox is journaled from then on
//!   (see `persist.rs`); a session that ends for good is forgotten with its rows.
//! - Memory is bounded broker-wide: at most `max_sessions` parked sessions (the one
//!   offline longest ends first), and the queue budget of `session.rs`. What a limit
//!   takes is counted in [`BrokerStats`] and logged once per state change (see
//!   `sys.rs`), never once per message or session.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::auth::{Identity, Policy};
use super::config::BrokerConfig;
use super::persist::{Loaded, Persister, QueuedRecord, SessionRecord};
use super::registry::{DueWill, Ended, Opened, Registry, Released};
use super::retained::RetainedStore;
use super::session::{
    Budget, Delivery, Kick, Limits, LogSink, Mailbox, Message, Pushed, Session, SubRecord, Target,
    NEVER_EXPIRES,
};
use super::tree::{Subscriber, SubscriptionTree};
use crate::mqtt::topic;
use crate::mqtt::{
    EncodedPublish, Protocol, QoS, ReasonCode, RetainHandling, Subscription, Unsubscribe,
};

/// A snapshot of the broker's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BrokerStats {
    /// Clients connected now.
    pub clients_connected: usize,
    /// Sessions, connected or not (persistent ones wait offline).
    pub sessions: usize,
    /// PUBLISH packets received from clients.
    pub messages_received: u64,
    /// PUBLISH packets sent to clients.
    pub messages_sent: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    /// Subscriptions in the tree.
    pub subscriptions: usize,
    /// Retained messages stored.
    pub retained: usize,
    /// Messages dropped because a client's queue was full (or a message was larger than
    /// the client accepts).
    pub dropped: u64,
    /// Messages for offline sessions dropped by the broker-wide queue budget
    /// (`max_queued_bytes_total`): new ones or, with `drop_oldest`, older ones.
    pub dropped_budget: u64,
    /// Bytes queued now, all sessions (as `max_queued_bytes_total` counts them).
    pub queued_bytes: usize,
    /// Offline sessions ended because their expiry passed.
    pub sessions_expired: u64,
    /// Offline sessions ended because `max_sessions` were offline.
    pub sessions_evicted: u64,
    /// Queued messages lost with sessions that expired or were evicted.
    pub dropped_with_sessions: u64,
    /// Queued messages dropped because their expiry interval passed.
    pub expired: u64,
    /// PUBLISH packets refused by the ACL or the protected topic trees.
    pub denied: u64,
    /// Retained messages for new topics not kept because the store was full.
    pub retained_refused: u64,
    pub uptime: Duration,
}

/// Settings the connections read, taken from the configuration.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub limits: Limits,
    pub max_inflight: u16,
    pub max_packet_size: u32,
    pub max_topic_alias: u16,
    pub max_keep_alive: Option<u16>,
    pub connect_timeout: Duration,
    /// Cap on session expiry, seconds.
    pub max_session_expiry: u32,
    /// Expiry of an offline 3.1.1 persistent session, seconds (already capped).
    pub v311_session_expiry: u32,
    pub max_sessions: usize,
    pub max_queued_bytes_total: usize,
    pub queue_policy: super::config::QueuePolicy,
    pub max_subscriptions: usize,
    pub max_retained: usize,
}

impl Settings {
    /// How long a session of `protocol` asking for `expiry` seconds stays parked: 3.1.1
    /// has no expiry of its own ("never"), so it gets the broker's.
    pub fn offline_expiry(&self, protocol: Protocol, expiry: u32) -> u32 {
        match (protocol, expiry) {
            (_, 0) => 0,
            (Protocol::V311, NEVER_EXPIRES) => self.v311_session_expiry,
            _ => expiry.min(self.max_session_expiry),
        }
    }

    pub fn from_config(config: &BrokerConfig) -> Settings {
        Settings {
            limits: Limits {
                max_messages: config.max_queued_messages,
                max_bytes: config.max_queued_bytes,
            },
            max_inflight: config.max_inflight_messages,
            max_packet_size: config.max_packet_size,
            max_topic_alias: config.max_topic_alias,
            max_keep_alive: config.max_keep_alive,
            connect_timeout: Duration::from_secs(config.connect_timeout_secs),
            max_session_expiry: config
                .persistent_session_expiry_secs
                .map_or(NEVER_EXPIRES, |s| u32::try_from(s).unwrap_or(NEVER_EXPIRES)),
            v311_session_expiry: u32::try_from(config.v311_session_expiry_secs)
                .unwrap_or(NEVER_EXPIRES)
                .min(
                    config
                        .persistent_session_expiry_secs
                        .map_or(NEVER_EXPIRES, |s| u32::try_from(s).unwrap_or(NEVER_EXPIRES)),
                ),
            max_sessions: config.max_sessions,
            max_queued_bytes_total: config.max_queued_bytes_total,
            queue_policy: config.queue_budget_policy,
            max_subscriptions: config.max_subscriptions_per_client,
            max_retained: config.max_retained_messages,
        }
    }
}

/// Counters behind [`BrokerStats`]. Connections add in batches.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub messages_received: AtomicU64,
    pub messages_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub dropped: AtomicU64,
    pub expired: AtomicU64,
    pub denied: AtomicU64,
    pub retained_refused: AtomicU64,
    pub sessions_expired: AtomicU64,
    pub sessions_evicted: AtomicU64,
    pub dropped_with_sessions: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// The broker's shared state.
#[derive(Debug)]
pub(crate) struct Router {
    pub settings: Settings,
    tree: RwLock<SubscriptionTree<Target>>,
    retained: RwLock<RetainedStore<Arc<Message>>>,
    registry: Registry,
    budget: Arc<Budget>,
    policy: RwLock<Arc<Policy>>,
    policy_generation: AtomicU64,
    pub counters: Counters,
    persister: Option<Persister>,
    /// Where journaled mailboxes report to (with a persistence file).
    sink: Option<Arc<dyn LogSink>>,
    started: Instant,
    /// Cancels pending will timers on shutdown.
    pub cancel: CancellationToken,
    /// LAN publishes handed to the agent (commands).
    pub taps: super::tap::Taps,
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    // The guarded structures stay consistent across a panic in a reader.
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

impl Router {
    pub fn new(settings: Settings, policy: Policy, persister: Option<Persister>) -> Router {
        let budget = Arc::new(Budget::new(
            settings.max_queued_bytes_total,
            settings.queue_policy,
        ));
        Router {
            registry: Registry::new(budget.clone(), settings.max_sessions),
            budget,
            settings,
            tree: RwLock::default(),
            retained: RwLock::default(),
            policy: RwLock::new(Arc::new(policy)),
            policy_generation: AtomicU64::new(0),
            counters: Counters::default(),
            sink: persister.as_ref().map(Persister::sink),
            persister,
            started: Instant::now(),
            cancel: CancellationToken::new(),
            taps: super::tap::Taps::default(),
        }
    }

    /// The current access policy and its generation.
    pub fn policy(&self) -> (Arc<Policy>, u64) {
        let policy = read(&self.policy).clone();
        (policy, self.policy_generation.load(Ordering::Acquire))
    }

    /// The generation of the current policy (cheap check for a reload).
    pub fn policy_generation(&self) -> u64 {
        self.policy_generation.load(Ordering::Acquire)
    }

    /// Puts `policy` in force and wakes every connection to apply it.
    pub fn set_policy(&self, policy: Policy) {
        *write(&self.policy) = Arc::new(policy);
        self.policy_generation.fetch_add(1, Ordering::AcqRel);
        self.registry.wake_all();
    }

    /// The topics of the retained messages matching `filter` (a valid filter).
    pub fn retained_topics(&self, filter: &str) -> Vec<String> {
        let mut topics = Vec::new();
        read(&self.retained).for_each_match(filter, |msg| topics.push(msg.topic.clone()));
        topics
    }

    /// Routes `msg` to every matching subscriber and stores it if retained. Returns the
    /// number of clients it was queued for.
    pub fn publish(&self, msg: Message) -> usize {
        let msg = Arc::new(msg);
        if msg.retain {
            self.store_retained(&msg);
        }
        let mut targets: Vec<(Arc<Mailbox>, QoS, bool, u32)> = Vec::new();
        read(&self.tree).for_each_match(&msg.topic, |sub, shared| {
            if sub.options.no_local && !shared && sub.owner.0.id == msg.origin {
                return;
            }
            targets.push((
                sub.owner.0.clone(),
                sub.options.qos.min(msg.qos),
                sub.options.retain_as_published,
                sub.id,
            ));
        });
        if targets.is_empty() {
            return 0;
        }
        targets.sort_unstable_by_key(|t| t.0.id);

        let now = Instant::now();
        // By protocol and QoS; the retain flag is patched per delivery.
        let mut forms: [Option<EncodedPublish>; 6] = Default::default();
        let mut queued = 0;
        let mut dropped = 0;
        let mut i = 0;
        while i < targets.len() {
            let (mailbox, mut qos, mut rap, id) = targets[i].clone();
            let mut ids: Vec<u32> = Vec::new();
            if id != 0 {
                ids.push(id);
            }
            i += 1;
            while i < targets.len() && targets[i].0.id == mailbox.id {
                qos = qos.max(targets[i].1);
                rap |= targets[i].2;
                if targets[i].3 != 0 {
                    ids.push(targets[i].3);
                }
                i += 1;
            }
            let protocol = mailbox.protocol();
            // 3.1.1 clears the retain flag on live deliveries; 5.0 keeps it on request.
            let retain = msg.retain && rap && protocol == Protocol::V5;
            let mut delivery = Delivery::new(msg.clone(), qos, retain, ids.into_boxed_slice());
            let particular = protocol == Protocol::V5
                && (!delivery.sub_ids.is_empty() || msg.expires_at.is_some());
            if !particular {
                let form = usize::from(protocol == Protocol::V5) * 3 + qos as usize;
                if forms[form].is_none() {
                    let publish = msg.to_publish(qos, false, &[], now);
                    match EncodedPublish::new(&publish, protocol) {
                        Ok(encoded) => forms[form] = Some(encoded),
                        Err(e) => {
                            tracing::warn!(topic = %msg.topic, error = %e, "cannot encode message");
                            return queued;
                        }
                    }
                }
                delivery.wire.clone_from(&forms[form]);
                delivery.wire_protocol = protocol;
            }
            match mailbox.push(delivery, self.settings.limits, true) {
                Pushed::Queued | Pushed::Evicted(_) => queued += 1,
                Pushed::Dropped => dropped += 1,
                Pushed::OverBudget | Pushed::Skipped => {}
            }
        }
        Counters::add(&self.counters.dropped, dropped);
        queued
    }

    fn store_retained(&self, msg: &Arc<Message>) {
        let stored = if msg.payload.is_empty() {
            write(&self.retained).remove(&msg.topic);
            None
        } else {
            // A copy, so the retained message does not pin the reader's whole buffer.
            let own = Arc::new(Message {
                topic: msg.topic.clone(),
                payload: bytes::Bytes::copy_from_slice(&msg.payload),
                qos: msg.qos,
                retain: true,
                properties: msg.properties.clone(),
                expires_at: msg.expires_at,
                origin: msg.origin,
            });
            let mut retained = write(&self.retained);
            if retained.len() >= self.settings.max_retained && !retained.contains(&msg.topic) {
                drop(retained);
                Counters::add(&self.counters.retained_refused, 1);
                tracing::debug!(topic = %msg.topic, "retained store full; message not kept");
                return;
            }
            retained.insert(&msg.topic, own.clone());
            Some(own)
        };
        if let Some(persister) = &self.persister {
            if !msg.topic.starts_with('$') {
                persister.retained(&msg.topic, stored);
            }
        }
    }

    /// Takes in what the persistence file held at start-up.
    pub fn restore(&self, loaded: Loaded) {
        {
            let mut retained = write(&self.retained);
            for msg in loaded.retained {
                retained.insert(&msg.topic.clone(), Arc::new(msg));
            }
        }
        for (client_id, record, queued) in loaded.sessions {
            self.restore_session(&client_id, record, queued);
        }
        self.end_over_limit();
    }

    /// Writes the record of every parked persistent session with every queue change
    /// still pending and stops the persistence thread. Blocks until the file is
    /// written.
    pub fn persist_and_close(&self) {
        let Some(persister) = &self.persister else {
            return;
        };
        let mut records = Vec::new();
        self.registry.for_each_parked(|s| {
            records.push((s.client_id().clone(), SessionRecord::of(s)));
        });
        persister.close(records);
    }

    /// Handles the filters of a SUBSCRIBE; returns one reason code per filter and queues
    /// the retained messages the subscriptions ask for.
    pub fn subscribe(
        &self,
        session: &mut Session,
        who: Identity<'_>,
        policy: &Policy,
        filters: &[Subscription],
        sub_id: u32,
    ) -> Vec<ReasonCode> {
        let mut codes = Vec::with_capacity(filters.len());
        let mut retained = Vec::new();
        let now = Instant::now();
        for s in filters {
            let Some((group, filter)) = split_shared(&s.filter) else {
                codes.push(ReasonCode::TOPIC_FILTER_INVALID);
                continue;
            };
            if topic::validate_topic_filter(filter).is_err()
                || (group.is_some() && s.options.no_local)
            {
                codes.push(ReasonCode::TOPIC_FILTER_INVALID);
                continue;
            }
            if !policy.can_subscribe(who, filter) {
                tracing::info!(client_id = who.client_id, filter = %s.filter, "subscription denied by the ACL");
                codes.push(ReasonCode::NOT_AUTHORIZED);
                continue;
            }
            if session.subscriptions.len() >= self.settings.max_subscriptions
                && !session.subscriptions.contains(&s.filter)
            {
                tracing::info!(client_id = who.client_id, filter = %s.filter, "subscription limit reached");
                codes.push(ReasonCode::QUOTA_EXCEEDED);
                continue;
            }
            let sub = Subscriber {
                owner: Target(session.mailbox.clone()),
                options: s.options,
                id: sub_id,
            };
            let new = write(&self.tree).insert(filter, group, sub);
            session.subscriptions.insert(
                &s.filter,
                SubRecord {
                    options: s.options,
                    id: sub_id,
                },
            );
            codes.push(ReasonCode(s.options.qos as u8));
            let wanted = match s.options.retain_handling {
                RetainHandling::SendAtSubscribe => true,
                RetainHandling::SendIfNew => new,
                RetainHandling::DoNotSend => false,
            };
            if wanted && group.is_none() {
                read(&self.retained).for_each_match(filter, |msg| {
                    if !msg.expired(now) {
                        retained.push((msg.clone(), s.options.qos.min(msg.qos)));
                    }
                });
            }
        }
        self.persist_session(session);
        let ids: Box<[u32]> = if sub_id == 0 {
            Box::new([])
        } else {
            Box::new([sub_id])
        };
        for (msg, qos) in retained {
            let d = Delivery::new(msg, qos, true, ids.clone());
            session.mailbox.push(d, self.settings.limits, false);
        }
        codes
    }

    /// Handles the filters of an UNSUBSCRIBE; one reason code per filter.
    pub fn unsubscribe(&self, session: &mut Session, unsub: &Unsubscribe) -> Vec<ReasonCode> {
        let target = Target(session.mailbox.clone());
        let codes = unsub
            .filters
            .iter()
            .map(|f| {
                if session.subscriptions.remove(f).is_some() {
                    if let Some((group, filter)) = split_shared(f) {
                        write(&self.tree).remove(filter, group, &target);
                    }
                    ReasonCode::SUCCESS
                } else {
                    ReasonCode::NO_SUBSCRIPTION_EXISTED
                }
            })
            .collect();
        self.persist_session(session);
        codes
    }

    /// Writes the record of a persistent session and journals its mailbox from now on.
    fn persist_session(&self, session: &Session) {
        if let (Some(persister), Some(sink)) = (&self.persister, &self.sink) {
            if session.expiry > 0 {
                persister.session(session.client_id(), SessionRecord::of(session));
                session.mailbox.journal(sink);
            }
        }
    }

    /// Removes every subscription of a session that ends.
    fn drop_subscriptions(&self, session: &Session) {
        let target = Target(session.mailbox.clone());
        let mut tree = write(&self.tree);
        for (filter, _) in session.subscriptions.iter() {
            if let Some((group, filter)) = split_shared(filter) {
                tree.remove(filter, group, &target);
            }
        }
    }

    /// Gives the session of `client_id` to a new connection: continues it (unless
    /// `clean_start`) or starts a new one, taking it over from a connection that still
    /// holds it.
    pub async fn open_session(
        &self,
        client_id: &str,
        clean_start: bool,
        protocol: Protocol,
    ) -> Opened {
        let (opened, replaced) = self.registry.open(client_id, clean_start, protocol).await;
        if let Some(replaced) = replaced {
            self.end_session(replaced);
        }
        // A session opened while the broker shuts down is closed at once.
        if self.cancel.is_cancelled() {
            opened.session.mailbox.kick(Kick::Shutdown);
        }
        opened
    }

    /// Ends a session for good: subscriptions gone, persistence cleared (unless the
    /// client id already belongs to a newer session), will sent.
    fn end_session(&self, ended: Ended) {
        let Ended {
            session,
            will,
            forget,
        } = ended;
        self.drop_subscriptions(&session);
        if let Some(persister) = &self.persister {
            let last_seq = session.mailbox.log().map_or(0, |log| log.close());
            if forget {
                persister.forget(session.client_id(), last_seq);
            }
        }
        if let Some(will) = will {
            self.publish_will(will);
        }
    }

    fn publish_will(&self, will: Arc<Message>) {
        tracing::debug!(topic = %will.topic, "publishing will");
        let msg = Arc::try_unwrap(will).unwrap_or_else(|shared| Message {
            topic: shared.topic.clone(),
            payload: shared.payload.clone(),
            qos: shared.qos,
            retain: shared.retain,
            properties: shared.properties.clone(),
            expires_at: shared.expires_at,
            origin: shared.origin,
        });
        self.publish(msg);
    }

    /// A connection lets go of its session. `will` is the will to publish (abnormal
    /// end), with its delay in seconds.
    pub fn close_session(
        self: &Arc<Self>,
        session: Session,
        generation: u64,
        will: Option<(Message, u32)>,
    ) {
        let client_id = session.client_id().clone();
        let mailbox = session.mailbox.clone();
        let expiry = self
            .settings
            .offline_expiry(session.mailbox.protocol(), session.expiry);
        let released = self
            .registry
            .release(session, generation, will, expiry, |s| {
                if let Some(persister) = &self.persister {
                    persister.session(s.client_id(), SessionRecord::of(s));
                }
            });
        if matches!(released, Released::Parked(_)) {
            // What it got while online (retained messages on subscribe, a backlog it
            // did not read) is held to the budget now, and what is left goes on file.
            self.fit_budget(&mailbox);
            if let (Some(sink), Some(_)) = (&self.sink, mailbox.log()) {
                mailbox.journal(sink);
            }
            self.end_over_limit();
        }
        match released {
            Released::Ended(ended) => self.end_session(ended),
            Released::Parked(None) => {}
            Released::Parked(Some(DueWill::Now(will))) => {
                self.publish(will);
            }
            Released::Parked(Some(DueWill::After(delay))) => {
                let router = self.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(u64::from(delay))) => router.fire_will(&client_id, generation),
                        () = router.cancel.cancelled() => {}
                    }
                });
            }
        }
    }

    fn fire_will(&self, client_id: &str, generation: u64) {
        if let Some(will) = self.registry.take_will(client_id, generation) {
            self.publish_will(will);
        }
    }

    /// Milliseconds since the router started (the clock of keepalives).
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Closes connections whose keepalive ran out, ends parked sessions whose expiry
    /// passed and drops expired retained messages.
    pub fn housekeeping(&self, now: Instant) {
        let now_ms = u64::try_from(now.saturating_duration_since(self.started).as_millis())
            .unwrap_or(u64::MAX);
        self.registry.kick_silent(now_ms);
        let expired = self.registry.take_expired(now);
        if !expired.is_empty() {
            let lost = self.end_sessions(expired, &self.counters.sessions_expired);
            tracing::info!(
                sessions = lost.0,
                queued_messages_lost = lost.1,
                "offline sessions expired"
            );
        }
        let gone = write(&self.retained).retain(|m| !m.expired(now));
        if gone > 0 {
            tracing::debug!(gone, "expired retained messages dropped");
        }
    }

    /// Ends parked sessions for good, counting them in `counter` and the queued
    /// messages they take along; returns both counts.
    fn end_sessions(&self, ended: Vec<Ended>, counter: &AtomicU64) -> (u64, u64) {
        let sessions = ended.len() as u64;
        let mut lost = 0;
        for e in ended {
            lost += e.session.mailbox.lock().items.len() as u64 + e.session.inflight.len() as u64;
            tracing::debug!(client_id = %e.session.client_id(), "offline session ended");
            self.end_session(e);
        }
        Counters::add(counter, sessions);
        Counters::add(&self.counters.dropped_with_sessions, lost);
        (sessions, lost)
    }

    /// Holds an offline session's queue to the broker-wide budget.
    fn fit_budget(&self, mailbox: &Mailbox) {
        let dropped = mailbox.lock().fit_budget();
        if dropped > 0 {
            tracing::debug!(client_id = %mailbox.client_id, dropped, "queue budget: messages of an offline session dropped");
        }
    }

    /// Ends the sessions offline the longest while more than `max_sessions` are.
    fn end_over_limit(&self) {
        let evicted = self.registry.take_over_limit();
        if !evicted.is_empty() {
            let before = self.counters.sessions_evicted.load(Ordering::Relaxed);
            let (sessions, lost) = self.end_sessions(evicted, &self.counters.sessions_evicted);
            // One line when the limit is first reached, then at every power of two.
            let after = before + sessions;
            if before == 0 || (before + 1..=after).any(u64::is_power_of_two) {
                tracing::warn!(
                    max_sessions = self.settings.max_sessions,
                    evicted_total = after,
                    queued_messages_lost = lost,
                    "too many offline sessions: the ones offline longest end"
                );
            }
        }
    }

    /// Restores a persisted session as parked.
    fn restore_session(&self, client_id: &str, record: SessionRecord, queued: Vec<QueuedRecord>) {
        let mailbox = self.registry.new_mailbox(client_id.into(), record.protocol);
        let mut session = Session::new(mailbox.clone());
        session.expiry = record.expiry;
        session.incoming = record.incoming;
        {
            let mut tree = write(&self.tree);
            for (filter, sub) in record.subscriptions {
                if let Some((group, f)) = split_shared(&filter) {
                    tree.insert(
                        f,
                        group,
                        Subscriber {
                            owner: Target(mailbox.clone()),
                            options: sub.options,
                            id: sub.id,
                        },
                    );
                }
                session.subscriptions.insert(&filter, sub);
            }
        }
        for q in queued {
            match q.pkid {
                Some((pkid, slot)) => session.inflight.restore(pkid, slot, q.delivery.seq),
                None => mailbox.restore(q.delivery),
            }
        }
        if let Some(sink) = &self.sink {
            mailbox.journal(sink);
        }
        self.fit_budget(&mailbox);
        let expiry = self.settings.offline_expiry(record.protocol, record.expiry);
        let expires_at = (expiry != NEVER_EXPIRES)
            .then(|| Instant::now() + Duration::from_secs(u64::from(expiry)));
        self.registry.insert_parked(session, expires_at);
    }

    /// Kicks every connection with `why`.
    pub fn kick_all(&self, why: Kick) {
        self.registry.kick_all(why);
    }

    pub fn persister(&self) -> Option<&Persister> {
        self.persister.as_ref()
    }

    pub fn stats(&self) -> BrokerStats {
        let c = &self.counters;
        let (sessions, connected) = self.registry.counts();
        BrokerStats {
            clients_connected: connected,
            sessions,
            messages_received: c.messages_received.load(Ordering::Relaxed),
            messages_sent: c.messages_sent.load(Ordering::Relaxed),
            bytes_received: c.bytes_received.load(Ordering::Relaxed),
            bytes_sent: c.bytes_sent.load(Ordering::Relaxed),
            subscriptions: read(&self.tree).len(),
            retained: read(&self.retained).len(),
            dropped: c.dropped.load(Ordering::Relaxed),
            dropped_budget: self.budget.dropped(),
            queued_bytes: self.budget.used(),
            sessions_expired: c.sessions_expired.load(Ordering::Relaxed),
            sessions_evicted: c.sessions_evicted.load(Ordering::Relaxed),
            dropped_with_sessions: c.dropped_with_sessions.load(Ordering::Relaxed),
            expired: c.expired.load(Ordering::Relaxed),
            denied: c.denied.load(Ordering::Relaxed),
            retained_refused: c.retained_refused.load(Ordering::Relaxed),
            uptime: self.started.elapsed(),
        }
    }
}

/// Splits `$share/group/filter` into its parts; a plain filter has no group. `None` for
/// a malformed shared filter.
pub(crate) fn split_shared(filter: &str) -> Option<(Option<&str>, &str)> {
    if !filter.starts_with("$share/") {
        return Some((None, filter));
    }
    let shared = topic::parse_shared(filter)?;
    Some((Some(shared.group), shared.filter))
}
