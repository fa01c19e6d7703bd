//! Sparkplug B wiring: the configured devices as a Sparkplug edge node, readings and
//! device states as stored Sparkplug rows, the uplink's format hook, and DCMD writes
//! handed to the command router as the set commands it already checks.
//!
//! Invariants:
//! - One [`EdgeNode`] per agent, shared by the pipeline (which records the latest value
//!   and state of every device, and stores rows) and the uplink (which formats births,
//!   deaths and rows at send time). The lock is held for one call, never across an await.
//! - Each point is a metric named after the point, of the device named after the device;
//!   its datatype follows the point's type (scaled values are Double), its unit is the
//!   `engUnit` property and its quality the `Quality` property (OPC codes, see
//!   [`quality_code`]).
//! - The `bdSeq` is advanced and written beside the queue before each CONNECT; a file
//!   that cannot be read or written is logged once per change, and counting goes on in
//!   memory.
//! - DCMD goes through the same router as `{prefix}/{device}/{point}/set`: a write is
//!   checked against the point (writable, limits, stale, duplicates), audited and read
//!   back there; without writable points DCMD is refused and logged.

use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::field::{DataType, DeviceState, FieldEvent, Quality, Reading, ResolvedBus, Value};
use crate::mqtt::{Properties, Publish, QoS, Will};
use crate::sparkplug::payload::{datatype, Value as Metric};
use crate::sparkplug::{
    self, BdSeqFile, Command, DeviceSpec, EdgeNode, MetricSpec, NodeConfig, Sample, QUALITY_GOOD,
};
use crate::store::{Message, Priority};
use crate::topics::Topics;
use crate::uplink::{Format, Incoming, UplinkConfig};

/// The edge node shared by the pipeline and the uplink.
#[derive(Debug, Clone)]
pub struct Node {
    node: Arc<Mutex<EdgeNode>>,
}

