//! The polling loop of a Modbus bus (RTU or TCP): each due device is read block by block
//! through its read plan, and the words are decoded into one reading per point.
//!
//! Invariants:
//! - The bus task is the only user of its connection: requests are strictly sequential,
//!   one at a time across all units (what a gateway needs), writes included.
//! - Pacing: a request starts no earlier than the bus's `request_delay_ms` after the end
//!   of the last request on the bus, and no earlier than its device's `request_delay_ms`
//!   after the end of the last request to that device (retries and writes included).
//! - A poll reads one poll group of a device (its plan), never the device's other groups.
//! - A Modbus exception is an answer: it becomes the quality of the block's points. An
//!   exception 02/03/04 on a joined block splits it in two at a point boundary, the two
//!   halves are read at once, and the split stays in the plan for the task's lifetime.
//! - A transport fault (timeout, corrupted answer, mismatched answer) is retried up to the
//!   device's `retries`; a fault that remains ends the poll, and the points not read yet
//!   get its quality. A bus that is down ends it at once.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc::Sender;
use tokio::time::Instant;
use tokio_modbus::ExceptionCode;
use tokio_util::sync::CancellationToken;

use super::command::{BusCommand, Inbox, WriteFailure, WriteReport};
use super::decode::{DecodeError, RegisterKind};
use super::link::{Link, ReadError, Words};
use super::reading::{FieldEvent, Quality, Reading, Value};
use super::resolve::{BusStats, ResolvedBus, ResolvedDevice};
use super::schedule::Outcome;
use super::task::{run_polls, DeviceRun, Polled, Poller};
use super::write::WriteOp;
use crate::clock::now_ms;

/// Exceptions after which a joined block is split: the device may not implement a
/// register in a gap (02), or refuse the length (03), or fail on one register (04).
/// (Compared as numbers: tokio-modbus may carry a known code as `Custom`.)
fn splittable(code: ExceptionCode) -> bool {
    matches!(u8::from(code), 0x02..=0x04)
}

/// The bus's connection with its request pacing: when the next request may start.
struct Wire<'a, L> {
    link: &'a mut L,
    /// Least pause after any request on the bus (`request_delay_ms` of the bus).
    bus_delay: Duration,
    /// The next request on the bus starts no earlier.
    bus_ready: Instant,
    /// Per unit: its next request starts no earlier (the device's `request_delay_ms`).
    unit_ready: HashMap<u8, Instant>,
}

