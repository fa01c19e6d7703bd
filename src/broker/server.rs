//! Listeners and the socket task of each connection.
//!
//! Invariants:
//! - One task per connection does both directions, so an idle connection costs one
//!   small task: its read buffer is released when a read leaves it empty, its write
//!   buffer when it has been written out, and it has no timer of its own (the router's
//!   housekeeping enforces keepalives).
//! - Reading pauses while more than [`READ_PAUSE`] bytes wait to be written to the
//!   client (it does not read its acknowledgements), and the read buffer holds at most
//!   one packet beyond what was decoded, so a flooding client is held back by TCP.
//! - Everything queued for a client is written in batches: the mailbox is drained into
//!   one buffer up to [`WRITE_BATCH`] bytes, then written with as few syscalls as the
//!   socket allows.
//! - A connection that sends no CONNECT within the connect timeout, nothing within 1.5
//!   times its keepalive, or a malformed packet is closed with one log line; nothing
//!   else is affected.
//! - Connections beyond `max_connections` are closed right after accept.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::conn::{Close, Conn};
use super::router::{Counters, Router};
use crate::mqtt::{self, ConnAck, Packet, Properties, Protocol, ReasonCode};

/// Bytes drained from the mailbox into one write.
const WRITE_BATCH: usize = 64 * 1024;
/// Reading stops while this much waits to be written.
const READ_PAUSE: usize = 256 * 1024;
/// Size of a read into a connection without a buffer.
const FIRST_READ: usize = 2048;
/// Reads at least this large keep the buffer for the next one.
const KEEP_BUFFER: usize = FIRST_READ;
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
pub(crate) async fn serve<S>(mut stream: S, peer: SocketAddr, shared: &Shared)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let router = &shared.router;
    let mut rbuf = BytesMut::new();
    let mut wbuf = BytesMut::new();
    // Boxed: CONNECT handling holds large packets for a moment; the task keeps only what
    // the connected state needs.
    let handshake = Box::pin(handshake(&mut stream, &mut rbuf, &mut wbuf, peer, shared)).await;
    let Some(mut conn) = handshake else {
        return;
    };
    let (why, detail) = run(&mut stream, &mut conn, &mut rbuf, &mut wbuf, router).await;
    finish(conn, why, detail.as_deref(), &mut wbuf, router);
    if why != Close::Lost && !wbuf.is_empty() {
        // Boxed for the same reason as the handshake: a timer is big and rarely needed.
        let _ = Box::pin(tokio::time::timeout(GOODBYE_TIMEOUT, async {
            stream.write_all(&wbuf).await?;
            stream.shutdown().await
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
    Counters::add(
        &router.counters.messages_received,
        std::mem::take(&mut conn.received),
    );
    Counters::add(
        &router.counters.messages_sent,
        std::mem::take(&mut conn.sent),
    );
    (*conn).close(why);
}

/// Reads CONNECT and answers it. `None` when the connection ends here.
async fn handshake<S>(
    stream: &mut S,
    rbuf: &mut BytesMut,
    wbuf: &mut BytesMut,
    peer: SocketAddr,
    shared: &Shared,
) -> Option<Box<Conn>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let router = &shared.router;
    let max = router.settings.max_packet_size as usize;
    let connect = tokio::select! {
        c = tokio::time::timeout(router.settings.connect_timeout, read_connect(stream, rbuf, max)) => c,
        () = shared.cancel.cancelled() => return None,
    };
    let connect = match connect {
        Err(_) => {
            tracing::info!(%peer, "no CONNECT within the connect timeout; closing");
            return None;
        }
        Ok(Err(ConnectError::Io)) => return None,
        Ok(Err(ConnectError::Malformed(e))) => {
            tracing::info!(%peer, error = %e, "bad CONNECT; closing");
            if e.reason_code() == ReasonCode::UNSUPPORTED_PROTOCOL_VERSION {
                let refusal = Packet::ConnAck(ConnAck {
                    session_present: false,
                    code: ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
                    properties: Properties::default(),
                });
                if mqtt::encode(&refusal, Protocol::V311, wbuf).is_ok() {
                    let _ = tokio::time::timeout(GOODBYE_TIMEOUT, stream.write_all(wbuf)).await;
                }
            }
            return None;
        }
        Ok(Ok(connect)) => connect,
    };
    let conn = Conn::connect(router, connect, peer, wbuf).await;
    if conn.is_none() {
        let _ = tokio::time::timeout(GOODBYE_TIMEOUT, stream.write_all(wbuf)).await;
    }
    conn.map(Box::new)
}

enum ConnectError {
    Io,
    Malformed(mqtt::Error),
}

/// Reads until a whole first packet is buffered; it must be CONNECT.
async fn read_connect<S>(
    stream: &mut S,
    rbuf: &mut BytesMut,
    max: usize,
) -> Result<mqtt::Connect, ConnectError>
where
    S: AsyncRead + Unpin,
{
    loop {
        match mqtt::decode(rbuf, Protocol::V311, max) {
            Ok(Some(Packet::Connect(c))) => return Ok(c),
            Ok(Some(other)) => {
                tracing::info!(packet = ?std::mem::discriminant(&other), "first packet is not CONNECT; closing");
                return Err(ConnectError::Io);
            }
            Ok(None) => {}
            Err(e) => return Err(ConnectError::Malformed(e)),
        }
        rbuf.reserve(FIRST_READ);
        match tokio::io::AsyncReadExt::read_buf(stream, rbuf).await {
            Ok(0) | Err(_) => return Err(ConnectError::Io),
            Ok(_) => {}
        }
    }
}

enum Event {
    Read(usize),
    Wrote(usize),
    Flushed,
    Mail,
    Closed,
}

/// The connection loop: read and handle packets, drain the mailbox, write, keepalive.
async fn run<S>(
    stream: &mut S,
    conn: &mut Conn,
    rbuf: &mut BytesMut,
    wbuf: &mut BytesMut,
    router: &Router,
) -> (Close, Option<String>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let max = router.settings.max_packet_size as usize;
    let protocol = conn.protocol();
    let mailbox = conn.mailbox().clone();
    let mut unflushed = false;
    loop {
        // Handle what is buffered, unless the client is not taking our answers.
        while !rbuf.is_empty() && wbuf.len() < READ_PAUSE {
            match mqtt::decode(rbuf, protocol, max) {
                Ok(Some(packet)) => {
                    if let Err(why) = conn.handle(packet, wbuf) {
                        return (why, None);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::info!(client_id = %conn.client_id(), error = %e, "malformed packet");
                    return (Close::Protocol(e.reason_code()), Some(e.to_string()));
                }
            }
        }
        // Also with a full buffer: a kick (takeover, shutdown) must end even a
        // connection whose client stopped reading.
        if let Err(why) = conn.drain(wbuf, WRITE_BATCH) {
            return (why, None);
        }
        if conn.sent > 0 {
            Counters::add(
                &router.counters.messages_sent,
                std::mem::take(&mut conn.sent),
            );
        }
        if conn.received > 0 {
            Counters::add(
                &router.counters.messages_received,
                std::mem::take(&mut conn.received),
            );
        }

        let reading = wbuf.len() < READ_PAUSE;
        let draining = wbuf.len() < WRITE_BATCH;
        let room = conn.has_room();
        let event = poll_fn(|cx| {
            if !wbuf.is_empty() {
                match Pin::new(&mut *stream).poll_write(cx, wbuf) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Event::Closed),
                    Poll::Ready(Ok(n)) => return Poll::Ready(Event::Wrote(n)),
                    Poll::Pending => {}
                }
            } else if unflushed {
                match Pin::new(&mut *stream).poll_flush(cx) {
                    Poll::Ready(Ok(())) => return Poll::Ready(Event::Flushed),
                    Poll::Ready(Err(_)) => return Poll::Ready(Event::Closed),
                    Poll::Pending => {}
                }
            }
            if reading {
                match poll_read(Pin::new(&mut *stream), cx, rbuf) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Event::Closed),
                    Poll::Ready(Ok(n)) => return Poll::Ready(Event::Read(n)),
                    Poll::Pending => {
                        if rbuf.is_empty() && rbuf.capacity() > 0 {
                            // Idle: give the buffer back.
                            *rbuf = BytesMut::new();
                        }
                    }
                }
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
            Event::Read(n) => {
                conn.touch();
                Counters::add(&router.counters.bytes_received, n as u64);
            }
            Event::Wrote(n) => {
                Counters::add(&router.counters.bytes_sent, n as u64);
                wbuf.advance(n);
                unflushed = true;
                if wbuf.is_empty() {
                    // Idle connections keep no write buffer.
                    *wbuf = BytesMut::new();
                }
            }
            Event::Flushed => unflushed = false,
            Event::Mail => {}
            Event::Closed => return (Close::Lost, None),
        }
    }
}

/// Reads into `rbuf`. A connection without a buffer reads into a stack buffer first and
/// gets a heap buffer only for the bytes that arrived.
fn poll_read<S: AsyncRead>(
    stream: Pin<&mut S>,
    cx: &mut std::task::Context<'_>,
    rbuf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    if rbuf.capacity() - rbuf.len() >= KEEP_BUFFER {
        return tokio_util::io::poll_read_buf(stream, cx, rbuf);
    }
    let mut tmp = [0u8; FIRST_READ];
    let mut buf = ReadBuf::new(&mut tmp);
    match stream.poll_read(cx, &mut buf) {
        Poll::Ready(Ok(())) => {
            let n = buf.filled().len();
            if n == FIRST_READ {
                // More is likely on its way: read the rest straight into the heap.
                rbuf.reserve(4 * FIRST_READ);
            }
            rbuf.extend_from_slice(buf.filled());
            Poll::Ready(Ok(n))
        }
        other => other.map(|r| r.map(|()| 0)),
    }
}
