//! Field polling throughput against the pymodbus slave over TCP, and decode throughput.
//!
//! Run: `cargo bench --bench field` (needs python3 with pymodbus, like the tests).
//!
//! - `tcp_poll/*`: one bus task, eight devices with a 1 ms interval on one TCP connection,
//!   so the bus is never idle; an iteration is one device poll, throughput is points/s.
//!   The requests/s of each scenario is printed after it (from the bus's counters).
//! - `decode/*`: register words → values for a full 125-register block.
//! - `plan/*`: building the read plan of a 200-point device.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::slave::Slave;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use fieldbridge::field::decode::{encode_be_bytes, ByteOrder, Codec, DataType, RegisterKind};
use fieldbridge::field::plan::{Limits, PointSpan, ReadPlan};
use fieldbridge::field::{self, FieldConfig, FieldEvent};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const DEVICES: usize = 8;

/// (name, points per device as TOML, points per poll, requests per poll)
fn scenarios() -> Vec<(&'static str, String, u64, u64)> {
    let point = |i: usize, address: usize, t: &str| {
        format!("[[bus.device.point]]\nname = \"p{i}\"\nkind = \"holding\"\naddress = {address}\ntype = \"{t}\"\n")
    };
    let block: String = (0..62).map(|i| point(i, i * 2, "f32")).collect();
    let one: String = point(0, 0, "u16");
    let spread: String = (0..10).map(|i| point(i, i * 12, "u16")).collect();
    vec![
        ("62_f32_in_1_request", block, 62, 1),
        ("1_u16_in_1_request", one, 1, 1),
        (
            "10_u16_in_10_requests_max_gap_0",
            format!("max_gap = 0\n{spread}"),
            10,
            10,
        ),
        (
            "10_u16_coalesced_into_1_request",
            format!("max_gap = 11\n{spread}"),
            10,
            1,
        ),
    ]
}

fn tcp_poll(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let regs: Vec<u16> = (0..62)
        .flat_map(|i| encode_be_bytes(&(i as f32 * 1.5).to_be_bytes(), ByteOrder::ABCD))
        .chain([0; 3])
        .collect();
    let units: serde_json::Map<String, serde_json::Value> = (1..=DEVICES)
        .map(|u| (u.to_string(), json!({"holding": {"0": regs}})))
        .collect();
    let slave = Slave::tcp(&json!({ "units": units }));
    let mut group = c.benchmark_group("tcp_poll");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(4));
    for (name, points, per_poll, requests_per_poll) in scenarios() {
        let mut text = format!(
            "[[bus]]\nname = \"bench\"\nkind = \"tcp\"\nhost = \"127.0.0.1\"\nport = {}\n",
            slave.port()
        );
        for unit in 1..=DEVICES {
            // Table keys must precede the points, so `max_gap` lines stay at the top.
            let (keys, pts) = points.split_at(points.find("[[").unwrap_or(0));
            text += &format!(
                "[[bus.device]]\nname = \"d{unit}\"\nunit_id = {unit}\npoll_interval_ms = 1\n{keys}{pts}"
            );
        }
        let config: FieldConfig = toml::from_str(&text).expect("bench config");
        let buses = field::resolve(&config).expect("valid bench config");
        let (tx, mut rx) = mpsc::channel(4096);
        let shutdown = CancellationToken::new();
        let _task = {
            let _guard = rt.enter();
            field::spawn_bus(&buses[0], tx, shutdown.clone())
        };
        let started = Instant::now();
        let before = buses[0].stats();
        group.throughput(Throughput::Elements(per_poll));
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    let mut left = iters * per_poll;
                    while left > 0 {
                        match rx.recv().await {
                            Some(FieldEvent::Reading(r)) => {
                                assert!(r.quality.is_good(), "{r:?}");
                                left -= 1;
                            }
                            Some(_) => {}
                            None => panic!("bus stopped"),
                        }
                    }
                    start.elapsed()
                })
            })
        });
        let after = buses[0].stats();
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "tcp_poll/{name}: {:.0} requests/s, {:.0} points/s ({requests_per_poll} request(s) per poll)",
            (after.requests - before.requests) as f64 / secs,
            (after.readings - before.readings) as f64 / secs,
        );
        shutdown.cancel();
    }
    group.finish();
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    for (t, order, width) in [
        (DataType::F32, ByteOrder::CDAB, 2usize),
        (DataType::U16, ByteOrder::ABCD, 1),
        (DataType::I64, ByteOrder::DCBA, 4),
    ] {
        let codec = Codec::new(t, order);
        let regs: Vec<u16> = (0..125u16).map(|i| i.wrapping_mul(7919)).collect();
        let points = 125 / width;
        group.throughput(Throughput::Elements(points as u64));
        group.bench_function(format!("{}_{}_block_of_125", t.name(), order.name()), |b| {
            b.iter(|| {
                for p in 0..points {
                    let _ = black_box(codec.decode_registers(black_box(&regs[p * width..])));
                }
            })
        });
    }
    let mut scaled = Codec::new(DataType::U16, ByteOrder::ABCD);
    scaled.scale = 0.1;
    let regs: Vec<u16> = (0..125u16).collect();
    group.throughput(Throughput::Elements(125));
    group.bench_function("u16_scaled_block_of_125", |b| {
        b.iter(|| {
            for p in 0..125 {
                let _ = black_box(scaled.decode_registers(black_box(&regs[p..])));
            }
        })
    });
    group.finish();
}

fn plan(c: &mut Criterion) {
    let points: Vec<PointSpan> = (0..200u16)
        .map(|i| PointSpan {
            kind: if i % 2 == 0 {
                RegisterKind::Holding
            } else {
                RegisterKind::Input
            },
            address: i * 3,
            width: 2,
        })
        .collect();
    c.bench_function("plan/build_200_points", |b| {
        b.iter(|| ReadPlan::build(black_box(&points), Limits::default()))
    });
}

criterion_group!(benches, decode, plan, tcp_poll);
criterion_main!(benches);
