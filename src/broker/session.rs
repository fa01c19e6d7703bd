//! Session state: messages, per-client mailboxes and the outbound inflight window.
//!
//! Invariants:
//! - A [`Message`] is allocated once per PUBLISH and shared by every delivery of it.
//! - A [`Mailbox`] is the only way messages reach a client, online or offline. It is
//!   bounded by message count and payload bytes; a push over the bound drops the new
//!   message and reports it (the router counts drops). QoS 0 messages for an offline
//!   session are not queued. Retained messages sent on subscribe bypass the bounds: they
//!   are already bounded by the retained store, and a subscriber must get all of them;
//!   a session that goes offline before reading them is held to the budget then.
//! - Pushing never blocks on the client: it takes the mailbox lock for a queue
//!   operation only, and wakes the connection if it is waiting for messages. A waiting
//!   connection is one stored waker, not a future per connection.
//! - [`Inflight`] holds at most the negotiated window of QoS 1/2 messages, in sending
//!   order, each with its packet id; ids in the window are unique.
//! - Every queued delivery is counted in the broker-wide [`Budget`] from its push to its
//!   pop (or the end of its mailbox). A message for an offline session is queued only
//!   within the budget; what the budget's policy drops is counted there. Online
//!   sessions are not held to it (their queues drain at wire speed, bounded per client),
//!   but they count, so live traffic wins over offline backlog.
//! - A journaled mailbox (a persistent session, with a persistence file) tells its
//!   [`QueueLog`] every change of a QoS 1/2 delivery's life: queued (a new `seq`), sent
//!   (packet id), released (QoS 2 PUBREC), done (acknowledged, expired or given up).
//!   Changes are noted under the mailbox lock, in queue order, and the persistence
//!   writer takes them under the same lock, so it never sees a message between its pop
//!   from the queue and its push into the inflight window.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::config::QueuePolicy;
use super::tree::{push_compact, Owner};
use crate::mqtt::{EncodedPublish, Properties, Protocol, Publish, QoS, SubscriptionOptions};

/// A published message as the router passes it on.
#[derive(Debug)]
pub(crate) struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// 5.0 properties forwarded to subscribers (never a topic alias or subscription id).
    pub properties: Option<Box<Properties>>,
    /// From the message expiry interval.
    pub expires_at: Option<Instant>,
    /// The publishing session's mailbox id, 0 for the agent and the broker itself.
    pub origin: u64,
}

impl Message {
    /// Whether the message expired at `now`.
    pub fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// Bytes counted against a mailbox's byte bound.
    pub fn size(&self) -> usize {
        self.topic.len() + self.payload.len()
    }

    /// The PUBLISH to send for this message.
    pub fn to_publish(&self, qos: QoS, retain: bool, sub_ids: &[u32], now: Instant) -> Publish {
        let mut properties = self.properties.as_deref().cloned().unwrap_or_default();
        if let Some(at) = self.expires_at {
            // Rounded up so a message never looks expired before it is.
            let left = at.saturating_duration_since(now);
            let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            properties.message_expiry_interval = Some(u32::try_from(secs).unwrap_or(u32::MAX));
        }
        properties.subscription_identifiers = sub_ids.to_vec();
        Publish {
            dup: false,
            qos,
            retain,
            topic: self.topic.clone(),
            pkid: 0,
            payload: self.payload.clone(),
            properties,
        }
    }
}

/// One message on its way to one client.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    pub msg: Arc<Message>,
    /// Encoded for `wire_protocol` with this delivery's QoS and retain flag; `None`
    /// when the wire form is particular to this client (subscription ids, expiry).
    pub wire: Option<EncodedPublish>,
    pub wire_protocol: Protocol,
    pub qos: QoS,
    pub retain: bool,
    pub sub_ids: Box<[u32]>,
    /// Its key in the persistence file, 0 when it is not journaled.
    pub seq: u64,
}

impl Delivery {
    /// A delivery that is encoded when it is sent.
    pub fn new(msg: Arc<Message>, qos: QoS, retain: bool, sub_ids: Box<[u32]>) -> Delivery {
        Delivery {
            msg,
            wire: None,
            wire_protocol: Protocol::V311,
            qos,
            retain,
            sub_ids,
            seq: 0,
        }
    }

