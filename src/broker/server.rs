//! Listeners and the socket task of each connection.
//!
//! Invariants:
//! - One task per connection does both directions, so an idle connection costs one
//!   small task: its read buffer is released when a read leaves it empty, its write
//!   buffer when it has been written out.
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

use std::future::{poll_fn, Future};
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
use tokio::time::Instant;
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
/// A write buffer larger than this is released once written out.
const KEEP_WRITE_BUFFER: usize = 1024;
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
        let tls = tls.clone();
        shared.tracker.spawn(async move {
            let _permit = permit;
            match tls {
                None => serve(stream, peer, &task_shared).await,
                Some(acceptor) => {
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
                }
            }
        });
    }
}

/// Serves one connection from CONNECT to close.
pub(crate) async fn serve<S>(mut stream: S, peer: SocketAddr, shared: &Shared)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let router = &shared.router;
    let max = router.settings.max_packet_size as usize;
    let mut rbuf = BytesMut::new();
    let connect = tokio::select! {
        c = tokio::time::timeout(router.settings.connect_timeout, read_connect(&mut stream, &mut rbuf, max)) => c,
        () = shared.cancel.cancelled() => return,
    };
    let connect = match connect {
        Err(_) => {
            tracing::info!(%peer, "no CONNECT within the connect timeout; closing");
            return;
        }
        Ok(Err(ConnectError::Io)) => return,
        Ok(Err(ConnectError::Malformed(e))) => {
            tracing::info!(%peer, error = %e, "bad CONNECT; closing");
            if e.reason_code() == ReasonCode::UNSUPPORTED_PROTOCOL_VERSION {
                let mut out = BytesMut::new();
                let refusal = Packet::ConnAck(ConnAck {
                    session_present: false,
                    code: ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
                    properties: Properties::default(),
                });
                if mqtt::encode(&refusal, Protocol::V311, &mut out).is_ok() {
                    let _ = tokio::time::timeout(GOODBYE_TIMEOUT, stream.write_all(&out)).await;
                }
            }
            return;
        }
        Ok(Ok(connect)) => connect,
    };
    let mut wbuf = BytesMut::new();
    let conn = Conn::connect(router, connect, &mut wbuf).await;
    let Some(mut conn) = conn else {
        let _ = tokio::time::timeout(GOODBYE_TIMEOUT, stream.write_all(&wbuf)).await;
        return;
    };
    let why = run(&mut stream, &mut conn, &mut rbuf, &mut wbuf, router).await;
    match why {
        Close::Protocol(code) => {
            tracing::info!(client_id = %conn.client_id(), %peer, reason = code.0, "closing connection after a protocol error");
        }
        Close::KeepAliveTimeout => {
            tracing::info!(client_id = %conn.client_id(), %peer, "keepalive expired");
        }
        _ => {}
    }
    conn.goodbye(why, &mut wbuf);
    Counters::add(
        &router.counters.messages_received,
        std::mem::take(&mut conn.received),
    );
    Counters::add(
        &router.counters.messages_sent,
        std::mem::take(&mut conn.sent),
    );
    // Let go of the session first: a connection taking it over is waiting.
    conn.close(why);
    if why != Close::Lost && !wbuf.is_empty() {
        let _ = tokio::time::timeout(GOODBYE_TIMEOUT, async {
            stream.write_all(&wbuf).await?;
            stream.shutdown().await
        })
        .await;
    }
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
    Tick,
    Closed,
}

/// The connection loop: read and handle packets, drain the mailbox, write, keepalive.
async fn run<S>(
    stream: &mut S,
    conn: &mut Conn,
    rbuf: &mut BytesMut,
    wbuf: &mut BytesMut,
    router: &Router,
) -> Close
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let max = router.settings.max_packet_size as usize;
    let protocol = conn.protocol();
    let mailbox = conn.mailbox().clone();
    let mut notified = std::pin::pin!(mailbox.notified());
    let keep_alive = conn.keep_alive_timeout();
    let mut last_read = Instant::now();
    let mut deadline = keep_alive.map(|ka| Box::pin(tokio::time::sleep(ka)));
    let mut unflushed = false;
    loop {
        // Handle what is buffered, unless the client is not taking our answers.
        while !rbuf.is_empty() && wbuf.len() < READ_PAUSE {
            match mqtt::decode(rbuf, protocol, max) {
                Ok(Some(packet)) => {
                    if let Err(why) = conn.handle(packet, wbuf) {
                        return why;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::info!(client_id = %conn.client_id(), error = %e, "malformed packet");
                    return Close::Protocol(e.reason_code());
                }
            }
        }
        if wbuf.len() < WRITE_BATCH {
            if let Err(why) = conn.drain(wbuf, WRITE_BATCH) {
                return why;
            }
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
            if notified.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Mail);
            }
            if let Some(deadline) = deadline.as_mut() {
                if deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Tick);
                }
            }
            Poll::Pending
        })
        .await;

        match event {
            Event::Read(n) => {
                last_read = Instant::now();
                Counters::add(&router.counters.bytes_received, n as u64);
            }
            Event::Wrote(n) => {
                Counters::add(&router.counters.bytes_sent, n as u64);
                wbuf.advance(n);
                unflushed = true;
                if wbuf.is_empty() && wbuf.capacity() > KEEP_WRITE_BUFFER {
                    *wbuf = BytesMut::new();
                }
            }
            Event::Flushed => unflushed = false,
            Event::Mail => notified.set(mailbox.notified()),
            Event::Tick => {
                let (Some(ka), Some(deadline)) = (keep_alive, deadline.as_mut()) else {
                    continue;
                };
                let due = last_read + ka;
                if due <= Instant::now() {
                    return Close::KeepAliveTimeout;
                }
                deadline.as_mut().reset(due);
            }
            Event::Closed => return Close::Lost,
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
