//! The Modbus connection of one bus: opening, reading one block, telling failures apart,
//! reconnecting.
//!
//! Invariants:
//! - One request at a time (the link is owned by its bus task and takes `&mut self`).
//! - On a serial line, at least the inter-frame silence passes between the end of one
//!   transaction (answer or timeout) and the next request.
//! - A Modbus exception is an answer, not a fault: it is the inner `Err` of
//!   `Result<Result<Words, ExceptionCode>, ReadError>` (tokio-modbus's shape), and the
//!   connection stays up.
//! - [`ReadError::is_retryable`] is the one list of faults worth retrying: those of one
//!   transaction on a link that stays up (timeout, corrupted or mismatched answer). A
//!   disconnection is never retried on the spot.
//! - Errors keep their causes: `Disconnected` holds a [`Disconnect`] whose `source()` is
//!   the io, serial or resolver error; each `Display` names only its own level, and log
//!   lines print the whole chain ([`Chain`]).
//! - An answer is used only if it has exactly the requested register count (bits: at
//!   least the requested count, padded to bytes). After a failed RTU transaction, input
//!   that is already waiting is dropped before the next request, since RTU frames carry
//!   no transaction id.
//! - After a transport fault (I/O error, or on TCP a timeout or a mismatched answer,
//!   after which the stream may hold a late reply) the connection is dropped and reopened
//!   lazily, at most once per reconnect backoff, so a missing USB adapter or a refused
//!   TCP port costs no bus time while it is missing.
//! - A device that accepts the connection and then closes it or answers bytes that are
//!   not Modbus is the device's fault, not the bus's ([`Disconnect::by_device`]): its
//!   polls count as failures, so the device's quarantine backoff spaces them out.
//! - "Connection lost" and "restored" are logged for a connection that had answered, so
//!   a device that fails every fresh connection logs once, through its device state.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_modbus::client::{Context, Reader, Writer};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{ExceptionCode, Slave};

use super::config::{BusConfig, BusKind, Framing, Parity};
use super::decode::RegisterKind;
use super::reading::Quality;
use super::schedule::Outcome;
use super::write::WriteOp;

/// Why a block read (or a line) produced no answer. Each error's `Display` names only its
/// own level; the cause is its `source()` (log lines render the whole chain).
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("no answer within the timeout")]
    Timeout,
    #[error("corrupted answer (CRC or framing)")]
    Crc,
    /// The port or connection is down. Shared, because a bus in its reopen backoff
    /// answers every read with the cause of the last failed open.
    #[error("disconnected")]
    Disconnected(#[source] Arc<Disconnect>),
    #[error("answer does not match the request")]
    Protocol(#[source] tokio_modbus::ProtocolError),
    #[error("answer does not match the request: {got} values for a request of {count}")]
    WrongCount { got: usize, count: u16 },
}

/// Why a bus's port or connection is down: the source of [`ReadError::Disconnected`].
#[derive(Debug, thiserror::Error)]
pub enum Disconnect {
    #[error("serial port {path}")]
    Serial {
        path: String,
        #[source]
        source: tokio_serial::Error,
    },
    #[error("resolve {host}")]
    Resolve {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("resolve {host}: no address")]
    NoAddress { host: String },
    /// A connect that timed out has a source of kind [`io::ErrorKind::TimedOut`].
    #[error("connect to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// The open port or connection failed (transparent: the error says it all).
    #[error(transparent)]
    Io(io::Error),
    /// A serial-port operation on the open port failed.
    #[error(transparent)]
    Port(tokio_serial::Error),
    /// The port's stream ended: a USB adapter unplugged, or the far end of a pty gone.
    #[error("the port closed (adapter unplugged?)")]
    Eof,
    /// A TCP answer out of step with its request: the connection is dropped, since the
    /// stream may still hold a late reply.
    #[error("answer out of step with the request")]
    OutOfStep,
    /// The device closed the connection instead of answering.
    #[error("the device closed the connection without answering")]
    Closed,
    /// The device sent bytes that are no answer, then closed the connection.
    #[error(
        "the device sent {bytes} bytes that are not a Modbus answer, then closed the connection"
    )]
    ClosedAfterGarbage { bytes: u64 },
    /// The device answered bytes that are not a Modbus TCP frame (the decoder's reason
    /// is the source); the connection is dropped, since nothing after them can be trusted.
    #[error("the device answered bytes that are not Modbus TCP")]
    Garbage(#[source] io::Error),
    /// Not open, and no failed open to blame (not expected to be seen).
    #[error("not connected")]
    NotConnected,
}