    /// Bytes counted against the broker-wide [`Budget`]: the message (shared, but
    /// counted per delivery so the bound holds whatever the fan-out) and the delivery.
    pub fn cost(&self) -> usize {
        self.msg.size() + std::mem::size_of::<Delivery>() + 4 * self.sub_ids.len()
    }
}

/// The broker-wide bound on queued bytes, and what it dropped.
#[derive(Debug)]
pub(crate) struct Budget {
    max_bytes: usize,
    policy: QueuePolicy,
    used: AtomicUsize,
    /// Messages for offline sessions lost to the budget (new or evicted).
    dropped: AtomicU64,
}

impl Budget {
    pub fn new(max_bytes: usize, policy: QueuePolicy) -> Budget {
        Budget {
            max_bytes,
            policy,
            used: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Bytes queued now, all sessions.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Messages dropped by the budget so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Counts `cost` if it fits (or unconditionally with `force`).
    pub fn reserve(&self, cost: usize, force: bool) -> bool {
        let before = self.used.fetch_add(cost, Ordering::Relaxed);
        if force || before + cost <= self.max_bytes {
            return true;
        }
        self.used.fetch_sub(cost, Ordering::Relaxed);
        false
    }

    pub fn release(&self, cost: usize) {
        self.used.fetch_sub(cost, Ordering::Relaxed);
    }
}

impl Default for Budget {
    /// No bound (tests of other parts).
    fn default() -> Budget {
        Budget::new(usize::MAX, QueuePolicy::DropNewest)
    }
}

/// Where a QoS 1/2 delivery on file is in its flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Flow {
    pub pkid: u16,
    /// PUBREL sent (QoS 2), waiting for PUBCOMP.
    pub released: bool,
}

/// What the persistence file must hold for one `seq` after the next commit.
#[derive(Debug, Clone)]
pub(crate) struct Change {
    /// The row; `None` to delete it.
    pub row: Option<(Delivery, Option<Flow>)>,
    /// The file has a row for it already (otherwise a deletion is a no-op).
    pub on_file: bool,
}

/// Bytes a pending change costs beyond its own struct (map entry, key).
const CHANGE_OVERHEAD: usize = 48;

impl Change {
    /// What it holds in memory until written, counted in the budget: a writer that
    /// falls behind fills the budget, and offline sessions then take no more messages.
    fn cost(&self) -> usize {
        std::mem::size_of::<Change>()
            + CHANGE_OVERHEAD
            + self.row.as_ref().map_or(0, |(d, _)| d.msg.size())
    }
}

/// Where journaled mailboxes report that they have changes to write.
pub(crate) trait LogSink: Send + Sync + std::fmt::Debug {
    /// A key for a new delivery, unique in the file.
    fn next_seq(&self) -> u64;
    /// `log` has changes; called once until they are taken.
    fn changed(&self, log: Arc<QueueLog>);
}

#[derive(Debug, Default)]
struct LogState {
    changes: BTreeMap<u64, Change>,
    /// The sink has been told and not yet taken the changes.
    noted: bool,
    /// The session ended: nothing more is recorded.
    closed: bool,
    last_seq: u64,
    /// What `changes` cost in the budget.
    held: usize,
}

impl LogState {
    fn put(&mut self, seq: u64, change: Change, budget: &Budget) {
        let cost = change.cost();
        budget.reserve(cost, true);
        self.held += cost;
        if let Some(old) = self.changes.insert(seq, change) {
            self.unhold(old.cost(), budget);
        }
    }

