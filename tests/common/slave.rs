//! An independent Modbus slave (pymodbus, `tests/fixtures/modbus_slave.py`) over TCP on a
//! free port or over RTU on one end of a `socat` pty pair, and the pty pair itself (which
//! a test can kill and start again, like a USB adapter pulled and plugged back).
//!
//! ```ignore
//! let slave = Slave::tcp(&json!({"units": {"1": {"holding": {"0": [1, 2]}}}}));
//! // fieldbridge config: host = "127.0.0.1", port = slave.port()
//! let mut pty = PtyPair::new();
//! let rtu = Slave::rtu(pty.slave_end(), &image);   // fieldbridge opens pty.master_end()
//! pty.kill(); /* port gone */ pty.restart(); /* port back: start a new Slave::rtu too */
//! ```
//!
//! Image format and behaviour (holes answer exception 02, `counter` registers increment
//! on every read, `exceptions` ranges, absent units never answer): see the script's doc.
//! Addresses are 0-based protocol addresses, as in fieldbridge's config.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::util::{free_port, tool, wait_for, wait_for_port};

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/modbus_slave.py"
);

const READER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/modbus_read.py");

/// A running pymodbus slave; killed on drop.
pub struct Slave {
    child: Child,
    port: Option<u16>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// One request as the slave saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub unit: u8,
    pub function: u8,
    pub address: u16,
    pub count: u16,
}

impl Slave {
    /// Serves `image` over Modbus TCP on a free 127.0.0.1 port.
    pub fn tcp(image: &serde_json::Value) -> Slave {
        Slave::tcp_on(free_port(), image)
    }

    /// Serves `image` over Modbus TCP on `port` (to restart a slave where it was).
    pub fn tcp_on(port: u16, image: &serde_json::Value) -> Slave {
        let slave = Slave::spawn(&["--tcp", &port.to_string()], image, Some(port));
        wait_for_port(port, Duration::from_secs(10));
        slave
    }

    /// Serves `image` as RTU frames over TCP on a free port (a serial device server).
    pub fn rtu_over_tcp(image: &serde_json::Value) -> Slave {
        let port = free_port();
        let slave = Slave::spawn(
            &["--tcp", &port.to_string(), "--framing", "rtu"],
            image,
            Some(port),
        );
        wait_for_port(port, Duration::from_secs(10));
        slave
    }

    /// Serves `image` over Modbus RTU (19200 8N1) on the serial device `device`.
    pub fn rtu(device: &Path, image: &serde_json::Value) -> Slave {
        let device = device.to_string_lossy().into_owned();
        Slave::spawn(
            &["--rtu", &device, "--baud", "19200", "--parity", "N"],
            image,
            None,
        )
    }

    fn spawn(args: &[&str], image: &serde_json::Value, port: Option<u16>) -> Slave {
        let python = tool(
            "python3",
            "python3 (and `pip install -r scripts/requirements-test.txt`)",
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("requests.log");
        let image_path = dir.path().join("image.json");
        std::fs::write(&image_path, image.to_string()).expect("write image");
        let mut child = Command::new(python)
            .arg(SCRIPT)
            .args(args)
            .arg("--image")
            .arg(format!("@{}", image_path.display()))
            .arg("--log")
            .arg(&log)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the pymodbus slave (python3 with pymodbus 3.16 installed?)");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        match rx.recv_timeout(Duration::from_secs(15)) {
            Ok(line) if line.trim() == "ready" => {}
            other => {
                let _ = child.kill();
                panic!(
                    "the pymodbus slave did not start ({other:?}); \
                     install it with `pip install -r scripts/requirements-test.txt`"
                );
            }
        }
        Slave {
            child,
            port,
            log,
            _dir: dir,
        }
    }

    /// The TCP port (TCP slaves only).
    pub fn port(&self) -> u16 {
        self.port.expect("a TCP slave")
    }

    /// Every request the slave received so far, in order.
    pub fn requests(&self) -> Vec<Request> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace().map(|x| x.parse::<u32>().ok());
                Some(Request {
                    unit: u8::try_from(f.next()??).ok()?,
                    function: u8::try_from(f.next()??).ok()?,
                    address: u16::try_from(f.next()??).ok()?,
                    count: u16::try_from(f.next()??).ok()?,
                })
            })
            .collect()
    }

    /// What the slave holds now, read by an independent pymodbus client
    /// (`tests/fixtures/modbus_read.py`; TCP slaves): `kind` is "holding" or "coil".
    pub fn read_independently(&self, unit: u8, kind: &str, address: u16, count: u16) -> Vec<u16> {
        let python = tool("python3", "python3");
        let out = Command::new(python)
            .arg(READER)
            .args([
                "--port",
                &self.port().to_string(),
                "--unit",
                &unit.to_string(),
            ])
            .args(["--kind", kind, "--address", &address.to_string()])
            .args(["--count", &count.to_string()])
            .output()
            .expect("run the independent Modbus reader");
        assert!(
            out.status.success(),
            "independent read failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("the reader prints a JSON list")
    }

    /// Stops the slave now (its TCP port closes; an RTU slave stops answering).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Slave {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Two connected pseudo-terminals made by `socat`, reachable under stable paths
/// (`master_end`, `slave_end`) that survive a restart. Killed on drop.
pub struct PtyPair {
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl PtyPair {
    pub fn new() -> PtyPair {
        let mut pair = PtyPair {
            child: None,
            dir: tempfile::tempdir().expect("temp dir"),
        };
        pair.restart();
        pair
    }

    /// The end fieldbridge opens.
    pub fn master_end(&self) -> PathBuf {
        self.dir.path().join("ttyA")
    }

    /// The end the device (slave script, or the test writing lines) opens.
    pub fn slave_end(&self) -> PathBuf {
        self.dir.path().join("ttyB")
    }

    /// Kills socat: both ends vanish, as when a USB serial adapter is unplugged.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(self.master_end());
        let _ = std::fs::remove_file(self.slave_end());
    }

    /// Starts socat (again) and waits until both paths exist.
    pub fn restart(&mut self) {
        self.kill();
        let socat = tool("socat", "socat");
        let end = |p: PathBuf| format!("pty,raw,echo=0,link={}", p.display());
        let child = Command::new(socat)
            .arg(end(self.master_end()))
            .arg(end(self.slave_end()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start socat");
        self.child = Some(child);
        let (a, b) = (self.master_end(), self.slave_end());
        wait_for("socat's pty links", Duration::from_secs(10), || {
            (a.exists() && b.exists()).then_some(())
        });
    }
}

impl Default for PtyPair {
    fn default() -> Self {
        PtyPair::new()
    }
}

impl Drop for PtyPair {
    fn drop(&mut self) {
        self.kill();
    }
}
