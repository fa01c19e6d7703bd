//! Writes through a running bus task into an independent Modbus slave (pymodbus), checked
//! with an independent client that reads the slave's registers (pymodbus as well, not
//! fieldbridge's reading of them).

mod common;

use std::time::Duration;

use common::slave::Slave;
use fieldbridge::field::{
    self, BusCommand, FieldConfig, FieldEvent, Refusal, Requested, ResolvedBus, Value,
    WriteFailure, WriteReport,
};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

const TYPES: [(&str, u16); 8] = [
    ("u16", 1),
    ("i16", 1),
    ("u32", 2),
    ("i32", 2),
    ("u64", 4),
    ("i64", 4),
    ("f32", 2),
    ("f64", 4),
];
const ORDERS: [&str; 4] = ["ABCD", "BADC", "CDAB", "DCBA"];

/// The value written to each type, and its big-endian bytes (as the type's own
/// `to_be_bytes` gives them: the reference the byte orders are defined against).
fn sample(t: &str) -> (Requested, Vec<u8>) {
    match t {
        "u16" => (Requested::Int(54321), 54321u16.to_be_bytes().to_vec()),
        "i16" => (Requested::Int(-1234), (-1234i16).to_be_bytes().to_vec()),
        "u32" => (
            Requested::Int(3_000_000_000),
            3_000_000_000u32.to_be_bytes().to_vec(),
        ),
        "i32" => (
            Requested::Int(-2_000_000_000),
            (-2_000_000_000i32).to_be_bytes().to_vec(),
        ),
        "u64" => (
            Requested::Int(18_000_000_000_000_000_001),
            18_000_000_000_000_000_001u64.to_be_bytes().to_vec(),
        ),
        "i64" => (
            Requested::Int(-9_000_000_000_000_000_007),
            (-9_000_000_000_000_000_007i64).to_be_bytes().to_vec(),
        ),
        "f32" => (Requested::Float(21.5), 21.5f32.to_be_bytes().to_vec()),
        "f64" => (
            Requested::Float(-1234.5678),
            (-1234.5678f64).to_be_bytes().to_vec(),
        ),
        other => panic!("{other}"),
    }
}

/// Big-endian bytes as registers in `order` (the table in `field/decode.rs`).
fn words_in_order(be: &[u8], order: &str) -> Vec<u16> {
    let mut words: Vec<[u8; 2]> = be.chunks(2).map(|c| [c[0], c[1]]).collect();
    if matches!(order, "CDAB" | "DCBA") {
        words.reverse();
    }
    words
        .into_iter()
        .map(|[a, b]| {
            if matches!(order, "BADC" | "DCBA") {
                u16::from_be_bytes([b, a])
            } else {
                u16::from_be_bytes([a, b])
            }
        })
        .collect()
}

struct Bus {
    bus: ResolvedBus,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    drain: tokio::task::JoinHandle<()>,
}

impl Bus {
    fn start(toml_text: &str) -> Bus {
        let config: FieldConfig = toml::from_str(toml_text).expect("test config parses");
        assert_eq!(config.validate(), vec![]);
        let bus = field::resolve(&config).expect("valid").remove(0);
        let (tx, mut rx) = mpsc::channel::<FieldEvent>(1024);
        let shutdown = CancellationToken::new();
        let task = field::spawn_bus(&bus, tx, shutdown.clone());
        let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
        Bus {
            bus,
            shutdown,
            task,
            drain,
        }
    }

    async fn write(&self, point: &str, value: Requested) -> Result<WriteReport, Refusal> {
        let planned = self
            .bus
            .plan_write("plc", point, value)
            .expect("on this bus")?;
        let (reply, answer) = oneshot::channel();
        self.bus.commands().submit(BusCommand {
            device: planned.device,
            point: planned.point,
            op: planned.op,
            deadline: None,
            reply,
        })?;
        Ok(tokio::time::timeout(WAIT, answer)
            .await
            .expect("answered in time")
            .expect("the bus task answers"))
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
        self.drain.abort();
    }
}

