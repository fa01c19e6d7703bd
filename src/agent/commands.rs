//! The command router: every command, from the LAN broker (in process, ACL-checked by
//! the broker) or from the upstream broker (the subscribed command topics), goes
//! through here on its way to the bus task that owns the device.
//!
//! Payloads on `{prefix}/{device}/{point}/set`: a bare value (`21.5`, `-3`, `true`,
//! `false`, `1`, `0`, `ON`, `OFF`), or JSON
//! `{"value": 21.5, "id": "abc", "expires_ms": 1700000000000, "ts": 1699999999000}` where
//! `id` names the command (a repeat of an id executes once; the result is repeated),
//! `expires_ms` is the wall-clock time (ms since the epoch) after which it must not be
//! applied, and `ts` when it was sent (older than `agent.command_max_age_ms` is stale).
//!
//! The result, on `{prefix}/{device}/{point}/set/result` (and on the 5.0 response topic
//! with the command's correlation data):
//! `{"id":"abc","ok":true,"value":21.5,"readback":21.5,"held":true,"error":null,
//!   "reason":null,"received_ms":…,"written_ms":…,"done_ms":…}`;
//! `correlation_data` is added (as text, or hex when not UTF-8) when the command had it.
//!
//! Invariants:
//! - Every command gets exactly one result (a duplicate gets the first one's again) and
//!   one log line, and moves exactly one counter: ok, failed, refused by reason, or
//!   duplicate.
//! - A refused command writes nothing: every rule (known point, writable, limits,
//!   representable, not stale, device not offline, not too soon, bus not busy) is
//!   checked before the bus sees it.
//! - Stale is judged by the command's own expiry when it has one (5.0 message expiry,
//!   `expires_ms`, `ts` + max age), and otherwise by `agent.command_max_age_ms` from
//!   arrival; the bus refuses a command that waited past its deadline in its queue.
//! - Duplicates: the same `id` on the same point, or a QoS 1 resend (DUP) of the same
//!   packet id from the same source, within the last [`RECENT`] commands.
//! - Nothing here waits on a bus: each accepted command's result is awaited in its own
//!   task, so one slow device never holds commands for another bus.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value as Json};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::broker::{BrokerHandle, Tapped};
use crate::clock::now_ms;
use crate::field::{
    BusCommand, DeviceState, FieldEvent, Reading, Refusal, Requested, ResolvedBus, Value,
    WriteFailure, WriteReport,
};
use crate::mqtt::{Publish, QoS};
use crate::store::{Message, Priority, Queue};
use crate::topics::Topics;

/// Commands remembered for duplicate detection.
pub const RECENT: usize = 256;

/// The command counters, for the health report.
#[derive(Debug, Default)]
pub struct CommandCounters {
    ok: AtomicU64,
    failed: AtomicU64,
    duplicates: AtomicU64,
    refused: Mutex<BTreeMap<&'static str, u64>>,
}

/// A copy of the command counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandSnapshot {
    pub ok: u64,
    pub failed: u64,
    pub duplicates: u64,
    /// Refused commands by reason (`out_of_range`, `not_writable`, ...).
    pub refused: BTreeMap<&'static str, u64>,
}

impl CommandCounters {
    /// The counters now, for the metrics endpoint.
    pub fn snapshot(&self) -> CommandSnapshot {
        CommandSnapshot {
            ok: self.ok.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            refused: self.refused.lock().map(|r| r.clone()).unwrap_or_default(),
        }
    }

    /// `{"ok":…,"failed":…,"duplicates":…,"refused":{"out_of_range":…}}`
    pub fn json(&self) -> Json {
        let now = self.snapshot();
        json!({
            "ok": now.ok,
            "failed": now.failed,
            "duplicates": now.duplicates,
            "refused": now.refused,
        })
    }

    fn refuse(&self, reason: &'static str) {
        if let Ok(mut refused) = self.refused.lock() {
            *refused.entry(reason).or_default() += 1;
        }
    }
}

/// Where a command came from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    Lan {
        client_id: String,
        username: Option<String>,
    },
    Upstream,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Lan {
                client_id,
                username,
            } => write!(
                f,
                "lan user {} client {client_id}",
                username.as_deref().unwrap_or("(anonymous)")
            ),
            Source::Upstream => f.write_str("upstream"),
        }
    }
}