impl<'a, L: Link> Wire<'a, L> {
    fn new(link: &'a mut L, bus_delay: Duration) -> Wire<'a, L> {
        let now = Instant::now();
        Wire {
            link,
            bus_delay,
            bus_ready: now,
            unit_ready: HashMap::new(),
        }
    }

    /// Waits until a request to `dev` may start.
    async fn pace(&mut self, dev: &ResolvedDevice) {
        let at = self
            .unit_ready
            .get(&dev.unit_id)
            .map_or(self.bus_ready, |&u| u.max(self.bus_ready));
        if at > Instant::now() {
            tokio::time::sleep_until(at).await;
        }
    }

    /// Notes that a request to `dev` just ended.
    fn ended(&mut self, dev: &ResolvedDevice) {
        let now = Instant::now();
        self.bus_ready = now + self.bus_delay;
        if !dev.request_delay.is_zero() {
            self.unit_ready.insert(dev.unit_id, now + dev.request_delay);
        }
    }

    /// One read request, once pacing allows it; counted in `stats` with its time on
    /// the wire (the pacing pause left out).
    async fn read(
        &mut self,
        stats: &BusStats,
        dev: &ResolvedDevice,
        kind: RegisterKind,
        start: u16,
        count: u16,
    ) -> Result<Result<Words, ExceptionCode>, ReadError> {
        self.pace(dev).await;
        let sent = Instant::now();
        let result = self
            .link
            .read(dev.unit_id, kind, start, count, dev.timeout)
            .await;
        stats.add_request(sent, &result);
        self.ended(dev);
        result
    }

    /// One write request, paced and counted as [`Wire::read`].
    async fn write(
        &mut self,
        stats: &BusStats,
        dev: &ResolvedDevice,
        op: &WriteOp,
    ) -> Result<Result<(), ExceptionCode>, ReadError> {
        self.pace(dev).await;
        let sent = Instant::now();
        let result = self.link.write(dev.unit_id, op, dev.timeout).await;
        stats.add_request(sent, &result);
        self.ended(dev);
        result
    }
}

/// Reads one block, retrying the faults that are worth retrying. Every request counts;
/// a request failed if it got no usable answer (an exception is an answer).
async fn read_with_retries<L: Link>(
    wire: &mut Wire<'_, L>,
    stats: &BusStats,
    dev: &ResolvedDevice,
    kind: RegisterKind,
    start: u16,
    count: u16,
) -> Result<Result<Words, ExceptionCode>, ReadError> {
    let mut attempt = 0;
    loop {
        let result = wire.read(stats, dev, kind, start, count).await;
        match result {
            Err(e) if e.is_retryable() && attempt < dev.retries => attempt += 1,
            result => return result,
        }
    }
}

/// What a poll learnt about one point: its value (if good), quality and time.
type PointResult = (Option<Value>, Quality, i64);

/// Polls one Modbus device through its plan. Returns one reading per point, the outcome
/// and the fault that ended the poll, if any.
async fn poll_modbus<L: Link>(
    bus: &Bus<'_>,
    wire: &mut Wire<'_, L>,
    run: &mut DeviceRun,
    inbox: &mut Inbox,
) -> Polled {
    let stats = bus.stats;
    let mut results: Vec<Option<PointResult>> = vec![None; run.spec.points.len()];
    let mut answered = false;
    let mut fault = None;
    let mut i = 0;
    let g = run.current;
    while i < run.groups[g].plan.blocks.len() {
        // Commands go before the next request.
        while let Ok(command) = inbox.try_recv() {
            execute(bus, wire, command).await;
        }
        let (kind, start, count) = {
            let b = &run.groups[g].plan.blocks[i];
            (b.kind, b.start, b.count)
        };
        let result = read_with_retries(wire, stats, &run.spec, kind, start, count).await;
        let ts = now_ms();
        match result {
            Ok(Ok(words)) => {
                answered = true;
                decode_block(run, i, &words, ts, &mut results);
            }
            Ok(Err(code)) => {
                answered = true;
                if splittable(code) && run.groups[g].plan.split(i, &run.spans) {
                    tracing::info!(
                        device = %run.spec.name,
                        function = kind.function_code(),
                        start,
                        count,
                        exception = u8::from(code),
                        "device refused a joined request; reading it in two parts from now on"
                    );
                    continue;
                }
                for &p in &run.groups[g].plan.blocks[i].points {
                    results[p] = Some((None, Quality::Exception(u8::from(code)), ts));
                }
            }
            Err(e) => {
                fault = Some(e);
                break;
            }
        }
        i += 1;
    }
    finish(run, results, answered, fault)
}

/// Decodes the points of block `i` from the words read for it.
fn decode_block(
    run: &DeviceRun,
    i: usize,
    words: &Words,
    ts: i64,
    results: &mut [Option<PointResult>],
) {
    let block = &run.groups[run.current].plan.blocks[i];
    for &p in &block.points {
        let offset = block.offset_of(&run.spans[p]);
        let codec = &run.spec.points[p].codec;
        let decoded = match words {
            Words::Registers(regs) => {
                codec.decode_registers(regs.get(offset..).unwrap_or_default())
            }
            Words::Bits(bits) => {
                bits.get(offset)
                    .map(|b| codec.decode_bit(*b))
                    .ok_or(DecodeError::Short {
                        need: offset + 1,
                        got: bits.len(),
                    })
            }
        };
        results[p] = Some(match decoded {
            Ok(v) => (Some(v), Quality::Good, ts),
            Err(_) => (None, Quality::Parse, ts),
        });
    }
}

/// One reading per point: what was read, or the quality of the fault that ended the
/// poll for the points not reached.
fn finish(
    run: &DeviceRun,
    results: Vec<Option<PointResult>>,
    answered: bool,
    fault: Option<ReadError>,
) -> Polled {
    let fault_quality = fault
        .as_ref()
        .map(ReadError::quality)
        .unwrap_or(Quality::Timeout);
    let ts = now_ms();
    let readings: Vec<(usize, Reading)> = run.groups[run.current]
        .points
        .iter()
        .map(|&p| {
            let (value, quality, ts) = results[p].clone().unwrap_or((None, fault_quality, ts));
            (p, run.spec.reading(p, value, quality, ts))
        })
        .collect();
    let outcome = match (&fault, answered) {
        (_, true) => Outcome::Answered,
        (Some(fault), false) => fault.outcome(),
        (None, false) => Outcome::Failed,
    };
    Polled {
        readings,
        outcome,
        fault,
    }
}

/// What a Modbus bus task reads from its resolved bus.
struct Bus<'a> {
    stats: &'a BusStats,
    devices: &'a [ResolvedDevice],
}

