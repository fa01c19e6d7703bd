//! A real Debian mosquitto per test, and real mosquitto_sub/mosquitto_pub against it.
//!
//! [`Mosquitto::start`] writes a config into a temp dir (persistence on, a log file,
//! optionally a TLS listener and a password file), starts the broker on a free loopback
//! port and waits for its "running" log line. [`Mosquitto::stop`] (SIGTERM: mosquitto
//! saves its persistence file), [`Mosquitto::kill`] (SIGKILL: it saves nothing) and
//! [`Mosquitto::restart`] (same ports, config and persistence dir) simulate outages;
//! [`Mosquitto::pause`] / [`Mosquitto::resume`] (SIGSTOP / SIGCONT) make a half-open
//! connection: the socket stays up, nothing answers.
//!
//! [`Subscriber`] runs `mosquitto_sub` and collects what it prints; [`retained`] reads
//! a retained message; [`publish`] runs `mosquitto_pub`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::util::{free_port, tool, wait_for};

const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Every [`Subscriber`] also listens here; probes prove its subscription is live.
const PROBE_TOPIC: &str = "fieldbridge-test/probe";

/// A TLS listener: PEM files and whether clients must present a certificate.
#[derive(Debug, Clone)]
pub struct TlsListener {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub require_certificate: bool,
}

/// How to configure the broker beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Adds a TLS listener on a second free port.
    pub tls: Option<TlsListener>,
    /// `(user, password)` pairs: written with `mosquitto_passwd`; anonymous access off.
    pub users: Vec<(String, String)>,
    /// Raw config lines for the plain listener's section, e.g. `max_packet_size 1024`,
    /// `max_qos 1`.
    pub extra: Vec<String>,
}

/// A running (or stopped) mosquitto. Killed on drop.
#[derive(Debug)]
pub struct Mosquitto {
    child: Option<Child>,
    pub port: u16,
    pub tls_port: Option<u16>,
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Mosquitto {
    /// Plain listener, anonymous access, persistence on.
    pub fn start() -> Mosquitto {
        Mosquitto::start_with(Options::default())
    }

    pub fn start_with(options: Options) -> Mosquitto {
        let dir = tempfile::tempdir().expect("temp dir for mosquitto");
        let port = free_port();
        let tls_port = options.tls.as_ref().map(|_| free_port());
        let mut lines = vec![
            // Stay root when the tests run as root, so the temp dir stays writable.
            "user root".to_owned(),
            "persistence true".to_owned(),
            format!("persistence_location {}/", dir.path().display()),
            format!(
                "log_dest file {}",
                dir.path().join("mosquitto.log").display()
            ),
            "log_type error".to_owned(),
            "log_type warning".to_owned(),
            "log_type notice".to_owned(),
            "log_type information".to_owned(),
            // Offline persistent sessions keep everything (the default caps at 1000).
            "max_queued_messages 0".to_owned(),
        ];
        if options.users.is_empty() {
            lines.push("allow_anonymous true".to_owned());
        } else {
            let file = dir.path().join("passwords");
            std::fs::write(&file, "").expect("write password file");
            for (user, password) in &options.users {
                let status = Command::new(tool("mosquitto_passwd", "mosquitto"))
                    .arg("-b")
                    .arg(&file)
                    .arg(user)
                    .arg(password)
                    .status()
                    .expect("run mosquitto_passwd");
                assert!(status.success(), "mosquitto_passwd failed");
            }
            lines.push("allow_anonymous false".to_owned());
            lines.push(format!("password_file {}", file.display()));
        }
        lines.push(format!("listener {port} 127.0.0.1"));
        lines.extend(options.extra.iter().cloned());
        if let (Some(tls), Some(tls_port)) = (&options.tls, tls_port) {
            lines.push(format!("listener {tls_port} 127.0.0.1"));
            lines.push(format!("cafile {}", tls.ca_file.display()));
            lines.push(format!("certfile {}", tls.cert_file.display()));
            lines.push(format!("keyfile {}", tls.key_file.display()));
            lines.push(format!("require_certificate {}", tls.require_certificate));
        }
        let config = dir.path().join("mosquitto.conf");
        std::fs::write(&config, lines.join("\n") + "\n").expect("write mosquitto.conf");
        let mut broker = Mosquitto {
            child: None,
            port,
            tls_port,
            dir,
            config,
        };
        broker.launch();
        broker
    }

    fn launch(&mut self) {
        assert!(self.child.is_none(), "mosquitto is already running");
        let started_before = self.log().matches(" running").count();
        let child = Command::new(tool("mosquitto", "mosquitto"))
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto");
        self.child = Some(child);
        wait_for("mosquitto to start", START_TIMEOUT, || {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("mosquitto exited with {status}; log:\n{}", self.log());
            }
            (self.log().matches(" running").count() > started_before).then_some(())
        });
    }

