//! fieldbridge's Modbus side against an independent slave (pymodbus): over TCP, and over
//! RTU through a socat pty pair so the real tokio-serial path runs.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::slave::{PtyPair, Request, Slave};
use fieldbridge::field::{
    self, DeviceState, FieldConfig, FieldEvent, ProbeTarget, ProbeTransport, Quality, Reading,
    RegisterKind, Value,
};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

struct Running {
    rx: mpsc::Receiver<FieldEvent>,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    fn start(toml_text: &str) -> Running {
        let config: FieldConfig = toml::from_str(toml_text).expect("test config parses");
        assert_eq!(config.validate(), vec![]);
        let (tx, rx) = mpsc::channel(256);
        let shutdown = CancellationToken::new();
        let tasks = field::spawn_buses(&config, tx, shutdown.clone()).expect("valid config");
        Running {
            rx,
            shutdown,
            tasks,
        }
    }

    /// The next event matching `pred`, or a panic naming `what` after the deadline.
    async fn next<T>(&mut self, what: &str, mut pred: impl FnMut(&FieldEvent) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(event)) => {
                    if let Some(t) = pred(&event) {
                        return t;
                    }
                }
                Ok(None) => panic!("event channel closed while waiting for {what}"),
                Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
            }
        }
    }

    async fn reading(&mut self, device: &str, point: &str, quality: Quality) -> Reading {
        self.next(
            &format!("{device}/{point} with quality {quality}"),
            |e| match e {
                FieldEvent::Reading(r)
                    if r.device == device && r.point == point && r.quality == quality =>
                {
                    Some(r.clone())
                }
                _ => None,
            },
        )
        .await
    }

    async fn state(&mut self, device: &str, state: DeviceState) {
        self.next(&format!("{device} {state}"), |e| match e {
            FieldEvent::DeviceState {
                device: d,
                state: s,
            } if d == device && *s == state => Some(()),
            _ => None,
        })
        .await
    }

    /// The first good value of each named point of `device`.
    async fn values(&mut self, device: &str, points: &[&str]) -> Vec<Value> {
        let mut found: Vec<Option<Value>> = vec![None; points.len()];
        while found.iter().any(Option::is_none) {
            let r = self
                .next(&format!("good readings of {device}"), |e| match e {
                    FieldEvent::Reading(r) if r.device == device => Some(r.clone()),
                    _ => None,
                })
                .await;
            assert_eq!(r.quality, Quality::Good, "{r:?}");
            if let Some(i) = points.iter().position(|p| *p == r.point) {
                found[i] = r.value;
            }
        }
        found.into_iter().map(|v| v.expect("filled")).collect()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            tokio::time::timeout(WAIT, t)
                .await
                .expect("bus task stops")
                .expect("no panic");
        }
    }
}

fn point(name: &str, kind: &str, address: u16, extra: &str) -> String {
    format!("[[bus.device.point]]\nname = \"{name}\"\nkind = \"{kind}\"\naddress = {address}\n{extra}\n")
}

/// Known images, written by hand from the IEEE 754 / two's complement bytes.
fn types_image() -> serde_json::Value {
    json!({"units": {"1": {
        "holding": {"0": [
            0x42F6, 0xE979,  0xF642, 0x79E9,  0xE979, 0x42F6,  0x79E9, 0xF642,  // f32 123.456 ×4 orders
            0xBEEF, 0xFB2E,                                                    // u16, i16 -1234
            0x5E00, 0xB2D0,                                                    // u32 3e9 CDAB
            0xEB32, 0xA4F8,                                                    // i32 -123456789 DCBA
            0x0201, 0x0403, 0x0605, 0x0807,                                    // u64 BADC
            0xFFFF, 0xF704, 0x7026, 0x7D75,                                    // i64 ABCD
            0x2D18, 0x5444, 0x21FB, 0x4009,                                    // f64 pi CDAB
            0x5344, 0x4D36, 0x3330, 0x0000,                                    // "SDM630"
            0b1000_0000_0000_0101, 2301,                                       // bits; u16 × 0.1
            0x0102, 0x0304, 0x0506, 0x0708,  0x0201, 0x0403, 0x0605, 0x0807,   // u64 ABCD, BADC
            0x0708, 0x0506, 0x0304, 0x0102,  0x0807, 0x0605, 0x0403, 0x0201,   // u64 CDAB, DCBA
        ]},
        "input": {"0": [0x42F6, 0xE979]},
        "coil": {"0": [1, 0, 1]},
        "discrete": {"0": [0, 1]},
    }}})
}