/// One command as it arrived, whatever the source.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub source: Source,
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub dup: bool,
    pub pkid: u16,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub expiry_secs: Option<u32>,
    pub arrived: Instant,
}

impl Inbound {
    pub fn from_lan(t: Tapped) -> Inbound {
        Inbound {
            source: Source::Lan {
                client_id: t.client_id,
                username: t.username,
            },
            topic: t.topic,
            payload: t.payload,
            qos: t.qos,
            dup: t.dup,
            pkid: t.pkid,
            response_topic: t.response_topic,
            correlation_data: t.correlation_data,
            expiry_secs: t.expiry_secs,
            arrived: t.arrived,
        }
    }

    pub fn from_upstream(p: Publish) -> Inbound {
        Inbound {
            source: Source::Upstream,
            topic: p.topic,
            payload: p.payload,
            qos: p.qos,
            dup: p.dup,
            pkid: p.pkid,
            response_topic: p.properties.response_topic,
            correlation_data: p.properties.correlation_data,
            expiry_secs: p.properties.message_expiry_interval,
            arrived: Instant::now(),
        }
    }
}

/// A payload taken apart.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub value: Requested,
    pub id: Option<String>,
    pub expires_ms: Option<i64>,
    pub ts: Option<i64>,
}

/// Reads a command payload.
///
/// # Errors
/// [`Refusal::BadPayload`] with what is wrong.
pub fn parse_payload(payload: &[u8]) -> Result<Parsed, Refusal> {
    let text = std::str::from_utf8(payload)
        .map_err(|_| Refusal::BadPayload("not UTF-8 text".into()))?
        .trim();
    if text.starts_with('{') {
        let json: Json = serde_json::from_str(text)
            .map_err(|e| Refusal::BadPayload(format!("not valid JSON ({e})")))?;
        let value = json
            .get("value")
            .ok_or_else(|| Refusal::BadPayload("the JSON object has no \"value\"".into()))
            .and_then(json_value)?;
        let id = match json.get("id") {
            None | Some(Json::Null) => None,
            Some(Json::String(s)) => Some(s.clone()),
            Some(Json::Number(n)) => Some(n.to_string()),
            Some(_) => return Err(Refusal::BadPayload("\"id\" must be a string".into())),
        };
        let ms = |key: &str| match json.get(key) {
            None | Some(Json::Null) => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| Refusal::BadPayload(format!("\"{key}\" must be milliseconds"))),
        };
        return Ok(Parsed {
            value,
            id,
            expires_ms: ms("expires_ms")?,
            ts: ms("ts")?,
        });
    }
    Ok(Parsed {
        value: bare_value(text)?,
        id: None,
        expires_ms: None,
        ts: None,
    })
}

fn bare_value(text: &str) -> Result<Requested, Refusal> {
    match text.to_ascii_lowercase().as_str() {
        "true" | "on" => return Ok(Requested::Bool(true)),
        "false" | "off" => return Ok(Requested::Bool(false)),
        _ => {}
    }
    if let Ok(i) = text.parse::<i128>() {
        return Ok(Requested::Int(i));
    }
    match text.parse::<f64>() {
        Ok(f) if f.is_finite() => Ok(Requested::Float(f)),
        _ => Err(Refusal::BadPayload(format!(
            "{text:?} is not a number, true/false or ON/OFF"
        ))),
    }
}

fn json_value(v: &Json) -> Result<Requested, Refusal> {
    match v {
        Json::Bool(b) => Ok(Requested::Bool(*b)),
        Json::Number(n) => Ok(match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Requested::Int(i128::from(i)),
            (None, Some(u)) => Requested::Int(i128::from(u)),
            _ => Requested::Float(n.as_f64().unwrap_or(f64::NAN)),
        }),
        Json::String(s) => bare_value(s),
        _ => Err(Refusal::BadPayload(
            "\"value\" must be a number, true/false or \"ON\"/\"OFF\"".into(),
        )),
    }
}

/// A remembered command: still running (with the duplicates waiting for its result), or
/// done with its result.
#[derive(Debug)]
enum Entry {
    Running { repeats: usize },
    Done(Bytes),
}

#[derive(Debug, Default)]
struct Memory {
    recent: HashMap<String, Entry>,
    order: VecDeque<String>,
    last_write: HashMap<(String, String), Instant>,
}

