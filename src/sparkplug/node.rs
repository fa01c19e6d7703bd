//! The Sparkplug edge node with no I/O: what the births, deaths and data of one edge
//! node say, and the sequence numbers they carry.
//!
//! Invariants:
//! - `seq` is 0 on NBIRTH and goes up by one (255 wraps to 0) on every other message
//!   this node makes ([`EdgeNode::births`], [`EdgeNode::send_row`]); NDEATH carries none.
//! - NDEATH and NBIRTH of one connection carry the same `bdSeq` ([`EdgeNode::set_bd_seq`]
//!   is called once per connection attempt, before its will is made).
//! - Aliases are numbered over the whole edge node in config order (devices, then their
//!   points), so they are unique across the node. Stored rows name their metrics; the
//!   name becomes the alias of the current birth when the row is sent, so a backlog
//!   recorded under an older config still lands on the right metric (or is left out when
//!   the metric is gone).
//! - A stored value goes out `is_historical = true` when it is not news to a host that
//!   saw this session's births: no newer than the value the DBIRTH announced for its
//!   metric, or stored by an earlier run of the agent. It keeps its original
//!   timestamps and the store's order, and takes the session's next `seq` like any
//!   other message. A value newer than the birth's (or the first of a metric that was
//!   born null in this run) is live.
//! - DBIRTH always describes every configured metric of the device, with the last value
//!   recorded (or `is_null` when none is known yet) and its quality. Births describe the
//!   present: a device recorded offline gets DDEATH right after its DBIRTH, and a stored
//!   state change replayed later goes out as the DDEATH or DBIRTH it was without
//!   changing what the node knows of the device now.

use std::collections::HashMap;

use bytes::Bytes;
use prost::Message as _;

use super::payload::{datatype, Metric, Payload, PropertySet, Value};
use super::Error;

/// The topic namespace of Sparkplug B.
pub const NAMESPACE: &str = "spBv1.0";
/// The NBIRTH metric that carries the birth/death sequence number.
pub const BD_SEQ: &str = "bdSeq";
/// The NBIRTH metric a host writes `true` to (NCMD) to ask for new births.
pub const REBIRTH: &str = "Node Control/Rebirth";
/// Property with the engineering unit of a metric.
pub const UNIT_PROPERTY: &str = "engUnit";
/// Property with the quality of a metric's value (OPC quality codes, Int32).
pub const QUALITY_PROPERTY: &str = "Quality";
/// OPC quality of a good value.
pub const QUALITY_GOOD: i32 = 192;
/// OPC quality of a metric that has no value yet.
pub const QUALITY_UNKNOWN: i32 = 0;

/// One metric of a device as its DBIRTH declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricSpec {
    pub name: String,
    /// One of [`datatype`].
    pub datatype: u32,
    pub unit: Option<String>,
}

/// One Sparkplug device: a configured field device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    pub name: String,
    pub metrics: Vec<MetricSpec>,
}

/// What the edge node is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub group_id: String,
    pub edge_node_id: String,
    pub devices: Vec<DeviceSpec>,
}

/// One value of a metric: `value` is `None` exactly when the quality is not good.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub value: Option<Value>,
    /// OPC quality code ([`QUALITY_GOOD`] for a good value).
    pub quality: i32,
    /// Milliseconds since the Unix epoch.
    pub ts_ms: u64,
}

/// A message to publish: topic and encoded payload.
pub type Outgoing = (String, Bytes);

/// What a command from a host asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// NCMD `Node Control/Rebirth = true`: publish NBIRTH and every DBIRTH again.
    Rebirth,
    /// DCMD: write these metrics of `device` (by metric name), with the time the host
    /// sent each (ms since the epoch), when it said.
    Write {
        device: String,
        writes: Vec<(String, Value, Option<u64>)>,
    },
}

#[derive(Debug)]
struct Device {
    spec: DeviceSpec,
    /// Alias of the first metric; the others follow in order.
    first_alias: u64,
    by_metric: HashMap<String, usize>,
    values: Vec<Option<Sample>>,
    /// Per metric: the timestamp of the value the last DBIRTH announced (0: none).
    born: Vec<u64>,
    online: bool,
}

impl Device {
    fn alias(&self, index: usize) -> u64 {
        self.first_alias + index as u64
    }
}

/// The edge node's state: its devices and their last values, `bdSeq` and `seq`.
#[derive(Debug)]
pub struct EdgeNode {
    group: String,
    node: String,
    devices: Vec<Device>,
    by_name: HashMap<String, usize>,
    bd_seq: u8,
    /// The `seq` of the next message.
    seq: u8,
    /// Wall clock when this run of the agent made the node: rows stored before are
    /// historical.
    started_ms: u64,
}