fn types_points() -> String {
    let mut s = String::new();
    for (i, order) in ["ABCD", "BADC", "CDAB", "DCBA"].iter().enumerate() {
        s += &point(
            &format!("f32_{order}"),
            "holding",
            i as u16 * 2,
            &format!("type = \"f32\"\norder = \"{order}\""),
        );
        s += &point(
            &format!("u64_{order}"),
            "holding",
            32 + i as u16 * 4,
            &format!("type = \"u64\"\norder = \"{order}\""),
        );
    }
    s += &point("u16", "holding", 8, "type = \"u16\"");
    s += &point("i16", "holding", 9, "type = \"i16\"");
    s += &point("u32", "holding", 10, "type = \"u32\"\norder = \"CDAB\"");
    s += &point("i32", "holding", 12, "type = \"i32\"\norder = \"DCBA\"");
    s += &point("u64", "holding", 14, "type = \"u64\"\norder = \"BADC\"");
    s += &point("i64", "holding", 18, "type = \"i64\"");
    s += &point("f64", "holding", 22, "type = \"f64\"\norder = \"CDAB\"");
    s += &point("name", "holding", 26, "type = \"string\"\nregisters = 4");
    s += &point("bit0", "holding", 30, "type = \"bit\"\nbit = 0");
    s += &point("bit1", "holding", 30, "type = \"bit\"\nbit = 1");
    s += &point("bit15", "holding", 30, "type = \"bit\"\nbit = 15");
    s += &point("voltage", "holding", 31, "scale = 0.1\nunit = \"V\"");
    s += &point("in_f32", "input", 0, "type = \"f32\"");
    s += &point("coil0", "coil", 0, "");
    s += &point("coil1", "coil", 1, "");
    s += &point("coil2", "coil", 2, "");
    s += &point("di1", "discrete", 1, "");
    s
}

const TYPE_NAMES: [&str; 25] = [
    "f32_ABCD", "f32_BADC", "f32_CDAB", "f32_DCBA", "u64_ABCD", "u64_BADC", "u64_CDAB", "u64_DCBA",
    "u16", "i16", "u32", "i32", "u64", "i64", "f64", "name", "bit0", "bit1", "bit15", "voltage",
    "in_f32", "coil0", "coil1", "coil2", "di1",
];