    fn unhold(&mut self, cost: usize, budget: &Budget) {
        self.held -= cost;
        budget.release(cost);
    }
}

/// The changes of one persistent session's queue the persistence file does not have yet.
#[derive(Debug)]
pub(crate) struct QueueLog {
    pub client_id: Arc<str>,
    mailbox: Weak<Mailbox>,
    sink: Arc<dyn LogSink>,
    /// Pending changes count in it until they are committed.
    pub budget: Arc<Budget>,
    state: Mutex<LogState>,
}

impl QueueLog {
    fn state(&self) -> MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Updates the change of `seq` with `f(row, existing)`.
    fn record(
        self: &Arc<Self>,
        seq: u64,
        f: impl FnOnce(Option<(Delivery, Option<Flow>)>) -> Option<(Delivery, Option<Flow>)>,
    ) {
        let notify = {
            let mut state = self.state();
            if state.closed {
                return;
            }
            state.last_seq = state.last_seq.max(seq);
            let change = state.changes.remove(&seq);
            let (row, on_file) = match change {
                Some(c) => {
                    state.unhold(c.cost(), &self.budget);
                    (c.row, c.on_file)
                }
                // No pending change: the row was written by an earlier commit (or, for
                // a new delivery, `f` ignores it).
                None => (None, true),
            };
            let row = f(row);
            if row.is_some() || on_file {
                state.put(seq, Change { row, on_file }, &self.budget);
            }
            !std::mem::replace(&mut state.noted, true)
        };
        if notify {
            self.sink.changed(self.clone());
        }
    }

    fn queued(self: &Arc<Self>, d: &Delivery) {
        let notify = {
            let mut state = self.state();
            if state.closed {
                return;
            }
            state.last_seq = state.last_seq.max(d.seq);
            let change = Change {
                row: Some((d.clone(), None)),
                on_file: false,
            };
            state.put(d.seq, change, &self.budget);
            !std::mem::replace(&mut state.noted, true)
        };
        if notify {
            self.sink.changed(self.clone());
        }
    }

    fn sent(self: &Arc<Self>, d: &Delivery, flow: Flow) {
        self.record(d.seq, |_| Some((d.clone(), Some(flow))));
    }

    fn done(self: &Arc<Self>, seq: u64) {
        self.record(seq, |_| None);
    }

    /// Takes the changes to write, under the mailbox lock (see the module doc), with
    /// what they hold in the budget: the writer releases it once they are committed.
    pub fn take(&self) -> (BTreeMap<u64, Change>, usize) {
        let mailbox = self.mailbox.upgrade();
        let _queue = mailbox.as_ref().map(|m| m.lock());
        let mut state = self.state();
        state.noted = false;
        let held = std::mem::take(&mut state.held);
        (std::mem::take(&mut state.changes), held)
    }

    /// The session ended: drops what was not written and stops recording. Returns the
    /// highest `seq` it ever had, so the file can forget every row up to it.
    pub fn close(&self) -> u64 {
        let mut state = self.state();
        state.closed = true;
        state.changes.clear();
        let held = std::mem::take(&mut state.held);
        self.budget.release(held);
        state.last_seq
    }
}

/// Why a connection must end although its client did nothing wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kick {
    /// Another connection took the session over.
    TakenOver,
    /// Nothing received within 1.5 times the keepalive.
    KeepAlive,
    /// The broker is shutting down.
    Shutdown,
}

/// The bounds of a mailbox.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_messages: usize,
    pub max_bytes: usize,
}

/// What became of a pushed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushed {
    Queued,
    /// Queued after the budget's policy dropped this many older messages of the session.
    Evicted(u64),
    /// Over the client's bound: dropped, to be counted.
    Dropped,
    /// Over the broker-wide budget: dropped (counted by the budget).
    OverBudget,
    /// QoS 0 for an offline session: not queued, by design.
    Skipped,
}

#[derive(Debug)]
pub(crate) struct Queue {
    pub items: VecDeque<Delivery>,
    bytes: usize,
    /// What `items` count in the budget.
    cost: usize,
    budget: Arc<Budget>,
    kick: Option<Kick>,
    /// The connection task, while it waits for messages.
    waker: Option<Waker>,
    /// Set once the session is persistent and there is a persistence file.
    log: Option<Arc<QueueLog>>,
}

impl Queue {
    fn new(budget: Arc<Budget>) -> Queue {
        Queue {
            items: VecDeque::new(),
            bytes: 0,
            cost: 0,
            budget,
            kick: None,
            waker: None,
            log: None,
        }
    }

    /// Takes the next delivery. A journaled one is done with unless the caller puts it
    /// into the inflight window before it lets go of the lock.
    pub fn pop(&mut self) -> Option<Delivery> {
        let d = self.items.pop_front()?;
        self.forget(&d);
        Some(d)
    }