impl Memory {
    fn remember(&mut self, key: String) {
        if self
            .recent
            .insert(key.clone(), Entry::Running { repeats: 0 })
            .is_none()
        {
            self.order.push_back(key);
        }
        while self.order.len() > RECENT {
            if let Some(old) = self.order.pop_front() {
                self.recent.remove(&old);
            }
        }
    }
}

/// What the router sends with, and what it reads.
#[derive(Clone)]
pub struct Router {
    pub topics: Topics,
    pub max_age: Duration,
    pub buses: Arc<Mutex<Vec<ResolvedBus>>>,
    pub devices: Arc<Mutex<BTreeMap<String, DeviceState>>>,
    pub events: mpsc::Sender<FieldEvent>,
    pub broker: Option<BrokerHandle>,
    pub queue: Option<Queue>,
    pub counters: Arc<CommandCounters>,
    memory: Arc<Mutex<Memory>>,
}

/// Everything a result carries besides the outcome.
struct Context {
    inbound: Inbound,
    device: String,
    point: String,
    id: Option<String>,
    value: Option<Value>,
    received_ms: i64,
    key: Option<String>,
}

impl Router {
    #[allow(clippy::too_many_arguments)] // the router's parts, each named at the call
    pub fn new(
        topics: Topics,
        max_age: Duration,
        buses: Arc<Mutex<Vec<ResolvedBus>>>,
        devices: Arc<Mutex<BTreeMap<String, DeviceState>>>,
        events: mpsc::Sender<FieldEvent>,
        broker: Option<BrokerHandle>,
        queue: Option<Queue>,
        counters: Arc<CommandCounters>,
    ) -> Router {
        Router {
            topics,
            max_age,
            buses,
            devices,
            events,
            broker,
            queue,
            counters,
            memory: Arc::default(),
        }
    }

    /// Takes commands from both sources until `stop`.
    pub async fn run(
        self,
        mut lan: Option<mpsc::Receiver<Tapped>>,
        mut upstream: Option<mpsc::Receiver<Publish>>,
        stop: CancellationToken,
    ) {
        loop {
            let inbound = tokio::select! {
                () = stop.cancelled() => return,
                Some(t) = recv(&mut lan) => Inbound::from_lan(t),
                Some(p) = recv(&mut upstream) => Inbound::from_upstream(p),
                else => return,
            };
            self.handle(inbound);
        }
    }

    /// Checks one command and hands it to its bus (or answers it at once).
    pub fn handle(&self, inbound: Inbound) {
        let Some((device, point)) = self.topics.parse_command(&inbound.topic) else {
            tracing::debug!(topic = %inbound.topic, "message on a subscribed topic that is no command");
            return;
        };
        let (device, point) = (device.to_string(), point.to_string());
        let received_ms = now_ms();
        let parsed = parse_payload(&inbound.payload);
        let id = parsed.as_ref().ok().and_then(|p| p.id.clone());
        let key = match (&id, inbound.qos) {
            (Some(id), _) => Some(format!("id {device}/{point} {id}")),
            (None, QoS::AtMostOnce) => None,
            (None, _) => Some(format!(
                "pkid {} {} {}",
                inbound.source, inbound.pkid, inbound.topic
            )),
        };
        if let Some(key) = &key {
            let resend = id.is_some() || inbound.dup;
            let mut memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
            match memory.recent.get_mut(key) {
                Some(Entry::Running { repeats }) if resend => {
                    *repeats += 1;
                    self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(source = %inbound.source, device, point, "command repeated while running: executes once");
                    return;
                }
                Some(Entry::Done(result)) if resend => {
                    let result = result.clone();
                    drop(memory);
                    self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(source = %inbound.source, device, point, "command repeated: executed once, result repeated");
                    self.publish(&inbound, &device, &point, result);
                    return;
                }
                _ => memory.remember(key.clone()),
            }
        }
        let ctx = Context {
            value: parsed.as_ref().ok().map(|p| p.value.to_value()),
            inbound,
            device,
            point,
            id,
            received_ms,
            key,
        };
        match self.admit(&ctx, parsed) {
            Ok((bus_queue, command, answer)) => match bus_queue.submit(command) {
                Ok(()) => {
                    // Only a command the bus took counts for the point's least interval.
                    self.memory
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .last_write
                        .insert((ctx.device.clone(), ctx.point.clone()), Instant::now());
                    let router = self.clone();
                    tokio::spawn(async move { router.finish(ctx, answer).await });
                }
                Err(refusal) => self.refused(ctx, &refusal),
            },
            Err(refusal) => self.refused(ctx, &refusal),
        }
    }

