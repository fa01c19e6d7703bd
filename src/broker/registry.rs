//! The session registry: every session by client id, who owns it (a connection or the
//! registry), takeover, the pending will and the expiry of a parked session.
//!
//! The registry only keeps state. What a session's end means for routing (its
//! subscriptions leave the tree, its will is published, its persisted record goes) is
//! done by the router (`router.rs`) with what the registry hands back.
//!
//! Invariants:
//! - Every session is in the registry under its client id: online (owned by exactly one
//!   connection) or parked (owned by the registry).
//! - A slot's generation is bumped each time a connection takes the session; a close or a
//!   will timer of an older generation is stale and changes nothing in the slot.
//! - A connection that opens a session still online kicks the old connection and waits
//!   up to [`TAKEOVER_TIMEOUT`] for it to park the session; after that the old state is
//!   given up and a new session starts.
//! - A pending will lives in the slot of its parked session: it is taken by its delay
//!   timer, by the end of the session (expiry or a clean start), or dropped when the
//!   session is resumed.
//! - Every parked session is in the parked index, by the order it went offline; at most
//!   `max_sessions` stay parked: beyond that the one offline longest ends first.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::session::{Budget, Kick, Mailbox, Message, Session, NEVER_EXPIRES};
use crate::mqtt::Protocol;

/// How long a new connection waits for the one it takes over to let go.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(5);

/// The registry entry of one session.
#[derive(Debug)]
struct SessionSlot {
    mailbox: Arc<Mailbox>,
    /// `Some` while no connection owns the session.
    parked: Option<Box<Session>>,
    /// Bumped each time a connection takes the session.
    generation: u64,
    /// When a parked session ends.
    expires_at: Option<Instant>,
    /// The will of the last connection, waiting for its delay.
    will: Option<Arc<Message>>,
    /// Its key in the parked index while parked.
    parked_order: u64,
}

/// The sessions and the index of the parked ones.
#[derive(Debug, Default)]
struct Sessions {
    by_id: HashMap<Arc<str>, SessionSlot>,
    /// Parked sessions by the order they went offline, oldest first.
    parked: BTreeMap<u64, Arc<str>>,
    next_order: u64,
}

impl Sessions {
    fn get_mut(&mut self, client_id: &str) -> Option<&mut SessionSlot> {
        self.by_id.get_mut(client_id)
    }

    /// Puts the session into `slot` and into the parked index.
    fn park(&mut self, client_id: &Arc<str>, session: Session) {
        self.next_order += 1;
        let order = self.next_order;
        if let Some(slot) = self.by_id.get_mut(client_id) {
            slot.parked = Some(Box::new(session));
            slot.parked_order = order;
            self.parked.insert(order, client_id.clone());
        }
    }

    /// Takes the parked session out of `client_id`'s slot and out of the index.
    fn unpark(&mut self, client_id: &str) -> Option<Session> {
        let slot = self.by_id.get_mut(client_id)?;
        let session = slot.parked.take()?;
        self.parked.remove(&slot.parked_order);
        Some(*session)
    }

    fn remove(&mut self, client_id: &str) -> Option<SessionSlot> {
        let slot = self.by_id.remove(client_id)?;
        if slot.parked.is_some() {
            self.parked.remove(&slot.parked_order);
        }
        Some(slot)
    }
}

/// A session handed to a connection.
#[derive(Debug)]
pub(crate) struct Opened {
    pub session: Session,
    /// The session existed and is continued.
    pub present: bool,
    pub generation: u64,
}

/// A session that ends for good; the router drops its subscriptions and publishes the
/// will.
#[derive(Debug)]
pub(crate) struct Ended {
    pub session: Session,
    pub will: Option<Arc<Message>>,
    /// Also remove it from persistence (false for a stale session whose client id
    /// already belongs to a newer one).
    pub forget: bool,
}

/// What became of a session its connection let go of.
#[derive(Debug)]
pub(crate) enum Released {
    Ended(Ended),
    /// Parked, with its will if one is due.
    Parked(Option<DueWill>),
}

/// The will of a session just parked.
#[derive(Debug)]
pub(crate) enum DueWill {
    /// No delay: publish it now.
    Now(Message),
    /// Kept in the slot; publish it after this many seconds unless the session is
    /// resumed or ends first.
    After(u32),
}

/// The end of a parked session taken out of the registry.
fn end_parked(mut slot: SessionSlot) -> Option<Ended> {
    let session = slot.parked.take()?;
    Some(Ended {
        session: *session,
        will: slot.will.take(),
        forget: true,
    })
}

fn ended(session: Session, will: Option<(Message, u32)>, forget: bool) -> Released {
    Released::Ended(Ended {
        session,
        will: will.map(|(w, _)| Arc::new(w)),
        forget,
    })
}

/// Sessions by client id.
#[derive(Debug)]
pub(crate) struct Registry {
    sessions: Mutex<Sessions>,
    /// Connections waiting for a session to be parked (takeover), rare and short-lived;
    /// locked only inside `sessions`.
    takeovers: Mutex<Vec<(Arc<str>, oneshot::Sender<()>)>>,
    next_id: AtomicU64,
    /// The broker-wide queue budget every mailbox counts in.
    budget: Arc<Budget>,
    /// Parked sessions kept at most.
    max_sessions: usize,
}

