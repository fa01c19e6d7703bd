//! Real MQTT clients for tests: `mosquitto_sub` / `mosquitto_pub` from the
//! mosquitto-clients package, and Python scripts using paho-mqtt
//! (`tests/fixtures/*.py`), spawned with their output collected and every wait bounded.
//!
//! `mosquitto_sub` runs with `-d`, so the helper can tell when its SUBACK arrived
//! ([`Sub::wait_subscribed`]) instead of sleeping; debug lines are kept apart from the
//! message lines the test asserts on.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::util::{poll_until, tool};

/// How long a client gets to finish a short job (connect, publish, disconnect).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Collected {
    messages: Vec<String>,
    debug: Vec<String>,
    stderr: String,
    /// Both pipes reached end of file: everything the process wrote is collected.
    stdout_done: bool,
    stderr_done: bool,
}

/// A running `mosquitto_sub`.
pub struct Sub {
    child: Child,
    collected: Arc<Mutex<Collected>>,
}

fn is_debug(line: &str) -> bool {
    line.starts_with("Client ") || line.starts_with("Subscribed (mid")
}

impl Sub {
    /// Starts `mosquitto_sub -h 127.0.0.1 -p PORT -d ARGS...`, line-buffered (its
    /// stdout is a pipe, where stdio would otherwise hold lines back).
    pub fn start(port: u16, args: &[&str]) -> Sub {
        let mut child = Command::new(tool("stdbuf", "coreutils"))
            .arg("-oL")
            .arg(tool("mosquitto_sub", "mosquitto-clients"))
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-d"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mosquitto_sub");
        let collected = Arc::new(Mutex::new(Collected::default()));
        let stdout = child.stdout.take().expect("piped stdout");
        let sink = collected.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut c = sink.lock().unwrap();
                if is_debug(&line) {
                    c.debug.push(line);
                } else {
                    c.messages.push(line);
                }
            }
            sink.lock().unwrap().stdout_done = true;
        });
        let mut stderr = child.stderr.take().expect("piped stderr");
        let sink = collected.clone();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            let mut c = sink.lock().unwrap();
            c.stderr = text;
            c.stderr_done = true;
        });
        Sub { child, collected }
    }

    /// Polls `check` until it returns `Some`; after `timeout` panics with `what` and
    /// what the client printed by then.
    fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Collected) -> Option<T>,
    ) -> T {
        poll_until(timeout, || check(&self.collected.lock().unwrap())).unwrap_or_else(|| {
            panic!(
                "timed out after {timeout:?} waiting for {what} ({})",
                self.describe()
            )
        })
    }

    /// Waits for the SUBACK; returns the granted QoS / reason codes as printed
    /// (`"1"`, `"0, 2"`, `"128"`).
    pub fn wait_subscribed(&self, timeout: Duration) -> String {
        self.wait("mosquitto_sub's SUBACK", timeout, |c| {
            c.debug
                .iter()
                .find_map(|l| l.strip_prefix("Subscribed (mid: "))
                .and_then(|rest| rest.split_once("): "))
                .map(|(_, granted)| granted.to_string())
        })
    }

    /// Waits until at least `n` message lines arrived; returns all of them.
    pub fn wait_messages(&self, n: usize, timeout: Duration) -> Vec<String> {
        self.wait(&format!("{n} messages"), timeout, |c| {
            (c.messages.len() >= n).then(|| c.messages.clone())
        })
    }

    /// The message lines so far.
    pub fn messages(&self) -> Vec<String> {
        self.collected.lock().unwrap().messages.clone()
    }

    /// The `-d` debug lines so far.
    pub fn debug(&self) -> Vec<String> {
        self.collected.lock().unwrap().debug.clone()
    }

    /// What it wrote to stderr (complete once it exited).
    pub fn stderr(&self) -> String {
        self.collected.lock().unwrap().stderr.clone()
    }

    /// Waits for the process to exit by itself (`-C`, `-W`, refused connection).
    /// Waits for the process to exit and for its reader threads to collect the last of
    /// its output: `messages()` is complete afterwards. (The exit alone came before the
    /// last line was read once: `session_takeover_disconnects_the_old_client` saw no
    /// `Received DISCONNECT (142)`.)
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = &mut self.child;
        let collected = &self.collected;
        super::util::wait_for("mosquitto_sub to exit", timeout, || {
            let status = child.try_wait().ok().flatten()?;
            let c = collected.lock().unwrap();
            (c.stdout_done && c.stderr_done).then_some(status)
        })
    }

    /// Kills it with SIGKILL (no DISCONNECT: the broker sees a lost connection).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn describe(&self) -> String {
        let c = self.collected.lock().unwrap();
        format!(
            "messages so far: {:?}, last debug lines: {:?}, stderr: {:?}",
            c.messages,
            c.debug.iter().rev().take(4).collect::<Vec<_>>(),
            c.stderr
        )
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs a short-lived client to completion, killing it after `CLIENT_TIMEOUT`.
pub fn run_bounded(mut command: Command) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
    let finished = {
        let deadline = std::time::Instant::now() + CLIENT_TIMEOUT;
        loop {
            if child.try_wait().ok().flatten().is_some() {
                break true;
            }
            if std::time::Instant::now() >= deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    if !finished {
        let _ = child.kill();
    }
    let output = child.wait_with_output().expect("collect output");
    assert!(
        finished,
        "{command:?} did not finish within {CLIENT_TIMEOUT:?}: {output:?}"
    );
    output
}

/// Runs `mosquitto_pub -h 127.0.0.1 -p PORT ARGS...` and returns its output.
pub fn mosquitto_pub(port: u16, args: &[&str]) -> Output {
    let mut command = Command::new(tool("mosquitto_pub", "mosquitto-clients"));
    command
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args);
    run_bounded(command)
}

/// As [`mosquitto_pub`], asserting that it succeeded.
pub fn publish(port: u16, args: &[&str]) {
    let output = mosquitto_pub(port, args);
    assert!(
        output.status.success(),
        "mosquitto_pub {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Path of a Python fixture in `tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Runs `python3 tests/fixtures/SCRIPT ARGS...`; panics with its output unless it
/// exits 0. Returns stdout.
pub fn python(script: &str, args: &[&str]) -> String {
    let python = tool("python3", "python3");
    let check = Command::new(&python)
        .args(["-c", "import paho.mqtt"])
        .output()
        .expect("run python3");
    assert!(
        check.status.success(),
        "paho-mqtt is missing: pip install -r scripts/requirements-test.txt (scripts/test.sh does)"
    );
    let mut command = Command::new(python);
    command.arg(fixture(script)).args(args);
    let output = run_bounded(command);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{script} {args:?} failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}