    /// Every rule before the bus; the bus's queue, the command and its reply channel.
    fn admit(
        &self,
        ctx: &Context,
        parsed: Result<Parsed, Refusal>,
    ) -> Result<
        (
            crate::field::CommandQueue,
            BusCommand,
            oneshot::Receiver<WriteReport>,
        ),
        Refusal,
    > {
        let parsed = parsed?;
        let now = Instant::now();
        let now_wall = now_ms();
        if let Some(expires) = parsed.expires_ms.filter(|e| now_wall > *e) {
            return Err(Refusal::Stale(format!(
                "it expired {} ms ago (expires_ms)",
                now_wall - expires
            )));
        }
        let max_age_ms = self.max_age.as_millis() as i64;
        if let Some(ts) = parsed.ts.filter(|ts| now_wall - ts > max_age_ms) {
            return Err(Refusal::Stale(format!(
                "it was sent {} ms ago, more than the {max_age_ms} ms allowed",
                now_wall - ts
            )));
        }
        let mut deadline = ctx.inbound.arrived + self.max_age;
        if let Some(secs) = ctx.inbound.expiry_secs {
            deadline = deadline.min(ctx.inbound.arrived + Duration::from_secs(u64::from(secs)));
        }
        if now > deadline {
            return Err(Refusal::Stale("it waited past its deadline".into()));
        }
        let (bus_queue, planned) = {
            let buses = self.buses.lock().unwrap_or_else(|e| e.into_inner());
            buses
                .iter()
                .find_map(|bus| {
                    bus.plan_write(&ctx.device, &ctx.point, parsed.value)
                        .map(|p| p.map(|p| (bus.commands().clone(), p)))
                })
                .unwrap_or(Err(Refusal::UnknownPoint))?
        };
        let state = self
            .devices
            .lock()
            .ok()
            .and_then(|d| d.get(&ctx.device).copied());
        if matches!(state, Some(DeviceState::Offline | DeviceState::Quarantined)) {
            return Err(Refusal::DeviceOffline);
        }
        {
            let memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
            let at = (ctx.device.clone(), ctx.point.clone());
            if let Some(last) = memory.last_write.get(&at) {
                if now < *last + planned.min_interval {
                    return Err(Refusal::TooSoon {
                        min_interval_ms: planned.min_interval.as_millis() as u64,
                    });
                }
            }
        }
        let (reply, answer) = oneshot::channel();
        let command = BusCommand {
            device: planned.device,
            point: planned.point,
            op: planned.op,
            deadline: Some(deadline),
            reply,
        };
        Ok((bus_queue, command, answer))
    }

    fn refused(&self, ctx: Context, refusal: &Refusal) {
        self.counters.refuse(refusal.reason());
        tracing::warn!(
            source = %ctx.inbound.source,
            device = %ctx.device,
            point = %ctx.point,
            value = %String::from_utf8_lossy(&ctx.inbound.payload),
            result = refusal.reason(),
            error = %refusal,
            "command refused"
        );
        let body = self.result_json(&ctx, Err((refusal.reason(), refusal.to_string())), None);
        self.done(ctx, body);
    }

    /// Waits for the bus, then answers.
    async fn finish(self, ctx: Context, answer: oneshot::Receiver<WriteReport>) {
        let Ok(report) = answer.await else {
            self.counters.failed.fetch_add(1, Ordering::Relaxed);
            let body = self.result_json(
                &ctx,
                Err(("stopped", "the bus task stopped before the write".into())),
                None,
            );
            self.done(ctx, body);
            return;
        };
        let held = report.held();
        let outcome = match &report.outcome {
            Ok(()) => {
                self.counters.ok.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(failure @ WriteFailure::Stale) => {
                self.counters.refuse(failure.reason());
                Err((failure.reason(), failure.to_string()))
            }
            Err(failure) => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                Err((failure.reason(), failure.to_string()))
            }
        };
        let took_ms = ctx.inbound.arrived.elapsed().as_millis() as u64;
        let shown = ctx
            .value
            .as_ref()
            .map(|v| v.to_string())
            .unwrap_or_default();
        match &outcome {
            Ok(()) => tracing::info!(
                source = %ctx.inbound.source,
                device = %ctx.device,
                point = %ctx.point,
                value = %shown,
                held = ?held,
                took_ms,
                "command written"
            ),
            Err((reason, error)) => tracing::warn!(
                source = %ctx.inbound.source,
                device = %ctx.device,
                point = %ctx.point,
                value = %shown,
                result = reason,
                error = %error,
                took_ms,
                "command failed"
            ),
        }
        let body = self.result_json(&ctx, outcome, Some(&report));
        if let Some(reading) = report.readback {
            // The new reading goes out at once, as every reading does.
            let _ = self.events.try_send(FieldEvent::Reading(reading));
        }
        self.done(ctx, body);
    }