impl EdgeNode {
    /// The node of `config`, made at `now_ms` (wall clock).
    pub fn new(config: NodeConfig, now_ms: u64) -> EdgeNode {
        // Alias 0 is left unused: some hosts read 0 as "no alias".
        let mut next_alias = 1;
        let mut by_name = HashMap::new();
        let devices = config
            .devices
            .into_iter()
            .enumerate()
            .map(|(i, spec)| {
                by_name.insert(spec.name.clone(), i);
                let first_alias = next_alias;
                next_alias += spec.metrics.len() as u64;
                let by_metric = spec
                    .metrics
                    .iter()
                    .enumerate()
                    .map(|(j, m)| (m.name.clone(), j))
                    .collect();
                Device {
                    values: vec![None; spec.metrics.len()],
                    born: vec![0; spec.metrics.len()],
                    spec,
                    first_alias,
                    by_metric,
                    online: true,
                }
            })
            .collect();
        EdgeNode {
            group: config.group_id,
            node: config.edge_node_id,
            devices,
            by_name,
            bd_seq: 0,
            seq: 0,
            started_ms: now_ms,
        }
    }

    /// `spBv1.0/{group}/{kind}/{node}` or `…/{device}`.
    pub fn topic(&self, kind: &str, device: Option<&str>) -> String {
        match device {
            Some(device) => format!("{NAMESPACE}/{}/{kind}/{}/{device}", self.group, self.node),
            None => format!("{NAMESPACE}/{}/{kind}/{}", self.group, self.node),
        }
    }

    /// The filters of the commands to this node: NCMD and DCMD of every device.
    pub fn command_filters(&self) -> Vec<String> {
        vec![self.topic("NCMD", None), self.topic("DCMD", Some("+"))]
    }

    /// The `bdSeq` of the connection about to be made (its will and its NBIRTH).
    pub fn set_bd_seq(&mut self, bd_seq: u8) {
        self.bd_seq = bd_seq;
    }

    pub fn bd_seq(&self) -> u8 {
        self.bd_seq
    }

    fn next_seq(&mut self) -> u64 {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        u64::from(seq)
    }

    /// NDEATH: the will of the connection (and what a graceful stop publishes), with the
    /// connection's `bdSeq` and no `seq`.
    pub fn death(&self, now_ms: u64) -> Outgoing {
        let payload = Payload {
            timestamp: Some(now_ms),
            metrics: vec![bd_seq_metric(self.bd_seq, now_ms)],
            ..Payload::default()
        };
        (self.topic("NDEATH", None), payload.encode_to_vec().into())
    }

    /// NBIRTH (`seq` 0, `bdSeq`, `Node Control/Rebirth`), then DBIRTH for every device,
    /// each followed by DDEATH when the device is known to be offline.
    pub fn births(&mut self, now_ms: u64) -> Vec<Outgoing> {
        self.seq = 0;
        let mut out = Vec::with_capacity(1 + self.devices.len());
        let seq = self.next_seq();
        let nbirth = Payload {
            timestamp: Some(now_ms),
            metrics: vec![
                bd_seq_metric(self.bd_seq, now_ms),
                Metric {
                    name: Some(REBIRTH.into()),
                    timestamp: Some(now_ms),
                    datatype: Some(datatype::BOOLEAN),
                    value: Some(Value::BooleanValue(false)),
                    ..Metric::default()
                },
            ],
            seq: Some(seq),
            ..Payload::default()
        };
        out.push((self.topic("NBIRTH", None), nbirth.encode_to_vec().into()));
        for index in 0..self.devices.len() {
            out.push(self.device_birth(index, now_ms));
            if !self.devices[index].online {
                out.push(self.device_death(index, now_ms));
            }
        }
        out
    }

    fn device_birth(&mut self, index: usize, now_ms: u64) -> Outgoing {
        let device = &mut self.devices[index];
        for (born, value) in device.born.iter_mut().zip(&device.values) {
            *born = value.as_ref().map_or(0, |s| s.ts_ms);
        }
        let device = &self.devices[index];
        let metrics = device
            .spec
            .metrics
            .iter()
            .enumerate()
            .map(|(j, spec)| {
                let sample = device.values[j].as_ref();
                let mut properties = PropertySet::default();
                if let Some(unit) = &spec.unit {
                    properties.push_string(UNIT_PROPERTY, unit);
                }
                properties.push_int32(
                    QUALITY_PROPERTY,
                    sample.map_or(QUALITY_UNKNOWN, |s| s.quality),
                );
                let value = sample.and_then(|s| s.value.clone());
                Metric {
                    name: Some(spec.name.clone()),
                    alias: Some(device.alias(j)),
                    timestamp: Some(sample.map_or(now_ms, |s| s.ts_ms)),
                    datatype: Some(spec.datatype),
                    is_null: value.is_none().then_some(true),
                    properties: Some(properties),
                    value,
                    ..Metric::default()
                }
            })
            .collect();
        let topic = self.topic("DBIRTH", Some(&self.devices[index].spec.name));
        let payload = Payload {
            timestamp: Some(now_ms),
            metrics,
            seq: Some(self.next_seq()),
            ..Payload::default()
        };
        (topic, payload.encode_to_vec().into())
    }