impl Disconnect {
    /// Whether the device itself ended the conversation on a connection it had accepted
    /// (closed it, or answered garbage): a fault of the device, not of the bus.
    pub fn by_device(&self) -> bool {
        matches!(
            self,
            Disconnect::Closed | Disconnect::ClosedAfterGarbage { .. } | Disconnect::Garbage(_)
        )
    }
}

impl ReadError {
    /// A [`ReadError::Disconnected`] for `cause`.
    pub fn disconnected(cause: Disconnect) -> ReadError {
        ReadError::Disconnected(Arc::new(cause))
    }
}

/// An error and its sources, `outer: inner: …`, for log lines and messages.
pub(crate) struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

impl ReadError {
    /// The quality a failed read gives its points.
    pub fn quality(&self) -> Quality {
        match self {
            ReadError::Timeout => Quality::Timeout,
            ReadError::Crc => Quality::Crc,
            ReadError::Disconnected(cause) => match **cause {
                Disconnect::ClosedAfterGarbage { .. } | Disconnect::Garbage(_) => Quality::Protocol,
                _ => Quality::Disconnected,
            },
            ReadError::Protocol(_) | ReadError::WrongCount { .. } => Quality::Protocol,
        }
    }

    /// What a poll that ended with this error says about the device's health: a bus
    /// that is down says nothing about it; anything else, including a device that
    /// closes the connection it accepted, is its failure.
    pub fn outcome(&self) -> Outcome {
        match self {
            ReadError::Disconnected(cause) if !cause.by_device() => Outcome::BusDown,
            _ => Outcome::Failed,
        }
    }

    /// A fault of one transaction on a link that stays up (no answer, a corrupted one, or
    /// one for another request): worth retrying, and whatever arrives late belongs to the
    /// failed transaction. A bus that is down is not retried: it is reopened lazily.
    pub fn is_retryable(&self) -> bool {
        match self {
            ReadError::Timeout
            | ReadError::Crc
            | ReadError::Protocol(_)
            | ReadError::WrongCount { .. } => true,
            ReadError::Disconnected(_) => false,
        }
    }
}

/// The data of one block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Words {
    Registers(Vec<u16>),
    Bits(Vec<bool>),
}

/// What the scheduler needs from a bus connection. The production implementation is
/// [`ModbusLink`]; the scheduler's paused-time tests drive an in-process device model.
///
/// As in tokio-modbus, a device's exception is an answer, not a fault: the outer `Result`
/// is the transport (did an answer for this request arrive?), the inner one the device's
/// verdict (the data, or the exception it answered instead).
pub trait Link: Send {
    /// Reads `count` registers or bits of `kind` at `start` from `unit`.
    fn read(
        &mut self,
        unit: u8,
        kind: RegisterKind,
        start: u16,
        count: u16,
        timeout: Duration,
    ) -> impl Future<Output = Result<Result<Words, ExceptionCode>, ReadError>> + Send;

    /// Sends one write to `unit` (a read-modify-write is two calls by the caller, so
    /// this never sees one); the device's acknowledgement is `Ok(Ok(()))`.
    fn write(
        &mut self,
        unit: u8,
        op: &WriteOp,
        timeout: Duration,
    ) -> impl Future<Output = Result<Result<(), ExceptionCode>, ReadError>> + Send;
}

/// One transaction: a block read, or a write.
#[derive(Debug, Clone, Copy)]
enum Request<'a> {
    Read {
        kind: RegisterKind,
        start: u16,
        count: u16,
    },
    Write(&'a WriteOp),
}

/// What a transaction's answer carried.
#[derive(Debug)]
enum Answer {
    Words(Words),
    Written,
}

