//! Listeners and the socket task of each connection.
//!
//! Invariants:
//! - One task per connection does both directions over one [`Connection`], so an idle
//!   connection costs one small task: no buffers while idle (see `connection.rs`) and no
//!   timer of its own (the router's housekeeping enforces keepalives).
//! - Everything queued for a client is written in batches: the mailbox is drained into
//!   one buffer up to [`WRITE_BATCH`] bytes, then written with as few syscalls as the
//!   socket allows.
//! - A connection that sends no CONNECT within the connect timeout, nothing within 1.5
//!   times its keepalive, or a malformed packet is closed; nothing else is affected.
//!   Refusals that a flood can repeat (limits, bad first packets) are logged at powers
//!   of two, not once each.
//! - A connection whose first byte is not CONNECT's is closed as soon as that byte
//!   arrives, and a CONNECT is held to `max_connect_packet_size` (see `connection.rs`).
//! - Connections that have not logged in yet wait in the [`Lobby`], which holds at most
//!   `max_pending_connections` of them. A new connection that finds the lobby full, or
//!   every slot of `max_connections` taken, closes the oldest one waiting there; only
//!   when every slot is held by a logged-in client is it refused. So idle connections
//!   that never send CONNECT cannot lock clients out, and logged-in clients are never
//!   closed to make room.

use std::collections::BTreeMap;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::conn::{Close, Conn};
use super::connection::{Connection, ReadError, Ready};
use super::router::{Counters, Router};
use crate::mqtt::{self, ConnAck, Packet, Properties, Protocol, ReasonCode};

/// Bytes drained from the mailbox into one write.
const WRITE_BATCH: usize = 64 * 1024;
/// How long a closing connection may take to deliver its last DISCONNECT.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(1);

/// What the accept loops and connection tasks share.
#[derive(Clone)]
pub(crate) struct Shared {
    pub router: Arc<Router>,
    pub slots: Arc<Semaphore>,
    pub lobby: Arc<Lobby>,
    pub cancel: CancellationToken,
    pub tracker: TaskTracker,
}

/// A count of repeated refusals, logged at powers of two.
#[derive(Debug, Default)]
struct Tally(AtomicU64);

impl Tally {
    /// Counts one more; true when the new count is a power of two (time to log).
    fn bump(&self) -> (u64, bool) {
        let n = self.0.fetch_add(1, Ordering::Relaxed) + 1;
        (n, n.is_power_of_two())
    }
}

/// The connections that have not logged in yet, oldest first, each with the token
/// that closes it.
#[derive(Debug)]
pub(crate) struct Lobby {
    waiting: Mutex<Waiting>,
    limit: usize,
    /// Largest CONNECT accepted, in bytes.
    max_connect: usize,
    /// Connections closed to make room for newer ones.
    made_room: Tally,
    /// Connections closed for a first packet that is not CONNECT, or a bad CONNECT.
    bad_first: Tally,
}

#[derive(Debug, Default)]
struct Waiting {
    by_age: BTreeMap<u64, CancellationToken>,
    next: u64,
}

/// A connection's place in the [`Lobby`], given up when dropped (it logged in or
/// ended). `closed` fires when a newer connection needs the place, or at shutdown.
pub(crate) struct Ticket {
    lobby: Arc<Lobby>,
    id: u64,
    closed: CancellationToken,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.lobby.waiting().by_age.remove(&self.id);
    }
}