    /// `mqtt://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// `mqtts://localhost:<tls port>` (the test certificates name `localhost`).
    pub fn tls_url(&self) -> String {
        let port = self.tls_port.expect("started without a TLS listener");
        format!("mqtts://localhost:{port}")
    }

    /// The temp dir with the config, log, password and persistence files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything mosquitto logged so far (across restarts).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("mosquitto is not running").id();
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {pid} failed");
    }

    /// SIGTERM and wait: mosquitto writes its persistence file on the way out.
    pub fn stop(&mut self) {
        self.signal("TERM");
        if let Some(mut child) = self.child.take() {
            child.wait().expect("wait for mosquitto");
        }
    }

    /// SIGKILL and wait: whatever was not saved is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same ports, config and persistence directory.
    pub fn restart(&mut self) {
        self.launch();
    }

    /// SIGSTOP: connections stay open but nothing answers.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// SIGCONT after [`Mosquitto::pause`].
    pub fn resume(&self) {
        self.signal("CONT");
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("mosquitto log ({}):\n{}", self.config.display(), self.log());
        }
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(child.id().to_string())
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One message as mosquitto_sub printed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub topic: String,
    pub payload: String,
    pub qos: u8,
    pub retained: bool,
}

/// How to run mosquitto_sub.
#[derive(Debug, Clone)]
pub struct SubOptions {
    pub qos: u8,
    /// A persistent session (`-c -i <id>`): messages queue while it is disconnected.
    pub client_id: Option<String>,
    /// MQTT 5 instead of 3.1.1.
    pub v5: bool,
}

impl Default for SubOptions {
    fn default() -> SubOptions {
        SubOptions {
            qos: 2,
            client_id: None,
            v5: false,
        }
    }
}

#[derive(Debug, Default)]
struct Output {
    messages: Vec<Received>,
    probes: Vec<String>,
}

/// A running mosquitto_sub that collects messages. Killed on drop.
#[derive(Debug)]
pub struct Subscriber {
    child: Child,
    port: u16,
    output: Arc<Mutex<Output>>,
}

impl Subscriber {
    /// Subscribes to `filters` on the plain listener and waits until it receives. It
    /// reconnects by itself after a broker restart.
    pub fn start(broker: &Mosquitto, filters: &[&str], options: SubOptions) -> Subscriber {
        Subscriber::start_on(broker.port, filters, options)
    }

