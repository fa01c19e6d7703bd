//! One task per bus: resolved devices, the polling loop of a Modbus bus, and the path of a
//! reading from decoding to the agent's channel.
//!
//! Invariants:
//! - The bus task is the only user of its connection: requests are strictly sequential.
//! - The device due first is polled first, so a slow or dead device delays the others by
//!   at most one poll of its own, and once quarantined by almost nothing.
//! - Every point of a polled device yields exactly one reading per poll (good, or bad with
//!   the reason); the point's filter then decides whether it is published.
//! - A device state event is sent, and logged, only when the state changes.
//! - Sending into the bounded channel waits (backpressure) but never outlives shutdown.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::Sender;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::config::{BusConfig, BusKind, DeviceConfig, FieldConfig, LineMode, PointConfig};
use super::decode::{ByteOrder, Codec, DecodeError};
use super::link::{Link, ReadError, Words};
use super::plan::{Limits, PointSpan, ReadPlan};
use super::reading::{batch_json, DeviceState, FieldEvent, Quality, Reading, Value};
use super::schedule::{Band, Health, Outcome, PointFilter, Slot};
use crate::clock::now_ms;

/// Counters of one bus, shared with whoever holds its [`ResolvedBus`].
#[derive(Debug, Default)]
pub struct BusStats {
    requests: AtomicU64,
    failed_requests: AtomicU64,
    readings: AtomicU64,
    lines: AtomicU64,
    garbage_lines: AtomicU64,
}

/// A copy of a bus's counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Modbus requests sent (each retry counts), or poll requests written on a lines bus.
    pub requests: u64,
    /// Requests that got no usable answer (timeout, corrupted, disconnected).
    pub failed_requests: u64,
    /// Readings produced (before deadband filtering).
    pub readings: u64,
    /// Lines received on a lines bus.
    pub lines: u64,
    /// Lines skipped as garbage: too long, bad checksum, or not matching the parser.
    pub garbage_lines: u64,
}