/// The Modbus way of polling a device: through its read plan, on the bus's link.
struct ModbusPoller<'a, L> {
    wire: Wire<'a, L>,
    bus: Bus<'a>,
}

impl<L: Link> Poller for ModbusPoller<'_, L> {
    async fn poll(&mut self, run: &mut DeviceRun, inbox: &mut Inbox) -> Polled {
        poll_modbus(&self.bus, &mut self.wire, run, inbox).await
    }

    async fn execute(&mut self, command: BusCommand) {
        execute(&self.bus, &mut self.wire, command).await;
    }
}

/// Writes, retrying the faults worth retrying (every write is absolute, so a repeat
/// after a lost answer leaves the same value).
async fn write_with_retries<L: Link>(
    wire: &mut Wire<'_, L>,
    stats: &BusStats,
    dev: &ResolvedDevice,
    op: &WriteOp,
) -> Result<Result<(), ExceptionCode>, ReadError> {
    let mut attempt = 0;
    loop {
        let result = wire.write(stats, dev, op).await;
        match result {
            Err(e) if e.is_retryable() && attempt < dev.retries => attempt += 1,
            result => return result,
        }
    }
}

/// Carries out one write, reads the point back and answers the command.
async fn execute<L: Link>(bus: &Bus<'_>, wire: &mut Wire<'_, L>, command: BusCommand) {
    let BusCommand {
        device,
        point,
        op,
        deadline,
        reply,
    } = command;
    let Some(dev) = bus.devices.get(device) else {
        return;
    };
    let Some(span) = dev.points.get(point).and_then(|p| p.span) else {
        return;
    };
    let written_ms = now_ms();
    if deadline.is_some_and(|d| tokio::time::Instant::now() > d) {
        let _ = reply.send(WriteReport {
            outcome: Err(WriteFailure::Stale),
            written_ms,
            readback: None,
            expected: None,
        });
        return;
    }
    let outcome = match write_with_retries(wire, bus.stats, dev, &op).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(code)) => Err(WriteFailure::Exception {
            code: u8::from(code),
        }),
        Err(e) => Err(WriteFailure::Fault(e)),
    };
    let codec = &dev.points[point].codec;
    let expected = expected_value(&op, codec);
    let readback = if outcome.is_ok() {
        let result =
            read_with_retries(wire, bus.stats, dev, span.kind, span.address, span.width).await;
        let ts = now_ms();
        let (value, quality) = match result {
            Ok(Ok(Words::Registers(regs))) => match codec.decode_registers(&regs) {
                Ok(v) => (Some(v), Quality::Good),
                Err(_) => (None, Quality::Parse),
            },
            Ok(Ok(Words::Bits(bits))) => match bits.first() {
                Some(b) => (Some(codec.decode_bit(*b)), Quality::Good),
                None => (None, Quality::Parse),
            },
            Ok(Err(code)) => (None, Quality::Exception(u8::from(code))),
            Err(e) => (None, e.quality()),
        };
        bus.stats.add_readings(1);
        Some(dev.reading(point, value, quality, ts))
    } else {
        None
    };
    let _ = reply.send(WriteReport {
        outcome,
        written_ms,
        readback,
        expected,
    });
}

