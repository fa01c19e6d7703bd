//! Home Assistant discovery with real parts: the `fieldbridge` binary with its LAN
//! broker, a pymodbus slave, mosquitto_sub/_pub as Home Assistant's side of the broker,
//! and Home Assistant's template engine (jinja2) to read the templates the way Home
//! Assistant does. The payload schema per point kind is tested in
//! `src/agent/discovery.rs`.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::clients::{mosquitto_pub, python, Sub};
use common::mosquitto::retained_on;
use common::slave::Slave;
use common::util::{free_port, wait_for, wait_for_port};
use serde_json::{json, Value};

const ARRIVE: Duration = Duration::from_secs(20);
const TEMP: &str = "homeassistant/sensor/ha_gw/meter__temp/config";
const PUMP: &str = "homeassistant/switch/ha_gw/meter__pump/config";
const GHOST: &str = "homeassistant/sensor/ha_gw/ghost__temp/config";

/// `fieldbridge run` on a config file in a temporary directory; killed on drop.
struct Running {
    child: Child,
    log: std::path::PathBuf,
}

impl Running {
    fn start(dir: &Path, config: &str) -> Running {
        let path = dir.join("fieldbridge.toml");
        std::fs::write(&path, config).expect("write config");
        let log = dir.join("fieldbridge.log");
        let child = Command::new(env!("CARGO_BIN_EXE_fieldbridge"))
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create log"))
            .spawn()
            .expect("spawn fieldbridge");
        Running { child, log }
    }

    fn wait_log(&self, needle: &str) {
        wait_for(&format!("{needle:?} in the agent log"), ARRIVE, || {
            std::fs::read_to_string(&self.log)
                .unwrap_or_default()
                .contains(needle)
                .then_some(())
        });
    }

    /// SIGHUP once the agent's signal handlers are in place.
    fn reload(&self, dir: &Path, config: &str) {
        self.wait_log("fieldbridge running");
        std::fs::write(dir.join("fieldbridge.toml"), config).expect("write config");
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }
}