/// Where and how to connect.
#[derive(Debug, Clone, PartialEq)]
pub enum Endpoint {
    Serial {
        path: String,
        baud: u32,
        parity: Parity,
        data_bits: u8,
        stop_bits: u8,
    },
    Tcp {
        host: String,
        port: u16,
        framing: Framing,
        connect_timeout: Duration,
    },
}

impl Endpoint {
    /// The endpoint of a Modbus bus (`None` for a lines bus).
    pub fn of(bus: &BusConfig) -> Option<Endpoint> {
        match bus.kind {
            BusKind::Rtu => Some(Endpoint::Serial {
                path: bus.serial_path()?.to_string(),
                baud: bus.baud(),
                parity: bus.parity(),
                data_bits: bus.data_bits(),
                stop_bits: bus.stop_bits(),
            }),
            BusKind::Tcp => Some(Endpoint::Tcp {
                host: bus.host.clone()?,
                port: bus.tcp_port()?,
                framing: bus.framing(),
                connect_timeout: Duration::from_millis(bus.connect_timeout_ms()),
            }),
            BusKind::Lines => None,
        }
    }

    fn rtu_framed(&self) -> bool {
        match self {
            Endpoint::Serial { .. } => true,
            Endpoint::Tcp { framing, .. } => *framing == Framing::Rtu,
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Serial { path, baud, .. } => write!(f, "{path} at {baud} baud"),
            Endpoint::Tcp { host, port, .. } => write!(f, "{host}:{port}"),
        }
    }
}

/// Opens a serial port with the given settings, ready for async I/O.
pub fn open_serial(
    path: &str,
    baud: u32,
    parity: Parity,
    data_bits: u8,
    stop_bits: u8,
) -> Result<tokio_serial::SerialStream, tokio_serial::Error> {
    use tokio_serial::SerialPortBuilderExt;
    tokio_serial::new(path, baud)
        .parity(match parity {
            Parity::None => tokio_serial::Parity::None,
            Parity::Even => tokio_serial::Parity::Even,
            Parity::Odd => tokio_serial::Parity::Odd,
        })
        .data_bits(if data_bits == 7 {
            tokio_serial::DataBits::Seven
        } else {
            tokio_serial::DataBits::Eight
        })
        .stop_bits(if stop_bits == 2 {
            tokio_serial::StopBits::Two
        } else {
            tokio_serial::StopBits::One
        })
        .open_native_async()
}

/// The shared side of a stream: bytes received, whether it reached its end, and (RTU) a
/// request to drop stale input.
#[derive(Debug, Default)]
struct Wire {
    received: AtomicU64,
    eof: AtomicBool,
    flush: AtomicBool,
}

/// A stream that counts the bytes it delivers and notes its end, so a timeout after
/// garbage can be told from a timeout after silence (tokio-modbus resynchronises on a bad
/// CRC by skipping bytes and keeps waiting, so a corrupted answer surfaces as a timeout)
/// and a device that closed the connection from an error of the socket (tokio-modbus
/// reports an end of stream as whatever `errno` holds, or as "bytes remaining on
/// stream"); and (RTU) that can drop input left over from a failed transaction before
/// the next request: RTU has no transaction id, so a late answer would otherwise be
/// taken for the next one.
#[derive(Debug)]
struct Counted<T> {
    inner: T,
    wire: Arc<Wire>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let room = buf.remaining() > 0;
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let got = buf.filled().len() - before;
        if got > 0 {
            self.wire.received.fetch_add(got as u64, Ordering::Relaxed);
        } else if room && matches!(result, Poll::Ready(Ok(()))) {
            self.wire.eof.store(true, Ordering::Relaxed);
        }
        result
    }
}

