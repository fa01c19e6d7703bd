//! Home Assistant MQTT discovery: the messages that make every configured device and
//! point appear in Home Assistant, on the LAN broker and, with `upstream = true`, on
//! the upstream broker.
//!
//! One discovery topic per entity, `{ha}/{component}/{node}/{device}__{point}/config`
//! (per-entity discovery, which every Home Assistant version with MQTT discovery reads),
//! rather than one device-based message (`{ha}/device/{id}/config`, Home Assistant
//! 2024.11 or later): a point that leaves the configuration is removed by an empty
//! retained message on its own topic, where a device message would have to be
//! rewritten with a platform-only stub for each removed entity.
//!
//! What is announced:
//! - The gateway is a device (identifier `{node}`, `sw_version` this build) with one
//!   `binary_sensor` (connectivity) on the agent's status topic.
//! - Each configured device is a device with `via_device` the gateway; each of its
//!   points one entity: `binary_sensor` for `bool`/`bit` types, `sensor` otherwise;
//!   writable points `switch` (bool/bit), `select` (with `allowed`) or `number` (with
//!   the write limits), their command topic the point's `…/set`. `ha_component`
//!   overrides the choice.
//! - Unit, `device_class` and `state_class` come from the point; the last two are
//!   inferred from the unit when the point does not set them ([`infer_classes`]).
//! - Availability needs both the device's status topic (`online`; `offline` and
//!   `quarantined` map to not available) and the agent's status topic.
//! - Sensors and binary sensors carry `expire_after`: `expire_after_polls` times the
//!   interval at which the point publishes (its heartbeat with a deadband; none with a
//!   deadband and no heartbeat, since an unchanged value is then never repeated).
//!
//! Upstream, the messages go through the store like the readings (retained, priority
//! `event`), so they wait out an outage and the uplink sends them retained when the
//! broker allows retained messages. The topics they name (states, statuses, commands)
//! are the same upstream as on the LAN broker. Upstream there is no answer to Home
//! Assistant's birth (the agent does not subscribe to `{ha}/status` there; the
//! upstream broker keeps the retained messages) and no clearing at start of what an
//! earlier run left retained (the agent cannot list the upstream broker's retained
//! topics); a reload clears what it removes on both.
//!
//! Invariants:
//! - Every message is retained; all of them are published again on the LAN broker
//!   when Home Assistant announces `online` there on `{ha}/status`.
//! - `unique_id` is `{node}_{device}__{point}` (as ids), so it survives restarts and
//!   reloads; only renaming the device or point (or `node_id`) makes a new entity.
//! - A reload that drops a device or point publishes an empty retained message on each
//!   of its topics, before the new ones; so does the start for what an earlier run left
//!   retained on the LAN broker (with `broker.persistence_path`) under this node id.
//! - Building the messages does no I/O ([`announcements`]); [`Announcer`] publishes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Map, Value as Json};
use tokio_util::sync::CancellationToken;

use crate::broker::BrokerHandle;
use crate::clock::now_ms;
use crate::config::HomeAssistantConfig;
use crate::field::schedule::Band;
use crate::field::{BusKind, DataType, HaComponent, ResolvedBus, StateClass};
use crate::field::{ResolvedDevice, ResolvedPoint};
use crate::mqtt::QoS;
use crate::store::{Done, Message, Priority, Queue};
use crate::topics::{discovery_id, discovery_object_id, Discovery, Topics};

/// Discovery topic → its JSON payload.
pub type Announcements = BTreeMap<String, String>;

/// Turns the state's JSON (`null` for a bad reading) into Home Assistant's `None`
/// (unknown) or the state.
const VALUE: &str = "{{ value_json.value }}";
const ON_OFF: &str =
    "{% if value_json.value is none %}None{% elif value_json.value %}ON{% else %}OFF{% endif %}";