impl Lobby {
    pub fn new(limit: usize, max_connect: usize) -> Lobby {
        Lobby {
            waiting: Mutex::default(),
            limit,
            max_connect,
            made_room: Tally::default(),
            bad_first: Tally::default(),
        }
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, Waiting> {
        // Only a map of tokens: consistent across a panic elsewhere.
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Enters a new connection, closing the oldest waiting one when the lobby is full.
    /// `shutdown` closes it too.
    fn enter(self: &Arc<Self>, shutdown: &CancellationToken) -> Ticket {
        let closed = shutdown.child_token();
        let mut waiting = self.waiting();
        let full = waiting.by_age.len() >= self.limit;
        if full {
            if let Some((_, oldest)) = waiting.by_age.pop_first() {
                oldest.cancel();
            }
        }
        let id = waiting.next;
        waiting.next += 1;
        waiting.by_age.insert(id, closed.clone());
        drop(waiting);
        if full {
            self.made_room();
        }
        Ticket {
            lobby: self.clone(),
            id,
            closed,
        }
    }

    fn is_full(&self) -> bool {
        self.waiting().by_age.len() >= self.limit
    }

    /// Closes the oldest waiting connection; false when none waits.
    fn close_oldest(&self) -> bool {
        let oldest = self.waiting().by_age.pop_first();
        let Some((_, token)) = oldest else {
            return false;
        };
        token.cancel();
        self.made_room();
        true
    }

    fn made_room(&self) {
        let (closed, log) = self.made_room.bump();
        if log {
            tracing::warn!(
                closed,
                "too many connections that have not logged in; closing the oldest to make room"
            );
        }
    }
}

/// A slot of `max_connections` for a new connection: a free one, else the one of the
/// oldest connection that has not logged in (closed for it). `None` when every slot is
/// held by a logged-in client.
async fn take_slot(shared: &Shared) -> Option<OwnedSemaphorePermit> {
    if shared.lobby.is_full() || shared.slots.available_permits() == 0 {
        // Someone may be about to close. First let the waiting connections read what
        // already arrived: in a burst of real clients (all reconnecting after a restart,
        // on one core) their CONNECTs are in the sockets, and they leave the lobby
        // instead of being closed.
        tokio::task::yield_now().await;
    }
    if let Ok(permit) = shared.slots.clone().try_acquire_owned() {
        return Some(permit);
    }
    if !shared.lobby.close_oldest() {
        return None;
    }
    // The closed connection's task gives its slot back as soon as it sees the token.
    let handed_over = tokio::time::timeout(GOODBYE_TIMEOUT, shared.slots.clone().acquire_owned());
    handed_over.await.ok()?.ok()
}

/// Accepts connections on `listener` until cancelled.
pub(crate) async fn accept_loop(listener: TcpListener, tls: Option<TlsAcceptor>, shared: Shared) {
    let local = listener.local_addr().ok();
    let mut refused: u64 = 0;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shared.cancel.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(listener = ?local, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(permit) = take_slot(&shared).await else {
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(%peer, refused, "connection limit reached, every slot logged in; closing new connections");
            }
            continue;
        };
        // Boxed: the connection's task keeps the room for it after logging in.
        let ticket = Box::new(shared.lobby.enter(&shared.cancel));
        let _ = stream.set_nodelay(true);
        let task_shared = shared.clone();
        // Two task shapes, so a plain connection does not carry the size of a TLS one.
        match tls.clone() {
            None => {
                // Spawned as it is: a wrapping block would keep room for its arguments.
                shared
                    .tracker
                    .spawn(serve(stream, peer, permit, ticket, task_shared));
            }
            Some(acceptor) => {
                shared.tracker.spawn(async move {
                    let timeout = task_shared.router.settings.connect_timeout;
                    let handshake = tokio::select! {
                        h = tokio::time::timeout(timeout, acceptor.accept(stream)) => h,
                        () = ticket.closed.cancelled() => return,
                    };
                    match handshake {
                        Ok(Ok(stream)) => {
                            serve(stream, peer, permit, ticket, task_shared).await;
                        }
                        Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        }
    }
}

/// Serves one connection from CONNECT to close, holding its slot of `max_connections`;
/// it leaves the lobby once its CONNECT is read.
pub(crate) async fn serve<S>(
    stream: S,
    peer: SocketAddr,
    _slot: OwnedSemaphorePermit,
    ticket: Box<Ticket>,
    shared: Shared,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let shared = &shared;
    let router = &shared.router;
    let mut io = Connection::new(stream);
    // Boxed: CONNECT handling holds large packets for a moment; the task keeps only what
    // the connected state needs.
    let handshake = Box::pin(handshake(&mut io, peer, ticket, shared)).await;
    let Some(mut conn) = handshake else {
        return;
    };
    let (why, detail) = run(&mut io, &mut conn, router).await;
    finish(conn, why, detail.as_deref(), io.write_buf(), router);
    if why != Close::Lost && io.pending() > 0 {
        // Boxed for the same reason as the handshake: a timer is big and rarely needed.
        let _ = Box::pin(tokio::time::timeout(GOODBYE_TIMEOUT, async {
            io.write_all().await?;
            io.shutdown().await
        }))
        .await;
    }
}

/// Logs why the connection ends, queues the 5.0 DISCONNECT and lets go of the session
/// (first: a connection taking it over is waiting).
fn finish(
    mut conn: Box<Conn>,
    why: Close,
    detail: Option<&str>,
    wbuf: &mut BytesMut,
    router: &Router,
) {
    match why {
        Close::Protocol(code) => {
            tracing::info!(client_id = %conn.client_id(), reason = code.0, "closing connection after a protocol error");
        }
        Close::KeepAliveTimeout => {
            tracing::info!(client_id = %conn.client_id(), "keepalive expired");
        }
        _ => {}
    }
    conn.goodbye(why, detail, wbuf);
    flush_counters(&mut conn, router);
    (*conn).close(why);
}

/// Adds the messages a connection received and sent since the last time to the
/// router's counters.
fn flush_counters(conn: &mut Conn, router: &Router) {
    Counters::add(
        &router.counters.messages_received,
        std::mem::take(&mut conn.received),
    );
    Counters::add(
        &router.counters.messages_sent,
        std::mem::take(&mut conn.sent),
    );
}

/// Reads CONNECT and answers it. `None` when the connection ends here.
async fn handshake<S>(
    io: &mut Connection<S>,
    peer: SocketAddr,
    ticket: Box<Ticket>,
    shared: &Shared,
) -> Option<Box<Conn>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let router = &shared.router;
    let lobby = &shared.lobby;
    let connect = tokio::select! {
        c = tokio::time::timeout(router.settings.connect_timeout, io.read_connect(lobby.max_connect)) => c,
        () = ticket.closed.cancelled() => return None,
    };
    drop(ticket);
    let connect = match connect {
        Err(_) => {
            tracing::info!(%peer, "no CONNECT within the connect timeout; closing");
            return None;
        }
        Ok(Err(ReadError::Io(_)) | Ok(None)) => return None,
        Ok(Err(e)) => {
            let (count, log) = lobby.bad_first.bump();
            if log {
                tracing::info!(%peer, error = %e, count, "first packet is not a valid CONNECT; closing");
            }
            if let ReadError::Malformed(e) = &e {
                if e.reason_code() == ReasonCode::UNSUPPORTED_PROTOCOL_VERSION {
                    refuse_protocol_version(io).await;
                }
            }
            return None;
        }
        Ok(Ok(Some(connect))) => connect,
    };
    let conn = Conn::connect(router, connect, peer, io.write_buf()).await;
    if conn.is_none() {
        let _ = tokio::time::timeout(GOODBYE_TIMEOUT, io.write_all()).await;
    }
    conn.map(Box::new)
}

/// Tells a client of an unknown protocol version so, in 3.1.1 (which every version
/// can read).
async fn refuse_protocol_version<S: AsyncRead + AsyncWrite + Unpin>(io: &mut Connection<S>) {
    let refusal = Packet::ConnAck(ConnAck {
        session_present: false,
        code: ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
        properties: Properties::default(),
    });
    if mqtt::encode(&refusal, Protocol::V311, io.write_buf()).is_ok() {
        let _ = tokio::time::timeout(GOODBYE_TIMEOUT, io.write_all()).await;
    }
}

/// Handles the packets already buffered (unless the client is not taking our answers).
/// An error with why the connection ends (and the decoding error's text).
fn handle_buffered<S>(
    io: &mut Connection<S>,
    conn: &mut Conn,
    protocol: Protocol,
    max: usize,
) -> Result<(), (Close, Option<String>)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        match io.buffered_packet(protocol, max) {
            Ok(Some(packet)) => conn
                .handle(packet, io.write_buf())
                .map_err(|why| (why, None))?,
            Ok(None) => return Ok(()),
            Err(e) => {
                tracing::info!(client_id = %conn.client_id(), error = %e, "malformed packet");
                return Err((Close::Protocol(e.reason_code()), Some(e.to_string())));
            }
        }
    }
}

enum Event {
    Io(Ready),
    Mail,
}

/// The connection loop: handle buffered packets, drain the mailbox, then wait for I/O
/// or mail. Keepalives are enforced by the router's housekeeping, through a kick.
async fn run<S>(io: &mut Connection<S>, conn: &mut Conn, router: &Router) -> (Close, Option<String>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let max = router.settings.max_packet_size as usize;
    let protocol = conn.protocol();
    let mailbox = conn.mailbox().clone();
    loop {
        if let Err(end) = handle_buffered(io, conn, protocol, max) {
            return end;
        }
        // Also with a full buffer: a kick (takeover, shutdown) must end even a
        // connection whose client stopped reading.
        if let Err(why) = conn.drain(io.write_buf(), WRITE_BATCH) {
            return (why, None);
        }
        if conn.sent > 0 || conn.received > 0 {
            flush_counters(conn, router);
        }
        let draining = io.pending() < WRITE_BATCH;
        let room = conn.has_room();
        let event = poll_fn(|cx| {
            if let Poll::Ready(ready) = io.poll_io(cx) {
                return Poll::Ready(Event::Io(ready));
            }
            // Also how a kick (takeover, keepalive, shutdown) reaches this task.
            if mailbox
                .poll_ready(cx, draining && room, draining)
                .is_ready()
            {
                return Poll::Ready(Event::Mail);
            }
            // A reload wakes the task after putting the new policy in force; the waker
            // is registered above, so checking after it misses no reload.
            if conn.reload_pending() {
                return Poll::Ready(Event::Mail);
            }
            Poll::Pending
        })
        .await;
        match event {
            Event::Io(Ready::Read(n)) => {
                conn.touch();
                Counters::add(&router.counters.bytes_received, n as u64);
            }
            Event::Io(Ready::Wrote(n)) => Counters::add(&router.counters.bytes_sent, n as u64),
            Event::Io(Ready::Flushed) | Event::Mail => {}
            Event::Io(Ready::Closed) => return (Close::Lost, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use crate::broker::{Broker, BrokerConfig, ListenerConfig};

    /// Regression: with the lobby full, a new connection closed the oldest waiting one
    /// at once, before that one's task had run; in a burst of real clients (all with
    /// their CONNECT already sent) on one core, clients were closed for each other.
    #[tokio::test(flavor = "current_thread")]
    async fn a_burst_of_real_clients_larger_than_the_lobby_all_log_in() {
        let broker = Broker::start(
            BrokerConfig {
                listeners: vec![ListenerConfig {
                    bind: "127.0.0.1:0".parse().unwrap(),
                    tls: None,
                }],
                max_pending_connections: 2,
                ..BrokerConfig::default()
            },
            Vec::new(),
        )
        .await
        .unwrap();
        let addr = broker.local_addrs()[0];
        // Blocking sockets: the broker's accept loop runs only once this test awaits,
        // so all of them wait in the backlog with their CONNECT sent.
        let clients: Vec<std::net::TcpStream> = (0..20u8)
            .map(|i| {
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                s.write_all(&[
                    0x10,
                    13,
                    0,
                    4,
                    b'M',
                    b'Q',
                    b'T',
                    b'T',
                    4,
                    2,
                    0,
                    60,
                    0,
                    1,
                    b'a' + i,
                ])
                .unwrap();
                s
            })
            .collect();
        let acks = tokio::task::spawn_blocking(move || {
            clients
                .into_iter()
                .map(|mut s| {
                    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
                        .unwrap();
                    let mut ack = [0u8; 4];
                    s.read_exact(&mut ack).map(|()| ack).ok()
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap();
        assert!(acks.iter().all(|a| *a == Some([0x20, 2, 0, 0])), "{acks:?}");
        broker.shutdown().await;
    }
}
