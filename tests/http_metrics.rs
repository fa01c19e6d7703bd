//! `/metrics` of the real binary, with real parts around it: a pymodbus slave, a real
//! mosquitto upstream, the LAN broker, and the text parsed by prometheus_client's own
//! parser (`tests/fixtures/parse_metrics.py`), not by code of this project.

mod common;

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::clients::python;
use common::http::{http, http_with};
use common::mosquitto::Mosquitto;
use common::slave::Slave;
use common::util::{free_port, poll_until, wait_for, wait_for_port};
use serde_json::{json, Value};

const START: Duration = Duration::from_secs(15);
const ARRIVE: Duration = Duration::from_secs(20);

/// The agent process; killed on drop.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_agent(dir: &Path, config: &str) -> Agent {
    let path = dir.join("fieldbridge.toml");
    std::fs::write(&path, config).expect("write config");
    let log = std::fs::File::create(dir.join("agent.log")).expect("create log");
    let child = Command::new(env!("CARGO_BIN_EXE_fieldbridge"))
        .args(["run", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn fieldbridge");
    Agent(child)
}

/// The families prometheus_client parsed from `text`.
fn parse(dir: &Path, text: &str) -> serde_json::Map<String, Value> {
    let path = dir.join("metrics.txt");
    std::fs::write(&path, text).expect("write metrics");
    let out = python("parse_metrics.py", &[&path.to_string_lossy()]);
    let parsed: Value = serde_json::from_str(&out).expect("parser output is JSON");
    parsed["families"].as_object().expect("families").clone()
}

/// The value of the sample `name` whose labels include `labels`.
fn sample(families: &serde_json::Map<String, Value>, name: &str, labels: &Value) -> Option<f64> {
    families.values().find_map(|family| {
        family["samples"].as_array()?.iter().find_map(|s| {
            let matches = s[0] == name
                && labels
                    .as_object()?
                    .iter()
                    .all(|(key, value)| &s[1][key] == value);
            if matches {
                s[2].as_f64()
            } else {
                None
            }
        })
    })
}

#[test]
fn metrics_parse_with_prometheus_client_and_follow_the_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = Mosquitto::start();
    let slave = Slave::tcp(&json!({"units": {"1": {"holding": {"0": [230, 1500]}}}}));
    let (lan_port, http_port, dead_port) = (free_port(), free_port(), free_port());
    let config = format!(
        "[agent]\nprefix = \"site/gw\"\nhealth_interval_secs = 1\n\n\
         [broker]\n[[broker.listeners]]\nbind = \"127.0.0.1:{lan_port}\"\n\n\
         [store]\npath = {store:?}\ncommit_interval_ms = 20\n\n\
         [upstream]\nurl = {url:?}\nclient_id = \"fieldbridge-metrics\"\n\n\
         [http]\nbind = \"127.0.0.1:{http_port}\"\n\n\
         [[bus]]\nname = \"plant\"\nkind = \"tcp\"\nhost = \"127.0.0.1\"\nport = {slave}\n\n\
         [[bus.device]]\nname = \"meter\"\nunit_id = 1\npoll_interval_ms = 100\ntimeout_ms = 2000\n\n\
         [[bus.device.point]]\nname = \"voltage\"\nunit = \"V\"\nkind = \"holding\"\naddress = 0\ntype = \"u16\"\n\
         [[bus.device.point]]\nname = \"power\"\nunit = \"W\"\nkind = \"holding\"\naddress = 1\ntype = \"u16\"\n\n\
         [[bus]]\nname = \"yard\"\nkind = \"tcp\"\nhost = \"127.0.0.1\"\nport = {dead_port}\n\n\
         [[bus.device]]\nname = \"pump\"\nunit_id = 1\npoll_interval_ms = 200\ntimeout_ms = 200\n\n\
         [[bus.device.point]]\nname = \"flow\"\nkind = \"holding\"\naddress = 0\ntype = \"u16\"\n",
        store = dir.path().join("queue.db").display().to_string(),
        url = upstream.url(),
        slave = slave.port(),
    );
    let mut agent = start_agent(dir.path(), &config);
    wait_for_port(http_port, START);

    let ready = poll_until(ARRIVE, || {
        let (status, text) = http(http_port, "GET", "/metrics");
        assert_eq!(status, 200, "{text}");
        let families = parse(dir.path(), &text);
        let acked = sample(&families, "fieldbridge_uplink_acked_total", &json!({}))?;
        let online = sample(
            &families,
            "fieldbridge_device_state",
            &json!({"bus": "plant", "device": "meter", "state": "online"}),
        )?;
        let pump_down = sample(
            &families,
            "fieldbridge_device_state",
            &json!({"bus": "yard", "device": "pump", "state": "online"}),
        )? == 0.0
            && sample(
                &families,
                "fieldbridge_device_state",
                &json!({"bus": "yard", "device": "pump", "state": "starting"}),
            )? == 0.0;
        (acked > 0.0 && online == 1.0 && pump_down).then_some((text, families))
    });
    let Some((text, families)) = ready else {
        let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
        panic!("metrics never showed a delivered reading and both device states\n{log}");
    };

    // Every family the README lists, with its type.
    for (name, kind) in [
        ("fieldbridge_build_info", "gauge"),
        ("fieldbridge_uptime_seconds", "gauge"),
        ("fieldbridge_readings_accepted", "counter"),
        ("fieldbridge_readings", "counter"),
        ("fieldbridge_bus_requests", "counter"),
        ("fieldbridge_bus_request_failures", "counter"),
        ("fieldbridge_bus_readings", "counter"),
        ("fieldbridge_bus_request_duration_seconds", "histogram"),
        ("fieldbridge_device_state", "gauge"),
        ("fieldbridge_store_rows", "gauge"),
        ("fieldbridge_store_bytes", "gauge"),
        ("fieldbridge_store_oldest_age_seconds", "gauge"),
        ("fieldbridge_store_dropped_rows", "counter"),
        ("fieldbridge_store_filesystem_free_bytes", "gauge"),
        ("fieldbridge_store_disk_state", "gauge"),
        ("fieldbridge_uplink_state", "gauge"),
        ("fieldbridge_uplink_inflight_messages", "gauge"),
        ("fieldbridge_uplink_published", "counter"),
        ("fieldbridge_uplink_acked", "counter"),
        ("fieldbridge_uplink_reconnects", "counter"),
        ("fieldbridge_lan_clients", "gauge"),
        ("fieldbridge_lan_sessions", "gauge"),
        ("fieldbridge_lan_messages_received", "counter"),
        ("fieldbridge_lan_messages_sent", "counter"),
        ("fieldbridge_lan_dropped_messages", "counter"),
        ("fieldbridge_commands", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_cpu_seconds", "counter"),
    ] {
        let family = families
            .get(name)
            .unwrap_or_else(|| panic!("no family {name} in\n{text}"));
        assert_eq!(family["type"], kind, "{name}");
    }
    // Counters end in _total, everything is prefixed.
    for (name, family) in &families {
        assert!(
            name.starts_with("fieldbridge_") || name.starts_with("process_"),
            "{name}"
        );
        if family["type"] == "counter" {
            for s in family["samples"].as_array().expect("samples") {
                let sample_name = s[0].as_str().expect("name");
                assert!(
                    sample_name.ends_with("_total") || sample_name.ends_with("_created"),
                    "counter sample {sample_name} lacks _total"
                );
            }
        }
    }
    let connected = sample(
        &families,
        "fieldbridge_uplink_state",
        &json!({"state": "connected"}),
    );
    assert_eq!(connected, Some(1.0));
    let requests = sample(
        &families,
        "fieldbridge_bus_requests_total",
        &json!({"bus": "plant"}),
    )
    .expect("plant requests");
    assert!(requests >= 1.0);
    // The closed port fails as `disconnected`; the slave answers, so plant has none.
    let failures = |bus: &str, quality: &str| {
        sample(
            &families,
            "fieldbridge_bus_request_failures_total",
            &json!({"bus": bus, "quality": quality}),
        )
        .unwrap_or_else(|| panic!("no {quality} failures of {bus} in\n{text}"))
    };
    assert!(failures("yard", "disconnected") >= 1.0, "{text}");
    assert_eq!(failures("plant", "timeout"), 0.0, "{text}");
    // Every request of a bus is in its latency histogram, under +Inf.
    let histogram_count = sample(
        &families,
        "fieldbridge_bus_request_duration_seconds_count",
        &json!({"bus": "plant"}),
    )
    .expect("plant latency count");
    let inf = sample(
        &families,
        "fieldbridge_bus_request_duration_seconds_bucket",
        &json!({"bus": "plant", "le": "+Inf"}),
    )
    .expect("plant +Inf bucket");
    assert_eq!(histogram_count, inf);
    assert!(histogram_count >= 1.0, "{text}");
    // Readings per device and point kind: the meter's holding registers.
    let meter = sample(
        &families,
        "fieldbridge_readings_total",
        &json!({"bus": "plant", "device": "meter", "kind": "holding"}),
    )
    .unwrap_or_else(|| panic!("no readings of the meter by kind in\n{text}"));
    assert!(meter >= 2.0, "{text}");
    let rss = sample(&families, "process_resident_memory_bytes", &json!({})).expect("rss");
    assert!(rss > 1_000_000.0, "RSS {rss} is in bytes");

    // A later scrape sees the readings that arrived since.
    let first = sample(&families, "fieldbridge_readings_accepted_total", &json!({}))
        .expect("accepted readings");
    wait_for("more accepted readings on a later scrape", ARRIVE, || {
        let (_, text) = http(http_port, "GET", "/metrics");
        let now = sample(
            &parse(dir.path(), &text),
            "fieldbridge_readings_accepted_total",
            &json!({}),
        )?;
        (now > first).then_some(())
    });

    // The endpoint holds the uplink's handle through the health report's sources; a
    // SIGTERM still ends with a clean DISCONNECT (the endpoint stops first).
    let _open = TcpStream::connect(("127.0.0.1", http_port)).expect("an idle keep-alive");
    let killed = Command::new("kill")
        .args(["-TERM", &agent.0.id().to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success());
    let status = wait_for("the agent to exit after SIGTERM", START, || {
        agent.0.try_wait().expect("wait for agent")
    });
    let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
    assert!(status.success(), "{log}");
    assert!(log.contains("upstream disconnected"), "{log}");
}

#[test]
fn the_endpoint_is_read_only_and_answers_404_for_unknown_paths() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (lan_port, http_port) = (free_port(), free_port());
    let config = format!(
        "[broker]\n[[broker.listeners]]\nbind = \"127.0.0.1:{lan_port}\"\n\n\
         [http]\nbind = \"127.0.0.1:{http_port}\"\n"
    );
    let _agent = start_agent(dir.path(), &config);
    wait_for_port(http_port, START);
    assert_eq!(http(http_port, "POST", "/metrics").0, 405);
    assert_eq!(http(http_port, "GET", "/nothing-here").0, 404);
    let (status, body) = http(http_port, "HEAD", "/metrics");
    assert_eq!((status, body.as_str()), (200, ""));
    // LAN-only: no store or uplink families that would look like an idle upstream.
    let (_, text) = http(http_port, "GET", "/metrics");
    let families = parse(dir.path(), &text);
    assert!(families.contains_key("fieldbridge_lan_clients"), "{text}");
    assert!(
        !families
            .keys()
            .any(|name| name.starts_with("fieldbridge_uplink_")
                || name.starts_with("fieldbridge_store_")),
        "{text}"
    );
}

#[test]
fn a_bind_outside_loopback_asks_for_a_user_of_the_broker_password_file() {
    use base64::Engine;
    let dir = tempfile::tempdir().expect("tempdir");
    let passwords = dir.path().join("passwd");
    std::fs::write(
        &passwords,
        fieldbridge::broker::passwd_line("scraper", "s3cret"),
    )
    .expect("write password file");
    let (lan_port, http_port) = (free_port(), free_port());
    let config = format!(
        "[broker]\npassword_file = {passwords:?}\n[[broker.listeners]]\nbind = \"127.0.0.1:{lan_port}\"\n\n\
         [http]\nbind = \"0.0.0.0:{http_port}\"\n",
        passwords = passwords.display().to_string(),
    );
    let _agent = start_agent(dir.path(), &config);
    wait_for_port(http_port, START);
    let basic = |user_password: &str| {
        format!(
            "Authorization: Basic {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(user_password)
        )
    };
    assert_eq!(http(http_port, "GET", "/metrics").0, 401);
    assert_eq!(
        http_with(http_port, "GET", "/metrics", &basic("scraper:wrong")).0,
        401
    );
    assert_eq!(
        http_with(http_port, "GET", "/metrics", "Authorization: Basic !!!\r\n").0,
        401
    );
    let (status, text) = http_with(http_port, "GET", "/metrics", &basic("scraper:s3cret"));
    assert_eq!(status, 200, "{text}");
    assert!(parse(dir.path(), &text).contains_key("fieldbridge_lan_clients"));
    // The status page and its JSON sit behind the same login.
    for path in ["/", "/api/status"] {
        assert_eq!(http(http_port, "GET", path).0, 401, "{path}");
        let (status, body) = http_with(http_port, "GET", path, &basic("scraper:s3cret"));
        assert_eq!(status, 200, "{path}: {body}");
    }
}