impl Running {
    /// SIGTERM, and the wait for a clean exit (the broker writes its file).
    fn stop(&mut self) {
        self.wait_log("fieldbridge running");
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
        let child = &mut self.child;
        let exit = wait_for("fieldbridge to exit", ARRIVE, || {
            child.try_wait().ok().flatten()
        });
        assert!(exit.success(), "{exit}");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(broker_port: u16, slave_port: u16, points: &str) -> String {
    config_with(broker_port, slave_port, points, "")
}

/// With `broker` keys (`persistence_path = …`).
fn config_with(broker_port: u16, slave_port: u16, points: &str, broker: &str) -> String {
    format!(
        "[agent]\nprefix = \"ha/gw\"\n\n[broker]\n{broker}\n[[broker.listeners]]\nbind = \"127.0.0.1:{broker_port}\"\n\n\
         [homeassistant]\n\n\
         [[bus]]\nname = \"plant\"\nkind = \"tcp\"\nhost = \"127.0.0.1\"\nport = {slave_port}\n\n\
         [[bus.device]]\nname = \"meter\"\npoll_interval_ms = 200\ntimeout_ms = 300\nretries = 0\nquarantine_after = 2\nbackoff_max_ms = 1000\n\n{points}"
    )
}

const TEMP_POINT: &str = "[[bus.device.point]]\nname = \"temp\"\nunit = \"°C\"\nkind = \"holding\"\naddress = 0\ntype = \"i16\"\nscale = 0.1\n";
const PUMP_POINT: &str =
    "[[bus.device.point]]\nname = \"pump\"\nkind = \"coil\"\naddress = 0\nwritable = true\n";

fn slave() -> Slave {
    Slave::tcp(&json!({"units": {"1": {"holding": {"0": [215]}, "coil": {"0": [1]}}}}))
}

/// The retained discovery message on `topic`, parsed.
fn discovery(port: u16, topic: &str) -> Value {
    let message = wait_for(&format!("retained {topic}"), ARRIVE, || {
        retained_on(port, topic).filter(|m| !m.payload.is_empty())
    });
    assert!(message.retained);
    serde_json::from_str(&message.payload).expect("discovery payload is JSON")
}

/// What Home Assistant makes of `payload` with `template` (jinja2).
fn render(template: &str, payload: &str) -> String {
    python("ha_render.py", &[template, payload])
}

/// A second device on the bus, at a unit the slave does not serve: it never answers.
const GHOST_DEVICE: &str = "[[bus.device]]\nname = \"ghost\"\nunit_id = 2\npoll_interval_ms = 200\ntimeout_ms = 100\nretries = 0\nquarantine_after = 2\n\n\
     [[bus.device.point]]\nname = \"temp\"\nkind = \"holding\"\naddress = 0\n";

/// Whether Home Assistant would show `entity` available now: every availability topic
/// (mode `all`), through its template, says `online`.
fn available(port: u16, entity: &Value) -> bool {
    assert_eq!(entity["availability_mode"], "all");
    entity["availability"]
        .as_array()
        .expect("availability list")
        .iter()
        .all(|a| {
            let topic = a["topic"].as_str().expect("availability topic");
            let payload = retained_on(port, topic)
                .map(|m| m.payload)
                .unwrap_or_default();
            let value = match a["value_template"].as_str() {
                Some(template) => render(template, &payload),
                None => payload,
            };
            value == "online"
        })
}

#[test]
fn entities_go_unavailable_when_their_device_stops_answering_and_return_after_ha_restarts() {
    let mut slave = slave();
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let agent = Running::start(
        dir.path(),
        &config(
            port,
            slave.port(),
            &format!("{TEMP_POINT}{PUMP_POINT}{GHOST_DEVICE}"),
        ),
    );
    wait_for_port(port, ARRIVE);

    let temp = discovery(port, TEMP);
    wait_for("the device online", ARRIVE, || {
        available(port, &temp).then_some(())
    });
    // The state as Home Assistant reads it from the point's topic.
    let state_topic = temp["state_topic"].as_str().unwrap();
    let reading = wait_for("a temperature reading", ARRIVE, || {
        retained_on(port, state_topic)
    });
    assert_eq!(
        render(temp["value_template"].as_str().unwrap(), &reading.payload),
        "21.5"
    );
    let pump = discovery(port, PUMP);
    let state = retained_on(port, pump["state_topic"].as_str().unwrap()).unwrap();
    assert_eq!(
        render(pump["value_template"].as_str().unwrap(), &state.payload),
        "ON"
    );

    // A device that never answers is quarantined: not available.
    let ghost = discovery(port, GHOST);
    let ghost_status = ghost["availability"][0]["topic"]
        .as_str()
        .unwrap()
        .to_string();
    wait_for("the silent device quarantined", ARRIVE, || {
        retained_on(port, &ghost_status).filter(|m| m.payload == "quarantined")
    });
    assert!(
        !available(port, &ghost),
        "quarantined must not be available"
    );
    assert!(
        available(port, &temp),
        "one device's state is not another's"
    );

    // The slave goes away: the device is offline, its entities not available.
    slave.kill();
    let device_status = temp["availability"][0]["topic"]
        .as_str()
        .unwrap()
        .to_string();
    wait_for("the device offline", ARRIVE, || {
        retained_on(port, &device_status).filter(|m| m.payload == "offline")
    });
    assert!(!available(port, &temp), "offline must not be available");

    // Home Assistant restarts: its birth message brings every discovery message again.
    let sub = Sub::start(
        port,
        &["-t", "homeassistant/+/ha_gw/+/config", "-F", "%r %t"],
    );
    sub.wait_subscribed(ARRIVE);
    let retained = sub.wait_messages(4, ARRIVE);
    assert!(retained.iter().all(|m| m.starts_with("1 ")), "{retained:?}");
    let output = mosquitto_pub(port, &["-t", "homeassistant/status", "-m", "online"]);
    assert!(output.status.success());
    let again = sub.wait_messages(8, ARRIVE);
    assert!(
        again[4..].iter().all(|m| m.starts_with("0 ")),
        "live copies after HA's birth: {again:?}"
    );
    drop(agent);
}

#[test]
fn a_point_removed_at_reload_has_its_discovery_message_cleared() {
    let slave = slave();
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let both = config(port, slave.port(), &format!("{TEMP_POINT}{PUMP_POINT}"));
    let agent = Running::start(dir.path(), &both);
    wait_for_port(port, ARRIVE);
    discovery(port, PUMP);
    let sub = Sub::start(port, &["-t", "homeassistant/#", "-F", "%t %l"]);
    sub.wait_subscribed(ARRIVE);

    agent.reload(dir.path(), &config(port, slave.port(), TEMP_POINT));
    wait_for("an empty message on the pump's topic", ARRIVE, || {
        sub.messages().contains(&format!("{PUMP} 0")).then_some(())
    });
    agent.wait_log("Home Assistant discovery updated");
    assert_eq!(
        retained_on(port, PUMP),
        None,
        "the removal must be retained"
    );
    discovery(port, TEMP);
}

#[test]
fn a_point_removed_while_stopped_is_cleared_at_the_next_start() {
    let slave = slave();
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let persist = format!("persistence_path = {:?}", dir.path().join("broker.db"));
    let both = config_with(
        port,
        slave.port(),
        &format!("{TEMP_POINT}{PUMP_POINT}"),
        &persist,
    );
    let mut agent = Running::start(dir.path(), &both);
    wait_for_port(port, ARRIVE);
    discovery(port, PUMP);
    agent.stop();

    // The broker's file brings the old announcement back; the start clears it.
    let agent = Running::start(
        dir.path(),
        &config_with(port, slave.port(), TEMP_POINT, &persist),
    );
    agent.wait_log("removed=1");
    wait_for_port(port, ARRIVE);
    assert_eq!(
        retained_on(port, PUMP),
        None,
        "the stale entity must be cleared"
    );
    discovery(port, TEMP);
}

/// Upstream only (no LAN broker), with `[homeassistant] upstream = true`.
fn upstream_config(url: &str, store: &Path, slave_port: u16, points: &str) -> String {
    format!(
        "[agent]\nprefix = \"ha/gw\"\n\n\
         [store]\npath = {store:?}\ncommit_interval_ms = 20\n\n\
         [upstream]\nurl = {url:?}\nclient_id = \"fieldbridge-ha-upstream\"\n\n\
         [homeassistant]\nupstream = true\n\n\
         [[bus]]\nname = \"plant\"\nkind = \"tcp\"\nhost = \"127.0.0.1\"\nport = {slave_port}\n\n\
         [[bus.device]]\nname = \"meter\"\npoll_interval_ms = 200\ntimeout_ms = 300\n\n{points}",
        store = store.display().to_string(),
    )
}

#[test]
fn discovery_upstream_is_retained_on_the_upstream_broker_and_cleared_at_reload() {
    let slave = slave();
    let upstream = common::mosquitto::Mosquitto::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let store = dir.path().join("queue.db");
    let config = |points: &str| upstream_config(&upstream.url(), &store, slave.port(), points);
    let agent = Running::start(dir.path(), &config(&format!("{TEMP_POINT}{PUMP_POINT}")));

    let temp = discovery(upstream.port, TEMP);
    assert_eq!(temp["state_topic"], "ha/gw/meter/temp");
    // The device's availability topic is retained upstream too.
    wait_for("the device online upstream", ARRIVE, || {
        retained_on(upstream.port, "ha/gw/meter/status").filter(|m| m.payload == "online")
    });
    let pump = discovery(upstream.port, PUMP);
    assert_eq!(pump["command_topic"], "ha/gw/meter/pump/set");

    agent.reload(dir.path(), &config(TEMP_POINT));
    agent.wait_log("Home Assistant discovery updated");
    wait_for("the pump's discovery cleared upstream", ARRIVE, || {
        retained_on(upstream.port, PUMP).is_none().then_some(())
    });
    discovery(upstream.port, TEMP);
}