impl<T: AsyncRead + Unpin> Counted<T> {
    /// Reads and drops whatever input is already there (never waits for more).
    fn drain(&mut self, cx: &mut TaskContext<'_>) {
        let mut scratch = [0u8; 256];
        loop {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {}
                _ => return,
            }
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.wire.flush.swap(false, Ordering::Relaxed) {
            self.drain(cx);
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// First and longest wait between reconnect attempts.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// A Modbus connection (RTU on a serial port, TCP, or RTU over TCP) with lazy reconnect.
pub struct ModbusLink {
    endpoint: Endpoint,
    silence: Duration,
    ctx: Option<Context>,
    wire: Arc<Wire>,
    /// End of the last transaction on the wire, for the inter-frame silence.
    quiet_since: Option<Instant>,
    next_connect: Instant,
    reconnect_wait: Duration,
    /// Why the connection is down, so the scheduler can log it once per state change.
    last_error: Option<Arc<Disconnect>>,
    /// The open connection has carried an answer (data or an exception).
    answered: bool,
}

impl ModbusLink {
    pub fn new(endpoint: Endpoint, silence: Duration) -> ModbusLink {
        ModbusLink {
            endpoint,
            silence,
            ctx: None,
            wire: Arc::new(Wire::default()),
            quiet_since: None,
            next_connect: Instant::now(),
            reconnect_wait: RECONNECT_MIN,
            last_error: None,
            answered: false,
        }
    }

    async fn connect(&mut self) -> Result<(), ReadError> {
        if self.ctx.is_some() {
            return Ok(());
        }
        if Instant::now() < self.next_connect {
            return Err(ReadError::Disconnected(
                self.last_error
                    .clone()
                    .unwrap_or_else(|| Arc::new(Disconnect::NotConnected)),
            ));
        }
        let result = open(self.endpoint.clone(), Arc::clone(&self.wire)).await;
        match result {
            Ok(ctx) => {
                self.ctx = Some(ctx);
                self.answered = false;
                self.wire.eof.store(false, Ordering::Relaxed);
                self.reconnect_wait = RECONNECT_MIN;
                self.quiet_since = None;
                Ok(())
            }
            Err(e) => {
                let e = Arc::new(e);
                if !same_cause(self.last_error.as_deref(), &e) {
                    tracing::warn!(endpoint = %self.endpoint, error = %Chain(&*e), "cannot open bus; retrying with backoff");
                }
                self.last_error = Some(Arc::clone(&e));
                self.next_connect = Instant::now() + self.reconnect_wait;
                self.reconnect_wait = (self.reconnect_wait * 2).min(RECONNECT_MAX);
                Err(ReadError::Disconnected(e))
            }
        }
    }
}

/// Whether `new` reads the same as `last` (so a retry that fails the same way logs
/// nothing new).
pub(crate) fn same_cause(last: Option<&Disconnect>, new: &Disconnect) -> bool {
    last.is_some_and(|last| Chain(last).to_string() == Chain(new).to_string())
}

/// Opens the endpoint (a free function: the future must not borrow the link, whose
/// client context is not `Sync`).
async fn open(endpoint: Endpoint, wire: Arc<Wire>) -> Result<Context, Disconnect> {
    match &endpoint {
        Endpoint::Serial {
            path,
            baud,
            parity,
            data_bits,
            stop_bits,
        } => {
            let port =
                open_serial(path, *baud, *parity, *data_bits, *stop_bits).map_err(|source| {
                    Disconnect::Serial {
                        path: path.clone(),
                        source,
                    }
                })?;
            let counted = Counted { inner: port, wire };
            Ok(tokio_modbus::client::rtu::attach(counted))
        }
        Endpoint::Tcp {
            host,
            port,
            framing,
            connect_timeout,
        } => {
            let addr = resolve(host, *port).await?;
            let stream =
                tokio::time::timeout(*connect_timeout, tokio::net::TcpStream::connect(addr))
                    .await
                    .unwrap_or_else(|_elapsed| Err(io::ErrorKind::TimedOut.into()))
                    .map_err(|source| Disconnect::Connect { addr, source })?;
            let _ = stream.set_nodelay(true);
            let counted = Counted {
                inner: stream,
                wire,
            };
            Ok(match framing {
                Framing::Tcp => tokio_modbus::client::tcp::attach(counted),
                Framing::Rtu => tokio_modbus::client::rtu::attach(counted),
            })
        }
    }
}

impl ModbusLink {
    /// Drops the connection after a fault. Logged only if it had answered: one that
    /// fails before any answer is the device's state change, logged by its task.
    fn drop_connection(&mut self, why: &Arc<Disconnect>) {
        if self.ctx.take().is_some() {
            if self.answered {
                tracing::warn!(endpoint = %self.endpoint, reason = %Chain(&**why), "bus connection lost; reopening");
            }
            self.last_error = Some(Arc::clone(why));
            self.next_connect = Instant::now();
        }
    }

    /// An answer arrived: the first one after a reopen says the connection is back.
    fn note_answer(&mut self) {
        if !self.answered {
            self.answered = true;
            if self.last_error.take().is_some() {
                tracing::info!(endpoint = %self.endpoint, "bus connection restored");
            }
        }
    }

    /// Names a transport error in the field's words: a device that closed the
    /// connection, or one that answered garbage (`received` bytes of this transaction).
    fn classify(&self, e: io::Error, received: u64) -> Disconnect {
        let eof = self.wire.eof.load(Ordering::Relaxed);
        if e.kind() == io::ErrorKind::InvalidData {
            Disconnect::Garbage(e)
        } else if eof && received > 0 {
            Disconnect::ClosedAfterGarbage { bytes: received }
        } else if eof {
            Disconnect::Closed
        } else {
            Disconnect::Io(e)
        }
    }

    async fn transact(
        ctx: &mut Context,
        unit: u8,
        request: Request<'_>,
    ) -> tokio_modbus::Result<Answer> {
        ctx.set_slave(Slave(unit));
        let (kind, start, count) = match request {
            Request::Read { kind, start, count } => (kind, start, count),
            Request::Write(op) => {
                let written = match op {
                    WriteOp::Coil { address, on } => ctx.write_single_coil(*address, *on).await?,
                    WriteOp::Register { address, word } => {
                        ctx.write_single_register(*address, *word).await?
                    }
                    WriteOp::Registers { address, words } => {
                        ctx.write_multiple_registers(*address, words).await?
                    }
                    WriteOp::Mask { address, and, or } => {
                        ctx.masked_write_register(*address, *and, *or).await?
                    }
                    // Never one request: `write` sends it as a read and a write.
                    WriteOp::ReadModifyWrite { .. } => Err(ExceptionCode::IllegalFunction),
                };
                return Ok(written.map(|()| Answer::Written));
            }
        };
        Ok(match kind {
            RegisterKind::Coil => ctx.read_coils(start, count).await?.map(Words::Bits),
            RegisterKind::Discrete => ctx
                .read_discrete_inputs(start, count)
                .await?
                .map(Words::Bits),
            RegisterKind::Holding => ctx
                .read_holding_registers(start, count)
                .await?
                .map(Words::Registers),
            RegisterKind::Input => ctx
                .read_input_registers(start, count)
                .await?
                .map(Words::Registers),
        }
        .map(Answer::Words))
    }
}

async fn resolve(host: &str, port: u16) -> Result<SocketAddr, Disconnect> {
    tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| Disconnect::Resolve {
            host: host.to_string(),
            source,
        })?
        .next()
        .ok_or_else(|| Disconnect::NoAddress {
            host: host.to_string(),
        })
}

impl Link for ModbusLink {
    async fn read(
        &mut self,
        unit: u8,
        kind: RegisterKind,
        start: u16,
        count: u16,
        timeout: Duration,
    ) -> Result<Result<Words, ExceptionCode>, ReadError> {
        let request = Request::Read { kind, start, count };
        Ok(match self.exchange(unit, request, timeout).await? {
            Ok(Answer::Words(words)) => Ok(words),
            Ok(Answer::Written) => return Err(ReadError::WrongCount { got: 0, count }),
            Err(code) => Err(code),
        })
    }

    async fn write(
        &mut self,
        unit: u8,
        op: &WriteOp,
        timeout: Duration,
    ) -> Result<Result<(), ExceptionCode>, ReadError> {
        let register;
        let op = match *op {
            WriteOp::ReadModifyWrite { address, bit, on } => {
                // Two transactions, each with its silence, and nothing in between: the
                // bus task holds the link until both are done.
                let word = match self
                    .read(unit, RegisterKind::Holding, address, 1, timeout)
                    .await?
                {
                    Ok(Words::Registers(words)) => words.first().copied().unwrap_or_default(),
                    Ok(Words::Bits(_)) => return Err(ReadError::WrongCount { got: 0, count: 1 }),
                    Err(code) => return Ok(Err(code)),
                };
                let mask = 1u16 << (bit & 15);
                register = WriteOp::Register {
                    address,
                    word: if on { word | mask } else { word & !mask },
                };
                &register
            }
            ref op => op,
        };
        Ok(self
            .exchange(unit, Request::Write(op), timeout)
            .await?
            .map(|_| ()))
    }
}

impl ModbusLink {
    /// One transaction on the wire: connect if needed, keep the inter-frame silence,
    /// wait at most `timeout`, and name what went wrong.
    async fn exchange(
        &mut self,
        unit: u8,
        request: Request<'_>,
        timeout: Duration,
    ) -> Result<Result<Answer, ExceptionCode>, ReadError> {
        self.connect().await?;
        let rtu = self.endpoint.rtu_framed();
        if rtu {
            if let Some(quiet) = self.quiet_since {
                tokio::time::sleep_until(quiet + self.silence).await;
            }
        }
        let received_before = self.wire.received.load(Ordering::Relaxed);
        let Some(ctx) = self.ctx.as_mut() else {
            return Err(ReadError::disconnected(Disconnect::NotConnected));
        };
        let outcome = tokio::time::timeout(timeout, Self::transact(ctx, unit, request)).await;
        self.quiet_since = Some(Instant::now());
        let result = match outcome {
            Err(_elapsed) => {
                let garbage = self.wire.received.load(Ordering::Relaxed) != received_before;
                if !rtu {
                    // A late MBAP answer would be read as the reply to the next request:
                    // start the next one on a fresh connection (quietly: the device, not
                    // the connection, is what failed, and the scheduler logs that).
                    self.ctx = None;
                }
                if rtu && garbage {
                    Err(ReadError::Crc)
                } else {
                    Err(ReadError::Timeout)
                }
            }
            Ok(Ok(Ok(answer))) => {
                // Registers must match exactly; bits come padded to whole bytes.
                let count = match request {
                    Request::Read { count, .. } => usize::from(count),
                    Request::Write(_) => 0,
                };
                let (got, ok) = match &answer {
                    Answer::Words(Words::Registers(r)) => (r.len(), r.len() == count),
                    Answer::Words(Words::Bits(b)) => (b.len(), b.len() >= count),
                    Answer::Written => (0, true),
                };
                if ok {
                    self.note_answer();
                    Ok(Ok(answer))
                } else {
                    Err(ReadError::WrongCount {
                        got,
                        count: count as u16,
                    })
                }
            }
            Ok(Ok(Err(code))) => {
                self.note_answer();
                Ok(Err(code))
            }
            Ok(Err(tokio_modbus::Error::Protocol(e))) => {
                if !rtu {
                    self.drop_connection(&Arc::new(Disconnect::OutOfStep));
                }
                Err(ReadError::Protocol(e))
            }
            Ok(Err(tokio_modbus::Error::Transport(e))) => {
                if e.kind() == io::ErrorKind::InvalidData && rtu {
                    // Bad CRC or undecodable frame after tokio-modbus gave up resyncing.
                    Err(ReadError::Crc)
                } else {
                    let received = self.wire.received.load(Ordering::Relaxed) - received_before;
                    let why = Arc::new(self.classify(e, received));
                    self.drop_connection(&why);
                    Err(ReadError::Disconnected(why))
                }
            }
        };
        if rtu && matches!(&result, Err(e) if e.is_retryable()) {
            // Whatever arrives late belongs to this failed transaction, not the next.
            self.wire.flush.store(true, Ordering::Relaxed);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: `Disconnected` carried its cause as a String, so the io::Error (and
    /// its kind) was gone by the time anything looked at it.
    #[tokio::test]
    async fn a_refused_connection_keeps_its_io_error_as_the_source() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let endpoint = Endpoint::Tcp {
            host: "127.0.0.1".into(),
            port,
            framing: Framing::Tcp,
            connect_timeout: Duration::from_secs(1),
        };
        let mut link = ModbusLink::new(endpoint, Duration::ZERO);
        let timeout = Duration::from_secs(1);
        let err = link
            .read(1, RegisterKind::Holding, 0, 1, timeout)
            .await
            .unwrap_err();
        assert_eq!(err.quality(), Quality::Disconnected);
        assert!(!err.is_retryable());
        let io = std::error::Error::source(&err)
            .and_then(|cause| cause.source())
            .and_then(|e| e.downcast_ref::<io::Error>())
            .expect("the io::Error is kept");
        assert_eq!(io.kind(), io::ErrorKind::ConnectionRefused);
        assert_eq!(
            Chain(&err).to_string(),
            format!("disconnected: connect to 127.0.0.1:{port}: {io}")
        );

        // Within the reconnect backoff the same cause is handed out again.
        let again = link
            .read(1, RegisterKind::Holding, 0, 1, timeout)
            .await
            .unwrap_err();
        match (&err, &again) {
            (ReadError::Disconnected(a), ReadError::Disconnected(b)) => {
                assert!(Arc::ptr_eq(a, b))
            }
            other => panic!("{other:?}"),
        }
    }

    /// A loopback "device" that accepts one connection, reads the request and then
    /// answers `answer` (possibly nothing) and closes, or stays open when `close` is
    /// false. Real sockets: the fault is what the peer does, not what a mock says.
    async fn device(answer: &'static [u8], close: bool) -> ModbusLink {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 12];
            socket.read_exact(&mut request).await.unwrap();
            socket.write_all(answer).await.unwrap();
            if !close {
                std::future::pending::<()>().await;
            }
        });
        let endpoint = Endpoint::Tcp {
            host: "127.0.0.1".into(),
            port,
            framing: Framing::Tcp,
            connect_timeout: Duration::from_secs(5),
        };
        ModbusLink::new(endpoint, Duration::ZERO)
    }

    async fn fault_of(mut link: ModbusLink) -> ReadError {
        link.read(1, RegisterKind::Holding, 0, 1, Duration::from_secs(5))
            .await
            .unwrap_err()
    }

    /// Regression: a device that closed its TCP connection showed as `Operation now in
    /// progress (os error 115)` (tokio-modbus reports the end of the stream as whatever
    /// errno holds), and was not held against the device.
    #[tokio::test]
    async fn a_device_that_closes_the_connection_is_named_and_blamed() {
        let err = fault_of(device(b"", true).await).await;
        assert_eq!(
            Chain(&err).to_string(),
            "disconnected: the device closed the connection without answering"
        );
        assert_eq!(err.outcome(), Outcome::Failed);
        assert_eq!(err.quality(), Quality::Disconnected);
    }

    /// Regression: garbage and then a close showed as `bytes remaining on stream`.
    #[tokio::test]
    async fn garbage_then_a_close_is_named_and_blamed() {
        let err = fault_of(device(b"\xde\xad\xbe", true).await).await;
        assert_eq!(
            Chain(&err).to_string(),
            "disconnected: the device sent 3 bytes that are not a Modbus answer, then closed the connection"
        );
        assert_eq!(err.outcome(), Outcome::Failed);
        assert_eq!(err.quality(), Quality::Protocol);
    }

    #[tokio::test]
    async fn an_answer_that_is_not_modbus_tcp_is_named_and_blamed() {
        // A header with protocol id 0xBEEF and a length that fits.
        let err = fault_of(device(b"\xde\xad\xbe\xef\x00\x03\x01\x03\x00", false).await).await;
        let text = Chain(&err).to_string();
        assert!(
            text.starts_with("disconnected: the device answered bytes that are not Modbus TCP: "),
            "{text}"
        );
        assert_eq!(err.outcome(), Outcome::Failed);
        // A bus that is down is not the device's fault.
        assert_eq!(
            ReadError::disconnected(Disconnect::NotConnected).outcome(),
            Outcome::BusDown
        );
    }

    #[test]
    fn only_faults_of_one_transaction_are_retried() {
        assert!(ReadError::Timeout.is_retryable());
        assert!(ReadError::Crc.is_retryable());
        assert!(ReadError::WrongCount { got: 1, count: 2 }.is_retryable());
        assert!(!ReadError::disconnected(Disconnect::Eof).is_retryable());
        assert_eq!(
            ReadError::WrongCount { got: 1, count: 2 }.to_string(),
            "answer does not match the request: 1 values for a request of 2"
        );
    }
}