const OPTION: &str = "{{ '%g' % value_json.value if value_json.value is number else 'None' }}";
const DEVICE_AVAILABLE: &str = "{{ 'online' if value == 'online' else 'offline' }}";
const ATTRIBUTES: &str = "{{ {'quality': value_json.quality, 'ts': value_json.ts} | tojson }}";

/// The gateway's node id: `node_id`, or the agent's prefix as an id.
pub fn node_id(config: &HomeAssistantConfig, topics: &Topics) -> String {
    config
        .node_id
        .clone()
        .unwrap_or_else(|| discovery_id(topics.prefix()))
}

/// Every discovery message of this configuration.
pub fn announcements(
    config: &HomeAssistantConfig,
    topics: &Topics,
    buses: &[ResolvedBus],
) -> Announcements {
    let ha = Discovery::new(&config.discovery_prefix);
    let node = node_id(config, topics);
    let mut out = Announcements::new();
    let origin = json!({"name": "fieldbridge", "sw_version": env!("CARGO_PKG_VERSION")});
    let gateway = json!({
        "name": "Gateway status",
        "unique_id": format!("{node}_gateway"),
        "state_topic": topics.status(),
        "payload_on": "online",
        "payload_off": "offline",
        "device_class": "connectivity",
        "entity_category": "diagnostic",
        "device": {
            "identifiers": [node],
            "name": format!("fieldbridge {}", topics.prefix()),
            "manufacturer": "fieldbridge",
            "model": "fieldbridge gateway",
            "sw_version": env!("CARGO_PKG_VERSION"),
        },
        "origin": origin,
    });
    out.insert(
        ha.config("binary_sensor", &node, "gateway"),
        gateway.to_string(),
    );
    for bus in buses {
        let stream = bus.kind() == BusKind::Lines;
        for device in bus.devices.iter() {
            let device_block = device_block(&node, device);
            let availability = json!([
                {"topic": topics.device_status(&device.name), "value_template": DEVICE_AVAILABLE},
                {"topic": topics.status()},
            ]);
            for point in &device.points {
                let object = discovery_object_id(&device.name, &point.name);
                let kind = component(point);
                let mut entity = Map::new();
                entity.insert("name".into(), json!(point.name));
                entity.insert("unique_id".into(), json!(format!("{node}_{object}")));
                entity.insert("device".into(), device_block.clone());
                entity.insert("origin".into(), origin.clone());
                entity.insert("availability".into(), availability.clone());
                entity.insert("availability_mode".into(), json!("all"));
                let state = topics.point(&device.name, &point.name, point.topic.as_deref());
                entity.insert("state_topic".into(), json!(state));
                entity.insert("json_attributes_topic".into(), json!(state));
                entity.insert("json_attributes_template".into(), json!(ATTRIBUTES));
                let command = topics.command(&device.name, &point.name);
                match kind {
                    HaComponent::Sensor => {
                        entity.insert("value_template".into(), json!(VALUE));
                        classes(&mut entity, point);
                    }
                    HaComponent::BinarySensor => {
                        entity.insert("value_template".into(), json!(ON_OFF));
                        if let Some(class) = &point.device_class {
                            entity.insert("device_class".into(), json!(class));
                        }
                    }
                    HaComponent::Switch => {
                        entity.insert("value_template".into(), json!(ON_OFF));
                        entity.insert("command_topic".into(), json!(command));
                    }
                    HaComponent::Select => {
                        entity.insert("value_template".into(), json!(OPTION));
                        entity.insert("command_topic".into(), json!(command));
                        let options: Vec<String> = point
                            .write
                            .as_ref()
                            .and_then(|w| w.allowed.clone())
                            .unwrap_or_default()
                            .iter()
                            .map(f64::to_string)
                            .collect();
                        entity.insert("options".into(), json!(options));
                    }
                    HaComponent::Number => {
                        entity.insert("value_template".into(), json!(VALUE));
                        entity.insert("command_topic".into(), json!(command));
                        entity.insert("mode".into(), json!("box"));
                        let (min, max, step) = number_limits(point);
                        entity.insert("min".into(), json!(min));
                        entity.insert("max".into(), json!(max));
                        entity.insert("step".into(), json!(step));
                        classes(&mut entity, point);
                        // A number has no state class.
                        entity.remove("state_class");
                    }
                }
                if matches!(kind, HaComponent::Sensor | HaComponent::BinarySensor) {
                    let every = publish_interval(stream, device, point);
                    if let Some(secs) = expire_after(every, config.expire_after_polls) {
                        entity.insert("expire_after".into(), json!(secs));
                    }
                }
                out.insert(
                    ha.config(component_name(kind), &node, &object),
                    Json::Object(entity).to_string(),
                );
            }
        }
    }
    out
}