    /// Accounts for `d` leaving the queue (front or back).
    fn forget(&mut self, d: &Delivery) {
        self.bytes -= d.msg.size();
        let cost = d.cost();
        self.cost -= cost;
        self.budget.release(cost);
        if d.seq != 0 {
            if let Some(log) = &self.log {
                log.done(d.seq);
            }
        }
        // An emptied queue gives its buffer back: thousands of offline sessions must
        // not each keep the capacity of their longest backlog.
        if self.items.is_empty() && self.items.capacity() > 16 {
            self.items = VecDeque::new();
        }
    }

    fn push_back(&mut self, d: Delivery, cost: usize) {
        self.bytes += d.msg.size();
        self.cost += cost;
        self.items.push_back(d);
    }

    /// Makes room for a message of `cost` by dropping this queue's oldest messages
    /// worth at least as much (the total stays as it was); returns how many went, or
    /// `None` (nothing dropped) when the queue holds less than that.
    fn evict_for(&mut self, cost: usize) -> Option<u64> {
        let mut worth = 0;
        let mut n = 0;
        for d in &self.items {
            if worth >= cost {
                break;
            }
            worth += d.cost();
            n += 1;
        }
        if worth < cost {
            return None;
        }
        for _ in 0..n {
            self.pop();
        }
        self.budget.reserve(cost, true);
        Some(n)
    }

    /// Drops queued messages, by the budget's policy, while the broker-wide budget is
    /// exceeded (a session going offline with what it got while online, or restored
    /// from the file); returns how many went, counted as dropped by the budget.
    pub fn fit_budget(&mut self) -> u64 {
        let mut dropped = 0;
        while self.budget.used() > self.budget.max_bytes {
            let d = match self.budget.policy {
                QueuePolicy::DropOldest => self.items.pop_front(),
                QueuePolicy::DropNewest => self.items.pop_back(),
            };
            let Some(d) = d else { break };
            self.forget(&d);
            dropped += 1;
        }
        self.budget.dropped.fetch_add(dropped, Ordering::Relaxed);
        dropped
    }

    pub fn kick(&self) -> Option<Kick> {
        self.kick
    }

    pub fn clear_kick(&mut self) {
        self.kick = None;
    }

    /// Keeps the deliveries `keep` accepts, in order; returns how many were dropped.
    pub fn retain(&mut self, mut keep: impl FnMut(&Delivery) -> bool) -> usize {
        let (before, mut bytes) = (self.items.len(), self.bytes);
        self.items.retain(|d| {
            let kept = keep(d);
            if !kept {
                bytes -= d.msg.size();
            }
            kept
        });
        self.bytes = bytes;
        before - self.items.len()
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        self.budget.release(self.cost);
    }
}

/// The queue of messages for one session, shared by publishers and its connection.
#[derive(Debug)]
pub(crate) struct Mailbox {
    /// Unique per session, never 0.
    pub id: u64,
    pub client_id: Arc<str>,
    queue: Mutex<Queue>,
    online: AtomicBool,
    protocol: AtomicU8,
    /// Keepalive of the connection in milliseconds, 0 for none.
    keep_alive_ms: AtomicU32,
    /// When the connection last received bytes, milliseconds on the router's clock.
    last_read_ms: AtomicU64,
    /// The journal of a persistent session (also in the queue, for pushes and pops
    /// under its lock; here for the inflight window).
    log: OnceLock<Arc<QueueLog>>,
}

impl Mailbox {
    pub fn new(id: u64, client_id: Arc<str>, protocol: Protocol, budget: Arc<Budget>) -> Mailbox {
        Mailbox {
            id,
            client_id,
            queue: Mutex::new(Queue::new(budget)),
            online: AtomicBool::new(false),
            protocol: AtomicU8::new(protocol.level()),
            keep_alive_ms: AtomicU32::new(0),
            last_read_ms: AtomicU64::new(0),
            log: OnceLock::new(),
        }
    }