    fn device_death(&mut self, index: usize, now_ms: u64) -> Outgoing {
        let topic = self.topic("DDEATH", Some(&self.devices[index].spec.name));
        let payload = Payload {
            timestamp: Some(now_ms),
            seq: Some(self.next_seq()),
            ..Payload::default()
        };
        (topic, payload.encode_to_vec().into())
    }

    /// Notes the latest value of a metric, for the next DBIRTH. Unknown names are
    /// ignored (a device or point not in the config has no metric).
    pub fn record(&mut self, device: &str, metric: &str, sample: Sample) {
        if let Some(&d) = self.by_name.get(device) {
            let device = &mut self.devices[d];
            if let Some(&m) = device.by_metric.get(metric) {
                device.values[m] = Some(sample);
            }
        }
    }

    /// Notes whether a device answers, for the next births; true when that changed
    /// (devices count as online until told otherwise: their birth has null values).
    pub fn set_online(&mut self, device: &str, online: bool) -> bool {
        match self.by_name.get(device) {
            Some(&d) => std::mem::replace(&mut self.devices[d].online, online) != online,
            None => false,
        }
    }

    /// The datatype a metric is born with, when the device and point are configured.
    pub fn datatype(&self, device: &str, metric: &str) -> Option<u32> {
        let device = &self.devices[*self.by_name.get(device)?];
        Some(device.spec.metrics[*device.by_metric.get(metric)?].datatype)
    }

    /// The stored form of a reading: a DDATA naming its metric (by name: the alias is
    /// the one of the birth in force when it is sent), without `seq`.
    pub fn data_row(&self, device: &str, metric: &str, sample: &Sample) -> Outgoing {
        let mut properties = PropertySet::default();
        properties.push_int32(QUALITY_PROPERTY, sample.quality);
        let payload = Payload {
            timestamp: Some(sample.ts_ms),
            metrics: vec![Metric {
                name: Some(metric.to_owned()),
                timestamp: Some(sample.ts_ms),
                is_null: sample.value.is_none().then_some(true),
                properties: Some(properties),
                value: sample.value.clone(),
                ..Metric::default()
            }],
            ..Payload::default()
        };
        (
            self.topic("DDATA", Some(device)),
            payload.encode_to_vec().into(),
        )
    }

    /// The stored form of a device state change: DBIRTH (back online) or DDEATH, with
    /// only a timestamp; the birth's metrics are filled in when it is sent.
    pub fn state_row(&self, device: &str, online: bool, ts_ms: u64) -> Outgoing {
        let kind = if online { "DBIRTH" } else { "DDEATH" };
        let payload = Payload {
            timestamp: Some(ts_ms),
            ..Payload::default()
        };
        (
            self.topic(kind, Some(device)),
            payload.encode_to_vec().into(),
        )
    }

    /// A stored row as it goes on the wire now: the next `seq`, metrics by alias,
    /// `is_historical` when it was created before this session's births. `Ok(None)`
    /// when nothing of it is left to send (its device or every metric left the config).
    ///
    /// # Errors
    /// [`Error::Topic`] for a row that is not one of this format's, [`Error::Decode`] for
    /// a payload that does not decode.
    pub fn send_row(
        &mut self,
        topic: &str,
        payload: &[u8],
        created_ms: u64,
        now_ms: u64,
    ) -> Result<Option<Outgoing>, Error> {
        let (kind, device) = row_parts(topic).ok_or_else(|| Error::Topic(topic.to_owned()))?;
        let Some(&index) = self.by_name.get(device) else {
            return Ok(None);
        };
        match kind {
            // The state recorded by `set_online` is the device's current one; a row
            // replays a change that may be older, so it does not overwrite it.
            "DBIRTH" => Ok(Some(self.device_birth(index, now_ms))),
            "DDEATH" => Ok(Some(self.device_death(index, now_ms))),
            "DDATA" => {
                let mut data = Payload::decode(payload)?;
                let earlier_run = created_ms < self.started_ms;
                let device = &self.devices[index];
                data.metrics.retain_mut(|metric| {
                    let Some(j) = metric
                        .name
                        .take()
                        .and_then(|n| device.by_metric.get(&n).copied())
                    else {
                        return false;
                    };
                    metric.alias = Some(device.alias(j));
                    metric.datatype = None;
                    let ts = metric.timestamp.unwrap_or(created_ms);
                    if earlier_run || ts <= device.born[j] {
                        metric.is_historical = Some(true);
                    }
                    true
                });
                if data.metrics.is_empty() {
                    return Ok(None);
                }
                data.seq = Some(self.next_seq());
                let topic = self.topic("DDATA", Some(&self.devices[index].spec.name));
                Ok(Some((topic, data.encode_to_vec().into())))
            }
            _ => Err(Error::Topic(topic.to_owned())),
        }
    }

