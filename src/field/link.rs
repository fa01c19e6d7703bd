//! The Modbus connection of one bus: opening, reading one block, telling failures apart,
//! reconnecting.
//!
//! Invariants:
//! - One request at a time (the link is owned by its bus task and takes `&mut self`).
//! - On a serial line, at least the inter-frame silence passes between the end of one
//!   transaction (answer or timeout) and the next request.
//! - A Modbus exception is an answer, not a fault: the connection stays up.
//! - An answer is used only if it has exactly the requested register count (bits: at
//!   least the requested count, padded to bytes). After a failed RTU transaction, input
//!   that is already waiting is dropped before the next request, since RTU frames carry
//!   no transaction id.
//! - After a transport fault (I/O error, or on TCP a timeout or a mismatched answer,
//!   after which the stream may hold a late reply) the connection is dropped and reopened
//!   lazily, at most once per reconnect backoff, so a missing USB adapter or a refused
//!   TCP port costs no bus time while it is missing.

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
use tokio_modbus::client::{Context, Reader};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{ExceptionCode, Slave};

use super::config::{BusConfig, BusKind, Framing, Parity};
use super::decode::RegisterKind;
use super::reading::Quality;

/// Why a block read produced no data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("no answer within the timeout")]
    Timeout,
    #[error("corrupted answer (CRC or framing)")]
    Crc,
    #[error("disconnected: {0}")]
    Disconnected(String),
    #[error("answer does not match the request: {0}")]
    Protocol(String),
}

impl ReadError {
    /// The quality a failed read gives its points.
    pub fn quality(&self) -> Quality {
        match self {
            ReadError::Timeout => Quality::Timeout,
            ReadError::Crc => Quality::Crc,
            ReadError::Disconnected(_) => Quality::Disconnected,
            ReadError::Protocol(_) => Quality::Protocol,
        }
    }

    /// A fault of one transaction on a link that stays up (no answer, a corrupted one, or
    /// one for another request): worth retrying, and whatever arrives late belongs to the
    /// failed transaction. A bus that is down is not retried: it is reopened lazily.
    pub fn is_retryable(&self) -> bool {
        match self {
            ReadError::Timeout | ReadError::Crc | ReadError::Protocol(_) => true,
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

/// The shared side of an RTU stream: bytes received, and a request to drop stale input.
#[derive(Debug, Default)]
struct Wire {
    received: AtomicU64,
    flush: AtomicBool,
}

/// An RTU stream that counts the bytes it delivers, so a timeout after garbage can be
/// told from a timeout after silence (tokio-modbus resynchronises on a bad CRC by
/// skipping bytes and keeps waiting, so a corrupted answer surfaces as a timeout), and
/// that can drop input left over from a failed transaction before the next request: RTU
/// has no transaction id, so a late answer would otherwise be taken for the next one.
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
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let got = buf.filled().len() - before;
        if got > 0 {
            self.wire.received.fetch_add(got as u64, Ordering::Relaxed);
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
    /// The last connect error, so the scheduler can log it once per state change.
    last_error: Option<String>,
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
                    .unwrap_or_else(|| "reconnecting".into()),
            ));
        }
        let result = open(self.endpoint.clone(), Arc::clone(&self.wire)).await;
        match result {
            Ok(ctx) => {
                if self.last_error.take().is_some() {
                    tracing::info!(endpoint = %self.endpoint, "bus connection restored");
                }
                self.ctx = Some(ctx);
                self.reconnect_wait = RECONNECT_MIN;
                self.quiet_since = None;
                Ok(())
            }
            Err(e) => {
                if self.last_error.as_deref() != Some(e.as_str()) {
                    tracing::warn!(endpoint = %self.endpoint, error = %e, "cannot open bus; retrying with backoff");
                }
                self.last_error = Some(e.clone());
                self.next_connect = Instant::now() + self.reconnect_wait;
                self.reconnect_wait = (self.reconnect_wait * 2).min(RECONNECT_MAX);
                Err(ReadError::Disconnected(e))
            }
        }
    }
}

/// Opens the endpoint (a free function: the future must not borrow the link, whose
/// client context is not `Sync`).
async fn open(endpoint: Endpoint, wire: Arc<Wire>) -> Result<Context, String> {
    match &endpoint {
        Endpoint::Serial {
            path,
            baud,
            parity,
            data_bits,
            stop_bits,
        } => {
            let port = open_serial(path, *baud, *parity, *data_bits, *stop_bits)
                .map_err(|e| format!("serial port {path}: {e}"))?;
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
                    .map_err(|_| format!("connect to {addr}: timed out"))?
                    .map_err(|e| format!("connect to {addr}: {e}"))?;
            let _ = stream.set_nodelay(true);
            Ok(match framing {
                Framing::Tcp => tokio_modbus::client::tcp::attach(stream),
                Framing::Rtu => tokio_modbus::client::rtu::attach(Counted {
                    inner: stream,
                    wire,
                }),
            })
        }
    }
}

impl ModbusLink {
    fn drop_connection(&mut self, why: &str) {
        if self.ctx.take().is_some() {
            tracing::warn!(endpoint = %self.endpoint, reason = why, "bus connection lost; reopening");
            self.last_error = Some(why.to_string());
            self.next_connect = Instant::now();
        }
    }

    async fn transact(
        ctx: &mut Context,
        unit: u8,
        kind: RegisterKind,
        start: u16,
        count: u16,
    ) -> tokio_modbus::Result<Words> {
        ctx.set_slave(Slave(unit));
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
        })
    }
}

async fn resolve(host: &str, port: u16) -> Result<SocketAddr, String> {
    tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("resolve {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("resolve {host}: no address"))
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
        self.connect().await?;
        let rtu = self.endpoint.rtu_framed();
        if rtu {
            if let Some(quiet) = self.quiet_since {
                tokio::time::sleep_until(quiet + self.silence).await;
            }
        }
        let received_before = self.wire.received.load(Ordering::Relaxed);
        let Some(ctx) = self.ctx.as_mut() else {
            return Err(ReadError::Disconnected("not connected".into()));
        };
        let outcome =
            tokio::time::timeout(timeout, Self::transact(ctx, unit, kind, start, count)).await;
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
            Ok(Ok(Ok(words))) => {
                // Registers must match exactly; bits come padded to whole bytes.
                let (got, ok) = match &words {
                    Words::Registers(r) => (r.len(), r.len() == usize::from(count)),
                    Words::Bits(b) => (b.len(), b.len() >= usize::from(count)),
                };
                if ok {
                    Ok(Ok(words))
                } else {
                    Err(ReadError::Protocol(format!(
                        "{got} values for a request of {count}"
                    )))
                }
            }
            Ok(Ok(Err(code))) => Ok(Err(code)),
            Ok(Err(tokio_modbus::Error::Protocol(e))) => {
                if !rtu {
                    self.drop_connection("answer out of step with the request");
                }
                Err(ReadError::Protocol(e.to_string()))
            }
            Ok(Err(tokio_modbus::Error::Transport(e))) => {
                if e.kind() == io::ErrorKind::InvalidData && rtu {
                    // Bad CRC or undecodable frame after tokio-modbus gave up resyncing.
                    Err(ReadError::Crc)
                } else {
                    let why = e.to_string();
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