/// The `device` block of `device`'s entities.
fn device_block(node: &str, device: &ResolvedDevice) -> Json {
    let mut block = Map::new();
    block.insert(
        "identifiers".into(),
        json!([format!("{node}_{}", discovery_id(&device.name))]),
    );
    block.insert("name".into(), json!(device.name));
    if let Some(manufacturer) = &device.manufacturer {
        block.insert("manufacturer".into(), json!(manufacturer));
    }
    if let Some(model) = &device.model {
        block.insert("model".into(), json!(model));
    }
    block.insert("via_device".into(), json!(node));
    Json::Object(block)
}

/// The entity kind of `point`.
fn component(point: &ResolvedPoint) -> HaComponent {
    if let Some(kind) = point.ha_component {
        return kind;
    }
    let boolean = matches!(point.codec.data_type, DataType::Bool | DataType::Bit);
    match (&point.write, boolean) {
        (None, true) => HaComponent::BinarySensor,
        (None, false) => HaComponent::Sensor,
        (Some(_), true) => HaComponent::Switch,
        (Some(write), false) if write.allowed.is_some() => HaComponent::Select,
        (Some(_), false) => HaComponent::Number,
    }
}

/// The discovery topic's component level.
fn component_name(kind: HaComponent) -> &'static str {
    match kind {
        HaComponent::Sensor => "sensor",
        HaComponent::BinarySensor => "binary_sensor",
        HaComponent::Number => "number",
        HaComponent::Switch => "switch",
        HaComponent::Select => "select",
    }
}

/// Unit, device class and state class of a numeric entity.
fn classes(entity: &mut Map<String, Json>, point: &ResolvedPoint) {
    if point.codec.data_type == DataType::String {
        return;
    }
    let unit = point.unit.as_deref();
    if let Some(unit) = unit {
        entity.insert("unit_of_measurement".into(), json!(unit));
    }
    let (device_class, state_class) = infer_classes(unit);
    if let Some(class) = point.device_class.as_deref().or(device_class) {
        entity.insert("device_class".into(), json!(class));
    }
    let state_class = match point.state_class.unwrap_or(state_class) {
        StateClass::Measurement => "measurement",
        StateClass::Total => "total",
        StateClass::TotalIncreasing => "total_increasing",
    };
    entity.insert("state_class".into(), json!(state_class));
}

/// Home Assistant's device and state class for a unit: energy counters are
/// `total_increasing`, everything else a `measurement`.
pub fn infer_classes(unit: Option<&str>) -> (Option<&'static str>, StateClass) {
    let Some(unit) = unit else {
        return (None, StateClass::Measurement);
    };
    let class = match unit {
        "Wh" | "kWh" | "MWh" => return (Some("energy"), StateClass::TotalIncreasing),
        "W" | "kW" | "MW" => "power",
        "VA" | "kVA" => "apparent_power",
        "var" | "kvar" => "reactive_power",
        "V" | "mV" | "kV" => "voltage",
        "A" | "mA" => "current",
        "Hz" => "frequency",
        "°C" | "°F" | "K" => "temperature",
        "bar" | "mbar" | "Pa" | "hPa" | "kPa" | "psi" => "pressure",
        "m³/h" | "L/min" | "l/min" => "volume_flow_rate",
        _ => return (None, StateClass::Measurement),
    };
    (Some(class), StateClass::Measurement)
}