    fn result_json(
        &self,
        ctx: &Context,
        outcome: Result<(), (&'static str, String)>,
        report: Option<&WriteReport>,
    ) -> Bytes {
        let value_json = |v: Option<&Value>| {
            v.map_or(Json::Null, |v| {
                let mut out = String::new();
                v.write_json(&mut out);
                serde_json::from_str(&out).unwrap_or(Json::Null)
            })
        };
        let readback: Option<&Reading> = report.and_then(|r| r.readback.as_ref());
        let (reason, error) = match &outcome {
            Ok(()) => (Json::Null, Json::Null),
            Err((reason, error)) => (json!(reason), json!(error)),
        };
        let mut body = json!({
            "id": ctx.id,
            "ok": outcome.is_ok(),
            "value": value_json(ctx.value.as_ref()),
            "readback": value_json(readback.and_then(|r| r.value.as_ref())),
            "held": report.and_then(WriteReport::held),
            "reason": reason,
            "error": error,
            "received_ms": ctx.received_ms,
            "written_ms": report.map(|r| r.written_ms),
            "done_ms": now_ms(),
        });
        if let Some(data) = &ctx.inbound.correlation_data {
            let text = match std::str::from_utf8(data) {
                Ok(s) => s.to_string(),
                Err(_) => data.iter().map(|b| format!("{b:02x}")).collect(),
            };
            body["correlation_data"] = json!(text);
        }
        Bytes::from(body.to_string())
    }

    /// Remembers the result for duplicates, publishes it (again for each duplicate that
    /// arrived meanwhile).
    fn done(&self, ctx: Context, body: Bytes) {
        let repeats = match &ctx.key {
            Some(key) => {
                let mut memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
                match memory.recent.insert(key.clone(), Entry::Done(body.clone())) {
                    Some(Entry::Running { repeats }) => repeats,
                    _ => 0,
                }
            }
            None => 0,
        };
        for _ in 0..=repeats {
            self.publish(&ctx.inbound, &ctx.device, &ctx.point, body.clone());
        }
    }

    /// The result on the result topic (LAN and upstream) and on the response topic (on
    /// the side the command came from).
    fn publish(&self, inbound: &Inbound, device: &str, point: &str, body: Bytes) {
        let topic = self.topics.command_result(device, point);
        let mut upstream = Vec::new();
        if let Some(broker) = &self.broker {
            broker.publish(&topic, body.clone(), QoS::AtLeastOnce, false);
        }
        let message = |topic: String| Message {
            topic,
            payload: body.clone(),
            qos: QoS::AtLeastOnce,
            retain: false,
            created_ms: now_ms(),
            priority: Priority::Event,
            unsynced: None,
        };
        upstream.push(message(topic));
        if let Some(response) = &inbound.response_topic {
            match (&inbound.source, &self.broker) {
                (Source::Lan { .. }, Some(broker)) => broker.publish_response(
                    response,
                    body.clone(),
                    inbound.correlation_data.clone(),
                ),
                (Source::Lan { .. }, None) => {}
                (Source::Upstream, _) => upstream.push(message(response.clone())),
            }
        }
        if let Some(queue) = &self.queue {
            let queue = queue.clone();
            tokio::spawn(async move {
                if let Err(err) = queue.append(upstream).await {
                    tracing::warn!(error = %err, "command result not stored for upstream");
                }
            });
        }
    }
}

async fn recv<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A router over one bus whose task is not running, so what reaches the bus stays
    /// in its queue; results go nowhere, the counters tell the outcome.
    fn router() -> (Router, mpsc::Receiver<FieldEvent>) {
        let config: crate::field::FieldConfig = toml::from_str(
            "[[bus]]\nname = \"b\"\nkind = \"tcp\"\nhost = \"127.0.0.1\"\n\
             [[bus.device]]\nname = \"boiler\"\n[[bus.device.point]]\nname = \"setpoint\"\n\
             kind = \"holding\"\naddress = 0\nwritable = true\n",
        )
        .unwrap();
        let buses = crate::field::resolve(&config).unwrap();
        let (events, rx) = mpsc::channel(8);
        let router = Router::new(
            Topics::new("gw"),
            Duration::from_millis(5000),
            Arc::new(Mutex::new(buses)),
            Arc::default(),
            events,
            None,
            None,
            Arc::default(),
        );
        (router, rx)
    }