impl BusStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            failed_requests: self.failed_requests.load(Ordering::Relaxed),
            readings: self.readings.load(Ordering::Relaxed),
            lines: self.lines.load(Ordering::Relaxed),
            garbage_lines: self.garbage_lines.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn add_request(&self, failed: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.failed_requests.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn add_readings(&self, n: usize) {
        self.readings.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn add_line(&self, garbage: bool) {
        self.lines.fetch_add(1, Ordering::Relaxed);
        if garbage {
            self.garbage_lines.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A point with everything resolved from its configuration.
#[derive(Debug, Clone)]
pub(crate) struct ResolvedPoint {
    pub name: String,
    pub unit: Option<String>,
    pub topic: Option<String>,
    /// Modbus points: where the point sits.
    pub span: Option<PointSpan>,
    pub codec: Codec,
    /// Lines points: capture group or key.
    pub field: String,
    pub band: Band,
    pub heartbeat: Option<Duration>,
}

/// A device with its profile merged in.
#[derive(Debug, Clone)]
pub(crate) struct ResolvedDevice {
    pub name: String,
    pub unit_id: u8,
    pub interval: Duration,
    pub timeout: Duration,
    pub retries: u32,
    pub batch: bool,
    pub quarantine_after: u32,
    pub backoff_max: Duration,
    pub limits: Limits,
    pub request: Option<String>,
    pub regex: Option<regex_lite::Regex>,
    pub points: Vec<ResolvedPoint>,
}

impl ResolvedDevice {
    pub fn spans(&self) -> Vec<PointSpan> {
        self.points
            .iter()
            .map(|p| {
                p.span.unwrap_or(PointSpan {
                    kind: super::decode::RegisterKind::Holding,
                    address: 0,
                    width: 1,
                })
            })
            .collect()
    }

    pub fn plan(&self) -> ReadPlan {
        ReadPlan::build(&self.spans(), self.limits)
    }

    /// A reading of point `i` with the given outcome.
    pub fn reading(&self, i: usize, value: Option<Value>, quality: Quality, ts_ms: i64) -> Reading {
        let p = &self.points[i];
        debug_assert_eq!(value.is_some(), quality.is_good());
        Reading {
            device: self.name.clone(),
            point: p.name.clone(),
            topic: p.topic.clone(),
            value,
            unit: p.unit.clone(),
            ts_ms,
            quality,
        }
    }
}

/// A validated bus, ready to be spawned (again, after a crash) with [`super::spawn_bus`].
#[derive(Debug, Clone)]
pub struct ResolvedBus {
    pub(crate) config: BusConfig,
    pub(crate) devices: Arc<[ResolvedDevice]>,
    pub(crate) stats: Arc<BusStats>,
}

impl ResolvedBus {
    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn kind(&self) -> BusKind {
        self.config.kind
    }

    /// The bus's counters so far (kept across respawns of the same `ResolvedBus`).
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// The device names on this bus.
    pub fn device_names(&self) -> Vec<String> {
        self.devices.iter().map(|d| d.name.clone()).collect()
    }
}

fn resolve_point(p: &PointConfig) -> ResolvedPoint {
    let data_type = p.data_type_or_default();
    let codec = Codec {
        data_type,
        order: p.order.unwrap_or(ByteOrder::ABCD),
        bit: p.bit.unwrap_or(0),
        string_registers: p.registers.unwrap_or(1),
        scale: p.scale,
        offset: p.offset,
    };
    let span = match (p.kind, p.address.and_then(|a| u16::try_from(a).ok())) {
        (Some(kind), Some(address)) => Some(PointSpan {
            kind,
            address,
            width: p.width().max(1),
        }),
        _ => None,
    };
    let band = match (p.deadband, p.deadband_percent) {
        (Some(d), _) => Band::Absolute(d),
        (None, Some(pc)) => Band::Percent(pc),
        (None, None) => Band::Every,
    };
    ResolvedPoint {
        name: p.name.clone(),
        unit: p.unit.clone(),
        topic: p.topic.clone(),
        span,
        codec,
        field: p.field().to_string(),
        band,
        heartbeat: (band != Band::Every && p.heartbeat_secs > 0)
            .then(|| Duration::from_secs(p.heartbeat_secs)),
    }
}

fn resolve_device(config: &FieldConfig, bus: &BusConfig, d: &DeviceConfig) -> ResolvedDevice {
    let profile_points = d
        .profile
        .as_ref()
        .and_then(|name| config.profiles.get(name))
        .map(|p| p.points.as_slice())
        .unwrap_or_default();
    ResolvedDevice {
        name: d.name.clone(),
        unit_id: d.unit_id,
        interval: Duration::from_millis(d.poll_interval_ms.max(1)),
        timeout: Duration::from_millis(d.timeout_ms(bus).max(1)),
        retries: d.retries,
        batch: d.batch,
        quarantine_after: d.quarantine_after,
        backoff_max: Duration::from_millis(d.backoff_max_ms),
        limits: Limits {
            max_gap: d.max_gap,
            max_registers: d.max_registers_per_request,
            max_bits: d.max_bits_per_request,
        },
        request: (bus.kind == BusKind::Lines && bus.mode() == LineMode::Poll)
            .then(|| d.request.clone())
            .flatten(),
        regex: d
            .regex
            .as_deref()
            .and_then(|r| regex_lite::Regex::new(r).ok()),
        points: profile_points
            .iter()
            .chain(&d.points)
            .map(resolve_point)
            .collect(),
    }
}

/// Resolves a configuration that passed [`FieldConfig::validate`].
pub(crate) fn resolve_buses(config: &FieldConfig) -> Vec<ResolvedBus> {
    config
        .buses
        .iter()
        .map(|bus| ResolvedBus {
            config: bus.clone(),
            devices: bus
                .devices
                .iter()
                .map(|d| resolve_device(config, bus, d))
                .collect::<Vec<_>>()
                .into(),
            stats: Arc::new(BusStats::default()),
        })
        .collect()
}

/// Per-device state inside a running bus task.
pub(crate) struct DeviceRun {
    pub spec: ResolvedDevice,
    pub plan: ReadPlan,
    pub spans: Vec<PointSpan>,
    pub slot: Slot,
    pub health: Health,
    pub filters: Vec<PointFilter>,
    /// The last fault, for one log line per change.
    pub last_fault: Option<String>,
}

impl DeviceRun {
    pub fn new(spec: &ResolvedDevice, anchor: Instant) -> DeviceRun {
        DeviceRun {
            plan: spec.plan(),
            spans: spec.spans(),
            slot: Slot::new(anchor, spec.interval),
            health: Health::new(spec.quarantine_after, spec.interval, spec.backoff_max),
            filters: spec
                .points
                .iter()
                .map(|p| PointFilter::new(p.band, p.heartbeat, spec.interval))
                .collect(),
            last_fault: None,
            spec: spec.clone(),
        }
    }

    /// Records a poll's outcome, reschedules, and returns the events to send: published
    /// readings, the batch, and a state change.
    ///
    /// `readings` are `(point index, reading)`; a lines device may yield only some points.
    pub fn finish_poll(
        &mut self,
        readings: Vec<(usize, Reading)>,
        outcome: Outcome,
        fault: Option<&ReadError>,
        started_ms: i64,
    ) -> Vec<FieldEvent> {
        let now = Instant::now();
        let mut events = Vec::with_capacity(readings.len() + 2);
        let batch = (self.spec.batch && !readings.is_empty()).then(|| {
            let all: Vec<Reading> = readings.iter().map(|(_, r)| r.clone()).collect();
            batch_json(started_ms, &all)
        });
        for (i, r) in readings {
            if self.filters[i].admit(r.value.as_ref(), r.quality, now) {
                events.push(FieldEvent::Reading(r));
            }
        }
        if let Some(payload_json) = batch {
            events.push(FieldEvent::Batch {
                device: self.spec.name.clone(),
                payload_json,
                ts_ms: started_ms,
            });
        }
        if let Some(state) = self.health.record(outcome) {
            self.log_state(state, fault);
            events.push(FieldEvent::DeviceState {
                device: self.spec.name.clone(),
                state,
            });
        }
        self.slot.advance(now, self.health.backoff());
        events
    }

    fn log_state(&mut self, state: DeviceState, fault: Option<&ReadError>) {
        let device = self.spec.name.as_str();
        match state {
            DeviceState::Online => tracing::info!(device, "device online"),
            DeviceState::Offline => tracing::warn!(
                device,
                error = %fault.map(ToString::to_string).unwrap_or_default(),
                "device offline"
            ),
            DeviceState::Quarantined => tracing::warn!(
                device,
                failures = self.spec.quarantine_after,
                error = %fault.map(ToString::to_string).unwrap_or_default(),
                retry_max_ms = self.spec.backoff_max.as_millis() as u64,
                "device quarantined; retrying with backoff"
            ),
        }
        self.last_fault = fault.map(ToString::to_string);
    }
}

/// The quality a failed read gives its points.
pub(crate) fn quality_of(e: &ReadError) -> Quality {
    match e {
        ReadError::Timeout => Quality::Timeout,
        ReadError::Exception(c) => Quality::Exception(*c),
        ReadError::Crc => Quality::Crc,
        ReadError::Disconnected(_) => Quality::Disconnected,
        ReadError::Protocol(_) => Quality::Protocol,
    }
}

/// Exceptions after which a joined block is split: the device may not implement a
/// register in a gap (02), or refuse the length (03), or fail on one register (04).
fn splittable(code: u8) -> bool {
    matches!(code, 0x02..=0x04)
}

/// Reads one block, retrying timeouts and corrupted answers.
async fn read_with_retries<L: Link>(
    link: &mut L,
    stats: &BusStats,
    dev: &ResolvedDevice,
    kind: super::decode::RegisterKind,
    start: u16,
    count: u16,
) -> Result<Words, ReadError> {
    let mut attempt = 0;
    loop {
        let result = link
            .read(dev.unit_id, kind, start, count, dev.timeout)
            .await;
        let retryable = matches!(
            result,
            Err(ReadError::Timeout | ReadError::Crc | ReadError::Protocol(_))
        );
        stats.add_request(matches!(&result, Err(e) if !matches!(e, ReadError::Exception(_))));
        if retryable && attempt < dev.retries {
            attempt += 1;
            continue;
        }
        return result;
    }
}

/// Polls one Modbus device through its plan. Returns one reading per point, the outcome
/// and the fault that ended the poll, if any.
pub(crate) async fn poll_modbus<L: Link>(
    link: &mut L,
    stats: &BusStats,
    run: &mut DeviceRun,
) -> (Vec<(usize, Reading)>, Outcome, Option<ReadError>) {
    let n = run.spec.points.len();
    let mut results: Vec<Option<(Option<Value>, Quality, i64)>> = vec![None; n];
    let mut answered = false;
    let mut fault = None;
    let mut i = 0;
    while i < run.plan.blocks.len() {
        let (kind, start, count) = {
            let b = &run.plan.blocks[i];
            (b.kind, b.start, b.count)
        };
        let result = read_with_retries(link, stats, &run.spec, kind, start, count).await;
        let ts = now_ms();
        match result {
            Ok(words) => {
                answered = true;
                let block = &run.plan.blocks[i];
                for &p in &block.points {
                    let offset = block.offset_of(&run.spans[p]);
                    let decoded = match &words {
                        Words::Registers(regs) => run.spec.points[p]
                            .codec
                            .decode_registers(regs.get(offset..).unwrap_or_default()),
                        Words::Bits(bits) => bits
                            .get(offset)
                            .map(|b| run.spec.points[p].codec.decode_bit(*b))
                            .ok_or(DecodeError::Short {
                                need: offset + 1,
                                got: bits.len(),
                            }),
                    };
                    results[p] = Some(match decoded {
                        Ok(v) => (Some(v), Quality::Good, ts),
                        Err(_) => (None, Quality::Parse, ts),
                    });
                }
            }
            Err(ReadError::Exception(code)) => {
                answered = true;
                if splittable(code) && run.plan.split(i, &run.spans) {
                    tracing::info!(
                        device = %run.spec.name,
                        function = kind.function_code(),
                        start,
                        count,
                        exception = code,
                        "device refused a joined request; reading it in two parts from now on"
                    );
                    continue;
                }
                for &p in &run.plan.blocks[i].points {
                    results[p] = Some((None, Quality::Exception(code), ts));
                }
            }
            Err(e) => {
                fault = Some(e);
                break;
            }
        }
        i += 1;
    }
    let fault_quality = fault.as_ref().map(quality_of).unwrap_or(Quality::Timeout);
    let ts = now_ms();
    let readings: Vec<(usize, Reading)> = results
        .into_iter()
        .enumerate()
        .map(|(p, r)| {
            let (value, quality, ts) = r.unwrap_or((None, fault_quality, ts));
            (p, run.spec.reading(p, value, quality, ts))
        })
        .collect();
    stats.add_readings(readings.len());
    let outcome = match (&fault, answered) {
        (_, true) => Outcome::Answered,
        (Some(ReadError::Disconnected(_)), false) => Outcome::BusDown,
        _ => Outcome::Failed,
    };
    (readings, outcome, fault)
}

/// Sends events in order; false once the receiver is gone, or once shutdown is
/// requested and the channel is full. At shutdown, what was already read is still
/// handed over while the channel has room (the pipeline drains it before the store
/// closes), but the task never waits for room.
pub(crate) async fn send_all(
    tx: &Sender<FieldEvent>,
    shutdown: &CancellationToken,
    events: Vec<FieldEvent>,
) -> bool {
    for event in events {
        tokio::select! {
            biased;
            permit = tx.reserve() => match permit {
                Ok(permit) => permit.send(event),
                Err(_) => return false,
            },
            _ = shutdown.cancelled() => {
                if tx.try_send(event).is_err() {
                    return false;
                }
            }
        }
    }
    true
}

/// The per-device state of every device of `bus`, on poll grids anchored now.
pub(crate) fn device_runs(bus: &ResolvedBus) -> Vec<DeviceRun> {
    let anchor = Instant::now();
    bus.devices
        .iter()
        .map(|d| DeviceRun::new(d, anchor))
        .collect()
}

/// Waits until the device due first is due and returns its index (ties go to the
/// device listed first); `None` once shutdown is requested. A bus without devices just
/// waits for shutdown.
pub(crate) async fn next_due(runs: &[DeviceRun], shutdown: &CancellationToken) -> Option<usize> {
    let Some(i) = (0..runs.len()).min_by_key(|&i| (runs[i].slot.next, i)) else {
        shutdown.cancelled().await;
        return None;
    };
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => None,
        _ = tokio::time::sleep_until(runs[i].slot.next) => Some(i),
    }
}

/// The loop of a Modbus bus: poll the device due first, forever, until shutdown.
pub(crate) async fn run_modbus<L: Link>(
    bus: &ResolvedBus,
    link: &mut L,
    tx: &Sender<FieldEvent>,
    shutdown: &CancellationToken,
) {
    let mut runs = device_runs(bus);
    while let Some(i) = next_due(&runs, shutdown).await {
        let started = now_ms();
        let run = &mut runs[i];
        let polled = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            polled = poll_modbus(link, &bus.stats, run) => polled,
        };
        let (readings, outcome, fault) = polled;
        let events = run.finish_poll(readings, outcome, fault.as_ref(), started);
        if !send_all(tx, shutdown, events).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    //! Scheduling under paused time. Real Modbus I/O cannot run under a paused clock
    //! (tokio advances the clock whenever the runtime waits on a socket), so these tests
    //! drive the scheduler through an in-process device model; the same behaviour is
    //! checked against the pymodbus slave in real time in `tests/field_modbus.rs`.
    use std::collections::HashMap;
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;

    use super::*;
    use crate::field::decode::RegisterKind;

    /// Units that answer after 5 ms with their registers, or never (dead).
    #[derive(Clone, Default)]
    struct Model {
        registers: Arc<Mutex<HashMap<u8, Vec<u16>>>>,
        dead: Arc<Mutex<HashMap<u8, Arc<AtomicBool>>>>,
        requests: Arc<Mutex<Vec<(u8, Instant)>>>,
    }

    impl Link for Model {
        async fn read(
            &mut self,
            unit: u8,
            _kind: RegisterKind,
            start: u16,
            count: u16,
            timeout: Duration,
        ) -> Result<Words, ReadError> {
            self.requests.lock().unwrap().push((unit, Instant::now()));
            let dead = self
                .dead
                .lock()
                .unwrap()
                .get(&unit)
                .map(|d| d.load(Ordering::SeqCst));
            if dead == Some(true) {
                tokio::time::sleep(timeout).await;
                return Err(ReadError::Timeout);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            let regs = self.registers.lock().unwrap()[&unit].clone();
            let range = usize::from(start)..usize::from(start) + usize::from(count);
            Ok(Words::Registers(regs[range].to_vec()))
        }
    }

    const CONFIG: &str = r#"
        [[bus]]
        name = "rs485"
        kind = "rtu"
        port = "/dev/null"
        [[bus.device]]
        name = "dead"
        unit_id = 2
        timeout_ms = 300
        retries = 1
        quarantine_after = 3
        backoff_max_ms = 8000
        [[bus.device.point]]
        name = "x"
        kind = "holding"
        address = 0
        [[bus.device]]
        name = "live"
        unit_id = 1
        [[bus.device.point]]
        name = "count"
        kind = "holding"
        address = 0
        [[bus.device.point]]
        name = "temp"
        kind = "holding"
        address = 1
        deadband = 0.5
        heartbeat_secs = 10
    "#;

    struct Seen {
        live_count: Vec<Instant>,
        live_temp: Vec<Instant>,
        dead: Vec<Reading>,
        states: Vec<(String, DeviceState, Instant)>,
    }

    async fn collect(
        rx: &mut tokio::sync::mpsc::Receiver<FieldEvent>,
        until: Instant,
        seen: &mut Seen,
    ) {
        while let Ok(Some(event)) = tokio::time::timeout_at(until, rx.recv()).await {
            match event {
                FieldEvent::Reading(r) if r.device == "live" && r.point == "count" => {
                    assert_eq!(r.quality, Quality::Good);
                    seen.live_count.push(Instant::now());
                }
                FieldEvent::Reading(r) if r.device == "live" => seen.live_temp.push(Instant::now()),
                FieldEvent::Reading(r) => seen.dead.push(r),
                FieldEvent::DeviceState { device, state } => {
                    seen.states.push((device, state, Instant::now()))
                }
                FieldEvent::Batch { .. } => {}
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_device_backs_off_while_the_others_are_polled_on_time() {
        let config: FieldConfig = toml::from_str(CONFIG).unwrap();
        let bus = crate::field::resolve(&config).unwrap().remove(0);
        let model = Model::default();
        model.registers.lock().unwrap().insert(1, vec![1, 215]);
        model.registers.lock().unwrap().insert(2, vec![7]);
        let dead_flag = Arc::new(AtomicBool::new(true));
        model.dead.lock().unwrap().insert(2, Arc::clone(&dead_flag));
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let shutdown = CancellationToken::new();
        let t0 = Instant::now();
        let task = {
            let (bus, mut link, shutdown) = (bus.clone(), model.clone(), shutdown.clone());
            tokio::spawn(async move { run_modbus(&bus, &mut link, &tx, &shutdown).await })
        };
        let mut seen = Seen {
            live_count: vec![],
            live_temp: vec![],
            dead: vec![],
            states: vec![],
        };
        collect(
            &mut rx,
            t0 + Duration::from_secs(60) + Duration::from_millis(900),
            &mut seen,
        )
        .await;

        // The live meter is polled once per second, every second, at most the dead
        // meter's two timeouts late, and without drift.
        assert_eq!(seen.live_count.len(), 61, "one poll per tick over 60 s");
        for (k, at) in seen.live_count.iter().enumerate() {
            let tick = t0 + Duration::from_secs(k as u64);
            let late = at.duration_since(tick);
            assert!(
                late <= Duration::from_millis(700),
                "poll {k} was {late:?} late"
            );
        }
        // Deadband with heartbeat: the constant temperature goes out only for the
        // heartbeat, never more than 10 s apart.
        assert!(
            (6..=8).contains(&seen.live_temp.len()),
            "{} heartbeats",
            seen.live_temp.len()
        );
        for pair in seen.live_temp.windows(2) {
            assert!(
                pair[1] - pair[0] <= Duration::from_secs(10),
                "{:?}",
                pair[1] - pair[0]
            );
        }

        // The dead meter: three failed polls (two requests each), then quarantine with
        // retries after 2, 4, 8, 8, … s instead of every second.
        let states: Vec<_> = seen
            .states
            .iter()
            .filter(|s| s.0 == "dead")
            .map(|s| s.1)
            .collect();
        assert_eq!(states, vec![DeviceState::Offline, DeviceState::Quarantined]);
        assert!(seen
            .dead
            .iter()
            .all(|r| r.quality == Quality::Timeout && r.value.is_none()));
        let dead_polls = model
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|(u, _)| *u == 2)
            .count()
            / 2;
        assert!(
            (9..=12).contains(&dead_polls),
            "{dead_polls} polls of the dead meter in 60 s"
        );

        // It comes back: online again within one backoff, then polled every second.
        dead_flag.store(false, Ordering::SeqCst);
        let back = Instant::now();
        collect(&mut rx, back + Duration::from_secs(20), &mut seen).await;
        let online = seen
            .states
            .iter()
            .find(|s| s.0 == "dead" && s.1 == DeviceState::Online)
            .expect("the recovered meter goes online");
        assert!(online.2.duration_since(back) <= Duration::from_secs(9));
        let good: Vec<&Reading> = seen
            .dead
            .iter()
            .filter(|r| r.quality == Quality::Good)
            .collect();
        assert!(
            good.len() >= 10,
            "polled on its interval again: {}",
            good.len()
        );
        assert_eq!(good[0].value, Some(Value::UInt(7)));

        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_stops_a_bus_that_is_waiting_on_a_full_channel() {
        let config: FieldConfig = toml::from_str(CONFIG).unwrap();
        let bus = crate::field::resolve(&config).unwrap().remove(0);
        let model = Model::default();
        model.registers.lock().unwrap().insert(1, vec![1, 2]);
        model.registers.lock().unwrap().insert(2, vec![7]);
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let shutdown = CancellationToken::new();
        let task = {
            let (bus, mut link, shutdown) = (bus.clone(), model.clone(), shutdown.clone());
            tokio::spawn(async move { run_modbus(&bus, &mut link, &tx, &shutdown).await })
        };
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!task.is_finished());
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .unwrap()
            .unwrap();
    }

    fn state_event(device: &str) -> FieldEvent {
        FieldEvent::DeviceState {
            device: device.to_string(),
            state: DeviceState::Online,
        }
    }

    /// Regression: at shutdown a poll's readings, already read, were dropped even when
    /// the channel had room, so they never reached the pipeline's final commit.
    #[tokio::test]
    async fn readings_already_read_are_handed_over_at_shutdown_while_there_is_room() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(2);
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        assert!(send_all(&tx, &shutdown, vec![state_event("a"), state_event("b")]).await);
        let mut got = Vec::new();
        while let Ok(FieldEvent::DeviceState { device, .. }) = rx.try_recv() {
            got.push(device);
        }
        assert_eq!(got, ["a", "b"]);

        // A full channel does not hold the stopping task.
        tx.try_send(state_event("c")).expect("room for one");
        tx.try_send(state_event("d")).expect("room for two");
        assert!(!send_all(&tx, &shutdown, vec![state_event("e")]).await);
    }
}