/// `(min, max, step)` of a writable number: the write limits, else the range the
/// point's type can hold after scale and offset.
fn number_limits(point: &ResolvedPoint) -> (f64, f64, f64) {
    let codec = &point.codec;
    let (raw_min, raw_max) = match codec.data_type {
        DataType::U16 => (0.0, f64::from(u16::MAX)),
        DataType::I16 => (f64::from(i16::MIN), f64::from(i16::MAX)),
        DataType::U32 => (0.0, f64::from(u32::MAX)),
        DataType::I32 => (f64::from(i32::MIN), f64::from(i32::MAX)),
        // Beyond 2^53 a JSON number is no longer exact.
        DataType::U64 => (0.0, 9_007_199_254_740_992.0),
        DataType::I64 => (-9_007_199_254_740_992.0, 9_007_199_254_740_992.0),
        _ => (f64::from(f32::MIN), f64::from(f32::MAX)),
    };
    let a = raw_min * codec.scale + codec.offset;
    let b = raw_max * codec.scale + codec.offset;
    let write = point.write.as_ref();
    let min = write.and_then(|w| w.min).unwrap_or(a.min(b));
    let max = write.and_then(|w| w.max).unwrap_or(a.max(b));
    let integer = !matches!(codec.data_type, DataType::F32 | DataType::F64);
    let step = write
        .and_then(|w| w.step)
        .unwrap_or(if integer { codec.scale.abs() } else { 0.001 })
        .max(0.001);
    (min, max, step)
}

/// How often `point` publishes when nothing is wrong; `None`: not at a known rate.
fn publish_interval(
    lines: bool,
    device: &ResolvedDevice,
    point: &ResolvedPoint,
) -> Option<Duration> {
    if point.band != Band::Every {
        return point.heartbeat;
    }
    // A lines device in stream mode talks on its own; its timeout is the longest
    // silence it is allowed.
    if lines && device.request.is_none() {
        return Some(device.timeout);
    }
    // Its own interval: a point in a slow poll group publishes at the group's rate.
    Some(point.interval)
}

/// `expire_after` in whole seconds (at least 1), or `None` for never.
fn expire_after(every: Option<Duration>, polls: u32) -> Option<u64> {
    let every = every?;
    if polls == 0 {
        return None;
    }
    let secs = (every.as_secs_f64() * f64::from(polls)).ceil() as u64;
    Some(secs.max(1))
}

/// The upstream broker as a destination of discovery messages: through the store,
/// like the readings, so they wait out an outage.
#[derive(Clone)]
pub struct Upstream {
    pub queue: Queue,
    pub qos: QoS,
}

/// Publishes the discovery messages on the LAN broker and (optionally) upstream, and
/// keeps them current.
#[derive(Clone)]
pub struct Announcer {
    lan: Option<BrokerHandle>,
    upstream: Option<Upstream>,
    announced: Arc<Mutex<Announcements>>,
}