    /// What a message on one of [`EdgeNode::command_filters`] asks for; `Ok(None)` for a
    /// command that asks nothing of this node (an NCMD without a rebirth request).
    ///
    /// # Errors
    /// [`Error::Topic`] for another topic or an unknown device, [`Error::Decode`] for a
    /// payload that does not decode, [`Error::UnknownMetric`] for a DCMD metric the
    /// device's birth did not declare.
    pub fn command(&self, topic: &str, payload: &[u8]) -> Result<Option<Command>, Error> {
        let (kind, device) = match row_parts(topic) {
            Some(parts) => parts,
            None if topic == self.topic("NCMD", None) => ("NCMD", ""),
            None => return Err(Error::Topic(topic.to_owned())),
        };
        let command = Payload::decode(payload)?;
        match kind {
            "NCMD" => Ok(command
                .metrics
                .iter()
                .any(|m| {
                    m.name.as_deref() == Some(REBIRTH) && m.value == Some(Value::BooleanValue(true))
                })
                .then_some(Command::Rebirth)),
            "DCMD" => {
                let index = *self
                    .by_name
                    .get(device)
                    .ok_or_else(|| Error::Topic(topic.to_owned()))?;
                let device = &self.devices[index];
                let mut writes = Vec::with_capacity(command.metrics.len());
                for metric in command.metrics {
                    let by_alias = metric.alias.and_then(|a| {
                        let j = usize::try_from(a.checked_sub(device.first_alias)?).ok()?;
                        (j < device.spec.metrics.len()).then_some(j)
                    });
                    let j = match (&metric.name, by_alias) {
                        (Some(name), _) => device.by_metric.get(name).copied(),
                        (None, alias) => alias,
                    }
                    .ok_or_else(|| Error::UnknownMetric {
                        device: device.spec.name.clone(),
                        metric: metric
                            .name
                            .clone()
                            .unwrap_or_else(|| format!("alias {}", metric.alias.unwrap_or(0))),
                    })?;
                    let Some(value) = metric.value else {
                        continue;
                    };
                    writes.push((
                        device.spec.metrics[j].name.clone(),
                        value,
                        metric.timestamp.or(command.timestamp),
                    ));
                }
                Ok(Some(Command::Write {
                    device: device.spec.name.clone(),
                    writes,
                }))
            }
            _ => Err(Error::Topic(topic.to_owned())),
        }
    }
}

/// `(kind, device)` of `spBv1.0/{group}/{kind}/{node}/{device}`.
fn row_parts(topic: &str) -> Option<(&str, &str)> {
    let mut levels = topic.split('/');
    let (Some(NAMESPACE), Some(_group), Some(kind), Some(_node), Some(device), None) = (
        levels.next(),
        levels.next(),
        levels.next(),
        levels.next(),
        levels.next(),
        levels.next(),
    ) else {
        return None;
    };
    Some((kind, device))
}

fn bd_seq_metric(bd_seq: u8, now_ms: u64) -> Metric {
    Metric {
        name: Some(BD_SEQ.into()),
        timestamp: Some(now_ms),
        datatype: Some(datatype::INT64),
        value: Some(Value::LongValue(u64::from(bd_seq))),
        ..Metric::default()
    }
}

/// Whether a host's `spBv1.0/STATE/{id}` payload (`{"online": true, "timestamp": …}`)
/// says it is online; `None` when it is not such a payload.
pub fn host_online(payload: &[u8]) -> Option<bool> {
    let state: serde_json::Value = serde_json::from_slice(payload).ok()?;
    state.get("online")?.as_bool()
}

#[cfg(test)]
#[path = "node_tests.rs"]
mod tests;
