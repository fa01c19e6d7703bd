//! The status page of the real binary: `/` is the embedded page and `/api/status` the
//! JSON it polls, with a pymodbus slave (one register counting its reads, so every poll
//! has a new value), a device on a closed port, a real mosquitto upstream and the LAN
//! broker. The page itself is checked in a real browser by `scripts/status-page-check.sh`.

mod common;

use std::time::Duration;

use common::agent::Agent;
use common::http::{exchange, http};
use common::mosquitto::Mosquitto;
use common::slave::Slave;
use common::util::{free_port, wait_for, wait_for_port};
use serde_json::{json, Value};

const START: Duration = Duration::from_secs(15);
const ARRIVE: Duration = Duration::from_secs(20);
/// The trend's bound (`agent::recent::TREND_LEN`).
const TREND_LEN: usize = 32;

fn status(port: u16) -> Value {
    let (code, body) = http(port, "GET", "/api/status");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("/api/status is JSON")
}

fn device<'a>(status: &'a Value, bus: &str, name: &str) -> &'a Value {
    let bus = status["buses"]
        .as_array()
        .expect("buses")
        .iter()
        .find(|b| b["name"] == bus)
        .unwrap_or_else(|| panic!("no bus {bus} in {status}"));
    bus["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("no device {name} in {status}"))
}

fn point<'a>(device: &'a Value, name: &str) -> &'a Value {
    device["points"]
        .as_array()
        .expect("points")
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no point {name} in {device}"))
}

#[test]
fn the_status_json_shows_every_device_point_value_and_a_bounded_trend() {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = Mosquitto::start();
    let slave = Slave::tcp(&json!({"units": {"1": {
        "holding": {"0": [230]},
        "counter": [{"kind": "holding", "address": 1}],
    }}}));
    let (lan_port, http_port, dead_port) = (free_port(), free_port(), free_port());
    let config = format!(
        "[agent]\nprefix = \"site/gw\"\nhealth_interval_secs = 1\n\n\
         [broker]\n[[broker.listeners]]\nbind = \"127.0.0.1:{lan_port}\"\n\n\
         [store]\npath = {store:?}\ncommit_interval_ms = 20\n\n\
         [upstream]\nurl = {url:?}\nclient_id = \"fieldbridge-status\"\n\n\
         [http]\nbind = \"127.0.0.1:{http_port}\"\n\n\
         [[bus]]\nname = \"plant\"\nkind = \"tcp\"\nhost = \"127.0.0.1\"\nport = {slave}\n\n\
         [[bus.device]]\nname = \"meter\"\nunit_id = 1\npoll_interval_ms = 50\ntimeout_ms = 2000\n\n\
         [[bus.device.point]]\nname = \"voltage\"\nunit = \"V\"\nkind = \"holding\"\naddress = 0\ntype = \"u16\"\n\
         [[bus.device.point]]\nname = \"polls\"\nkind = \"holding\"\naddress = 1\ntype = \"u16\"\n\n\
         [[bus]]\nname = \"yard\"\nkind = \"tcp\"\nhost = \"127.0.0.1\"\nport = {dead_port}\n\n\
         [[bus.device]]\nname = \"pump\"\nunit_id = 1\npoll_interval_ms = 200\ntimeout_ms = 200\n\n\
         [[bus.device.point]]\nname = \"flow\"\nunit = \"m³/h\"\nkind = \"input\"\naddress = 0\ntype = \"u16\"\n",
        store = dir.path().join("queue.db").display().to_string(),
        url = upstream.url(),
        slave = slave.port(),
    );
    let _agent = Agent::start(dir.path(), &config);
    wait_for_port(http_port, START);

    // The page: HTML, small, and it polls the JSON relative to where it is served.
    let (code, head, page) = exchange(http_port, "GET", "/", "");
    assert_eq!(code, 200, "{page}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/html; charset=utf-8"),
        "{head}"
    );
    assert!(page.contains("fetch(\"api/status\""), "{page}");
    assert!(page.len() < 8 * 1024, "the page is {} bytes", page.len());
    assert!(
        !page.contains(" src=") && !page.contains("<link"),
        "everything is inline, nothing is fetched from elsewhere"
    );

    // More polls than the trend holds, and the dead pump's state is known.
    let settled = wait_for(
        "the meter past a full trend and the pump down",
        ARRIVE,
        || {
            let status = status(http_port);
            let meter = device(&status, "plant", "meter");
            let polls = point(meter, "polls")["readings"].as_u64()?;
            let pump = device(&status, "yard", "pump")["state"]
                .as_str()?
                .to_string();
            let up = status["upstream"]["state"] == "connected";
            (polls > TREND_LEN as u64 + 2 && pump != "starting" && up).then_some(status)
        },
    );

    let buses: Vec<&str> = settled["buses"]
        .as_array()
        .expect("buses")
        .iter()
        .filter_map(|b| b["name"].as_str())
        .collect();
    assert_eq!(buses, ["plant", "yard"], "configuration order");
    assert_eq!(settled["prefix"], "site/gw");
    assert!(
        settled["readings"]["accepted"].as_u64().is_some(),
        "{settled}"
    );
    assert!(settled["readings"].get("per_sec").is_none(), "{settled}");
    assert!(settled["queue"]["depth"].as_u64().is_some(), "{settled}");
    assert!(settled["queue"]["dropped"].is_object(), "{settled}");
    assert!(settled["queue"].get("oldest_age_ms").is_some(), "{settled}");
    assert_eq!(settled["upstream"]["last_error"], Value::Null, "{settled}");
    assert!(settled["lan"]["clients"].as_u64().is_some(), "{settled}");
    assert!(
        settled["time"]["synced"].is_boolean(),
        "the page's Clock card: {settled}"
    );

    let meter = device(&settled, "plant", "meter");
    assert_eq!(meter["state"], "online", "{meter}");
    assert!(meter["last_ts"].as_i64().is_some(), "{meter}");
    assert_eq!(meter["bad_readings"], 0, "{meter}");
    let voltage = point(meter, "voltage");
    assert_eq!(
        (
            &voltage["value"],
            &voltage["unit"],
            &voltage["kind"],
            &voltage["quality"]
        ),
        (&json!(230), &json!("V"), &json!("holding"), &json!("good")),
        "{voltage}"
    );
    assert!(
        voltage["age_ms"].as_i64().is_some_and(|age| age >= 0),
        "{voltage}"
    );
    let polls = point(meter, "polls");
    let trend: Vec<f64> = polls["trend"]
        .as_array()
        .expect("trend")
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    assert_eq!(trend.len(), TREND_LEN, "bounded and full: {polls}");
    assert!(
        trend.windows(2).all(|w| w[1] > w[0]),
        "the counter rises poll by poll, oldest first: {trend:?}"
    );
    assert_eq!(
        Some(trend[TREND_LEN - 1]),
        polls["value"].as_f64(),
        "{polls}"
    );

    let pump = device(&settled, "yard", "pump");
    assert_ne!(pump["state"], "online", "{pump}");
    assert_eq!(pump["last_error"]["quality"], "disconnected", "{pump}");
    let flow = point(pump, "flow");
    assert_eq!(flow["value"], Value::Null, "{flow}");
    assert_eq!(flow["quality"], "disconnected", "{flow}");
    assert_eq!(flow["trend"], json!([]), "{flow}");

    // A later poll sees newer values.
    let first = polls["value"].as_f64().expect("a value");
    wait_for("a newer value on a later poll", ARRIVE, || {
        let later = status(http_port);
        let value = point(device(&later, "plant", "meter"), "polls")["value"].as_f64()?;
        (value > first).then_some(())
    });
}

