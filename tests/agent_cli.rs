//! The shipped artefacts and the command line, run as a user would: the systemd unit
//! through `systemd-analyze verify`, every example config through `check-config` (with
//! the files it names), the live config the package installs, the error format of a
//! broken config, the files `check-config` opens and with whose rights, and the
//! password file `passwd` writes. `scripts/package-check.sh` checks the built package.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::clients::Sub;
use common::util::{free_port, output_text as text, tool, wait_for, wait_for_port};

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
        "DeviceAllow=char-ttyS rw",
        "DeviceAllow=char-ttyACM rw",
        "DeviceAllow=char-ttyAMA rw",
        // SC16IS752 RS-485 HATs (/dev/ttySC0) and Exar's USB driver (/dev/ttyXRUSB0).
        "DeviceAllow=char-ttySC rw",
        "DeviceAllow=char-ttyXRUSB rw",
        "UMask=0027",
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

/// Writes the files the examples name under /etc/fieldbridge into `dir`: a password
/// file, an ACL, a CA and a client certificate with its key.
fn example_files(dir: &Path) {
    let output = fieldbridge()
        .args(["passwd", "-b"])
        .arg(dir.join("passwd"))
        .args(["ha", "secret"])
        .output()
        .expect("run fieldbridge passwd");
    assert!(output.status.success(), "{}", text(&output));
    std::fs::write(dir.join("acl"), "user ha\ntopic read #\n").expect("write acl");
    let ca = rcgen::generate_simple_self_signed(vec!["fieldbridge test CA".into()]).expect("CA");
    std::fs::write(dir.join("ca.pem"), ca.cert.pem()).expect("write CA");
    let client = rcgen::generate_simple_self_signed(vec!["gw42".into()]).expect("client cert");
    std::fs::write(dir.join("client.pem"), client.cert.pem()).expect("write cert");
    std::fs::write(dir.join("client.key"), client.key_pair.serialize_pem()).expect("write key");
}