    fn command(payload: &str, expiry_secs: Option<u32>) -> Inbound {
        Inbound {
            source: Source::Upstream,
            topic: "gw/boiler/setpoint/set".into(),
            payload: Bytes::from(payload.to_string()),
            qos: QoS::AtLeastOnce,
            dup: false,
            pkid: 1,
            response_topic: None,
            correlation_data: None,
            expiry_secs,
            arrived: Instant::now(),
        }
    }

    fn refused(router: &Router, reason: &str) -> u64 {
        router.counters.json()["refused"][reason]
            .as_u64()
            .unwrap_or(0)
    }

    #[tokio::test(start_paused = true)]
    async fn stale_offline_and_busy_commands_never_reach_the_bus() {
        let (router, _events) = router();
        let queue = router.buses.lock().unwrap()[0].commands().clone();
        let mut inbox = queue.inbox().await;

        // 5.0 message expiry: it arrived with 1 s to live and was handled 2 s later.
        let late = command("21", Some(1));
        tokio::time::advance(Duration::from_secs(2)).await;
        router.handle(late);
        // Arrival without any expiry, handled after the maximum age.
        let old = command("21", None);
        tokio::time::advance(Duration::from_secs(6)).await;
        router.handle(old);
        // The payload's own expiry and sending time.
        let now = now_ms();
        router.handle(command(
            &format!(r#"{{"value": 21, "expires_ms": {}}}"#, now - 1),
            None,
        ));
        router.handle(command(
            &format!(r#"{{"value": 21, "ts": {}}}"#, now - 6000),
            None,
        ));
        assert_eq!(refused(&router, "stale"), 4);
        assert!(inbox.try_recv().is_err(), "nothing reached the bus");

        // An offline device is not written.
        router
            .devices
            .lock()
            .unwrap()
            .insert("boiler".into(), DeviceState::Quarantined);
        router.handle(command("21", None));
        assert_eq!(refused(&router, "device_offline"), 1);
        router.devices.lock().unwrap().clear();

        // A full bus queue refuses at once instead of waiting.
        for i in 0..crate::field::command::QUEUE_CAPACITY + 1 {
            let mut c = command("21", None);
            c.pkid = i as u16 + 10;
            router.handle(c);
        }
        assert_eq!(refused(&router, "busy"), 1);
        let mut taken = 0;
        while let Ok(cmd) = inbox.try_recv() {
            assert!(cmd.deadline.is_some());
            taken += 1;
        }
        assert_eq!(taken, crate::field::command::QUEUE_CAPACITY);
    }

    #[test]
    fn payloads_home_assistant_sends_are_understood() {
        let value = |p: &str| parse_payload(p.as_bytes()).map(|p| p.value);
        assert_eq!(value("21.5"), Ok(Requested::Float(21.5)));
        assert_eq!(value(" -3 "), Ok(Requested::Int(-3)));
        assert_eq!(value("ON"), Ok(Requested::Bool(true)));
        assert_eq!(value("off"), Ok(Requested::Bool(false)));
        assert_eq!(value("0"), Ok(Requested::Int(0)));
        assert_eq!(value("false"), Ok(Requested::Bool(false)));
        let parsed =
            parse_payload(br#"{"value": "OFF", "id": 7, "expires_ms": 5, "ts": 4}"#).unwrap();
        assert_eq!(
            parsed,
            Parsed {
                value: Requested::Bool(false),
                id: Some("7".into()),
                expires_ms: Some(5),
                ts: Some(4),
            }
        );
        for bad in ["", "warm", "{\"id\": 1}", "{\"value\": [1]}", "NaN", "{"] {
            assert_eq!(
                parse_payload(bad.as_bytes()).unwrap_err().reason(),
                "bad_payload",
                "{bad}"
            );
        }
    }
}