/// The value the point reads as after `op`.
fn expected_value(op: &WriteOp, codec: &super::decode::Codec) -> Option<Value> {
    match op {
        WriteOp::Coil { on, .. } | WriteOp::ReadModifyWrite { on, .. } => Some(Value::Bool(*on)),
        WriteOp::Mask { or, .. } => Some(Value::Bool(*or != 0)),
        WriteOp::Register { word, .. } => codec.decode_registers(&[*word]).ok(),
        WriteOp::Registers { words, .. } => codec.decode_registers(words).ok(),
    }
}

/// The loop of a Modbus bus: poll the device due first, forever, until shutdown.
pub(crate) async fn run_modbus<L: Link>(
    bus: &ResolvedBus,
    link: &mut L,
    tx: &Sender<FieldEvent>,
    shutdown: &CancellationToken,
) {
    let delay = Duration::from_millis(bus.config.request_delay_ms.unwrap_or(0));
    let mut poller = ModbusPoller {
        wire: Wire::new(link, delay),
        bus: Bus {
            stats: &bus.stats,
            devices: &bus.devices,
        },
    };
    run_polls(bus, &mut poller, tx, shutdown).await;
}

#[cfg(test)]
mod tests {
    //! Scheduling under paused time. Real Modbus I/O cannot run under a paused clock
    //! (tokio advances the clock whenever the runtime waits on a socket), so these tests
    //! drive the scheduler through an in-process device model; the same behaviour is
    //! checked against the pymodbus slave in real time in `tests/field_modbus.rs`.
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;
    use crate::field::config::FieldConfig;
    use crate::field::decode::RegisterKind;
    use crate::field::reading::DeviceState;

    /// Units that answer after 5 ms with their registers, or never (dead).
    #[derive(Clone, Default)]
    struct Model {
        registers: Arc<Mutex<HashMap<u8, Vec<u16>>>>,
        dead: Arc<Mutex<HashMap<u8, Arc<AtomicBool>>>>,
        requests: Arc<Mutex<Vec<(u8, Instant)>>>,
        /// Units that answer every read with this exception.
        refuse: Arc<Mutex<HashMap<u8, ExceptionCode>>>,
        /// Writes, each with the number of reads before it.
        writes: Arc<Mutex<Vec<(usize, WriteOp)>>>,
    }

    impl Link for Model {
        async fn read(
            &mut self,
            unit: u8,
            _kind: RegisterKind,
            start: u16,
            count: u16,
            timeout: Duration,
        ) -> Result<Result<Words, ExceptionCode>, ReadError> {
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
            if let Some(code) = self.refuse.lock().unwrap().get(&unit) {
                return Ok(Err(*code));
            }
            let regs = self.registers.lock().unwrap()[&unit].clone();
            let range = usize::from(start)..usize::from(start) + usize::from(count);
            Ok(Ok(Words::Registers(regs[range].to_vec())))
        }