#[test]
fn every_example_config_passes_check_config() {
    let mut examples: Vec<PathBuf> = std::fs::read_dir(repo().join("config"))
        .expect("read config/")
        .map(|entry| entry.expect("dir entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    examples.sort();
    assert!(examples.len() >= 7, "examples: {examples:?}");
    // check-config opens the files an example names: give it real ones.
    let dir = tempfile::tempdir().expect("temp dir");
    example_files(dir.path());
    let etc = format!("{}/", dir.path().display());
    for example in &examples {
        let config = std::fs::read_to_string(example).expect("read example");
        let copy = dir.path().join(example.file_name().expect("file name"));
        std::fs::write(&copy, config.replace("/etc/fieldbridge/", &etc)).expect("write copy");
        let output = check_config(&copy);
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
        "fieldbridge.toml",
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

/// Regression: the package installed the full reference config (polling /dev/ttyUSB0, a
/// PLC at 192.168.1.20 and broker.example.net) as the live one, so after a reboot the
/// service ran unconfigured, warning every second and building a queue.
#[test]
fn the_package_installs_a_minimal_live_config_and_the_reference_as_documentation() {
    let manifest: toml::Table = std::fs::read_to_string(repo().join("Cargo.toml"))
        .expect("read Cargo.toml")
        .parse()
        .expect("Cargo.toml parses");
    let deb = &manifest["package"]["metadata"]["deb"];
    let assets: Vec<Vec<String>> = deb["assets"]
        .as_array()
        .expect("assets")
        .iter()
        .map(|asset| {
            asset
                .as_array()
                .expect("asset")
                .iter()
                .map(|field| field.as_str().expect("string").to_string())
                .collect()
        })
        .collect();
    let installs = |source: &str| assets.iter().find(|asset| asset[0] == source).cloned();
    assert_eq!(
        installs("config/fieldbridge.toml"),
        Some(vec![
            "config/fieldbridge.toml".to_string(),
            "etc/fieldbridge/fieldbridge.toml".to_string(),
            "640".to_string()
        ])
    );
    let reference = installs("config/fieldbridge.example.toml").expect("reference shipped");
    assert_eq!(reference[1], "usr/share/doc/fieldbridge/examples/");

    let live = repo().join("config/fieldbridge.toml");
    let config = std::fs::read_to_string(&live).expect("read live config");
    for active in ["[[bus]]", "[upstream]", "[store]"] {
        assert!(
            !config
                .lines()
                .any(|line| line.trim_start().starts_with(active)),
            "the live config has an active {active}"
        );
    }
    assert!(config.contains("/usr/share/doc/fieldbridge/examples/fieldbridge.example.toml"));
    let output = check_config(&live);
    assert!(output.status.success(), "{}", text(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("local broker: yes"), "{stdout}");
    assert!(stdout.contains("upstream: none"), "{stdout}");
    assert!(!stdout.contains("requests per poll"), "{stdout}");
    assert!(
        !String::from_utf8_lossy(&output.stderr).contains("warning"),
        "{}",
        text(&output)
    );
}

/// A `fieldbridge run` with its stderr in a file; SIGKILLed on drop if still running.
struct Running {
    child: std::process::Child,
    log: PathBuf,
}

impl Running {
    /// Starts the agent under `umask 022` (a shell's usual one), which would make
    /// SQLite's files 0644.
    fn start(dir: &Path, config: &str) -> Running {
        let path = dir.join("run.toml");
        std::fs::write(&path, config).expect("write config");
        let log = dir.join("run.log");
        let child = Command::new("sh")
            .args(["-c", "umask 022 && exec \"$0\" run --config \"$1\""])
            .arg(env!("CARGO_BIN_EXE_fieldbridge"))
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create log"))
            .spawn()
            .expect("spawn fieldbridge run");
        Running { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM once the signal handlers are in, then waits for exit 0.
    fn stop(mut self) -> String {
        wait_for("the agent to run", Duration::from_secs(15), || {
            self.log().contains("fieldbridge running").then_some(())
        });
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success());
        let exit = wait_for("the agent to exit", Duration::from_secs(15), || {
            self.child.try_wait().ok().flatten()
        });
        assert!(exit.success(), "exit {exit}:\n{}", self.log());
        self.log()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The live config, run as the service would run it (on a free port, since 1883 may be
/// taken): it comes up, publishes its retained status and says nothing alarming.
#[test]
fn the_live_config_starts_harmlessly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let config = std::fs::read_to_string(repo().join("config/fieldbridge.toml"))
        .expect("read live config")
        .replace("127.0.0.1:1883", &format!("127.0.0.1:{port}"));
    let agent = Running::start(dir.path(), &config);
    wait_for_port(port, Duration::from_secs(15));
    let mut sub = Sub::start(port, &["-t", "fieldbridge/+/status", "-C", "1", "-W", "15"]);
    sub.wait_exit(Duration::from_secs(20));
    assert_eq!(sub.messages(), ["online"], "{}", sub.stderr());
    let log = agent.stop();
    for alarming in [" WARN ", " ERROR "] {
        assert!(
            !log.contains(alarming),
            "the live config logs {alarming}:\n{log}"
        );
    }
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read dir")
        .map(|entry| entry.expect("entry").file_name())
        .collect();
    assert_eq!(
        left.len(),
        2,
        "no queue or other file beside config and log: {left:?}"
    );
}

/// Regression: the queue was created 0644 (SQLite's default under a 022 umask); the
/// store, the broker database and their WAL files are 0640 or tighter.
#[test]
fn the_queue_and_the_broker_database_are_created_0640() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (port, closed) = (free_port(), free_port());
    let queue = dir.path().join("queue.db");
    let broker_db = dir.path().join("broker.db");
    let config = format!(
        "[broker]\npersistence_path = {:?}\n[[broker.listeners]]\nbind = \"127.0.0.1:{port}\"\n\
         [store]\npath = {:?}\n[upstream]\nurl = \"mqtt://127.0.0.1:{closed}\"\n",
        broker_db.display().to_string(),
        queue.display().to_string(),
    );
    let agent = Running::start(dir.path(), &config);
    wait_for("both databases", Duration::from_secs(15), || {
        (queue.exists() && broker_db.exists()).then_some(())
    });
    agent.stop();
    for entry in std::fs::read_dir(dir.path()).expect("read dir") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        if !(name.starts_with("queue.db") || name.starts_with("broker.db")) {
            continue;
        }
        let mode = std::fs::metadata(&path).expect("metadata").mode() & 0o777;
        assert_eq!(mode & !0o640, 0, "{name} is {mode:04o}, wider than 0640");
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
                unsynced: None,
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
        "device \"meter1\" (unit 1): 10 points\n    every 1000 ms: 8 points, 3 requests per poll"
            .to_string(),
        "every 60000 ms (poll_group energy): 2 points, 1 request per poll".to_string(),
        "bus load: 6.0 requests/s".to_string(),
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

fn is_root() -> bool {
    fieldbridge::files::effective_uid() == Some(0)
}

/// A temp dir others may enter (tempfile makes them 0700), for checks as another user.
fn open_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod temp dir");
    dir
}

/// Regression: `check-config` said ok for a config whose password file the service
/// could not read; it now opens every file the config names and reports each one that
/// cannot be read or parsed, at the key that names it, with the path and the reason.
#[test]
fn check_config_reports_every_named_file_it_cannot_read_or_parse() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = |name: &str| dir.path().join(name).display().to_string();
    std::fs::write(path("acl"), "topik read #\n").expect("write acl");
    std::fs::write(path("garbage.pem"), "not a certificate\n").expect("write pem");
    let config = format!(
        "[broker]\npassword_file = {:?}\nacl_file = {:?}\n\
         [[broker.listeners]]\nbind = \"127.0.0.1:8883\"\n\
         tls = {{ cert_file = {:?}, key_file = {:?} }}\n\
         [[broker.listeners]]\nbind = \"127.0.0.1:8884\"\n\
         tls = {{ cert_file = {:?}, key_file = {:?} }}\n\
         [upstream]\nurl = \"ssl://broker.example.net\"\nusername = \"gw\"\npassword_file = {:?}\n\
         [upstream.tls]\nca_file = {:?}\n",
        path("passwd"),
        path("acl"),
        path("garbage.pem"),
        path("missing.key"),
        path("garbage.pem"),
        path("garbage.pem"),
        path("upstream.password"),
        path("garbage.pem"),
    );
    let file = dir.path().join("fieldbridge.toml");
    std::fs::write(&file, config).expect("write config");
    let output = check_config(&file);
    assert!(!output.status.success(), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for (line, key, says) in [
        (
            2,
            "broker.password_file",
            format!("cannot read {}: No such file", path("passwd")),
        ),
        (
            3,
            "broker.acl_file",
            format!("{}:1: expected `user`, `topic` or `pattern`", path("acl")),
        ),
        (
            6,
            "broker.listeners[0].tls.key_file",
            format!("cannot read {}: No such file", path("missing.key")),
        ),
        (
            13,
            "upstream.password_file",
            format!("cannot read {}: No such file", path("upstream.password")),
        ),
        (
            9,
            "broker.listeners[1].tls.cert_file",
            format!("{} holds no certificate", path("garbage.pem")),
        ),
        (
            15,
            "upstream.tls.ca_file",
            format!(
                "the CA file {} holds no PEM certificate",
                path("garbage.pem")
            ),
        ),
    ] {
        let expected = format!("{}:{line}:", file.display());
        let named = format!(" {key}: ");
        let found = stderr
            .lines()
            .any(|text| text.contains(&expected) && text.contains(&named) && text.contains(&says));
        assert!(found, "no {expected} {key}: {says}\n{stderr}");
    }
}

/// A serial port that does not exist is a warning (a USB adapter may come later), not a
/// refusal.
#[test]
fn check_config_warns_about_a_serial_port_that_does_not_exist() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("rtu.toml");
    std::fs::write(
        &file,
        "[broker]\n[[bus]]\nname = \"rs485\"\nkind = \"rtu\"\nport = \"/dev/ttySC7-not-here\"\n\
         [[bus.device]]\nname = \"meter\"\n\
         [[bus.device.point]]\nname = \"v\"\nkind = \"input\"\naddress = 0\n",
    )
    .expect("write config");
    let output = check_config(&file);
    assert!(output.status.success(), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "warning: {}:5:8: bus[0].port: serial port /dev/ttySC7-not-here does not exist",
            file.display()
        )),
        "{}",
        text(&output)
    );
}

/// Regression: without the rights to read the config, `check-config` said only
/// `Permission denied` (twice); it now says which file or directory refuses and who may
/// read it. As root it runs as `nobody` (via setpriv); otherwise the file is made
/// unreadable for the caller.
#[test]
fn check_config_without_rights_says_which_file_and_who_may_read_it() {
    let dir = open_tempdir();
    let etc = dir.path().join("etc");
    std::fs::create_dir(&etc).expect("mkdir");
    let file = etc.join("fieldbridge.toml");
    std::fs::write(&file, "[broker]\n").expect("write config");
    let output = if is_root() {
        // root:daemon 0750, as /etc/fieldbridge is root:fieldbridge 0750.
        std::os::unix::fs::chown(&etc, Some(0), Some(1)).expect("chgrp daemon");
        std::fs::set_permissions(&etc, std::fs::Permissions::from_mode(0o750)).expect("chmod");
        Command::new(tool("setpriv", "util-linux"))
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(env!("CARGO_BIN_EXE_fieldbridge"))
            .args(["check-config", "--config"])
            .arg(&file)
            .output()
            .expect("run setpriv")
    } else {
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o000)).expect("chmod");
        check_config(&file)
    };
    assert!(!output.status.success(), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("{}: cannot read: ", file.display())),
        "{}",
        text(&output)
    );
    let expected = if is_root() {
        let group = fieldbridge::files::group_name(1);
        format!(
            "its directory {} is root:{group} 0750, readable by root and the {group} group only: \
             run it with sudo, or join the group (sudo adduser $USER {group}",
            etc.display()
        )
    } else {
        format!("{} is ", file.display())
    };
    assert!(stderr.contains(&expected), "{}", text(&output));
}

/// `--as-user` checks the named files with that user's rights: as root, a password
/// file only root can read fails for `nobody`, and passes once it is readable.
#[test]
fn check_config_as_user_checks_with_that_users_rights() {
    let dir = open_tempdir();
    let passwd = dir.path().join("passwd");
    let output = fieldbridge()
        .args(["passwd", "-b"])
        .arg(&passwd)
        .args(["ha", "secret"])
        .output()
        .expect("run passwd");
    assert!(output.status.success(), "{}", text(&output));
    std::fs::set_permissions(&passwd, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let file = dir.path().join("fieldbridge.toml");
    std::fs::write(
        &file,
        format!(
            "[broker]\npassword_file = {:?}\n",
            passwd.display().to_string()
        ),
    )
    .expect("write config");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let as_nobody = || {
        fieldbridge()
            .args(["check-config", "--as-user", "nobody", "--config"])
            .arg(&file)
            .output()
            .expect("run check-config --as-user")
    };
    let output = as_nobody();
    assert!(!output.status.success(), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !is_root() {
        assert!(stderr.contains("--as-user needs root"), "{}", text(&output));
        return;
    }
    assert!(
        stderr.contains(&format!(
            "broker.password_file: cannot read {}: Permission denied",
            passwd.display()
        )),
        "{}",
        text(&output)
    );
    std::fs::set_permissions(&passwd, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let output = as_nobody();
    assert!(output.status.success(), "{}", text(&output));

    let output = fieldbridge()
        .args(["check-config", "--as-user", "no-such-user-here", "--config"])
        .arg(&file)
        .output()
        .expect("run check-config --as-user");
    assert!(!output.status.success(), "{}", text(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("no such user"),
        "{}",
        text(&output)
    );
}

fn passwd_batch(file: &Path, user: &str, password: &str) {
    let output = fieldbridge()
        .args(["passwd", "-b"])
        .arg(file)
        .args([user, password])
        .output()
        .expect("run fieldbridge passwd -b");
    assert!(output.status.success(), "{}", text(&output));
}

fn verifies(file: &Path, user: &str, password: &str) -> bool {
    fieldbridge::broker::PasswordFile::load(file)
        .expect("password file loads")
        .verify(user, password.as_bytes())
}

/// Regression: `passwd` rewrote the file as root:root 0600, so the service could no
/// longer read it. An existing file keeps its owner, group and mode (as root, the file
/// is given to daemon:daemon first; otherwise only the mode can differ from the
/// default).
#[test]
fn passwd_keeps_the_owner_group_and_mode_of_an_existing_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("passwd");
    passwd_batch(&file, "alice", "one");
    if is_root() {
        std::os::unix::fs::chown(&file, Some(1), Some(1)).expect("chown daemon:daemon");
    }
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let before = std::fs::metadata(&file).expect("metadata");

    let output = fieldbridge()
        .arg("passwd")
        .arg(&file)
        .arg("bob")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().expect("stdin").write_all(b"two\n")?;
            child.wait_with_output()
        })
        .expect("run fieldbridge passwd");
    assert!(output.status.success(), "{}", text(&output));
    passwd_batch(&file, "alice", "three");

    let after = std::fs::metadata(&file).expect("metadata");
    assert_eq!(after.mode() & 0o7777, 0o640, "mode changed");
    assert_eq!(
        (after.uid(), after.gid()),
        (before.uid(), before.gid()),
        "owner changed"
    );
    assert!(verifies(&file, "bob", "two"));
    assert!(verifies(&file, "alice", "three"));
    assert!(!verifies(&file, "alice", "one"));
    let left: Vec<_> = std::fs::read_dir(dir.path()).expect("read dir").collect();
    assert_eq!(left.len(), 1, "a temporary file was left behind");
}

/// A new password file is 0640 with the group of its directory (`/etc/fieldbridge` is
/// root:fieldbridge, so the service can read it without a manual chown).
#[test]
fn passwd_creates_a_new_file_0640_with_the_group_of_its_directory() {
    let dir = open_tempdir();
    if is_root() {
        std::os::unix::fs::chown(dir.path(), None, Some(1)).expect("chgrp daemon");
    }
    let dir_gid = std::fs::metadata(dir.path()).expect("metadata").gid();
    let file = dir.path().join("passwd");
    passwd_batch(&file, "ha", "secret");
    let meta = std::fs::metadata(&file).expect("metadata");
    assert_eq!(meta.mode() & 0o7777, 0o640);
    assert_eq!(meta.gid(), dir_gid);
    assert!(verifies(&file, "ha", "secret"));
}

/// On a terminal the password is asked twice; a mismatch changes nothing. `script`
/// gives the command a real terminal.
#[test]
fn passwd_asks_twice_on_a_terminal() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("passwd");
    let on_terminal = |input: &str| {
        let command = format!(
            "{} passwd {} ha",
            env!("CARGO_BIN_EXE_fieldbridge"),
            file.display()
        );
        let mut child = Command::new(tool("script", "bsdutils"))
            .args(["-qec", &command, "/dev/null"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run script");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("type");
        child.wait_with_output().expect("wait for script")
    };
    let output = on_terminal("first\nsecond\n");
    let shown = text(&output);
    assert!(shown.contains("Reenter password: "), "{shown}");
    assert!(shown.contains("do not match"), "{shown}");
    assert!(!file.exists(), "{shown}");
    let output = on_terminal("same\nsame\n");
    assert!(output.status.success(), "{}", text(&output));
    assert!(verifies(&file, "ha", "same"));
}

#[test]
fn passwd_takes_the_password_as_an_argument_only_with_b() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("passwd");
    let output = fieldbridge()
        .arg("passwd")
        .arg(&file)
        .args(["ha", "secret"])
        .output()
        .expect("run passwd");
    assert!(!output.status.success(), "{}", text(&output));
    assert!(!file.exists());
    passwd_batch(&file, "ha", "secret");
    assert!(verifies(&file, "ha", "secret"));
}

/// The config mistakes that passed `check-config` and failed at runtime (or silently),
/// and the spellings mosquitto, Paho and Telegraf users write that were refused, through
/// the binary in one file each.
#[test]
fn check_config_refuses_silent_mistakes_and_accepts_common_spellings() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mistakes = dir.path().join("mistakes.toml");
    std::fs::write(
        &mistakes,
        "[broker]\n[agent]\nprefix = \"site/gw\"\n\
         [[bus]]\nname = \"plc\"\nkind = \"tcp\"\nhost = \"10.0.0.5:502\"\nport = 502\n\
         [[bus.device]]\nname = \"press\"\n\
         [[bus.device.point]]\nname = \"status\"\nkind = \"holding\"\naddress = 0\n\
         [[bus.device.point]]\nname = \"label\"\nkind = \"holding\"\naddress = 10\n\
         type = \"string\"\nregisters = 4\ndeadband = 1.0\n",
    )
    .expect("write config");
    let output = check_config(&mistakes);
    assert!(!output.status.success(), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for expected in [
        "7:8: bus[0].host: \"10.0.0.5:502\" includes a port; write host = \"10.0.0.5\" and port = 502",
        "21:12: bus[0].device[0].point[1].deadband: a deadband applies only to numeric types",
    ] {
        assert!(stderr.contains(expected), "missing {expected:?}:\n{stderr}");
    }

    // The status-word point alone: its topic is the device's status topic.
    let status = dir.path().join("status.toml");
    std::fs::write(
        &status,
        "[broker]\n[agent]\nprefix = \"site/gw\"\n\
         [[bus]]\nname = \"plc\"\nkind = \"tcp\"\nhost = \"10.0.0.5\"\n\
         [[bus.device]]\nname = \"press\"\n\
         [[bus.device.point]]\nname = \"status\"\nkind = \"holding\"\naddress = 0\n\
         [[bus.device.point]]\nname = \"running\"\nkind = \"holding\"\naddress = 0\n\
         type = \"bit\"\nbit = 0\n",
    )
    .expect("write config");
    let output = check_config(&status);
    assert!(!output.status.success(), "{}", text(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains(
            "bus[0].device[0].point[0].name: point \"status\" of device \"press\" would publish \
             on \"site/gw/press/status\", which is already the online/offline status of device \
             \"press\" (bus[0].device[0].name)"
        ),
        "{}",
        text(&output)
    );
    // Renamed, the word and its bit on one register are fine.
    std::fs::write(
        &status,
        std::fs::read_to_string(&status)
            .expect("read")
            .replace("name = \"status\"", "name = \"status_word\""),
    )
    .expect("write config");
    let output = check_config(&status);
    assert!(output.status.success(), "{}", text(&output));

    let spellings = dir.path().join("spellings.toml");
    std::fs::write(
        &spellings,
        "[broker]\nallow_anonymous = true\n[[broker.listeners]]\nbind = \"localhost:1883\"\n\
         [[broker.listeners]]\nbind = \"1884\"\n\
         [upstream]\nurl = \"ssl://broker.example.net\"\n",
    )
    .expect("write config");
    let output = check_config(&spellings);
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("upstream: ssl://broker.example.net"),
        "{}",
        text(&output)
    );
}

/// `agent.log_level` is a list of `target=level` directives: a target set louder than the
/// default is heard, every other target stays at the default (the filter is tracing's
/// `Targets`, not `EnvFilter`: no regex engine in the binary). A level that is not one
/// is a config problem at its key.
#[test]
fn log_directives_set_the_level_per_target() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let path = dir.path().join("log.toml");
    std::fs::write(
        &path,
        format!(
            "[agent]\nlog_level = \"warn,fieldbridge::broker=info\"\n[broker]\n\
             allow_anonymous = true\n[[broker.listeners]]\nbind = \"127.0.0.1:{port}\"\n"
        ),
    )
    .expect("write config");
    let log = dir.path().join("log.log");
    let mut child = fieldbridge()
        .args(["run", "--config"])
        .arg(&path)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("create log"))
        .spawn()
        .expect("spawn fieldbridge run");
    // The broker listens after the signal handlers are in: SIGTERM is a clean stop.
    wait_for_port(port, Duration::from_secs(15));
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .expect("run kill");
    assert!(status.success());
    let exit = wait_for("the agent to exit", Duration::from_secs(15), || {
        child.try_wait().ok().flatten()
    });
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(exit.success(), "exit {exit}:\n{logged}");
    assert!(logged.contains("broker listening"), "{logged}");
    assert!(
        !logged.contains("fieldbridge running") && !logged.contains("starting"),
        "info lines of other targets were logged:\n{logged}"
    );

    std::fs::write(&path, "[agent]\nlog_level = \"fieldbridge=loud\"\n").expect("write");
    let output = check_config(&path);
    assert!(!output.status.success(), "{}", text(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("agent.log_level"),
        "{}",
        text(&output)
    );
}
