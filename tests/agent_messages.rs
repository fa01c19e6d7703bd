//! What an operator reads in the first hour, from the real binary: error messages that
//! say each cause once and in the field's words, a report that survives `| head`, and
//! `probe` tables that can be read at a glance (against the pymodbus slave).

mod common;

use common::agent::Agent;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::util::output_text as text;
use serde_json::json;

fn fieldbridge() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fieldbridge"))
}

fn run(args: &[&str], config: Option<&Path>) -> Output {
    let mut command = fieldbridge();
    command.args(args);
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    command.output().expect("run fieldbridge")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Regression: `cannot read: No such file or directory (os error 2): No such file or
/// directory (os error 2)`, and the cause three times over for a listener that cannot
/// bind or a TLS file that cannot be read.
#[test]
fn an_error_chain_says_each_cause_once() {
    let output = run(
        &["check-config"],
        Some(Path::new("/nonexistent/fieldbridge.toml")),
    );
    assert!(!output.status.success(), "{}", text(&output));
    let err = stderr(&output);
    assert_eq!(
        err.trim(),
        "error: /nonexistent/fieldbridge.toml: cannot read: No such file or directory (os error 2)",
        "{}",
        text(&output)
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let busy = dir.path().join("busy.toml");
    std::fs::write(
        &busy,
        format!("[broker]\n[[broker.listeners]]\nbind = \"127.0.0.1:{port}\"\n"),
    )
    .expect("write config");
    let output = run(&["run"], Some(&busy));
    assert!(!output.status.success(), "{}", text(&output));
    let err = stderr(&output);
    assert_eq!(err.matches("Address already in use").count(), 1, "{err}");
    assert_eq!(err.matches("cannot listen on").count(), 1, "{err}");

    let tls = dir.path().join("tls.toml");
    std::fs::write(
        &tls,
        "[broker]\n[[broker.listeners]]\nbind = \"127.0.0.1:0\"\n\
         tls = { cert_file = \"/nonexistent/server.pem\", key_file = \"/nonexistent/server.key\" }\n",
    )
    .expect("write config");
    let output = run(&["run"], Some(&tls));
    assert!(!output.status.success(), "{}", text(&output));
    let err = stderr(&output);
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    assert_eq!(err.matches("/nonexistent/server.pem").count(), 1, "{err}");
}

/// Regression: with a LAN-only config `queue stats` opened the default store path and
/// said `entity not found: entity not found`.
#[test]
fn queue_stats_says_a_lan_only_config_has_no_store() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("lan.toml");
    std::fs::write(&config, "[broker]\n").expect("write config");
    let output = run(&["queue", "stats"], Some(&config));
    assert!(!output.status.success(), "{}", text(&output));
    let err = stderr(&output);
    assert!(
        err.contains("has no [upstream] section") && err.contains("no store"),
        "{err}"
    );
    assert!(!err.contains("/var/lib/fieldbridge"), "{err}");

    let missing = dir.path().join("queue.db");
    let output = fieldbridge()
        .args(["queue", "stats", "--db"])
        .arg(&missing)
        .output()
        .expect("run fieldbridge");
    assert!(!output.status.success(), "{}", text(&output));
    let err = stderr(&output);
    assert!(
        err.contains(&format!("no queue database at {}", missing.display())),
        "{err}"
    );
    assert!(!err.contains("entity not found"), "{err}");
}

/// Regression: `check-config | head -1` panicked with `failed printing to stdout: Broken
/// pipe` (exit status 101). The reader is gone before the report starts, so the very
/// first write fails.
#[test]
fn a_closed_stdout_ends_check_config_quietly() {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/sdm630-rs485.toml");
    let output = fieldbridge()
        .args(["check-config", "--config"])
        .arg(&config)
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .expect("run fieldbridge");
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(141), "{err}");
    // The report's warnings (the example's serial port is absent here) go to stderr;
    // the closed stdout itself must leave no trace.
    assert!(
        !err.contains("panicked") && !err.contains("Broken pipe"),
        "{err}"
    );
}

/// Regression: a type error said `expected u8`.
#[test]
fn a_type_error_names_the_values_allowed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("qos.toml");
    std::fs::write(&config, "[broker]\n[agent]\nqos = 300\n").expect("write config");
    let output = run(&["check-config"], Some(&config));
    assert!(!output.status.success(), "{}", text(&output));
    let err = stderr(&output);
    assert!(
        err.contains("agent.qos: invalid value: integer `300`, expected a whole number 0..=255"),
        "{err}"
    );
}

