//! The shipped artefacts and the command line, run as a user would: the systemd unit
//! through `systemd-analyze verify`, every example config through `check-config`, and
//! the error format of a broken config.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::util::{output_text as text, tool};

fn fieldbridge() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fieldbridge"))
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn check_config(path: &Path) -> Output {
    fieldbridge()
        .args(["check-config", "--config"])
        .arg(path)
        .output()
        .expect("run fieldbridge check-config")
}

#[test]
fn version_flag_prints_the_crate_version() {
    let output = fieldbridge()
        .arg("--version")
        .output()
        .expect("run fieldbridge");
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("fieldbridge {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let analyze = tool("systemd-analyze", "systemd");
    let unit = std::fs::read_to_string(repo().join("systemd/fieldbridge.service"))
        .expect("read systemd/fieldbridge.service");
    // verify checks that ExecStart is executable: point it at the binary under test.
    assert!(unit.contains("ExecStart=/usr/bin/fieldbridge run"));
    let unit = unit.replace("/usr/bin/fieldbridge", env!("CARGO_BIN_EXE_fieldbridge"));
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("fieldbridge.service");
    std::fs::write(&path, unit).expect("write unit");

    let output = Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .env("SYSTEMD_LOG_LEVEL", "warning")
        .output()
        .expect("run systemd-analyze verify");
    // Unknown keys and bad values are warnings with exit status 0: any line about our
    // unit is a failure.
    let about_unit: Vec<String> = String::from_utf8_lossy(&output.stderr)
        .lines()
        .chain(String::from_utf8_lossy(&output.stdout).lines())
        .filter(|line| line.contains("fieldbridge"))
        .map(str::to_string)
        .collect();
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        about_unit.is_empty(),
        "systemd-analyze complained: {about_unit:#?}"
    );

    for directive in [
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "User=fieldbridge",
        "SupplementaryGroups=dialout",
        "StateDirectory=fieldbridge",
        "ConfigurationDirectory=fieldbridge",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "RestrictAddressFamilies=",
        "DevicePolicy=closed",
        "DeviceAllow=char-ttyUSB rw",
        "\nCapabilityBoundingSet=\n",
    ] {
        assert!(
            std::fs::read_to_string(&path)
                .expect("read")
                .contains(directive),
            "unit lacks {directive:?}"
        );
    }
}

#[test]
fn every_example_config_passes_check_config() {
    let mut examples: Vec<PathBuf> = std::fs::read_dir(repo().join("config"))
        .expect("read config/")
        .map(|entry| entry.expect("dir entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    examples.sort();
    assert!(examples.len() >= 6, "examples: {examples:?}");
    for example in &examples {
        let output = check_config(example);
        assert!(
            output.status.success(),
            "{} failed check-config:\n{}",
            example.display(),
            text(&output)
        );
    }
    let names: Vec<String> = examples
        .iter()
        .filter_map(|path| path.file_name())
        .map(|name| name.to_string_lossy().into_owned())
        .collect();
    for required in [
        "fieldbridge.example.toml",
        "upstream-tls.toml",
        "lan-only.toml",
    ] {
        assert!(
            names.iter().any(|name| name == required),
            "missing {required}"
        );
    }
}

#[test]
fn broken_config_fails_with_file_line_column_key_and_message() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("broken.toml");
    std::fs::write(
        &path,
        "[broker]\n\n[agent]\nprefix = \"plant/#\"\nhealth_interval_secs = 0\n",
    )
    .expect("write config");
    let output = check_config(&path);
    assert!(!output.status.success(), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let file = path.display();
    assert!(
        stderr.contains(&format!(
            "{file}:4:10: agent.prefix: must not contain MQTT wildcards"
        )),
        "{}",
        text(&output)
    );
    assert!(
        stderr.contains(&format!(
            "{file}:5:24: agent.health_interval_secs: must be at least 1"
        )),
        "{}",
        text(&output)
    );
}

#[test]
fn unknown_key_is_rejected_with_its_position() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("typo.toml");
    std::fs::write(&path, "[broker]\n[agent]\nhealth_intervall_secs = 5\n").expect("write");
    let output = check_config(&path);
    assert!(!output.status.success(), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "{}:3:1: agent.health_intervall_secs: unknown field `health_intervall_secs`",
            path.display()
        )),
        "{}",
        text(&output)
    );
}

