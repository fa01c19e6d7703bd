//! A `fieldbridge run` process for the integration tests: the real binary with its
//! config and log in a test's directory, signalled, killed with SIGKILL or restarted.
//!
//! The log goes to a file that every launch appends to, so a test can count lines
//! across restarts; on a failing test, the log is printed before the process is
//! killed (on drop).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use super::util::wait_for;

/// How long a launch may take to log that it runs.
const START: Duration = Duration::from_secs(15);

/// A `fieldbridge run` process with its log in a file. Killed on drop.
pub struct Agent {
    child: Option<Child>,
    config: PathBuf,
    log: PathBuf,
    env: Vec<(String, String)>,
    launches: usize,
}

impl Agent {
    /// Writes `config` to `dir/fieldbridge.toml` and starts the agent on it, at
    /// `RUST_LOG=info`.
    pub fn start(dir: &Path, config: &str) -> Agent {
        Agent::start_with_env(dir, config, Vec::new())
    }

    /// As [`Agent::start`], with more environment (a `RUST_LOG` here wins).
    pub fn start_with_env(dir: &Path, config: &str, env: Vec<(String, String)>) -> Agent {
        let path = dir.join("fieldbridge.toml");
        std::fs::write(&path, config).expect("write config");
        let mut agent = Agent {
            child: None,
            config: path,
            log: dir.join("fieldbridge.log"),
            env,
            launches: 0,
        };
        agent.launch();
        agent
    }

    /// Starts the process again (after [`Agent::kill9`] or an exit).
    pub fn launch(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open agent log");
        // systemd names the watched process in WATCHDOG_PID; a shell that execs the agent
        // knows that pid before it starts.
        let mut command = if self.env.iter().any(|(key, _)| key == "WATCHDOG_USEC") {
            let mut shell = Command::new("sh");
            shell.args([
                "-c",
                "WATCHDOG_PID=$$ exec \"$0\" \"$@\"",
                env!("CARGO_BIN_EXE_fieldbridge"),
            ]);
            shell
        } else {
            Command::new(env!("CARGO_BIN_EXE_fieldbridge"))
        };
        let child = command
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn fieldbridge");
        self.child = Some(child);
        self.launches += 1;
    }

    /// The config file the agent runs on (a test rewrites it before a SIGHUP).
    pub fn config(&self) -> &Path {
        &self.config
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    /// Sends `signal` once the current process has its handlers installed (it logs
    /// "fieldbridge running" after that).
    pub fn signal(&self, signal: &str) {
        self.wait_log("fieldbridge running", self.launches);
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("agent running");
        let status = wait_for("fieldbridge to exit", timeout, || {
            child.try_wait().ok().flatten()
        });
        self.child = None;
        status
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(&mut self) {
        self.signal("TERM");
        let status = self.wait_exit(START);
        assert!(status.success(), "fieldbridge exited with {status}");
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| child.try_wait().ok().flatten().is_none())
    }

    /// Everything every launch logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many log lines contain `text`.
    pub fn count(&self, text: &str) -> usize {
        self.log()
            .lines()
            .filter(|line| line.contains(text))
            .count()
    }

    /// Waits until `needle` appears `count` times in the log.
    pub fn wait_log(&self, needle: &str, count: usize) {
        wait_for(
            &format!("{count}× {needle:?} in the agent log"),
            START,
            || (self.log().matches(needle).count() >= count).then_some(()),
        );
    }

    /// Waits for the first log line that contains `text`, and returns it.
    pub fn wait_line(&self, text: &str, timeout: Duration) -> String {
        wait_for(&format!("a log line with {text:?}"), timeout, || {
            self.log()
                .lines()
                .find(|line| line.contains(text))
                .map(str::to_string)
        })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("fieldbridge log:\n{}", self.log());
        }
        self.kill9();
    }
}