fn config(port: u16, points: &str, device_extra: &str) -> String {
    format!(
        "[[bus]]\nname = \"plc\"\nkind = \"tcp\"\nhost = \"127.0.0.1\"\nport = {port}\n\
         [[bus.device]]\nname = \"plc\"\nunit_id = 1\npoll_interval_ms = 100\n{device_extra}\n{points}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_writable_type_and_byte_order_lands_as_the_right_raw_words() {
    let slave = Slave::tcp(&json!({"units": {"1": {"holding": {"0": vec![0; 128]}}}}));
    let mut points = String::new();
    let mut expected = vec![0u16; 128];
    let mut cases = Vec::new();
    for (o, order) in ORDERS.iter().enumerate() {
        for (t, (ty, _)) in TYPES.iter().enumerate() {
            let address = (o * TYPES.len() + t) * 4;
            let name = format!("{ty}_{order}");
            points.push_str(&format!(
                "[[bus.device.point]]\nname = \"{name}\"\nkind = \"holding\"\naddress = {address}\n\
                 type = \"{ty}\"\norder = \"{order}\"\nwritable = true\n"
            ));
            let (value, be) = sample(ty);
            for (k, w) in words_in_order(&be, order).into_iter().enumerate() {
                expected[address + k] = w;
            }
            cases.push((name, value));
        }
    }
    let bus = Bus::start(&config(slave.port(), &points, ""));
    for (name, value) in &cases {
        let report = bus.write(name, *value).await.expect("accepted");
        assert!(report.outcome.is_ok(), "{name}: {:?}", report.outcome);
        assert_eq!(
            report.held(),
            Some(true),
            "{name}: read back {:?}",
            report.readback
        );
    }
    let mut held = slave.read_independently(1, "holding", 0, 64);
    held.extend(slave.read_independently(1, "holding", 64, 64));
    for (i, (want, got)) in expected.iter().zip(&held).enumerate() {
        assert_eq!(
            want, got,
            "register {i}: {want:#06x} written, slave holds {got:#06x}"
        );
    }
    // Multi-register values went out as one FC16 each.
    let fc16 = slave.requests().iter().filter(|r| r.function == 16).count();
    assert_eq!(fc16, 4 * 6, "one FC16 per 32/64-bit point");
    let fc6 = slave.requests().iter().filter(|r| r.function == 6).count();
    assert_eq!(fc6, 4 * 2, "one FC6 per 16-bit point");
    bus.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coils_go_on_and_off_and_bits_are_written_by_fc22_or_read_modify_write() {
    let image = json!({"units": {"1": {
        "coil": {"0": [0, 1]},
        "holding": {"10": [0b1010_0000_0000_0001], "20": [7]},
    }}});
    let slave = Slave::tcp(&image);
    let points = "[[bus.device.point]]\nname = \"pump\"\nkind = \"coil\"\naddress = 0\nwritable = true\n\
         [[bus.device.point]]\nname = \"fan\"\nkind = \"coil\"\naddress = 1\nwritable = true\n\
         [[bus.device.point]]\nname = \"run\"\nkind = \"holding\"\naddress = 10\ntype = \"bit\"\nbit = 4\nwritable = true\n\
         [[bus.device.point]]\nname = \"mode\"\nkind = \"holding\"\naddress = 20\nwritable = true\nwrite_function = 16\n";
    let bus = Bus::start(&config(slave.port(), points, ""));
    assert!(bus
        .write("pump", Requested::Bool(true))
        .await
        .unwrap()
        .outcome
        .is_ok());
    // Writing 0 to a coil that is on: the case peers get wrong.
    let off = bus.write("fan", Requested::Int(0)).await.unwrap();
    assert!(off.outcome.is_ok());
    assert_eq!(off.readback.unwrap().value, Some(Value::Bool(false)));
    assert_eq!(slave.read_independently(1, "coil", 0, 2), [1, 0]);
    assert!(bus
        .write("run", Requested::Bool(true))
        .await
        .unwrap()
        .outcome
        .is_ok());
    assert_eq!(
        slave.read_independently(1, "holding", 10, 1),
        [0b1010_0000_0001_0001],
        "only bit 4 changed"
    );
    assert!(bus
        .write("mode", Requested::Int(3))
        .await
        .unwrap()
        .outcome
        .is_ok());
    assert_eq!(slave.read_independently(1, "holding", 20, 1), [3]);
    let functions: Vec<u8> = slave
        .requests()
        .iter()
        .map(|r| r.function)
        .filter(|f| *f >= 5)
        .collect();
    assert_eq!(
        functions,
        [5, 5, 22, 16],
        "FC5, FC5, FC22, FC16 (write_function)"
    );
    bus.stop().await;

    // A device without FC22: read-modify-write, and nothing else in between.
    let image = json!({"units": {"1": {"holding": {"10": [0b1000_0000_0001_0001]}, "no_mask_write": true}}});
    let slave = Slave::tcp(&image);
    let points = "[[bus.device.point]]\nname = \"run\"\nkind = \"holding\"\naddress = 10\ntype = \"bit\"\nbit = 4\nwritable = true\n";
    let bus = Bus::start(&config(slave.port(), points, "mask_write = false"));
    let report = bus.write("run", Requested::Bool(false)).await.unwrap();
    assert!(report.outcome.is_ok(), "{:?}", report.outcome);
    assert_eq!(report.held(), Some(true));
    assert_eq!(
        slave.read_independently(1, "holding", 10, 1),
        [0b1000_0000_0000_0001]
    );
    let requests = slave.requests();
    let write_at = requests
        .iter()
        .position(|r| r.function == 6)
        .expect("an FC6");
    assert_eq!(
        requests[write_at - 1].function,
        3,
        "the read of the read-modify-write"
    );
    assert_eq!(
        (requests[write_at - 1].address, requests[write_at - 1].count),
        (10, 1)
    );
    assert!(requests.iter().all(|r| r.function != 22));
    bus.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_write_nothing_and_device_exceptions_carry_their_code() {
    let image = json!({"units": {"1": {
        "holding": {"0": [0, 0, 0]},
        "input": {"0": [0]},
        "write_exceptions": [{"kind": "holding", "start": 2, "end": 2, "code": 3}],
    }}});
    let slave = Slave::tcp(&image);
    let points = "[[bus.device.point]]\nname = \"setpoint\"\nkind = \"holding\"\naddress = 0\ntype = \"i16\"\n\
         scale = 0.1\nwritable = true\nmin = 5.0\nmax = 30.0\n\
         [[bus.device.point]]\nname = \"mode\"\nkind = \"holding\"\naddress = 1\nwritable = true\nallowed = [0, 1, 3]\n\
         [[bus.device.point]]\nname = \"locked\"\nkind = \"holding\"\naddress = 2\nwritable = true\n\
         [[bus.device.point]]\nname = \"measured\"\nkind = \"input\"\naddress = 0\n";
    let bus = Bus::start(&config(slave.port(), points, ""));
    let cases = [
        ("setpoint", Requested::Float(31.0), "out_of_range"),
        ("setpoint", Requested::Float(21.55), "not_representable"),
        ("setpoint", Requested::Bool(true), "out_of_range"),
        ("mode", Requested::Int(2), "out_of_range"),
        ("measured", Requested::Int(1), "not_writable"),
        ("nothing", Requested::Int(1), "unknown_point"),
    ];
    for (point, value, reason) in cases {
        let refused = bus.write(point, value).await.expect_err("refused");
        assert_eq!(refused.reason(), reason, "{point} {value:?}: {refused}");
    }
    assert!(
        slave.requests().iter().all(|r| r.function < 5),
        "nothing was written: {:?}",
        slave.requests()
    );
    assert_eq!(slave.read_independently(1, "holding", 0, 3), [0, 0, 0]);

    let report = bus.write("locked", Requested::Int(9)).await.unwrap();
    match &report.outcome {
        Err(failure @ WriteFailure::Exception { code: 3 }) => {
            assert_eq!(
                failure.to_string(),
                "the device answered Modbus exception 0x03 (illegal data value)"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(report.readback.is_none());
    let report = bus.write("setpoint", Requested::Float(21.5)).await.unwrap();
    assert!(report.outcome.is_ok());
    assert_eq!(slave.read_independently(1, "holding", 0, 1), [215]);
    assert_eq!(report.readback.unwrap().value, Some(Value::Float(21.5)));
    bus.stop().await;
}

/// Over RTU on a serial line (a socat pty pair): writes go out between polls with the
/// line's framing, and the device confirms them on read-back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_over_rtu_on_a_serial_line_are_confirmed_by_read_back() {
    let pty = common::slave::PtyPair::new();
    let image = json!({"units": {"1": {"holding": {"0": [0, 0]}, "coil": {"0": [1]}}}});
    let slave = Slave::rtu(&pty.slave_end(), &image);
    let text = format!(
        "[[bus]]\nname = \"plc\"\nkind = \"rtu\"\nport = {:?}\nbaud = 19200\nparity = \"none\"\n\
         [[bus.device]]\nname = \"plc\"\nunit_id = 1\npoll_interval_ms = 50\n\
         [[bus.device.point]]\nname = \"total\"\nkind = \"holding\"\naddress = 0\ntype = \"u32\"\n\
         order = \"CDAB\"\nwritable = true\n\
         [[bus.device.point]]\nname = \"valve\"\nkind = \"coil\"\naddress = 0\nwritable = true\n",
        pty.master_end().display().to_string()
    );
    let bus = Bus::start(&text);
    let report = bus
        .write("total", Requested::Int(0x0001_0002))
        .await
        .unwrap();
    assert!(report.outcome.is_ok(), "{:?}", report.outcome);
    assert_eq!(report.held(), Some(true));
    assert_eq!(
        report.readback.unwrap().value,
        Some(Value::UInt(0x0001_0002))
    );
    let report = bus.write("valve", Requested::Bool(false)).await.unwrap();
    assert!(report.outcome.is_ok(), "{:?}", report.outcome);
    assert_eq!(report.readback.unwrap().value, Some(Value::Bool(false)));
    let writes: Vec<(u8, u16, u16)> = slave
        .requests()
        .iter()
        .filter(|r| r.function >= 5)
        .map(|r| (r.function, r.address, r.count))
        .collect();
    assert_eq!(writes, [(16, 0, 2), (5, 0, 1)]);
    bus.stop().await;
}