        async fn write(
            &mut self,
            unit: u8,
            op: &WriteOp,
            _timeout: Duration,
        ) -> Result<Result<(), ExceptionCode>, ReadError> {
            self.writes
                .lock()
                .unwrap()
                .push((self.requests.lock().unwrap().len(), op.clone()));
            tokio::time::sleep(Duration::from_millis(5)).await;
            if let WriteOp::Register { address, word } = op {
                self.registers.lock().unwrap().get_mut(&unit).unwrap()[usize::from(*address)] =
                    *word;
            }
            Ok(Ok(()))
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

    /// An exception is the device's answer: its points get the exception as quality,
    /// the device stays online, and no request counts as failed.
    #[tokio::test(start_paused = true)]
    async fn an_exception_is_a_reading_quality_not_a_fault() {
        let config: FieldConfig = toml::from_str(
            r#"
            [[bus]]
            name = "rs485"
            kind = "rtu"
            port = "/dev/null"
            [[bus.device]]
            name = "meter"
            unit_id = 3
            retries = 2
            quarantine_after = 1
            [[bus.device.point]]
            name = "x"
            kind = "holding"
            address = 0
            "#,
        )
        .unwrap();
        let bus = crate::field::resolve(&config).unwrap().remove(0);
        let model = Model::default();
        model
            .refuse
            .lock()
            .unwrap()
            .insert(3, ExceptionCode::ServerDeviceFailure);
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let shutdown = CancellationToken::new();
        let task = {
            let (bus, mut link, shutdown) = (bus.clone(), model.clone(), shutdown.clone());
            tokio::spawn(async move { run_modbus(&bus, &mut link, &tx, &shutdown).await })
        };
        let until = Instant::now() + Duration::from_millis(3500);
        let (mut readings, mut states) = (vec![], vec![]);
        while let Ok(Some(event)) = tokio::time::timeout_at(until, rx.recv()).await {
            match event {
                FieldEvent::Reading(r) => readings.push(r),
                FieldEvent::DeviceState { state, .. } => states.push(state),
                FieldEvent::Batch { .. } => {}
            }
        }
        shutdown.cancel();
        task.await.unwrap();
        assert_eq!(states, [DeviceState::Online]);
        assert_eq!(readings.len(), 4, "one poll per second, not retried");
        assert!(readings
            .iter()
            .all(|r| r.quality == Quality::Exception(4) && r.value.is_none()));
        let stats = bus.stats();
        assert_eq!((stats.requests, stats.failed_requests), (4, 0));
    }

    /// A command waits at most for the request on the wire: on a bus busy with a
    /// device of many blocks, it goes out right after the read in progress, not after
    /// the poll, and the point is read back at once.
    #[tokio::test(start_paused = true)]
    async fn a_command_goes_out_before_the_next_request_of_a_poll_in_progress() {
        let mut points = String::new();
        for k in 0..10 {
            points.push_str(&format!(
                "[[bus.device.point]]\nname = \"p{k}\"\nkind = \"holding\"\naddress = {}\n",
                k * 100
            ));
        }
        points.push_str("writable = true\n");
        let config: FieldConfig = toml::from_str(&format!(
            "[[bus]]\nname = \"rs485\"\nkind = \"rtu\"\nport = \"/dev/null\"\n\
             [[bus.device]]\nname = \"plc\"\nunit_id = 1\nmax_gap = 0\npoll_interval_ms = 1\n{points}"
        ))
        .unwrap();
        let bus = crate::field::resolve(&config).unwrap().remove(0);
        let model = Model::default();
        model.registers.lock().unwrap().insert(1, vec![0; 1000]);
        let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
        let shutdown = CancellationToken::new();
        let task = {
            let (bus, mut link, shutdown) = (bus.clone(), model.clone(), shutdown.clone());
            tokio::spawn(async move { run_modbus(&bus, &mut link, &tx, &shutdown).await })
        };
        let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
        // Into the middle of a poll: 10 blocks of 5 ms each, polled back to back.
        tokio::time::sleep(Duration::from_millis(123)).await;
        let planned = bus
            .plan_write("plc", "p9", crate::field::Requested::Int(4242))
            .unwrap()
            .unwrap();
        let (reply, answer) = tokio::sync::oneshot::channel();
        let reads_before = model.requests.lock().unwrap().len();
        let sent = Instant::now();
        bus.commands()
            .submit(BusCommand {
                device: planned.device,
                point: planned.point,
                op: planned.op,
                deadline: None,
                reply,
            })
            .unwrap();
        let report = answer.await.unwrap();
        let took = sent.elapsed();
        assert!(report.outcome.is_ok());
        assert_eq!(report.held(), Some(true));
        let readback = report.readback.unwrap();
        assert_eq!(readback.value, Some(Value::UInt(4242)));
        let writes = model.writes.lock().unwrap().clone();
        assert_eq!(writes.len(), 1);
        // At most the read on the wire went first.
        assert!(
            writes[0].0 <= reads_before + 1,
            "write after read {} (command arrived at read {reads_before})",
            writes[0].0
        );
        // One read in progress (≤ 5 ms), the write (5 ms), the read-back (5 ms).
        assert!(took <= Duration::from_millis(15), "{took:?}");
        shutdown.cancel();
        task.await.unwrap();
        drain.abort();
    }

    /// Readings per point, with the (paused) time each arrived, until `until`.
    async fn arrivals(
        rx: &mut tokio::sync::mpsc::Receiver<FieldEvent>,
        until: Instant,
    ) -> HashMap<String, Vec<Instant>> {
        let mut seen: HashMap<String, Vec<Instant>> = HashMap::new();
        while let Ok(Some(event)) = tokio::time::timeout_at(until, rx.recv()).await {
            if let FieldEvent::Reading(r) = event {
                assert_eq!(r.quality, Quality::Good, "{r:?}");
                seen.entry(format!("{}/{}", r.device, r.point))
                    .or_default()
                    .push(Instant::now());
            }
        }
        seen
    }

    /// Two groups of one meter come at their own rates, on their grids; and on a bus
    /// kept busy beyond its capacity by fast devices, the slow group still comes every
    /// second (earliest due first: a group that waited goes before one just polled).
    #[tokio::test(start_paused = true)]
    async fn two_poll_groups_arrive_at_their_rates_and_a_busy_bus_does_not_starve_the_slow_one() {
        let header = "[[bus]]\nname = \"rs485\"\nkind = \"rtu\"\nport = \"/dev/null\"\n";
        let meter = String::from(
            "[[bus.device]]\nname = \"meter\"\nunit_id = 1\npoll_interval_ms = 100\n\
             poll_groups = { energy = 1000 }\n\
             [[bus.device.point]]\nname = \"power\"\nkind = \"holding\"\naddress = 0\n\
             [[bus.device.point]]\nname = \"energy\"\nkind = \"holding\"\naddress = 50\n\
             poll_group = \"energy\"\n",
        );
        let config: FieldConfig = toml::from_str(&format!("{header}{meter}")).unwrap();
        let model = Model::default();
        for unit in 1..=5 {
            model.registers.lock().unwrap().insert(unit, vec![0; 100]);
        }
        let run = |config: FieldConfig, seconds: u64| {
            let model = model.clone();
            async move {
                let bus = crate::field::resolve(&config).unwrap().remove(0);
                let (tx, mut rx) = tokio::sync::mpsc::channel(4096);
                let shutdown = CancellationToken::new();
                let t0 = Instant::now();
                let task = {
                    let (bus, mut link, shutdown) = (bus.clone(), model.clone(), shutdown.clone());
                    tokio::spawn(async move { run_modbus(&bus, &mut link, &tx, &shutdown).await })
                };
                let seen = arrivals(&mut rx, t0 + Duration::from_secs(seconds)).await;
                shutdown.cancel();
                task.await.unwrap();
                (t0, seen)
            }
        };

        // Alone: 100 ms and 1 s, each on its grid (a poll of one 5 ms request).
        let (t0, seen) = run(config, 10).await;
        assert_eq!(seen["meter/power"].len(), 100, "10 per second for 10 s");
        assert_eq!(seen["meter/energy"].len(), 10, "1 per second for 10 s");
        for (k, at) in seen["meter/energy"].iter().enumerate() {
            let late = at.duration_since(t0 + Duration::from_secs(k as u64));
            assert!(
                late <= Duration::from_millis(10),
                "energy {k}: {late:?} late"
            );
        }
        for (k, at) in seen["meter/power"].iter().enumerate() {
            let late = at.duration_since(t0 + Duration::from_millis(100 * k as u64));
            assert!(
                late <= Duration::from_millis(10),
                "power {k}: {late:?} late"
            );
        }

        // Busy: four more devices every 10 ms, 5 ms per poll each: twice what the bus
        // carries. The fast groups skip ticks; the slow group still comes every second,
        // though the busy devices are listed first (and so win every tie).
        let mut text = header.to_string();
        for unit in 2..=5 {
            text += &format!(
                "[[bus.device]]\nname = \"busy{unit}\"\nunit_id = {unit}\npoll_interval_ms = 10\n\
                 [[bus.device.point]]\nname = \"v\"\nkind = \"holding\"\naddress = 0\n"
            );
        }
        text += &meter;
        let config: FieldConfig = toml::from_str(&text).unwrap();
        let (t0, seen) = run(config, 10).await;
        let energy = &seen["meter/energy"];
        assert_eq!(energy.len(), 10, "the slow group is not starved");
        for (k, at) in energy.iter().enumerate() {
            let late = at.duration_since(t0 + Duration::from_secs(k as u64));
            // At most one poll of each other group goes first.
            assert!(
                late <= Duration::from_millis(30),
                "energy {k}: {late:?} late"
            );
        }
        assert!(
            (90..=100).contains(&seen["meter/power"].len()),
            "the 100 ms group keeps its rate: {}",
            seen["meter/power"].len()
        );
        // The bus is kept busy: about one request every 5 ms.
        let total: usize = seen.values().map(Vec::len).sum();
        assert!(total >= 1900, "{total} polls in 10 s at 5 ms each");
    }

    /// `request_delay_ms`: a device that needs a pause gets it between its requests
    /// (retries and polls included), while the bus serves another device meanwhile only
    /// after the bus's own pause.
    #[tokio::test(start_paused = true)]
    async fn request_delay_paces_requests_to_a_device_and_across_the_bus() {
        let config: FieldConfig = toml::from_str(
            "[[bus]]\nname = \"gw\"\nkind = \"tcp\"\nhost = \"127.0.0.1\"\nrequest_delay_ms = 10\n\
             [[bus.device]]\nname = \"slow\"\nunit_id = 1\nmax_gap = 0\npoll_interval_ms = 1\n\
             request_delay_ms = 50\n\
             [[bus.device.point]]\nname = \"a\"\nkind = \"holding\"\naddress = 0\n\
             [[bus.device.point]]\nname = \"b\"\nkind = \"holding\"\naddress = 20\n\
             [[bus.device.point]]\nname = \"c\"\nkind = \"holding\"\naddress = 40\n\
             [[bus.device]]\nname = \"quick\"\nunit_id = 2\npoll_interval_ms = 1\n\
             [[bus.device.point]]\nname = \"v\"\nkind = \"holding\"\naddress = 0\n",
        )
        .unwrap();
        assert_eq!(config.validate(), vec![]);
        let bus = crate::field::resolve(&config).unwrap().remove(0);
        let model = Model::default();
        model.registers.lock().unwrap().insert(1, vec![0; 50]);
        model.registers.lock().unwrap().insert(2, vec![0; 50]);
        let (tx, mut rx) = tokio::sync::mpsc::channel(4096);
        let shutdown = CancellationToken::new();
        let task = {
            let (bus, mut link, shutdown) = (bus.clone(), model.clone(), shutdown.clone());
            tokio::spawn(async move { run_modbus(&bus, &mut link, &tx, &shutdown).await })
        };
        let seen = arrivals(&mut rx, Instant::now() + Duration::from_secs(2)).await;
        shutdown.cancel();
        task.await.unwrap();
        assert!(seen.contains_key("slow/c") && seen.contains_key("quick/v"));
        let requests = model.requests.lock().unwrap().clone();
        assert!(requests.len() > 20, "{}", requests.len());
        let answer = Duration::from_millis(5);
        for pair in requests.windows(2) {
            let pause = pair[1].1.duration_since(pair[0].1) - answer;
            assert!(pause >= Duration::from_millis(10), "bus pause {pause:?}");
        }
        let slow: Vec<Instant> = requests
            .iter()
            .filter(|(u, _)| *u == 1)
            .map(|r| r.1)
            .collect();
        for pair in slow.windows(2) {
            let pause = pair[1].duration_since(pair[0]) - answer;
            assert!(pause >= Duration::from_millis(50), "device pause {pause:?}");
        }
        // The pauses of the slow device are not lost: the quick one is polled in them
        // only between polls (a poll is not interleaved), so both are served.
        assert!(requests.iter().filter(|(u, _)| *u == 2).count() >= 10);
    }

    /// A dead device with two poll groups costs one poll per backoff, not one per
    /// group: quarantined, all its groups wait; back, each group resumes its rate.
    #[tokio::test(start_paused = true)]
    async fn a_quarantined_device_with_two_groups_is_tried_once_per_backoff() {
        let config: FieldConfig = toml::from_str(
            "[[bus]]\nname = \"rs485\"\nkind = \"rtu\"\nport = \"/dev/null\"\n\
             [[bus.device]]\nname = \"meter\"\nunit_id = 1\ntimeout_ms = 100\nretries = 0\n\
             quarantine_after = 2\nbackoff_max_ms = 4000\npoll_groups = { slow = 3000 }\n\
             [[bus.device.point]]\nname = \"fast\"\nkind = \"holding\"\naddress = 0\n\
             [[bus.device.point]]\nname = \"slow\"\nkind = \"holding\"\naddress = 50\n\
             poll_group = \"slow\"\n",
        )
        .unwrap();
        let bus = crate::field::resolve(&config).unwrap().remove(0);
        let model = Model::default();
        model.registers.lock().unwrap().insert(1, vec![0; 60]);
        let dead = Arc::new(AtomicBool::new(true));
        model.dead.lock().unwrap().insert(1, Arc::clone(&dead));
        let (tx, mut rx) = tokio::sync::mpsc::channel(4096);
        let shutdown = CancellationToken::new();
        let task = {
            let (bus, mut link, shutdown) = (bus.clone(), model.clone(), shutdown.clone());
            tokio::spawn(async move { run_modbus(&bus, &mut link, &tx, &shutdown).await })
        };
        let drain = tokio::spawn(async move {
            let mut good = Vec::new();
            while let Some(event) = rx.recv().await {
                if let FieldEvent::Reading(r) = event {
                    if r.quality == Quality::Good {
                        good.push(r.point);
                    }
                }
            }
            good
        });
        tokio::time::sleep(Duration::from_secs(30)).await;
        // Two failed polls (both groups at 0 s), then one try after 2 s and one every
        // 4 s (the cap): about 9 requests in 30 s, not one per group each time.
        let dead_requests = model.requests.lock().unwrap().len();
        assert!(
            (7..=10).contains(&dead_requests),
            "{dead_requests} requests to a dead device in 30 s"
        );
        dead.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(4) + Duration::from_secs(30)).await;
        shutdown.cancel();
        task.await.unwrap();
        let good = drain.await.unwrap();
        let fast = good.iter().filter(|p| *p == "fast").count();
        let slow = good.iter().filter(|p| *p == "slow").count();
        // Back within one backoff (≤ 4 s): 30 to 34 s on the grids of 1 s and 3 s.
        assert!((30..=35).contains(&fast), "fast {fast} in 30-34 s back");
        assert!((10..=12).contains(&slow), "slow {slow} in 30-34 s back");
    }
}
