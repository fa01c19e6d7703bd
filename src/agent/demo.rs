//! The simulated Modbus TCP device behind `fieldbridge demo`: no hardware, changing
//! values, served by tokio-modbus on loopback so the real Modbus TCP bus code polls it.
//!
//! Register map (protocol addresses, 0-based):
//!
//! | kind | address | point | encoding |
//! |---|---|---|---|
//! | input register | 0–1 | `temperature`, °C: 21 + 4·sin(2π·t/60 s) | f32, ABCD |
//! | input register | 2–3 | `energy`, Wh: grows by 3 Wh per second | u32, ABCD |
//! | input register | 4 | `power`, W: 10 800 ± 300 | u16 |
//! | discrete input | 0 | `running`: always on | bit |
//! | discrete input | 1 | `alarm`: on 5 s of every 30 s | bit |
//! | discrete input | 2 | `door_open`: toggles every 20 s | bit |
//!
//! Any other address answers with the Modbus exception "illegal data address", as a
//! real device would.

use std::future::{ready, Ready};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_modbus::server::tcp::{accept_tcp_connection, Server};
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_util::sync::CancellationToken;

/// Topic prefix of the demo.
pub const DEMO_PREFIX: &str = "fieldbridge/demo";

/// Registers of the simulated device, computed from the time since it started.
#[derive(Debug, Clone, Copy)]
pub struct DemoDevice {
    started: Instant,
}

impl DemoDevice {
    pub fn new() -> DemoDevice {
        DemoDevice {
            started: Instant::now(),
        }
    }

    fn input_registers(&self) -> [u16; 5] {
        let t = self.started.elapsed().as_secs_f64();
        let temperature = (21.0 + 4.0 * (std::f64::consts::TAU * t / 60.0).sin()) as f32;
        let energy = 1_000_000u32.wrapping_add((t * 3.0) as u32);
        let power = (10_800.0 + 300.0 * (std::f64::consts::TAU * t / 7.0).sin()) as u16;
        let temperature = temperature.to_bits();
        [
            (temperature >> 16) as u16,
            temperature as u16,
            (energy >> 16) as u16,
            energy as u16,
            power,
        ]
    }

    fn discrete_inputs(&self) -> [bool; 3] {
        let t = self.started.elapsed().as_secs();
        [true, t % 30 < 5, (t / 20) % 2 == 1]
    }

    fn answer(&self, request: &Request<'_>) -> Result<Response, ExceptionCode> {
        match *request {
            Request::ReadInputRegisters(address, count) => {
                slice(&self.input_registers(), address, count).map(Response::ReadInputRegisters)
            }
            Request::ReadDiscreteInputs(address, count) => {
                slice(&self.discrete_inputs(), address, count).map(Response::ReadDiscreteInputs)
            }
            Request::ReadHoldingRegisters(..) | Request::ReadCoils(..) => {
                Err(ExceptionCode::IllegalDataAddress)
            }
            _ => Err(ExceptionCode::IllegalFunction),
        }
    }
}

impl Default for DemoDevice {
    fn default() -> Self {
        DemoDevice::new()
    }
}

fn slice<T: Copy>(table: &[T], address: u16, count: u16) -> Result<Vec<T>, ExceptionCode> {
    let start = usize::from(address);
    let end = start + usize::from(count);
    if count == 0 || end > table.len() {
        return Err(ExceptionCode::IllegalDataAddress);
    }
    Ok(table[start..end].to_vec())
}

impl tokio_modbus::server::Service for DemoDevice {
    type Request = SlaveRequest<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = Ready<Result<Response, ExceptionCode>>;

    fn call(&self, request: Self::Request) -> Self::Future {
        ready(self.answer(&request.request))
    }
}

/// A running simulated device.
pub struct DemoServer {
    pub addr: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl DemoServer {
    /// Serves a [`DemoDevice`] on `listener` until [`DemoServer::stop`].
    ///
    /// # Errors
    /// The listener's local address cannot be read.
    pub fn spawn(listener: TcpListener) -> std::io::Result<DemoServer> {
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let device = DemoDevice::new();
        let cancelled = stop.clone();
        let task = tokio::spawn(async move {
            let on_connected = move |stream, peer| async move {
                accept_tcp_connection(stream, peer, |_| Ok(Some(device)))
            };
            let on_error = |err| tracing::debug!(error = %err, "demo device connection ended");
            let served = Server::new(listener)
                .serve_until(&on_connected, on_error, async move {
                    cancelled.cancelled().await;
                })
                .await;
            if let Err(err) = served {
                tracing::warn!(error = %err, "demo device stopped");
            }
        });
        Ok(DemoServer { addr, stop, task })
    }

    /// Stops accepting and ends every connection.
    pub async fn stop(self) {
        self.stop.cancel();
        if let Err(err) = self.task.await {
            tracing::warn!(error = %err, "demo device task failed");
        }
    }
}

/// First port tried after `first` that nothing listens on, up to 100 further.
fn free_broker_port(first: u16) -> std::io::Result<u16> {
    for port in first..first.saturating_add(100) {
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("no free port in {first}..{}", first.saturating_add(100)),
    ))
}