    /// As [`Subscriber::start`], on any broker listening on 127.0.0.1:`port`.
    pub fn start_on(port: u16, filters: &[&str], options: SubOptions) -> Subscriber {
        let mut command = Command::new(tool("mosquitto_sub", "mosquitto-clients"));
        command
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-q", &options.qos.to_string()])
            .args(["-F", "MSG %r %q %t %p", "-t", PROBE_TOPIC]);
        for filter in filters {
            command.args(["-t", filter]);
        }
        if let Some(id) = &options.client_id {
            command.args(["-c", "-i", id]);
            if options.v5 {
                command.args(["-x", "3600"]);
            }
        }
        if options.v5 {
            command.args(["-V", "mqttv5"]);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto_sub");
        let stdout = child.stdout.take().expect("piped stdout");
        let output = Arc::new(Mutex::new(Output::default()));
        let sink = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let Some(rest) = line.strip_prefix("MSG ") else {
                    continue;
                };
                let mut parts = rest.splitn(4, ' ');
                let retained = parts.next() == Some("1");
                let qos = parts.next().and_then(|q| q.parse().ok()).unwrap_or(0);
                let topic = parts.next().unwrap_or_default().to_owned();
                let payload = parts.next().unwrap_or_default().to_owned();
                let mut out = sink.lock().expect("subscriber output lock");
                if topic == PROBE_TOPIC {
                    out.probes.push(payload);
                } else {
                    out.messages.push(Received {
                        topic,
                        payload,
                        qos,
                        retained,
                    });
                }
            }
        });
        let subscriber = Subscriber {
            child,
            port,
            output,
        };
        subscriber.wait_ready();
        subscriber
    }

    /// Waits until the subscription is live (again, after a broker restart): publishes
    /// QoS 0 probes until one comes through.
    pub fn wait_ready(&self) {
        static PROBES: AtomicU64 = AtomicU64::new(0);
        let nonce = format!("probe{}", PROBES.fetch_add(1, Ordering::Relaxed));
        let mut sent = 0u32;
        wait_for("mosquitto_sub to receive", START_TIMEOUT, || {
            sent += 1;
            let probe = format!("{nonce}-{sent}");
            let _ = Command::new(tool("mosquitto_pub", "mosquitto-clients"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(["-t", PROBE_TOPIC, "-m", &probe])
                .stderr(Stdio::null())
                .status();
            std::thread::sleep(Duration::from_millis(50));
            let out = self.output.lock().expect("lock");
            out.probes
                .iter()
                .any(|p| p.starts_with(&format!("{nonce}-")))
                .then_some(())
        });
    }

    /// Every message received so far, in order.
    pub fn messages(&self) -> Vec<Received> {
        self.output.lock().expect("lock").messages.clone()
    }

    /// Waits until at least `n` messages arrived and returns them all.
    pub fn wait_for_count(&self, n: usize, timeout: Duration) -> Vec<Received> {
        wait_for(&format!("{n} messages at mosquitto_sub"), timeout, || {
            let messages = self.messages();
            (messages.len() >= n).then_some(messages)
        })
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The retained message on `topic`, if any (mosquitto_sub --retained-only).
pub fn retained(broker: &Mosquitto, topic: &str) -> Option<Received> {
    retained_on(broker.port, topic)
}

/// The retained message on `topic` of any broker on 127.0.0.1:`port` (fieldbridge's
/// own, for one), if any.
pub fn retained_on(port: u16, topic: &str) -> Option<Received> {
    let output = Command::new(tool("mosquitto_sub", "mosquitto-clients"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-t", topic, "--retained-only", "-C", "1", "-W", "1"])
        .args(["-F", "%r %q %p"])
        .output()
        .expect("run mosquitto_sub");
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text.lines().next()?;
    let mut parts = line.splitn(3, ' ');
    let retained = parts.next() == Some("1");
    let qos = parts.next().and_then(|q| q.parse().ok()).unwrap_or(0);
    Some(Received {
        topic: topic.to_owned(),
        payload: parts.next().unwrap_or_default().to_owned(),
        qos,
        retained,
    })
}

/// Publishes one message with mosquitto_pub on the plain listener.
pub fn publish(broker: &Mosquitto, topic: &str, payload: &str, qos: u8) {
    let status = Command::new(tool("mosquitto_pub", "mosquitto-clients"))
        .args(["-h", "127.0.0.1", "-p", &broker.port.to_string()])
        .args(["-t", topic, "-m", payload, "-q", &qos.to_string()])
        .status()
        .expect("run mosquitto_pub");
    assert!(status.success(), "mosquitto_pub failed");
}