    /// The queue, locked. Never held across an await.
    pub fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding this lock leaves only a queue behind, still consistent
        // for our use (every mutation is a single push or pop).
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `d` within `limits` and, for an offline session, the broker-wide budget
    /// (or beyond both when `bounded` is false).
    pub fn push(&self, mut d: Delivery, limits: Limits, bounded: bool) -> Pushed {
        let online = self.is_online();
        if !online && d.qos == QoS::AtMostOnce {
            return Pushed::Skipped;
        }
        let size = d.msg.size();
        let cost = d.cost();
        let mut evicted = 0;
        let waker = {
            let mut q = self.lock();
            if bounded
                && (q.items.len() >= limits.max_messages || q.bytes + size > limits.max_bytes)
            {
                return Pushed::Dropped;
            }
            if !q.budget.reserve(cost, online || !bounded) {
                let room = match q.budget.policy {
                    QueuePolicy::DropOldest => q.evict_for(cost),
                    QueuePolicy::DropNewest => None,
                };
                match room {
                    Some(n) => {
                        q.budget.dropped.fetch_add(n, Ordering::Relaxed);
                        evicted = n;
                    }
                    None => {
                        q.budget.dropped.fetch_add(1, Ordering::Relaxed);
                        return Pushed::OverBudget;
                    }
                }
            }
            // Retained messages of a subscribe (unbounded) are journaled only if the
            // session goes offline with them (see `journal`): a client that subscribes
            // to a big retained tree and reads it costs no writes.
            if d.qos != QoS::AtMostOnce && bounded {
                if let Some(log) = q.log.clone() {
                    d.seq = log.sink.next_seq();
                    log.queued(&d);
                }
            }
            q.push_back(d, cost);
            q.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        if evicted > 0 {
            return Pushed::Evicted(evicted);
        }
        Pushed::Queued
    }

    /// Queues a delivery read back from the persistence file: no bound, no journal
    /// entry (the file has it already).
    pub fn restore(&self, d: Delivery) {
        let cost = d.cost();
        let mut q = self.lock();
        q.budget.reserve(cost, true);
        q.push_back(d, cost);
    }

    /// Journals this mailbox from now on, and records the QoS 1/2 deliveries queued
    /// and not on file yet (those queued before, and the retained messages of a
    /// subscribe, which are journaled only once the session goes offline with them).
    /// From the first of those on, every delivery is recorded under a new key, so the
    /// file keeps the queue's order.
    pub fn journal(self: &Arc<Self>, sink: &Arc<dyn LogSink>) {
        let mut q = self.lock();
        let log = self
            .log
            .get_or_init(|| {
                Arc::new(QueueLog {
                    client_id: self.client_id.clone(),
                    mailbox: Arc::downgrade(self),
                    sink: sink.clone(),
                    budget: q.budget.clone(),
                    state: Mutex::default(),
                })
            })
            .clone();
        let mut renumber = false;
        for d in q.items.iter_mut().filter(|d| d.qos != QoS::AtMostOnce) {
            renumber |= d.seq == 0;
            if renumber {
                if d.seq != 0 {
                    log.done(d.seq);
                }
                d.seq = sink.next_seq();
                log.queued(d);
            }
        }
        q.log = Some(log);
    }

    /// The journal, when the mailbox has one.
    pub fn log(&self) -> Option<&Arc<QueueLog>> {
        self.log.get()
    }

    /// Asks the connection serving this session to end.
    pub fn kick(&self, why: Kick) {
        let waker = {
            let mut q = self.lock();
            q.kick = Some(why);
            q.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Wakes the connection task without a kick (to re-check a reloaded access policy).
    pub fn wake(&self) {
        let waker = self.lock().waker.take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Ready when the connection has something to do: it was kicked, or a message waits
    /// that it may send (`room`: its inflight window has space for QoS 1/2). Otherwise
    /// the task is woken by the next push or kick.
    /// With `messages` false only a kick counts (the connection cannot take messages
    /// now, but must still hear that it has to end).
    pub fn poll_ready(&self, cx: &mut Context<'_>, room: bool, messages: bool) -> Poll<()> {
        let mut q = self.lock();
        let sendable = match q.items.front() {
            Some(d) => messages && (room || d.qos == QoS::AtMostOnce),
            None => false,
        };
        if q.kick.is_some() || sendable {
            return Poll::Ready(());
        }
        match &q.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => q.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Records the keepalive of the connection now serving the session.
    pub fn set_keep_alive(&self, keep_alive: Option<Duration>, now_ms: u64) {
        let ms = keep_alive.map_or(0, |d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX));
        self.keep_alive_ms.store(ms, Ordering::Relaxed);
        self.last_read_ms.store(now_ms, Ordering::Relaxed);
    }

    /// The connection received bytes at `now_ms`.
    pub fn touch(&self, now_ms: u64) {
        self.last_read_ms.store(now_ms, Ordering::Relaxed);
    }

    /// Whether the connection's keepalive (already 1.5 times the client's) ran out.
    pub fn keep_alive_expired(&self, now_ms: u64) -> bool {
        let ka = u64::from(self.keep_alive_ms.load(Ordering::Relaxed));
        ka > 0 && now_ms >= self.last_read_ms.load(Ordering::Relaxed) + ka
    }

    pub fn is_online(&self) -> bool {
        self.online.load(Ordering::Acquire)
    }

    pub fn set_online(&self, online: bool) {
        self.online.store(online, Ordering::Release);
    }

    pub fn protocol(&self) -> Protocol {
        if self.protocol.load(Ordering::Relaxed) == Protocol::V5.level() {
            Protocol::V5
        } else {
            Protocol::V311
        }
    }

    pub fn set_protocol(&self, protocol: Protocol) {
        self.protocol.store(protocol.level(), Ordering::Relaxed);
    }
}

/// A mailbox as an owner of subscriptions: equal when it is the same session.
#[derive(Debug, Clone)]
pub(crate) struct Target(pub Arc<Mailbox>);

impl PartialEq for Target {
    fn eq(&self, other: &Target) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Owner for Target {
    fn is_online(&self) -> bool {
        self.0.is_online()
    }
}

/// Where an outbound QoS 1/2 message is in its flow.
#[derive(Debug, Clone)]
pub(crate) enum Slot {
    /// Sent; waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Sent(Delivery),
    /// PUBREL sent; waiting for PUBCOMP.
    Released,
}

/// Outbound QoS 1/2 messages not yet acknowledged, in sending order.
#[derive(Debug, Default)]
pub(crate) struct Inflight {
    slots: VecDeque<(u16, Slot)>,
    /// The journal key of each slot (0: not journaled), same order as `slots`.
    seqs: VecDeque<u64>,
    last_pkid: u16,
    /// The session's mailbox, whose journal hears of every change of a journaled slot.
    mailbox: Option<Arc<Mailbox>>,
}

impl Inflight {
    fn for_mailbox(mailbox: Arc<Mailbox>) -> Inflight {
        Inflight {
            mailbox: Some(mailbox),
            ..Inflight::default()
        }
    }

    fn log(&self, seq: u64) -> Option<&Arc<QueueLog>> {
        if seq == 0 {
            return None;
        }
        self.mailbox.as_ref()?.log()
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// A packet id not in the window. The caller keeps the window far below 65535, so
    /// one always exists.
    pub fn next_id(&mut self) -> u16 {
        loop {
            self.last_pkid = self.last_pkid.checked_add(1).unwrap_or(1);
            let id = self.last_pkid;
            if !self.slots.iter().any(|(p, _)| *p == id) {
                return id;
            }
        }
    }

    /// Records `slot` under `pkid` (from [`Inflight::next_id`]), after the slots
    /// already there.
    pub fn push(&mut self, pkid: u16, slot: Slot) {
        let seq = match &slot {
            Slot::Sent(d) => {
                if let Some(log) = self.log(d.seq) {
                    log.sent(
                        d,
                        Flow {
                            pkid,
                            released: false,
                        },
                    );
                }
                d.seq
            }
            Slot::Released => 0,
        };
        self.slots.push_back((pkid, slot));
        self.seqs.push_back(seq);
    }

    /// Records a slot read back from the persistence file (no journal entry).
    pub fn restore(&mut self, pkid: u16, slot: Slot, seq: u64) {
        self.slots.push_back((pkid, slot));
        self.seqs.push_back(seq);
    }

    fn position(&self, pkid: u16) -> Option<usize> {
        // Acknowledgements nearly always come in order: look at the front first.
        match self.slots.front() {
            Some((p, _)) if *p == pkid => Some(0),
            _ => self.slots.iter().position(|(p, _)| *p == pkid),
        }
    }

    fn take(&mut self, at: usize) -> Option<Slot> {
        let (_, slot) = self.slots.remove(at)?;
        let seq = self.seqs.remove(at).unwrap_or(0);
        if let Some(log) = self.log(seq) {
            log.done(seq);
        }
        Some(slot)
    }

    /// PUBACK: frees the slot if it held a QoS 1 message.
    pub fn puback(&mut self, pkid: u16) -> bool {
        match self.position(pkid) {
            Some(at) if matches!(&self.slots[at].1, Slot::Sent(d) if d.qos == QoS::AtLeastOnce) => {
                self.take(at);
                true
            }
            _ => false,
        }
    }

    /// PUBREC: a QoS 2 message moves to `Released`. False when no such message.
    pub fn pubrec(&mut self, pkid: u16) -> bool {
        let Some(at) = self.position(pkid) else {
            return false;
        };
        match &self.slots[at].1 {
            Slot::Sent(d) if d.qos == QoS::ExactlyOnce => {
                if let Some(log) = self.log(d.seq) {
                    log.sent(
                        d,
                        Flow {
                            pkid,
                            released: true,
                        },
                    );
                }
                self.slots[at].1 = Slot::Released;
                true
            }
            Slot::Released => true,
            Slot::Sent(_) => false,
        }
    }

    /// PUBCOMP: ends a QoS 2 flow whose PUBREL was sent.
    pub fn complete(&mut self, pkid: u16) -> bool {
        match self.position(pkid) {
            Some(at) if matches!(self.slots[at].1, Slot::Released) => {
                self.take(at);
                true
            }
            _ => false,
        }
    }

    /// Removes the slot of `pkid` whatever its state (a PUBREC refusing the message, or
    /// a message that could not be sent).
    pub fn remove(&mut self, pkid: u16) -> Option<Slot> {
        let at = self.position(pkid)?;
        self.take(at)
    }

    pub fn iter(&self) -> impl Iterator<Item = &(u16, Slot)> {
        self.slots.iter()
    }
}

/// One subscription as the session remembers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SubRecord {
    pub options: SubscriptionOptions,
    pub id: u32,
}

/// A session's subscriptions by filter as subscribed (`$share/group/` included).
///
/// A vector sized to fit: clients have a handful of filters, and an idle connection
/// should cost little.
#[derive(Debug, Default)]
pub(crate) struct Subscriptions(Vec<(Box<str>, SubRecord)>);

impl Subscriptions {
    /// Adds or replaces; returns the previous record.
    pub fn insert(&mut self, filter: &str, record: SubRecord) -> Option<SubRecord> {
        if let Some((_, existing)) = self.0.iter_mut().find(|(f, _)| &**f == filter) {
            return Some(std::mem::replace(existing, record));
        }
        push_compact(&mut self.0, (filter.into(), record));
        None
    }

    pub fn remove(&mut self, filter: &str) -> Option<SubRecord> {
        let at = self.0.iter().position(|(f, _)| &**f == filter)?;
        let (_, record) = self.0.swap_remove(at);
        Some(record)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &SubRecord)> {
        self.0.iter().map(|(f, r)| (&**f, r))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn contains(&self, filter: &str) -> bool {
        self.0.iter().any(|(f, _)| &**f == filter)
    }
}

/// Session expiry meaning "never".
pub(crate) const NEVER_EXPIRES: u32 = u32::MAX;

/// Everything about a client that outlives one connection.
#[derive(Debug)]
pub(crate) struct Session {
    pub mailbox: Arc<Mailbox>,
    pub subscriptions: Subscriptions,
    pub inflight: Inflight,
    /// Packet ids of inbound QoS 2 messages routed but not yet released.
    pub incoming: Vec<u16>,
    /// Seconds the session outlives its connection; [`NEVER_EXPIRES`] or 0.
    pub expiry: u32,
}

impl Session {
    pub fn new(mailbox: Arc<Mailbox>) -> Session {
        Session {
            inflight: Inflight::for_mailbox(mailbox.clone()),
            mailbox,
            subscriptions: Subscriptions::default(),
            incoming: Vec::new(),
            expiry: 0,
        }
    }

    pub fn client_id(&self) -> &Arc<str> {
        &self.mailbox.client_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(payload: &'static [u8]) -> Arc<Message> {
        Arc::new(Message {
            topic: "t".into(),
            payload: Bytes::from_static(payload),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: None,
            expires_at: None,
            origin: 0,
        })
    }

    fn delivery(qos: QoS) -> Delivery {
        Delivery::new(msg(b"0123456789"), qos, false, Box::new([]))
    }

    #[test]
    fn mailbox_is_bounded_by_count_and_bytes() {
        let mailbox = Mailbox::new(1, "c".into(), Protocol::V5, Arc::default());
        mailbox.set_online(true);
        let limits = Limits {
            max_messages: 3,
            max_bytes: 1000,
        };
        for _ in 0..3 {
            assert_eq!(
                mailbox.push(delivery(QoS::AtMostOnce), limits, true),
                Pushed::Queued
            );
        }
        assert_eq!(
            mailbox.push(delivery(QoS::AtLeastOnce), limits, true),
            Pushed::Dropped
        );
        assert_eq!(
            mailbox.push(delivery(QoS::AtLeastOnce), limits, false),
            Pushed::Queued
        );
        let tight = Limits {
            max_messages: 100,
            max_bytes: 4 * 11 + 5,
        };
        assert_eq!(
            mailbox.push(delivery(QoS::AtLeastOnce), tight, true),
            Pushed::Dropped
        );
        assert!(mailbox.lock().pop().is_some());
        assert_eq!(
            mailbox.push(delivery(QoS::AtLeastOnce), tight, true),
            Pushed::Queued
        );
        assert_eq!(mailbox.lock().items.len(), 4);
    }

    #[test]
    fn offline_mailbox_skips_qos0_and_keeps_qos1() {
        let mailbox = Mailbox::new(1, "c".into(), Protocol::V311, Arc::default());
        let limits = Limits {
            max_messages: 10,
            max_bytes: 1000,
        };
        assert_eq!(
            mailbox.push(delivery(QoS::AtMostOnce), limits, true),
            Pushed::Skipped
        );
        assert_eq!(
            mailbox.push(delivery(QoS::ExactlyOnce), limits, true),
            Pushed::Queued
        );
    }

    #[test]
    fn inflight_ids_are_unique_and_acks_match_the_flow() {
        let mut inflight = Inflight {
            last_pkid: 65534,
            ..Inflight::default()
        };
        let mut insert = |slot| {
            let id = inflight.next_id();
            inflight.push(id, slot);
            id
        };
        let a = insert(Slot::Sent(delivery(QoS::AtLeastOnce)));
        let b = insert(Slot::Sent(delivery(QoS::ExactlyOnce)));
        let c = insert(Slot::Sent(delivery(QoS::AtLeastOnce)));
        assert_eq!((a, b, c), (65535, 1, 2), "wraps past 65535, never 0");
        assert!(!inflight.puback(b), "PUBACK for a QoS 2 message");
        assert!(!inflight.complete(b), "PUBCOMP before PUBREC");
        assert!(inflight.puback(c), "out of order");
        assert!(inflight.pubrec(b));
        assert!(inflight.pubrec(b), "a repeated PUBREC is answered again");
        assert!(inflight.complete(b));
        assert!(!inflight.complete(b));
        assert!(inflight.puback(a));
        assert_eq!(inflight.len(), 0);
        let d = inflight.next_id();
        inflight.push(d, Slot::Sent(delivery(QoS::ExactlyOnce)));
        assert!(inflight.remove(d).is_some(), "PUBREC with a failure code");
        assert!(inflight.remove(d).is_none());

        let mut i = Inflight::default();
        i.push(1, Slot::Released);
        i.push(2, Slot::Released);
        assert_eq!(i.next_id(), 3, "skips ids in use");
    }

    #[test]
    fn expiry_interval_counts_down_and_rounds_up() {
        let now = Instant::now();
        let mut m = Message {
            expires_at: Some(now + std::time::Duration::from_millis(2500)),
            ..Arc::try_unwrap(msg(b"x")).unwrap()
        };
        let p = m.to_publish(QoS::AtMostOnce, false, &[3], now);
        assert_eq!(p.properties.message_expiry_interval, Some(3));
        assert_eq!(p.properties.subscription_identifiers, [3]);
        assert!(!m.expired(now));
        m.expires_at = Some(now);
        assert!(m.expired(now));
    }
}