#[test]
fn a_reload_drops_removed_points_from_the_status_and_keeps_the_trend_of_the_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let slave = Slave::tcp(&json!({"units": {"1": {
        "holding": {"0": [230, 7]},
        "counter": [{"kind": "holding", "address": 2}],
    }}}));
    let (lan_port, http_port) = (free_port(), free_port());
    let config = |points: &[(&str, u16)]| {
        let mut config = format!(
            "[broker]\n[[broker.listeners]]\nbind = \"127.0.0.1:{lan_port}\"\n\n\
             [http]\nbind = \"127.0.0.1:{http_port}\"\n\n\
             [[bus]]\nname = \"plant\"\nkind = \"tcp\"\nhost = \"127.0.0.1\"\nport = {}\n\n\
             [[bus.device]]\nname = \"meter\"\nunit_id = 1\npoll_interval_ms = 50\n",
            slave.port()
        );
        for (name, address) in points {
            config.push_str(&format!(
                "[[bus.device.point]]\nname = \"{name}\"\nkind = \"holding\"\naddress = {address}\ntype = \"u16\"\n"
            ));
        }
        config
    };
    let agent = Agent::start(dir.path(), &config(&[("polls", 2), ("old", 1)]));
    wait_for_port(http_port, START);
    let before = wait_for("a few polls", ARRIVE, || {
        let status = status(http_port);
        let polls = point(device(&status, "plant", "meter"), "polls")["readings"].as_u64()?;
        (polls >= 3).then_some(polls)
    });

    std::fs::write(agent.config(), config(&[("polls", 2), ("new", 0)])).expect("rewrite config");
    agent.signal("HUP");
    agent.wait_log("device maps reloaded", 1);
    let status = wait_for("the new point polled", ARRIVE, || {
        let status = status(http_port);
        let polled = device(&status, "plant", "meter")["points"]
            .as_array()?
            .iter()
            .any(|p| p["name"] == "new" && p["value"] == 230);
        polled.then_some(status)
    });
    let meter = device(&status, "plant", "meter");
    let names: Vec<&str> = meter["points"]
        .as_array()
        .expect("points")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(names, ["polls", "new"], "{meter}");
    let polls = point(meter, "polls");
    assert!(
        polls["readings"].as_u64().is_some_and(|n| n > before),
        "the kept point keeps counting: {polls}"
    );
    assert!(
        polls["trend"]
            .as_array()
            .is_some_and(|t| t.len() as u64 >= before.min(TREND_LEN as u64)),
        "and keeps its trend: {polls}"
    );
}