impl Registry {
    pub fn new(budget: Arc<Budget>, max_sessions: usize) -> Registry {
        Registry {
            sessions: Mutex::default(),
            takeovers: Mutex::default(),
            next_id: AtomicU64::new(1),
            budget,
            max_sessions,
        }
    }

    fn sessions(&self) -> MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn takeovers(&self) -> MutexGuard<'_, Vec<(Arc<str>, oneshot::Sender<()>)>> {
        self.takeovers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A mailbox with a new id, for a new session.
    pub fn new_mailbox(&self, client_id: Arc<str>, protocol: Protocol) -> Arc<Mailbox> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        Arc::new(Mailbox::new(id, client_id, protocol, self.budget.clone()))
    }

    /// Gives the session of `client_id` to a new connection: continues it (unless
    /// `clean_start`) or starts a new one, taking it over from a connection that still
    /// holds it. A parked session that a clean start replaces comes back as [`Ended`].
    pub async fn open(
        &self,
        client_id: &str,
        clean_start: bool,
        protocol: Protocol,
    ) -> (Opened, Option<Ended>) {
        let mut waited = false;
        loop {
            let wait = {
                let mut sessions = self.sessions();
                match sessions.get_mut(client_id) {
                    Some(slot) if slot.parked.is_none() && !waited => {
                        slot.mailbox.kick(Kick::TakenOver);
                        let (tx, rx) = oneshot::channel();
                        self.takeovers().push((slot.mailbox.client_id.clone(), tx));
                        rx
                    }
                    Some(slot) if slot.parked.is_some() => {
                        let session = sessions.unpark(client_id).expect("checked parked");
                        let slot = sessions.get_mut(client_id).expect("still there");
                        return self.resume(slot, session, client_id, clean_start, protocol);
                    }
                    Some(_) => {
                        // The old connection did not let go in time: give up on its
                        // state and start afresh.
                        // Its subscriptions leave the tree when it finally closes.
                        tracing::warn!(
                            client_id,
                            "previous connection did not release its session; starting a new one"
                        );
                        sessions.remove(client_id);
                        continue;
                    }
                    None => return (self.insert_new(&mut sessions, client_id, protocol), None),
                }
            };
            // Either the old connection parks its session or the wait times out; both
            // continue the loop.
            let _ = tokio::time::timeout(TAKEOVER_TIMEOUT, wait).await;
            waited = true;
        }
    }

    /// Takes a parked session out of its slot for a connection.
    fn resume(
        &self,
        slot: &mut SessionSlot,
        mut session: Session,
        client_id: &str,
        clean_start: bool,
        protocol: Protocol,
    ) -> (Opened, Option<Ended>) {
        slot.generation += 1;
        slot.expires_at = None;
        let pending_will = slot.will.take();
        let mut ended = None;
        if clean_start {
            let fresh = self.new_mailbox(client_id.into(), protocol);
            slot.mailbox = fresh.clone();
            let old = std::mem::replace(&mut session, Session::new(fresh));
            ended = Some(Ended {
                session: old,
                will: pending_will,
                forget: true,
            });
        } else if pending_will.is_some() {
            tracing::debug!(
                client_id,
                "session resumed within the will delay; will cancelled"
            );
        }
        session.mailbox.lock().clear_kick();
        session.mailbox.set_protocol(protocol);
        session.mailbox.set_online(true);
        let opened = Opened {
            session,
            present: !clean_start,
            generation: slot.generation,
        };
        (opened, ended)
    }

    fn insert_new(&self, sessions: &mut Sessions, client_id: &str, protocol: Protocol) -> Opened {
        let mailbox = self.new_mailbox(client_id.into(), protocol);
        mailbox.set_online(true);
        sessions.by_id.insert(
            mailbox.client_id.clone(),
            SessionSlot {
                mailbox: mailbox.clone(),
                parked: None,
                generation: 1,
                expires_at: None,
                will: None,
                parked_order: 0,
            },
        );
        Opened {
            session: Session::new(mailbox),
            present: false,
            generation: 1,
        }
    }

    /// A connection lets go of its session: it ends (no expiry, or stale after a
    /// takeover timeout) or is parked for `expiry` seconds (the session's own, capped
    /// by the broker). `will` is the will to publish (abnormal end), with its delay in
    /// seconds. `persist` is called with a session about to be parked, before another
    /// connection can take it.
    pub fn release(
        &self,
        session: Session,
        generation: u64,
        will: Option<(Message, u32)>,
        expiry: u32,
        persist: impl FnOnce(&Session),
    ) -> Released {
        session.mailbox.set_online(false);
        let client_id = session.client_id().clone();
        let mut sessions = self.sessions();
        self.wake_takeovers(&client_id);
        let slot = match sessions.get_mut(&client_id) {
            Some(slot)
                if slot.generation == generation
                    && Arc::ptr_eq(&slot.mailbox, &session.mailbox) =>
            {
                slot
            }
            // Replaced after a takeover timeout: this state is stale.
            _ => return ended(session, will, false),
        };
        let kicked = session.mailbox.lock().kick();
        if session.expiry == 0 || expiry == 0 {
            sessions.remove(&client_id);
            return ended(session, will, true);
        }
        slot.expires_at = (expiry != NEVER_EXPIRES)
            .then(|| Instant::now() + Duration::from_secs(u64::from(expiry)));
        if kicked == Some(Kick::Shutdown) {
            // Kept for the persistence snapshot; no will on our own shutdown.
            sessions.park(&client_id, session);
            return Released::Parked(None);
        }
        persist(&session);
        sessions.park(&client_id, session);
        let Some(slot) = sessions.get_mut(&client_id) else {
            return Released::Parked(None);
        };
        let Some((will, delay)) = will else {
            return Released::Parked(None);
        };
        let delay = delay.min(expiry);
        if delay == 0 {
            return Released::Parked(Some(DueWill::Now(will)));
        }
        slot.will = Some(Arc::new(will));
        Released::Parked(Some(DueWill::After(delay)))
    }

    /// Lets the connections waiting to take over `client_id` go on.
    fn wake_takeovers(&self, client_id: &Arc<str>) {
        let mut takeovers = self.takeovers();
        let mut i = 0;
        while i < takeovers.len() {
            if takeovers[i].0 == *client_id {
                let (_, waiter) = takeovers.swap_remove(i);
                let _ = waiter.send(());
            } else {
                i += 1;
            }
        }
    }

    /// The will waiting in the slot of `client_id`, if the slot is still of `generation`.
    pub fn take_will(&self, client_id: &str, generation: u64) -> Option<Arc<Message>> {
        let mut sessions = self.sessions();
        match sessions.get_mut(client_id) {
            Some(slot) if slot.generation == generation => slot.will.take(),
            _ => None,
        }
    }

    /// Kicks the connections whose keepalive ran out by `now_ms`.
    pub fn kick_silent(&self, now_ms: u64) {
        for slot in self.sessions().by_id.values() {
            if slot.parked.is_none() && slot.mailbox.keep_alive_expired(now_ms) {
                slot.mailbox.kick(Kick::KeepAlive);
            }
        }
    }

    /// Removes the parked sessions whose expiry passed by `now`.
    pub fn take_expired(&self, now: Instant) -> Vec<Ended> {
        let expired: Vec<SessionSlot> = {
            let mut sessions = self.sessions();
            let ids: Vec<Arc<str>> = sessions
                .by_id
                .iter()
                .filter(|(_, s)| s.parked.is_some() && s.expires_at.is_some_and(|at| at <= now))
                .map(|(id, _)| id.clone())
                .collect();
            ids.iter().filter_map(|id| sessions.remove(id)).collect()
        };
        expired.into_iter().filter_map(end_parked).collect()
    }

    /// Removes the parked sessions offline the longest while more than `max_sessions`
    /// are parked.
    pub fn take_over_limit(&self) -> Vec<Ended> {
        let evicted: Vec<SessionSlot> = {
            let mut sessions = self.sessions();
            let mut out = Vec::new();
            while sessions.parked.len() > self.max_sessions {
                let Some((_, id)) = sessions.parked.pop_first() else {
                    break;
                };
                if let Some(mut slot) = sessions.by_id.remove(&id) {
                    // Already out of the index.
                    slot.parked_order = 0;
                    out.push(slot);
                }
            }
            out
        };
        evicted.into_iter().filter_map(end_parked).collect()
    }

    /// Adds a session restored from persistence, parked.
    pub fn insert_parked(&self, session: Session, expires_at: Option<Instant>) {
        let mailbox = session.mailbox.clone();
        let client_id = mailbox.client_id.clone();
        let mut sessions = self.sessions();
        sessions.by_id.insert(
            client_id.clone(),
            SessionSlot {
                mailbox,
                parked: None,
                generation: 1,
                expires_at,
                will: None,
                parked_order: 0,
            },
        );
        sessions.park(&client_id, session);
    }

    /// Kicks every connection with `why`.
    pub fn kick_all(&self, why: Kick) {
        for slot in self.sessions().by_id.values() {
            if slot.parked.is_none() {
                slot.mailbox.kick(why);
            }
        }
    }

    /// Wakes every connection (a reload for them to apply).
    pub fn wake_all(&self) {
        for slot in self.sessions().by_id.values() {
            if slot.parked.is_none() {
                slot.mailbox.wake();
            }
        }
    }

    /// Calls `f` with every parked persistent session (persistence snapshot on
    /// shutdown).
    pub fn for_each_parked(&self, mut f: impl FnMut(&Session)) {
        for slot in self.sessions().by_id.values() {
            if let Some(session) = &slot.parked {
                if session.expiry > 0 {
                    f(session);
                }
            }
        }
    }

    /// Sessions in the registry, and how many of them are online.
    pub fn counts(&self) -> (usize, usize) {
        let sessions = self.sessions();
        let all = sessions.by_id.len();
        (all, all - sessions.parked.len())
    }
}