/// The demo's configuration: the simulated device at `device`, the local broker on
/// `broker_port`, the store under `dir`, and an upstream when given.
pub fn config_text(
    device: SocketAddr,
    broker_port: u16,
    dir: &Path,
    upstream: Option<&str>,
) -> String {
    let mut text = format!(
        r#"[agent]
prefix = "{DEMO_PREFIX}"
health_interval_secs = 10

[broker]
[[broker.listeners]]
bind = "127.0.0.1:{broker_port}"

[store]
path = {store:?}

[[bus]]
name = "demo"
kind = "tcp"
host = "{host}"
port = {port}

[[bus.device]]
name = "sim"
unit_id = 1
poll_interval_ms = 1000

[[bus.device.point]]
name = "temperature"
unit = "°C"
kind = "input"
address = 0
type = "f32"

[[bus.device.point]]
name = "energy"
unit = "Wh"
kind = "input"
address = 2
type = "u32"

[[bus.device.point]]
name = "power"
unit = "W"
kind = "input"
address = 4
type = "u16"

[[bus.device.point]]
name = "running"
kind = "discrete"
address = 0

[[bus.device.point]]
name = "alarm"
kind = "discrete"
address = 1

[[bus.device.point]]
name = "door_open"
kind = "discrete"
address = 2
"#,
        store = dir.join("queue.db").display().to_string(),
        host = device.ip(),
        port = device.port(),
    );
    if let Some(url) = upstream {
        text.push_str(&format!("\n[upstream]\nurl = {url:?}\n"));
    }
    text
}

/// `fieldbridge demo`: the simulated device, the local broker, a temporary store and
/// an optional upstream, until SIGINT or SIGTERM.
///
/// # Errors
/// A part cannot start (see [`super::run`]).
pub async fn run(upstream: Option<String>, first_port: u16) -> Result<(), super::Error> {
    let device = DemoServer::spawn(
        TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(super::Error::Io)?,
    )
    .map_err(super::Error::Io)?;
    let port = free_broker_port(first_port).map_err(super::Error::Io)?;
    let dir = std::env::temp_dir().join(format!("fieldbridge-demo-{}", std::process::id()));
    let text = config_text(device.addr, port, &dir, upstream.as_deref());
    let config = crate::config::parse("(demo)", &text)?;
    println!(
        "fieldbridge demo: simulated Modbus TCP device on {}",
        device.addr
    );
    println!("local MQTT broker on 127.0.0.1:{port}");
    match &upstream {
        Some(url) => println!("forwarding to {url} through the store in {}", dir.display()),
        None => println!("LAN-only: no upstream, so no store (add --upstream URL to forward)"),
    }
    println!();
    println!("watch the values with:");
    println!("    mosquitto_sub -h 127.0.0.1 -p {port} -t '{DEMO_PREFIX}/#' -v");
    println!();
    println!("stop with Ctrl-C");
    let result = super::run(config, None).await;
    device.stop().await;
    if let Err(err) = std::fs::remove_dir_all(&dir) {
        if err.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), error = %err, "temporary store not removed");
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_modbus::client::Reader;

    #[tokio::test]
    async fn a_modbus_client_reads_the_simulated_values() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let server = DemoServer::spawn(listener).expect("spawn");
        let mut client = tokio_modbus::client::tcp::connect(server.addr)
            .await
            .expect("connect");

        let registers = client
            .read_input_registers(0, 5)
            .await
            .expect("transport")
            .expect("no exception");
        let temperature = f32::from_bits(u32::from(registers[0]) << 16 | u32::from(registers[1]));
        assert!((17.0..=25.0).contains(&temperature), "{temperature}");
        let energy = u32::from(registers[2]) << 16 | u32::from(registers[3]);
        assert!(energy >= 1_000_000, "{energy}");

        let bits = client
            .read_discrete_inputs(0, 3)
            .await
            .expect("transport")
            .expect("no exception");
        assert!(bits[0], "running");

        let beyond = client.read_input_registers(4, 2).await.expect("transport");
        assert_eq!(beyond, Err(ExceptionCode::IllegalDataAddress));
        let holding = client
            .read_holding_registers(0, 1)
            .await
            .expect("transport");
        assert_eq!(holding, Err(ExceptionCode::IllegalDataAddress));

        server.stop().await;
    }
}