fn type_values() -> Vec<Value> {
    let u64v = Value::UInt(0x0102_0304_0506_0708);
    vec![
        Value::Float(123.456),
        Value::Float(123.456),
        Value::Float(123.456),
        Value::Float(123.456),
        u64v.clone(),
        u64v.clone(),
        u64v.clone(),
        u64v.clone(),
        Value::UInt(0xBEEF),
        Value::Int(-1234),
        Value::UInt(3_000_000_000),
        Value::Int(-123_456_789),
        u64v,
        Value::Int(-9_876_543_210_123),
        Value::Float(std::f64::consts::PI),
        Value::Text("SDM630".into()),
        Value::Bool(true),
        Value::Bool(false),
        Value::Bool(true),
        Value::Float(230.1),
        Value::Float(123.456),
        Value::Bool(true),
        Value::Bool(false),
        Value::Bool(true),
        Value::Bool(true),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_and_byte_order_over_tcp_in_the_fewest_requests() {
    let slave = Slave::tcp(&types_image());
    let config = format!(
        "[[bus]]\nname = \"plc\"\nkind = \"tcp\"\nhost = \"127.0.0.1\"\nport = {}\n\
         [[bus.device]]\nname = \"m\"\nunit_id = 1\npoll_interval_ms = 60000\n{}",
        slave.port(),
        types_points()
    );
    let mut run = Running::start(&config);
    let values = run.values("m", &TYPE_NAMES).await;
    for ((name, got), want) in TYPE_NAMES.iter().zip(&values).zip(type_values()) {
        assert_eq!(got, &want, "{name}");
    }
    // 48 holding registers in one request, and one each for input, coil and discrete.
    let requests = slave.requests();
    let req = |function, address, count| Request {
        unit: 1,
        function,
        address,
        count,
    };
    assert_eq!(
        requests,
        vec![req(1, 0, 3), req(2, 1, 1), req(4, 0, 2), req(3, 0, 48)]
    );
    let plans = field::describe_plans(&toml::from_str(&config).unwrap());
    assert!(plans.contains("4 requests per poll"), "{plans}");
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exceptions_become_qualities_and_refused_blocks_are_split_once() {
    // Registers 5 and 6 do not exist: a request spanning them gets exception 02.
    // Register 20 answers exception 04 (server device failure).
    let slave = Slave::tcp(&json!({"units": {"2": {
        "holding": {"0": [10, 11, 12, 13, 14], "7": [17, 18, 19], "20": [0]},
        "exceptions": [{"kind": "holding", "start": 20, "end": 20, "code": 4}],
    }}}));
    let config = format!(
        "[[bus]]\nname = \"plc\"\nkind = \"tcp\"\nhost = \"127.0.0.1\"\nport = {}\n\
         [[bus.device]]\nname = \"m\"\nunit_id = 2\npoll_interval_ms = 150\n{}{}{}{}",
        slave.port(),
        point("a", "holding", 0, ""),
        point("b", "holding", 4, ""),
        point("c", "holding", 8, ""),
        point("d", "holding", 20, ""),
    );
    let mut run = Running::start(&config);
    let d = run.reading("m", "d", Quality::Exception(4)).await;
    assert_eq!(
        (&d.value, d.quality.to_string()),
        (&None, "exception:04".to_string())
    );
    assert_eq!(
        d.payload_json().split(",\"ts\"").next(),
        Some(r#"{"value":null,"unit":null"#)
    );
    assert_eq!(
        run.values("m", &["a", "b", "c"]).await,
        vec![Value::UInt(10), Value::UInt(14), Value::UInt(18)]
    );
    // Wait for the second poll to finish, then compare what the slave saw.
    run.reading("m", "d", Quality::Exception(4)).await;
    let seen: Vec<(u16, u16)> = slave
        .requests()
        .iter()
        .take(10)
        .map(|r| (r.address, r.count))
        .collect();
    assert_eq!(
        seen,
        vec![
            // First poll: 0..=8 refused, split into 0 and 4..=8; 4..=8 refused, split again.
            (0, 9),
            (0, 1),
            (4, 5),
            (4, 1),
            (8, 1),
            (20, 1),
            // Second poll: the splits are remembered.
            (0, 1),
            (4, 1),
            (8, 1),
            (20, 1),
        ]
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_unit_is_quarantined_and_a_dropped_connection_comes_back() {
    // Unit 1 has a counter that increments on every read; unit 9 never answers.
    let image = json!({"units": {"1": {"counter": [{"kind": "holding", "address": 0}]}}});
    let mut slave = Slave::tcp(&image);
    let port = slave.port();
    let config = format!(
        "[[bus]]\nname = \"plc\"\nkind = \"tcp\"\nhost = \"127.0.0.1\"\nport = {port}\n\
         [[bus.device]]\nname = \"live\"\nunit_id = 1\npoll_interval_ms = 50\n{}\
         [[bus.device]]\nname = \"dead\"\nunit_id = 9\npoll_interval_ms = 50\ntimeout_ms = 100\nretries = 0\n\
         quarantine_after = 2\nbackoff_max_ms = 400\n{}",
        point("count", "holding", 0, ""),
        point("x", "holding", 0, ""),
    );
    let mut run = Running::start(&config);
    let mut last = 0;
    let mut dead_states = Vec::new();
    // Until the dead unit is quarantined: every dead reading is a timeout without a
    // value, and every live reading is a fresh counter value (never a repeat).
    while dead_states.last() != Some(&DeviceState::Quarantined) {
        let event = run.next("events", |e| Some(e.clone())).await;
        match event {
            FieldEvent::Reading(r) if r.device == "live" => {
                let Some(Value::UInt(n)) = r.value else {
                    panic!("{r:?}")
                };
                assert!(n > last, "counter {n} after {last}: a stale value");
                last = n;
            }
            FieldEvent::Reading(r) => assert_eq!((r.quality, r.value), (Quality::Timeout, None)),
            FieldEvent::DeviceState { device, state } if device == "dead" => {
                dead_states.push(state)
            }
            _ => {}
        }
    }
    assert_eq!(
        dead_states,
        vec![DeviceState::Offline, DeviceState::Quarantined]
    );
    let before = last;
    for _ in 0..5 {
        let r = run.reading("live", "count", Quality::Good).await;
        last = match r.value {
            Some(Value::UInt(n)) => n,
            other => panic!("{other:?}"),
        };
    }
    assert!(last >= before + 5, "the live unit keeps being polled");

    slave.kill();
    let r = run.reading("live", "count", Quality::Disconnected).await;
    assert_eq!(r.value, None);
    run.state("live", DeviceState::Offline).await;
    let _slave = Slave::tcp_on(port, &image);
    run.reading("live", "count", Quality::Good).await;
    run.state("live", DeviceState::Online).await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_finds_the_byte_order_of_an_expected_value() {
    let slave = Slave::tcp(&types_image());
    let target = ProbeTarget {
        transport: ProbeTransport::Tcp {
            host: "127.0.0.1".into(),
            port: slave.port(),
            framing: Default::default(),
        },
        unit_id: 1,
        kind: RegisterKind::Holding,
        address: 3,
        count: 4,
        timeout: Duration::from_secs(2),
        expect: Some(123.456),
        choose: None,
    };
    let report = field::probe(&target).await.expect("probe reads");
    assert!(
        report.contains("closest to 123.456: f32 CDAB at 4"),
        "{report}"
    );
    assert!(
        report.contains("address = 4  # 0-based protocol address (40005 in 1-based notation)"),
        "{report}"
    );
    // A range with a hole: the exception is explained in the same convention.
    let err = field::probe(&ProbeTarget {
        address: 60,
        ..target
    })
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("exception 0x02") && err.contains("0-based"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtu_over_a_pty_and_a_serial_port_that_vanishes_and_returns() {
    let mut pty = PtyPair::new();
    let image = json!({"units": {"3": {
        "holding": {"0": [0x42F6, 0xE979, 0xF642, 0x79E9, 0xE979, 0x42F6, 0x79E9, 0xF642]},
        "counter": [{"kind": "input", "address": 0}],
    }}});
    let mut device = Slave::rtu(&pty.slave_end(), &image);
    let mut points = String::new();
    for (i, order) in ["ABCD", "BADC", "CDAB", "DCBA"].iter().enumerate() {
        points += &point(
            order,
            "holding",
            i as u16 * 2,
            &format!("type = \"f32\"\norder = \"{order}\""),
        );
    }
    points += &point("count", "input", 0, "");
    let config = format!(
        "[[bus]]\nname = \"rs485\"\nkind = \"rtu\"\nport = \"{}\"\nbaud = 19200\nparity = \"none\"\n\
         [[bus.device]]\nname = \"meter\"\nunit_id = 3\npoll_interval_ms = 100\ntimeout_ms = 300\n{points}",
        pty.master_end().display()
    );
    let mut run = Running::start(&config);
    assert_eq!(
        run.values("meter", &["ABCD", "BADC", "CDAB", "DCBA"]).await,
        vec![Value::Float(123.456); 4]
    );
    run.reading("meter", "count", Quality::Good).await;

    // Unplug: the port vanishes; readings turn bad without values.
    device.kill();
    pty.kill();
    let r = run
        .next("a bad reading after unplugging", |e| match e {
            FieldEvent::Reading(r) if r.point == "count" && !r.quality.is_good() => Some(r.clone()),
            _ => None,
        })
        .await;
    assert_eq!(r.value, None);
    run.reading("meter", "count", Quality::Disconnected).await;

    // Plug back in: the same path returns, fieldbridge reopens it by itself.
    pty.restart();
    let _device = Slave::rtu(&pty.slave_end(), &image);
    let r = run.reading("meter", "count", Quality::Good).await;
    assert!(matches!(r.value, Some(Value::UInt(_))));
    run.state("meter", DeviceState::Online).await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtu_frames_over_tcp_for_serial_device_servers() {
    let slave = Slave::rtu_over_tcp(&types_image());
    let config = format!(
        "[[bus]]\nname = \"gw\"\nkind = \"tcp\"\nframing = \"rtu\"\nhost = \"127.0.0.1\"\nport = {}\n\
         [[bus.device]]\nname = \"m\"\nunit_id = 1\n{}{}",
        slave.port(),
        point("f", "holding", 4, "type = \"f32\"\norder = \"CDAB\""),
        point("i", "holding", 12, "type = \"i32\"\norder = \"DCBA\""),
    );
    let mut run = Running::start(&config);
    assert_eq!(
        run.values("m", &["f", "i"]).await,
        vec![Value::Float(123.456), Value::Int(-123_456_789)]
    );
    run.stop().await;
}

/// CRC-16/MODBUS, written out here so the test does not trust the code under test.
fn crc16(bytes: &[u8]) -> [u8; 2] {
    let mut crc: u16 = 0xFFFF;
    for b in bytes {
        crc ^= u16::from(*b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc.to_le_bytes()
}

/// A device with a noisy line answers with a broken CRC: quality `crc`, never the
/// corrupted number. No real Modbus stack sends bad CRCs on purpose, so the test plays
/// the device on the far end of the pty itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_answer_on_the_serial_line_is_quality_crc() {
    use std::io::{Read, Write};
    let pty = PtyPair::new();
    let config = format!(
        "[[bus]]\nname = \"rs485\"\nkind = \"rtu\"\nport = \"{}\"\nbaud = 19200\n\
         [[bus.device]]\nname = \"m\"\nunit_id = 5\npoll_interval_ms = 50\ntimeout_ms = 200\nretries = 0\n{}",
        pty.master_end().display(),
        point("v", "holding", 0, ""),
    );
    let mut end = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(pty.slave_end())
        .unwrap();
    let corrupt = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flag = Arc::clone(&corrupt);
    std::thread::spawn(move || {
        let mut request = [0u8; 8];
        while end.read_exact(&mut request).is_ok() {
            let mut answer = vec![5, 0x03, 0x02, 0x00, 0x2A];
            let mut crc = crc16(&answer);
            if flag.load(std::sync::atomic::Ordering::SeqCst) {
                crc[0] ^= 0xFF;
            }
            answer.extend_from_slice(&crc);
            if end.write_all(&answer).is_err() {
                return;
            }
        }
    });
    let mut run = Running::start(&config);
    let r = run.reading("m", "v", Quality::Crc).await;
    assert_eq!(r.value, None);
    corrupt.store(false, std::sync::atomic::Ordering::SeqCst);
    let r = run.reading("m", "v", Quality::Good).await;
    assert_eq!(r.value, Some(Value::UInt(42)));
    run.stop().await;
}

/// Requests on a serial bus never overlap and keep the inter-frame silence: the fake
/// device timestamps the end of each answer and the arrival of the next request. (A
/// lower bound only, so a slow machine cannot make it fail.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serial_bus_keeps_the_inter_frame_silence_between_devices() {
    use std::io::{Read, Write};
    use std::time::Instant;
    let pty = PtyPair::new();
    let mut config = format!(
        "[[bus]]\nname = \"rs485\"\nkind = \"rtu\"\nport = \"{}\"\nbaud = 19200\ninter_frame_ms = 20\n",
        pty.master_end().display()
    );
    for unit in [5, 6] {
        config += &format!(
            "[[bus.device]]\nname = \"m{unit}\"\nunit_id = {unit}\npoll_interval_ms = 10\n"
        );
        config += &point("v", "holding", 0, "");
    }
    let mut end = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(pty.slave_end())
        .unwrap();
    let gaps = Arc::new(std::sync::Mutex::new(Vec::<(u8, Duration)>::new()));
    let seen = Arc::clone(&gaps);
    std::thread::spawn(move || {
        let mut request = [0u8; 8];
        let mut answered_at: Option<Instant> = None;
        while end.read_exact(&mut request[..1]).is_ok() {
            let arrived = Instant::now();
            if end.read_exact(&mut request[1..]).is_err() {
                return;
            }
            if let Some(at) = answered_at {
                seen.lock().unwrap().push((request[0], arrived - at));
            }
            let mut answer = vec![request[0], 0x03, 0x02, 0x00, request[0]];
            answer.extend_from_slice(&crc16(&answer));
            // Stamped before the write: the agent cannot have the answer earlier, so
            // its silence is never over-counted. Stamped after it, a descheduled test
            // thread made a gap look shorter than it was (seen on a busy machine:
            // "only 16.557122ms after the last answer").
            let answering = Instant::now();
            if end.write_all(&answer).and_then(|()| end.flush()).is_err() {
                return;
            }
            answered_at = Some(answering);
        }
    });
    let mut run = Running::start(&config);
    while gaps.lock().unwrap().len() < 12 {
        run.reading("m6", "v", Quality::Good).await;
    }
    let gaps = gaps.lock().unwrap().clone();
    assert!(
        gaps.iter().any(|g| g.0 == 5) && gaps.iter().any(|g| g.0 == 6),
        "{gaps:?}"
    );
    for (unit, gap) in gaps {
        assert!(
            gap >= Duration::from_millis(20),
            "request to unit {unit} only {gap:?} after the last answer"
        );
    }
    run.stop().await;
}

/// A TCP "device" that accepts every connection, reads a request, answers `answer` and
/// closes: a fault pymodbus cannot be made to produce. Records when each connection
/// came. Real sockets on loopback.
fn garbage_device(answer: &'static [u8]) -> (u16, Arc<std::sync::Mutex<Vec<std::time::Instant>>>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let accepted = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&accepted);
    std::thread::spawn(move || {
        for mut socket in listener.incoming().flatten() {
            seen.lock().expect("lock").push(std::time::Instant::now());
            let mut request = [0u8; 12];
            if socket.read_exact(&mut request).is_ok() {
                let _ = socket.write_all(answer);
            }
        }
    });
    (port, accepted)
}

/// Regression: a TCP device that accepts connections and answers garbage was
/// reconnected on every poll with a WARN/INFO pair and never backed off (its failures
/// counted as "bus down", which never quarantines).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_device_that_answers_garbage_is_quarantined_with_backoff() {
    let (port, accepted) = garbage_device(b"\xde\xad\xbe");
    let config = format!(
        "[[bus]]\nname = \"plc\"\nkind = \"tcp\"\nhost = \"127.0.0.1\"\nport = {port}\n\
         [[bus.device]]\nname = \"junk\"\nunit_id = 1\npoll_interval_ms = 100\nretries = 0\n\
         quarantine_after = 2\nbackoff_max_ms = 800\n{}",
        point("x", "holding", 0, ""),
    );
    let mut run = Running::start(&config);
    let r = run.reading("junk", "x", Quality::Protocol).await;
    assert_eq!(r.value, None);
    run.state("junk", DeviceState::Quarantined).await;
    let at_quarantine = accepted.lock().expect("lock").len();
    let times = common::util::wait_for_async("three connections in quarantine", WAIT, || {
        let times = accepted.lock().expect("lock").clone();
        std::future::ready((times.len() >= at_quarantine + 3).then_some(times))
    })
    .await;
    // In quarantine the polls wait 2 × the interval and more, never one interval.
    for pair in times[at_quarantine - 1..].windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(190),
            "reconnected after {gap:?}"
        );
    }
    run.stop().await;
}

/// Two poll groups of one meter against the independent slave, in real time: power at
/// the device's 200 ms, the energy counter in a 1 s group. Both arrive at their rates,
/// and the slave saw the counter's register read only at its group's rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_poll_groups_arrive_at_their_rates_from_the_slave() {
    let slave = Slave::tcp(&json!({"units": {"1": {"holding": {"0": vec![7; 60]}}}}));
    let config = format!(
        "[[bus]]\nname = \"plc\"\nkind = \"tcp\"\nhost = \"127.0.0.1\"\nport = {}\n\
         [[bus.device]]\nname = \"meter\"\nunit_id = 1\npoll_interval_ms = 200\n\
         poll_groups = {{ energy = 1000 }}\n{}{}",
        slave.port(),
        point("power", "holding", 0, ""),
        point("energy", "holding", 50, "poll_group = \"energy\""),
    );
    let mut run = Running::start(&config);
    let (mut power, mut energy) = (0, 0);
    // From the first energy reading to the fourth: three seconds of polling.
    while energy < 4 {
        let r = run
            .next("readings of meter", |e| match e {
                FieldEvent::Reading(r) if r.device == "meter" => Some(r.clone()),
                _ => None,
            })
            .await;
        assert_eq!(r.quality, Quality::Good, "{r:?}");
        match r.point.as_str() {
            "energy" => energy += 1,
            _ if energy > 0 => power += 1,
            _ => {}
        }
    }
    // 3 s at 200 ms is 15 polls; the grid never polls faster, a busy machine may skip.
    assert!((10..=16).contains(&power), "{power} power readings in 3 s");
    run.stop().await;
    let requests = slave.requests();
    let fast = requests.iter().filter(|r| r.address == 0).count();
    let slow = requests.iter().filter(|r| r.address == 50).count();
    assert!(
        (4..=5).contains(&slow) && fast >= 3 * slow,
        "{fast} reads of power, {slow} of energy: {requests:?}"
    );
    assert!(
        requests.iter().all(|r| r.count == 1),
        "groups never share a request"
    );
}

/// The bus-load estimate of `check-config` beside measured RTU runs: over a bare pty
/// (which carries bytes at once, so it measures what the estimate leaves out: the
/// device's response and the agent's turnaround) and over a line paced at 9600 baud
/// (`tests/fixtures/paced_line.py` between two ptys). Not in the default suite:
/// `cargo test --test field_modbus -- --ignored --nocapture bus_load`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn bus_load_estimate_beside_a_measured_rtu_run() {
    for paced in [None, Some(9600u32)] {
        let agent_side = PtyPair::new();
        let device_side = PtyPair::new();
        let _pacer = paced.map(|baud| {
            let mut child = std::process::Command::new("python3")
                .arg(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/tests/fixtures/paced_line.py"
                ))
                .arg("--a")
                .arg(agent_side.slave_end())
                .arg("--b")
                .arg(device_side.master_end())
                .args(["--baud", &baud.to_string(), "--bits", "10"])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("python3 runs the line pacer");
            let mut ready = String::new();
            std::io::BufRead::read_line(
                &mut std::io::BufReader::new(child.stdout.take().expect("piped")),
                &mut ready,
            )
            .expect("the pacer starts");
            assert_eq!(ready.trim(), "ready");
            KillOnDrop(child)
        });
        let (agent_end, device_end) = match paced {
            Some(_) => (agent_side.master_end(), device_side.slave_end()),
            None => (agent_side.master_end(), agent_side.slave_end()),
        };
        let _slave = Slave::rtu(
            &device_end,
            &json!({"units": {"1": {"holding": {"0": vec![1; 125]}}}}),
        );
        let config = format!(
            "[[bus]]\nname = \"rs485\"\nkind = \"rtu\"\nport = \"{}\"\nbaud = {}\nparity = \"none\"\n\
             [[bus.device]]\nname = \"m\"\nunit_id = 1\npoll_interval_ms = 1000\n{}",
            agent_end.display(),
            paced.unwrap_or(19_200),
            point("block", "holding", 0, "type = \"string\"\nregisters = 125"),
        );
        let parsed: FieldConfig = toml::from_str(&config).unwrap();
        println!("{}", field::describe_plans(&parsed));
        let fast: FieldConfig = toml::from_str(&config.replace("= 1000", "= 1")).unwrap();
        let bus = field::resolve(&fast).unwrap().remove(0);
        let (tx, mut rx) = mpsc::channel(1024);
        let shutdown = CancellationToken::new();
        let task = field::spawn_bus(&bus, tx, shutdown.clone());
        // Warm up (open the port, first answer), then measure.
        loop {
            if let Some(FieldEvent::Reading(r)) = rx.recv().await {
                assert_eq!(r.quality, Quality::Good);
                break;
            }
        }
        let (start, at) = (bus.stats().requests, std::time::Instant::now());
        let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
        tokio::time::sleep(Duration::from_secs(10)).await;
        let (n, took) = (bus.stats().requests - start, at.elapsed());
        shutdown.cancel();
        task.await.unwrap();
        drain.abort();
        println!(
            "measured ({}): {n} requests of 125 registers in {took:.2?}: {:.2} requests/s, \
             {:.1} ms each\n",
            match paced {
                Some(baud) => format!("line paced at {baud} baud"),
                None => "bare pty".to_string(),
            },
            n as f64 / took.as_secs_f64(),
            took.as_secs_f64() * 1000.0 / n as f64
        );
    }
}

/// A child process killed when the test ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