#[test]
fn missing_config_file_is_a_clear_error() {
    let output = check_config(Path::new("/nonexistent/fieldbridge.toml"));
    assert!(!output.status.success(), "{}", text(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("/nonexistent/fieldbridge.toml: cannot read"),
        "{}",
        text(&output)
    );
}

#[test]
fn queue_stats_reads_a_real_store_without_the_agent() {
    use fieldbridge::mqtt::QoS;
    use fieldbridge::store::{Message, Priority, Queue, StoreConfig};

    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("queue.db");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64;
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let queue = Queue::open(StoreConfig {
            path: db.clone(),
            ..StoreConfig::default()
        })
        .expect("open store");
        let messages = (0..3)
            .map(|i| Message {
                topic: format!("site/gw/meter/p{i}"),
                payload: bytes::Bytes::from_static(b"{\"value\":1}"),
                qos: QoS::AtLeastOnce,
                retain: false,
                created_ms: now_ms,
                priority: Priority::Periodic,
            })
            .collect();
        queue.append(messages).await.expect("append");
        queue.close().await.expect("close");
    });

    let output = fieldbridge()
        .args(["queue", "stats", "--db"])
        .arg(&db)
        .output()
        .expect("run fieldbridge queue stats");
    assert!(output.status.success(), "{}", text(&output));
    let stats: serde_json::Value = serde_json::from_slice(&output.stdout).expect("stats are JSON");
    assert_eq!(stats["depth"], 3, "{stats}");
    assert_eq!(stats["appended"], 3, "{stats}");

    // Through a config file naming the database.
    let config = dir.path().join("fieldbridge.toml");
    std::fs::write(
        &config,
        format!("[broker]\n[store]\npath = {:?}\n", db.display().to_string()),
    )
    .expect("write config");
    let output = fieldbridge()
        .args(["queue", "stats", "--config"])
        .arg(&config)
        .output()
        .expect("run fieldbridge queue stats");
    assert!(output.status.success(), "{}", text(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("\"depth\": 3"));
}

#[test]
fn a_problem_found_by_another_section_points_at_its_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("upstream.toml");
    std::fs::write(&path, "[upstream]\nurl = \"http://broker.example:1883\"\n").expect("write");
    let output = check_config(&path);
    assert!(!output.status.success(), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("{}:2:7: upstream.url: ", path.display())),
        "{}",
        text(&output)
    );
}

#[test]
fn check_config_prints_topics_and_read_plans() {
    let output = check_config(&repo().join("config/sdm630-rs485.toml"));
    assert!(output.status.success(), "{}", text(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let host = fieldbridge::config::hostname();
    for expected in [
        format!("site/{host}/status"),
        format!("site/{host}/meter2/status"),
        format!("site/{host}/meter1/voltage_l1"),
        format!("site/{host}/meter2/export_energy"),
        "device \"meter1\" (unit 1): 10 points, 3 requests per poll".to_string(),
        "fc04 input 0..=11".to_string(),
    ] {
        assert!(
            stdout.contains(&expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
}

#[test]
fn probe_reads_an_independent_slave_and_finds_the_byte_order() {
    // 123.456 as f32 in CDAB (word-swapped) order: 0x42F6E979 -> words E979, 42F6.
    let slave = common::slave::Slave::tcp(&serde_json::json!({
        "units": {"1": {"holding": {"10": [0xE979, 0x42F6]}}}
    }));
    let output = fieldbridge()
        .args(["probe", "--tcp"])
        .arg(format!("127.0.0.1:{}", slave.port()))
        .args([
            "--kind",
            "holding",
            "--address",
            "10",
            "--count",
            "2",
            "--expect",
            "123.456",
        ])
        .output()
        .expect("run fieldbridge probe");
    assert!(output.status.success(), "{}", text(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("CDAB"), "{stdout}");
    assert!(stdout.contains("123.45"), "{stdout}");

    let output = fieldbridge()
        .args([
            "probe",
            "--tcp",
            "127.0.0.1:1",
            "--kind",
            "register",
            "--address",
            "0",
        ])
        .output()
        .expect("run fieldbridge probe");
    assert!(!output.status.success(), "{}", text(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("--kind \"register\""),
        "{}",
        text(&output)
    );
}