impl Node {
    /// The edge node of `upstream`'s ids with every device of `buses`.
    pub fn new(upstream: &UplinkConfig, buses: &[ResolvedBus]) -> Node {
        let devices = buses
            .iter()
            .flat_map(|bus| bus.devices.iter())
            .map(|device| DeviceSpec {
                name: device.name.clone(),
                metrics: device
                    .points
                    .iter()
                    .map(|point| MetricSpec {
                        name: point.name.clone(),
                        datatype: metric_type(
                            point.codec.data_type,
                            point.codec.scale != 1.0 || point.codec.offset != 0.0,
                        ),
                        unit: point.unit.clone(),
                    })
                    .collect(),
            })
            .collect();
        let node = EdgeNode::new(
            NodeConfig {
                group_id: upstream.group_id.clone().unwrap_or_default(),
                edge_node_id: upstream.edge_node_id(),
                devices,
            },
            wall(crate::clock::now_ms()),
        );
        Node {
            node: Arc::new(Mutex::new(node)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, EdgeNode> {
        // A panic while holding the lock leaves plain data behind; go on with it.
        self.node
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What `event` is upstream: a DDATA row for a reading, a DDEATH/DBIRTH row for a
    /// device that went offline or came back; `None` for a poll's batch summary (its
    /// readings come one by one) and a state that changes nothing upstream (online
    /// after online, quarantined after offline). The latest value and state are
    /// recorded for the next births.
    pub fn row(&self, event: &FieldEvent, qos: QoS) -> Option<Message> {
        let mut node = self.lock();
        let (topic, payload, created_ms, priority) = match event {
            FieldEvent::Reading(reading) => {
                let kind = node.datatype(&reading.device, &reading.point)?;
                let sample = sample(reading, kind);
                let (topic, payload) = node.data_row(&reading.device, &reading.point, &sample);
                node.record(&reading.device, &reading.point, sample);
                (topic, payload, reading.ts_ms, Priority::Periodic)
            }
            FieldEvent::DeviceState { device, state } => {
                let online = *state == DeviceState::Online;
                if !node.set_online(device, online) {
                    return None;
                }
                let now = crate::clock::now_ms();
                let (topic, payload) = node.state_row(device, online, wall(now));
                (topic, payload, now, Priority::Event)
            }
            FieldEvent::Batch { .. } => return None,
        };
        Some(Message {
            topic,
            payload,
            qos,
            retain: false,
            created_ms,
            priority,
            unsynced: None,
        })
    }

    /// The uplink's format hook for this node.
    pub fn format(
        &self,
        upstream: &UplinkConfig,
        bd_seq: BdSeqFile,
        writable: bool,
    ) -> Box<dyn Format> {
        let last = match bd_seq.load() {
            Ok(last) => last,
            Err(error) => {
                tracing::warn!(%error, "Sparkplug bdSeq unknown; counting from 0");
                None
            }
        };
        Box::new(SparkplugFormat {
            node: self.clone(),
            file: bd_seq,
            last,
            write_failing: false,
            host_state: upstream
                .primary_host_id
                .as_ref()
                .map(|id| format!("{}/STATE/{id}", sparkplug::NAMESPACE)),
            writable,
            refused_logged: false,
            unknown_logged: false,
        })
    }

    /// DCMD messages from `incoming` as the router's set commands (one per metric); other
    /// messages pass unchanged. Ends when `incoming` closes.
    pub fn commands(
        &self,
        mut incoming: mpsc::Receiver<Publish>,
        topics: Topics,
    ) -> mpsc::Receiver<Publish> {
        let (tx, rx) = mpsc::channel(crate::field::command::QUEUE_CAPACITY * 4);
        let node = self.clone();
        tokio::spawn(async move {
            while let Some(publish) = incoming.recv().await {
                let command = node.lock().command(&publish.topic, &publish.payload);
                let writes = match command {
                    Ok(Some(Command::Write { device, writes })) => writes
                        .into_iter()
                        .map(|(point, value, ts)| set_command(&topics, &device, &point, &value, ts))
                        .collect(),
                    Ok(_) => Vec::new(),
                    // Not a Sparkplug command: one of the configured subscriptions.
                    Err(sparkplug::Error::Topic(_)) => vec![publish],
                    Err(error) => {
                        tracing::warn!(topic = %publish.topic, %error, "Sparkplug DCMD refused");
                        Vec::new()
                    }
                };
                for write in writes {
                    if tx.send(write).await.is_err() {
                        return;
                    }
                }
            }
        });
        rx
    }
}

/// A DCMD write as the router's `{prefix}/{device}/{point}/set` command.
fn set_command(
    topics: &Topics,
    device: &str,
    point: &str,
    value: &Metric,
    ts: Option<u64>,
) -> Publish {
    let value = match value {
        Metric::IntValue(v) => serde_json::json!(v),
        Metric::LongValue(v) => serde_json::json!(v),
        Metric::FloatValue(v) => serde_json::json!(v),
        Metric::DoubleValue(v) => serde_json::json!(v),
        Metric::BooleanValue(v) => serde_json::json!(v),
        Metric::StringValue(v) => serde_json::json!(v),
    };
    let mut body = serde_json::json!({ "value": value });
    if let Some(ts) = ts {
        body["ts"] = serde_json::json!(ts);
    }
    Publish {
        topic: topics.command(device, point),
        payload: Bytes::from(body.to_string()),
        qos: QoS::AtLeastOnce,
        ..Publish::default()
    }
}

/// The uplink's hook: NDEATH will, births after CONNACK, rows with `seq` at send time.
#[derive(Debug)]
struct SparkplugFormat {
    node: Node,
    file: BdSeqFile,
    /// The `bdSeq` of the last connection attempt.
    last: Option<u8>,
    write_failing: bool,
    /// `spBv1.0/STATE/{primary_host_id}`, when births wait for that host.
    host_state: Option<String>,
    writable: bool,
    refused_logged: bool,
    unknown_logged: bool,
}

impl Format for SparkplugFormat {
    fn will(&mut self) -> Will {
        let (bd_seq, written) = self.file.advance(self.last);
        match written {
            Err(error) if !self.write_failing => {
                self.write_failing = true;
                tracing::warn!(%error, "cannot keep the Sparkplug bdSeq; a restart may reuse one");
            }
            Ok(()) if self.write_failing => {
                self.write_failing = false;
                tracing::info!(path = %self.file.path().display(), "the Sparkplug bdSeq is kept again");
            }
            _ => {}
        }
        self.last = Some(bd_seq);
        let mut node = self.node.lock();
        node.set_bd_seq(bd_seq);
        let (topic, payload) = node.death(wall(crate::clock::now_ms()));
        Will {
            topic,
            payload,
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Properties::default(),
        }
    }

    fn subscriptions(&self) -> Vec<String> {
        let mut filters = self.node.lock().command_filters();
        filters.extend(self.host_state.clone());
        filters
    }

    fn waits_for_host(&self) -> bool {
        self.host_state.is_some()
    }

    fn births(&mut self) -> Vec<(String, Bytes)> {
        self.node.lock().births(wall(crate::clock::now_ms()))
    }

    fn farewell(&mut self) -> (String, Bytes) {
        self.node.lock().death(wall(crate::clock::now_ms()))
    }

    fn row(&mut self, topic: &str, payload: &Bytes, created_ms: i64) -> Option<(String, Bytes)> {
        let now = wall(crate::clock::now_ms());
        match self
            .node
            .lock()
            .send_row(topic, payload, wall(created_ms), now)
        {
            Ok(None) => {
                if !self.unknown_logged {
                    self.unknown_logged = true;
                    tracing::warn!(
                        topic,
                        "stored readings of a device or point no longer configured are \
                         dropped (further ones are not logged)"
                    );
                }
                None
            }
            Ok(row) => row,
            // Rows of another kind (command results) go out as they are.
            Err(sparkplug::Error::Topic(_)) => Some((topic.to_owned(), payload.clone())),
            Err(error) => {
                tracing::warn!(topic, %error, "a stored Sparkplug row does not decode; dropped");
                None
            }
        }
    }

    fn incoming(&mut self, publish: &Publish) -> Incoming {
        if self.host_state.as_deref() == Some(publish.topic.as_str()) {
            return match sparkplug::host_online(&publish.payload) {
                Some(true) => Incoming::HostOnline,
                Some(false) => Incoming::HostOffline,
                None => {
                    tracing::warn!(topic = %publish.topic, "host STATE message not understood");
                    Incoming::Consumed
                }
            };
        }
        match self.node.lock().command(&publish.topic, &publish.payload) {
            Ok(Some(Command::Rebirth)) => {
                tracing::info!("Sparkplug host asked for a rebirth");
                Incoming::Rebirth
            }
            Ok(Some(Command::Write { .. })) if self.writable => Incoming::Forward,
            Ok(Some(Command::Write { device, .. })) => {
                if !self.refused_logged {
                    self.refused_logged = true;
                    tracing::warn!(device, "Sparkplug DCMD refused: no point of this gateway is writable (further ones are not logged)");
                }
                Incoming::Consumed
            }
            Ok(None) => Incoming::Consumed,
            Err(sparkplug::Error::Topic(_)) => Incoming::Forward,
            Err(error) => {
                tracing::warn!(topic = %publish.topic, %error, "Sparkplug command refused");
                Incoming::Consumed
            }
        }
    }
}

/// Milliseconds since the epoch as Sparkplug's unsigned timestamp (0 before 1970).
fn wall(ms: i64) -> u64 {
    u64::try_from(ms).unwrap_or(0)
}

/// The Sparkplug datatype of a point: its type's, or Double once scaled.
fn metric_type(kind: DataType, scaled: bool) -> u32 {
    if scaled && kind.is_numeric() {
        return datatype::DOUBLE;
    }
    match kind {
        DataType::Bool | DataType::Bit => datatype::BOOLEAN,
        DataType::U16 => datatype::UINT16,
        DataType::I16 => datatype::INT16,
        DataType::U32 => datatype::UINT32,
        DataType::I32 => datatype::INT32,
        DataType::U64 => datatype::UINT64,
        DataType::I64 => datatype::INT64,
        DataType::F32 => datatype::FLOAT,
        DataType::F64 => datatype::DOUBLE,
        DataType::String => datatype::STRING,
    }
}

/// OPC quality code of a reading's quality: 192 good; 8 not connected (bus down);
/// 12 device failure (Modbus exception); 24 communication failure (timeout, CRC, an
/// answer to another request); 0 bad (a value that could not be read from the data).
pub fn quality_code(quality: Quality) -> i32 {
    match quality {
        Quality::Good => QUALITY_GOOD,
        Quality::Disconnected => 8,
        Quality::Exception(_) => 12,
        Quality::Timeout | Quality::Crc | Quality::Protocol => 24,
        Quality::Parse => 0,
    }
}

/// A reading as a metric value of datatype `kind`.
fn sample(reading: &Reading, kind: u32) -> Sample {
    Sample {
        value: reading.value.as_ref().map(|v| metric_value(v, kind)),
        quality: quality_code(reading.quality),
        ts_ms: wall(reading.ts_ms),
    }
}

/// `value` in the field of datatype `kind` (integers as two's complement, as the
/// specification's `int_value` and `long_value` carry them).
fn metric_value(value: &Value, kind: u32) -> Metric {
    let number = value.as_f64().unwrap_or(0.0);
    match (kind, value) {
        (datatype::BOOLEAN, Value::Bool(b)) => Metric::BooleanValue(*b),
        (datatype::BOOLEAN, _) => Metric::BooleanValue(number != 0.0),
        (datatype::STRING, Value::Text(text)) => Metric::StringValue(text.clone()),
        (datatype::STRING, _) => Metric::StringValue(number.to_string()),
        (datatype::FLOAT, _) => Metric::FloatValue(number as f32),
        (datatype::DOUBLE, _) => Metric::DoubleValue(number),
        (datatype::INT64 | datatype::UINT64, Value::Int(i)) => Metric::LongValue(*i as u64),
        (datatype::INT64 | datatype::UINT64, Value::UInt(u)) => Metric::LongValue(*u),
        (datatype::INT64 | datatype::UINT64, _) => Metric::LongValue(number as i64 as u64),
        (_, Value::Int(i)) => Metric::IntValue(*i as i32 as u32),
        (_, Value::UInt(u)) => Metric::IntValue(*u as u32),
        (_, _) => Metric::IntValue(number as i64 as i32 as u32),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_travel_in_the_field_of_their_datatype() {
        assert_eq!(
            metric_value(&Value::Int(-2), datatype::INT16),
            Metric::IntValue(0xFFFF_FFFE)
        );
        assert_eq!(
            metric_value(&Value::Int(-2), datatype::INT64),
            Metric::LongValue(u64::MAX - 1)
        );
        assert_eq!(
            metric_value(&Value::UInt(7), datatype::UINT32),
            Metric::IntValue(7)
        );
        assert_eq!(
            metric_value(&Value::Float(1.5), datatype::FLOAT),
            Metric::FloatValue(1.5)
        );
        assert_eq!(
            metric_value(&Value::Bool(true), datatype::BOOLEAN),
            Metric::BooleanValue(true)
        );
        assert_eq!(
            metric_value(&Value::Text("x".into()), datatype::STRING),
            Metric::StringValue("x".into())
        );
        assert_eq!(metric_type(DataType::U16, true), datatype::DOUBLE);
        assert_eq!(metric_type(DataType::Bool, true), datatype::BOOLEAN);
    }
}
