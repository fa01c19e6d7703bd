//! Ports, tool lookup and waiting with a deadline.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

/// Finds an external tool on PATH or in the sbin directories Debian installs daemons
/// into, or panics with what to install.
pub fn tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    for dir in path.split(':').chain(["/usr/sbin", "/sbin", "/usr/bin"]) {
        let candidate = PathBuf::from(dir).join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("`{name}` not found: install the Debian package `{package}` (scripts/test.sh does)");
}

/// How long a wait sleeps between two checks.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// The deadline of one wait. The sync and the async loops below share it, so both
/// check first, give up only after a check at or past the deadline, and sleep
/// [`POLL_INTERVAL`] in between. Real time: not for tests with paused tokio time.
struct Deadline(Instant);

impl Deadline {
    fn after(timeout: Duration) -> Deadline {
        Deadline(Instant::now() + timeout)
    }

    /// Whether a check that found nothing was the last one.
    fn passed(&self) -> bool {
        Instant::now() >= self.0
    }
}

fn timed_out(what: &str, timeout: Duration) -> ! {
    panic!("timed out after {timeout:?} waiting for {what}")
}

/// Polls `check` until it returns `Some`, or gives `None` once `timeout` has passed,
/// so the caller can describe the state it timed out in.
pub fn poll_until<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Deadline::after(timeout);
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if deadline.passed() {
            return None;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Polls `check` until it returns `Some`, or panics after `timeout` with `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, check: impl FnMut() -> Option<T>) -> T {
    poll_until(timeout, check).unwrap_or_else(|| timed_out(what, timeout))
}

/// [`poll_until`] for async tests: awaits `check()` until it gives `Some`, sleeping
/// on the runtime's timer in between, or gives `None` once `timeout` has passed.
pub async fn poll_until_async<T, F>(timeout: Duration, mut check: impl FnMut() -> F) -> Option<T>
where
    F: std::future::Future<Output = Option<T>>,
{
    let deadline = Deadline::after(timeout);
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if deadline.passed() {
            return None;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// [`wait_for`] for async tests: awaits `check()` until it gives `Some`, or panics
/// after `timeout` with `what`.
pub async fn wait_for_async<T, F>(what: &str, timeout: Duration, check: impl FnMut() -> F) -> T
where
    F: std::future::Future<Output = Option<T>>,
{
    poll_until_async(timeout, check)
        .await
        .unwrap_or_else(|| timed_out(what, timeout))
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port`.
pub fn wait_for_port(port: u16, timeout: Duration) {
    wait_for(&format!("a listener on port {port}"), timeout, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
}

/// A finished process's status, stdout and stderr, for assertion messages.
pub fn output_text(output: &Output) -> String {
    format!(
        "status: {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}