impl Announcer {
    /// Clears what an earlier run announced for `node` (retained on the LAN broker)
    /// that `initial` no longer has, publishes `initial` on the LAN broker and
    /// upstream, and answers Home Assistant's `online` on the LAN broker's
    /// `{ha}/status` with all messages again (there), until `stop`.
    pub async fn start(
        lan: Option<BrokerHandle>,
        upstream: Option<Upstream>,
        config: &HomeAssistantConfig,
        node: &str,
        initial: Announcements,
        stop: CancellationToken,
    ) -> Announcer {
        let ha = Discovery::new(&config.discovery_prefix);
        let stale: Vec<String> = lan.as_ref().map_or_else(Vec::new, |broker| {
            broker
                .retained_topics(&ha.node_filter(node))
                .into_iter()
                .filter(|topic| !initial.contains_key(topic))
                .collect()
        });
        if let Some(broker) = &lan {
            for topic in &stale {
                broker.publish(topic, Bytes::new(), QoS::AtLeastOnce, true);
            }
        }
        let announcer = Announcer {
            lan,
            upstream,
            announced: Arc::new(Mutex::new(initial)),
        };
        announcer.publish_lan();
        announcer.publish_upstream(Vec::new()).await;
        tracing::info!(
            entities = announcer.count(),
            removed = stale.len(),
            prefix = %config.discovery_prefix,
            lan = announcer.lan.is_some(),
            upstream = announcer.upstream.is_some(),
            "Home Assistant discovery announced"
        );
        if let Some(broker) = &announcer.lan {
            let mut births = broker.tap(&ha.status(), 8);
            let again = announcer.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = stop.cancelled() => break,
                        tapped = births.recv() => match tapped {
                            Some(t) if t.payload.as_ref() == b"online" => {
                                again.publish_lan();
                                tracing::info!(entities = again.count(), "Home Assistant came online: discovery announced again");
                            }
                            Some(_) => {}
                            None => break,
                        },
                    }
                }
            });
        }
        announcer
    }

    /// Replaces the announced set: an empty retained message for each topic `new` no
    /// longer has, then every message of `new`, on the LAN broker and upstream.
    pub async fn update(&self, new: Announcements) {
        let removed: Vec<String> = {
            let Ok(mut announced) = self.announced.lock() else {
                return;
            };
            let removed = announced
                .keys()
                .filter(|topic| !new.contains_key(*topic))
                .cloned()
                .collect();
            *announced = new;
            removed
        };
        if let Some(broker) = &self.lan {
            for topic in &removed {
                broker.publish(topic, Bytes::new(), QoS::AtLeastOnce, true);
            }
        }
        self.publish_lan();
        let count = removed.len();
        self.publish_upstream(removed).await;
        tracing::info!(
            removed = count,
            entities = self.count(),
            "Home Assistant discovery updated"
        );
    }

    fn publish_lan(&self) {
        let (Some(broker), Ok(announced)) = (&self.lan, self.announced.lock()) else {
            return;
        };
        for (topic, payload) in announced.iter() {
            broker.publish(topic, Bytes::from(payload.clone()), QoS::AtLeastOnce, true);
        }
    }

    /// Queues an empty retained message for each of `removed`, then every announced
    /// message, retained, for the upstream broker.
    async fn publish_upstream(&self, removed: Vec<String>) {
        let Some(upstream) = &self.upstream else {
            return;
        };
        let created_ms = now_ms();
        let message = |topic: String, payload: Bytes| Message {
            topic,
            payload,
            qos: upstream.qos,
            retain: true,
            created_ms,
            priority: Priority::Event,
            unsynced: None,
        };
        let mut messages: Vec<Message> = removed
            .into_iter()
            .map(|topic| message(topic, Bytes::new()))
            .collect();
        if let Ok(announced) = self.announced.lock() {
            messages.extend(
                announced
                    .iter()
                    .map(|(topic, payload)| message(topic.clone(), Bytes::from(payload.clone()))),
            );
        }
        let done: Done = Box::new(|result| {
            if let Err(err) = result {
                tracing::warn!(error = %err, "Home Assistant discovery not queued for the upstream broker");
            }
        });
        upstream.queue.submit(messages, done).await;
    }

    fn count(&self) -> usize {
        self.announced.lock().map_or(0, |a| a.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[agent]
prefix = "site/gw1"
[broker]
[homeassistant]
[[bus]]
name = "b"
kind = "tcp"
host = "127.0.0.1"
[[bus.device]]
name = "meter.1"
poll_interval_ms = 2000
manufacturer = "Eastron"
model = "SDM630"
[[bus.device.point]]
name = "energy"
kind = "input"
address = 0
type = "f32"
unit = "kWh"
[[bus.device.point]]
name = "voltage"
kind = "input"
address = 2
type = "f32"
unit = "V"
deadband = 0.5
heartbeat_secs = 60
[[bus.device.point]]
name = "alarm"
kind = "discrete"
address = 0
[[bus.device.point]]
name = "pump"
kind = "coil"
address = 0
writable = true
[[bus.device.point]]
name = "setpoint"
kind = "holding"
address = 10
type = "i16"
scale = 0.1
unit = "°C"
writable = true
min = 5.0
max = 30.0
step = 0.5
[[bus.device.point]]
name = "mode"
kind = "holding"
address = 11
writable = true
allowed = [0, 1, 3]
[[bus.device.point]]
name = "level"
kind = "holding"
address = 12
unit = "%"
device_class = "moisture"
state_class = "total"
ha_component = "sensor"
"#;

    fn all(file: &str) -> Announcements {
        let config = crate::config::parse("test.toml", file).unwrap();
        let topics = Topics::new(&config.agent.resolved_prefix("h"));
        let buses = crate::field::resolve(&config.field).unwrap();
        announcements(config.homeassistant.as_ref().unwrap(), &topics, &buses)
    }

    fn entity(all: &Announcements, topic: &str) -> Json {
        let payload = all
            .get(topic)
            .unwrap_or_else(|| panic!("no {topic}: {all:#?}"));
        serde_json::from_str(payload).unwrap()
    }

    fn string(entity: &Json, key: &str) -> String {
        entity[key]
            .as_str()
            .unwrap_or_else(|| panic!("{key} is not a string: {entity}"))
            .to_string()
    }

    /// The keys Home Assistant's MQTT schemas require or that every entity here must
    /// carry, with their types.
    fn check_schema(topic: &str, entity: &Json) {
        let levels: Vec<&str> = topic.split('/').collect();
        assert_eq!(levels.len(), 5, "{topic}");
        assert_eq!(levels[0], "homeassistant");
        assert_eq!(levels[4], "config");
        for id in &levels[1..4] {
            assert!(crate::topics::is_discovery_id(id), "{topic}");
        }
        assert!(!string(entity, "unique_id").is_empty());
        assert!(!string(entity, "name").is_empty());
        assert!(!string(entity, "state_topic").is_empty());
        let device = &entity["device"];
        assert!(device["identifiers"]
            .as_array()
            .is_some_and(|ids| !ids.is_empty() && ids.iter().all(Json::is_string)));
        assert!(device["name"].is_string());
        match levels[1] {
            "sensor" | "binary_sensor" => {}
            "number" => {
                assert!(entity["command_topic"].is_string());
                for key in ["min", "max", "step"] {
                    assert!(entity[key].is_number(), "{key}: {entity}");
                }
                assert!(entity["min"].as_f64() < entity["max"].as_f64());
            }
            "switch" => assert!(entity["command_topic"].is_string()),
            "select" => {
                assert!(entity["command_topic"].is_string());
                assert!(entity["options"]
                    .as_array()
                    .is_some_and(|o| !o.is_empty() && o.iter().all(Json::is_string)));
            }
            other => panic!("unexpected component {other}"),
        }
        if levels[3] != "gateway" {
            assert!(entity["value_template"].is_string());
            assert_eq!(entity["availability_mode"], "all");
            let availability = entity["availability"].as_array().unwrap();
            assert_eq!(availability.len(), 2);
            assert!(availability.iter().all(|a| a["topic"].is_string()));
            assert_eq!(device["via_device"], "site_gw1");
        }
    }

    #[test]
    fn every_point_kind_is_announced_with_the_documented_keys() {
        let all = all(FILE);
        assert_eq!(all.len(), 8, "{all:#?}");
        for (topic, payload) in &all {
            check_schema(topic, &serde_json::from_str(payload).unwrap());
        }

        let gateway = entity(&all, "homeassistant/binary_sensor/site_gw1/gateway/config");
        assert_eq!(gateway["state_topic"], "site/gw1/status");
        assert_eq!(gateway["device"]["identifiers"], json!(["site_gw1"]));
        assert_eq!(gateway["device"]["sw_version"], env!("CARGO_PKG_VERSION"));

        let energy = entity(&all, "homeassistant/sensor/site_gw1/meter_1__energy/config");
        assert_eq!(energy["unique_id"], "site_gw1_meter_1__energy");
        assert_eq!(energy["state_topic"], "site/gw1/meter.1/energy");
        assert_eq!(energy["value_template"], VALUE);
        assert_eq!(energy["unit_of_measurement"], "kWh");
        assert_eq!(energy["device_class"], "energy");
        assert_eq!(energy["state_class"], "total_increasing");
        assert_eq!(energy["expire_after"], 6);
        assert_eq!(energy["device"]["manufacturer"], "Eastron");
        assert_eq!(energy["device"]["model"], "SDM630");
        assert_eq!(energy["device"]["identifiers"], json!(["site_gw1_meter_1"]));
        assert_eq!(
            energy["availability"][0]["topic"],
            "site/gw1/meter.1/status"
        );
        assert_eq!(energy["availability"][1]["topic"], "site/gw1/status");

        // With a deadband the value repeats only at the heartbeat.
        let voltage = entity(
            &all,
            "homeassistant/sensor/site_gw1/meter_1__voltage/config",
        );
        assert_eq!(voltage["device_class"], "voltage");
        assert_eq!(voltage["state_class"], "measurement");
        assert_eq!(voltage["expire_after"], 180);

        let alarm = entity(
            &all,
            "homeassistant/binary_sensor/site_gw1/meter_1__alarm/config",
        );
        assert_eq!(alarm["value_template"], ON_OFF);
        assert!(alarm.get("unit_of_measurement").is_none());
        assert!(alarm.get("command_topic").is_none());

        let pump = entity(&all, "homeassistant/switch/site_gw1/meter_1__pump/config");
        assert_eq!(pump["command_topic"], "site/gw1/meter.1/pump/set");
        assert!(pump.get("expire_after").is_none());

        let setpoint = entity(
            &all,
            "homeassistant/number/site_gw1/meter_1__setpoint/config",
        );
        assert_eq!(setpoint["command_topic"], "site/gw1/meter.1/setpoint/set");
        assert_eq!(
            (&setpoint["min"], &setpoint["max"], &setpoint["step"]),
            (&json!(5.0), &json!(30.0), &json!(0.5))
        );
        assert_eq!(setpoint["device_class"], "temperature");
        assert!(setpoint.get("state_class").is_none());

        let mode = entity(&all, "homeassistant/select/site_gw1/meter_1__mode/config");
        assert_eq!(mode["options"], json!(["0", "1", "3"]));
        assert_eq!(mode["value_template"], OPTION);

        // The point's own keys win over inference and over the writable kind.
        let level = entity(&all, "homeassistant/sensor/site_gw1/meter_1__level/config");
        assert_eq!(level["device_class"], "moisture");
        assert_eq!(level["state_class"], "total");
        assert_eq!(level["unit_of_measurement"], "%");
    }

    #[test]
    fn a_number_without_limits_gets_the_range_of_its_type() {
        let file = FILE.replace("min = 5.0\nmax = 30.0\nstep = 0.5\n", "");
        let all = all(&file);
        let setpoint = entity(
            &all,
            "homeassistant/number/site_gw1/meter_1__setpoint/config",
        );
        assert_eq!(setpoint["min"], json!(-3276.8));
        assert_eq!(setpoint["max"], json!(3276.7000000000003));
        assert_eq!(setpoint["step"], json!(0.1));
    }

    #[test]
    fn unique_ids_and_topics_stay_when_nothing_but_other_points_change() {
        let before = all(FILE);
        let after = all(&FILE.replace("address = 12\n", "address = 13\n"));
        assert_eq!(
            before.keys().collect::<Vec<_>>(),
            after.keys().collect::<Vec<_>>()
        );
        let file = FILE.replace(
            "[homeassistant]\n",
            "[homeassistant]\nnode_id = \"boiler-house\"\n",
        );
        let renamed = all(&file);
        assert!(renamed
            .keys()
            .all(|topic| topic.split('/').nth(2) == Some("boiler-house")));
    }

    #[test]
    fn discovery_needs_the_broker_it_announces_on_and_id_characters() {
        let err = crate::config::parse("test.toml", &FILE.replace("[broker]\n", ""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("homeassistant: discovery is announced on the LAN broker"),
            "{err}"
        );
        let upstream_only = FILE
            .replace(
                "[broker]\n",
                "[upstream]\nurl = \"mqtt://127.0.0.1:1883\"\n",
            )
            .replace("[homeassistant]\n", "[homeassistant]\nupstream = true\n");
        assert!(crate::config::parse("test.toml", &upstream_only).is_ok());
        let err = crate::config::parse(
            "test.toml",
            &FILE.replace("[homeassistant]\n", "[homeassistant]\nupstream = true\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("homeassistant.upstream: discovery upstream needs an [upstream]"),
            "{err}"
        );
        let file = FILE.replace("[homeassistant]\n", "[homeassistant]\nnode_id = \"gw/1\"\n");
        let err = crate::config::parse("test.toml", &file)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("homeassistant.node_id: must be letters"),
            "{err}"
        );
        let file = FILE.replace("ha_component = \"sensor\"", "ha_component = \"select\"");
        let err = crate::config::parse("test.toml", &file)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("point[6].ha_component: a number, switch or select sends commands"),
            "{err}"
        );
        let file = FILE.replace("site/gw1", "homeassistant");
        let err = crate::config::parse("test.toml", &file)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("homeassistant.discovery_prefix: \"homeassistant\" is also agent.prefix"),
            "{err}"
        );
    }

    #[test]
    fn names_that_become_the_same_id_are_refused() {
        let file = format!(
            "{FILE}[[bus.device.point]]\nname = \"level.x\"\nkind = \"holding\"\naddress = 13\n\
             [[bus.device.point]]\nname = \"level x\"\nkind = \"holding\"\naddress = 14\n"
        );
        let err = crate::config::parse("test.toml", &file)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bus[0].device[0].point[8].name: is \"meter_1/meter_1__level_x\" as a Home Assistant id, like bus[0].device[0].point[7].name"),
            "{err}"
        );
    }

    #[test]
    fn units_name_their_classes() {
        assert_eq!(
            infer_classes(Some("Wh")),
            (Some("energy"), StateClass::TotalIncreasing)
        );
        for (unit, class) in [
            ("kW", "power"),
            ("V", "voltage"),
            ("A", "current"),
            ("Hz", "frequency"),
            ("°C", "temperature"),
            ("bar", "pressure"),
            ("Pa", "pressure"),
        ] {
            assert_eq!(
                infer_classes(Some(unit)),
                (Some(class), StateClass::Measurement)
            );
        }
        assert_eq!(infer_classes(Some("%")), (None, StateClass::Measurement));
        assert_eq!(infer_classes(None), (None, StateClass::Measurement));
    }

    /// A point polled in its own, slower poll group expires after its own interval,
    /// not the device's (the energy counter read every minute would otherwise show as
    /// unavailable between two polls).
    #[test]
    fn a_point_in_a_slow_poll_group_expires_after_its_own_interval() {
        let file = FILE.replacen(
            "unit = \"kWh\"\n",
            "unit = \"kWh\"\npoll_interval_ms = 60000\n",
            1,
        );
        let all = all(&file);
        let energy = entity(&all, "homeassistant/sensor/site_gw1/meter_1__energy/config");
        assert_eq!(energy["expire_after"], 180);
    }

    #[test]
    fn expire_after_is_never_zero_and_can_be_off() {
        assert_eq!(expire_after(Some(Duration::from_millis(100)), 3), Some(1));
        assert_eq!(expire_after(Some(Duration::from_secs(2)), 0), None);
        assert_eq!(expire_after(None, 3), None);
    }
}
