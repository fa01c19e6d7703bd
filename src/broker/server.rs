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
//!   times its keepalive, or a malformed packet is closed with one log line; nothing
//!   else is affected.
//! - Connections beyond `max_connections` are closed right after accept.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
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
    pub cancel: CancellationToken,
    pub tracker: TaskTracker,
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
        let Ok(permit) = shared.slots.clone().try_acquire_owned() else {
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(%peer, refused, "connection limit reached; closing new connections");
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let task_shared = shared.clone();
        // Two task shapes, so a plain connection does not carry the size of a TLS one.
        match tls.clone() {
            None => {
                shared.tracker.spawn(async move {
                    let _permit = permit;
                    serve(stream, peer, &task_shared).await;
                });
            }
            Some(acceptor) => {
                shared.tracker.spawn(async move {
                    let _permit = permit;
                    let timeout = task_shared.router.settings.connect_timeout;
                    let handshake = tokio::select! {
                        h = tokio::time::timeout(timeout, acceptor.accept(stream)) => h,
                        () = task_shared.cancel.cancelled() => return,
                    };
                    match handshake {
                        Ok(Ok(stream)) => serve(stream, peer, &task_shared).await,
                        Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        }
    }
}

/// Serves one connection from CONNECT to close.
pub(crate) async fn serve<S>(stream: S, peer: SocketAddr, shared: &Shared)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let router = &shared.router;
    let mut io = Connection::new(stream);
    // Boxed: CONNECT handling holds large packets for a moment; the task keeps only what
    // the connected state needs.
    let handshake = Box::pin(handshake(&mut io, peer, shared)).await;
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
    shared: &Shared,
) -> Option<Box<Conn>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let router = &shared.router;
    let max = router.settings.max_packet_size as usize;
    let connect = tokio::select! {
        c = tokio::time::timeout(router.settings.connect_timeout, read_connect(io, max)) => c,
        () = shared.cancel.cancelled() => return None,
    };
    let connect = match connect {
        Err(_) => {
            tracing::info!(%peer, "no CONNECT within the connect timeout; closing");
            return None;
        }
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "bad CONNECT; closing");
            if e.reason_code() == ReasonCode::UNSUPPORTED_PROTOCOL_VERSION {
                refuse_protocol_version(io).await;
            }
            return None;
        }
        Ok(Ok(None)) => return None,
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

/// Reads the first packet; it must be CONNECT. `Ok(None)` when the connection ends
/// first (closed, failed, or another packet).
async fn read_connect<S>(
    io: &mut Connection<S>,
    max: usize,
) -> Result<Option<mqtt::Connect>, mqtt::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match io.read_packet(Protocol::V311, max).await {
        Ok(Some(Packet::Connect(c))) => Ok(Some(c)),
        Ok(Some(other)) => {
            tracing::info!(packet = ?std::mem::discriminant(&other), "first packet is not CONNECT; closing");
            Ok(None)
        }
        Ok(None) | Err(ReadError::Io(_)) => Ok(None),
        Err(ReadError::Malformed(e)) => Err(e),
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