fn probe(port: u16, args: &[&str]) -> Output {
    fieldbridge()
        .args(["probe", "--tcp"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["--kind", "holding"])
        .args(args)
        .output()
        .expect("run fieldbridge probe")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Regression: f32/f64 decodings of unrelated words printed as hundreds of digits, and
/// without `--expect` the TOML snippet was the first row (f32 ABCD) whatever it held.
#[test]
fn probe_prints_compact_floats_marks_the_implausible_and_proposes_the_best() {
    // 0xE979 0x42F6: f32 CDAB is 123.456; f32 ABCD is -1.88e25.
    let slave = common::slave::Slave::tcp(&json!({
        "units": {"1": {"holding": {"10": [0xE979, 0x42F6]}}}
    }));
    let output = probe(slave.port(), &["--address", "10", "--count", "2"]);
    assert!(output.status.success(), "{}", text(&output));
    let out = stdout(&output);
    assert!(out.contains("-1.88e25"), "{out}");
    for line in out.lines() {
        assert!(line.len() < 140, "a line too wide for a terminal: {line:?}");
    }
    let longest_number = out
        .split(|c: char| !c.is_ascii_digit())
        .map(str::len)
        .max()
        .unwrap_or(0);
    assert!(
        longest_number <= 20,
        "a number of {longest_number} digits: {out}"
    );
    assert!(
        out.contains("-1.88e25?"),
        "implausible values are marked: {out}"
    );
    assert!(out.contains("type = \"f32\"\norder = \"CDAB\""), "{out}");
    assert!(out.contains("most plausible"), "{out}");
}

/// Regression: `--expect 21.5` with a raw 215 was "off by 900%", `--expect -123456` was
/// taken for a flag, and `--address 40011` printed `440012 in 1-based notation`.
#[test]
fn probe_expect_tries_scales_negative_values_and_high_addresses() {
    // 215 at 40011 (a device whose map really starts there); -123456 as i32 at 40012.
    let slave = common::slave::Slave::tcp(&json!({
        "units": {"1": {"holding": {"40011": [215, 0xFFFE, 0x1DC0]}}}
    }));
    let output = probe(
        slave.port(),
        &["--address", "40011", "--count", "1", "--expect", "21.5"],
    );
    assert!(output.status.success(), "{}", text(&output));
    let out = stdout(&output);
    assert!(out.contains("scale = 0.1"), "{out}");
    assert!(out.contains("type = \"u16\""), "{out}");
    assert!(!out.contains("440012"), "{out}");
    assert!(!out.contains("off by 900"), "{out}");

    let output = probe(
        slave.port(),
        &["--address", "40012", "--count", "2", "--expect", "-123456"],
    );
    assert!(output.status.success(), "{}", text(&output));
    let out = stdout(&output);
    assert!(out.contains("type = \"i32\""), "{out}");
    assert!(!out.contains("scale ="), "{out}");
}

const WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The health report retained on fieldbridge's own broker, once `wanted` holds.
fn health(
    port: u16,
    topic: &str,
    what: &str,
    wanted: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    common::util::wait_for(what, WAIT, || {
        let message = common::mosquitto::retained_on(port, topic)?;
        assert!(message.retained, "{message:?}");
        let report: serde_json::Value = serde_json::from_str(&message.payload).ok()?;
        wanted(&report).then_some(report)
    })
}

/// Regression: the uplink logged a WARN per reconnect attempt (11 lines in 30 s), and
/// said nothing about the backlog when it came back; `{prefix}/health` was not
/// retained, and its `upstream.state` read `backoff: connection refused`.
#[test]
fn an_upstream_outage_is_logged_once_then_its_recovery_and_the_drained_backlog() {
    let mut broker = common::mosquitto::Mosquitto::start();
    broker.stop();
    let dir = tempfile::tempdir().expect("temp dir");
    let lan = common::util::free_port();
    let config = format!(
        "[agent]\nprefix = \"t/gw\"\nhealth_interval_secs = 1\n\
             [broker]\n[[broker.listeners]]\nbind = \"127.0.0.1:{lan}\"\n\
             [store]\npath = {:?}\n\
             [upstream]\nurl = \"{}\"\nbackoff_min_ms = 50\nbackoff_max_ms = 200\n",
        dir.path().join("queue.db").display().to_string(),
        broker.url()
    );
    let agent = Agent::start(dir.path(), &config);
    let report = health(
        lan,
        "t/gw/health",
        "10 failed attempts, reports queued",
        |r| {
            r["upstream"]["connect_failures"].as_u64() >= Some(10)
                && r["queue"]["depth"].as_u64() >= Some(2)
        },
    );
    assert_eq!(report["upstream"]["state"], "backoff", "{report}");
    let last_error = report["upstream"]["last_error"]
        .as_str()
        .unwrap_or_default();
    assert!(last_error.contains("Connection refused"), "{report}");
    let lines = agent.log();
    assert_eq!(agent.count("upstream connection failed"), 1, "{lines}");
    assert_eq!(agent.count("WARN"), 1, "{lines}");

    broker.restart();
    let recovered = agent.wait_line("upstream connected again after", WAIT);
    assert!(recovered.contains("rows waiting"), "{recovered}");
    let drained = agent.wait_line("backlog drained in", WAIT);
    assert!(drained.contains(" rows)"), "{drained}");
    let report = health(lan, "t/gw/health", "a connected report", |r| {
        r["upstream"]["state"] == "connected"
    });
    assert_eq!(
        report["upstream"]["last_error"],
        serde_json::Value::Null,
        "{report}"
    );
}
