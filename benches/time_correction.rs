//! What the clock's sync costs: the store's correction of a backlog stored while the
//! wall clock was not synchronized (`Queue::retime` with the payload rewrite the agent
//! uses), and the rewrite of one payload alone. Prints the markdown rows used in
//! BENCHMARKS.md.
//!
//! `cargo bench --bench time_correction`; `FIELDBRIDGE_BENCH_ROWS` sets the backlog
//! (default 100,000 readings: about 3 hours of 10 readings/s).

use std::time::Instant;

use fieldbridge::clock::Stamp;
use fieldbridge::field::{retime_payload, Quality, Reading, TimeMark, Value};
use fieldbridge::mqtt::QoS;
use fieldbridge::store::{DrainOrder, Message, Priority, Queue, StoreConfig};

const BOOT: i64 = 7;

fn reading(n: u64) -> Reading {
    Reading {
        device: "meter1".into(),
        point: "voltage".into(),
        topic: None,
        value: Some(Value::Float(230.0 + (n % 100) as f64 / 10.0)),
        unit: Some("V".into()),
        ts_ms: 5_000 + n as i64 * 100,
        mono_ms: 10_000 + n * 100,
        time: TimeMark::Unsynced,
        quality: Quality::Good,
    }
}

fn message(n: u64) -> Message {
    let r = reading(n);
    Message {
        topic: "fieldbridge/gw1/meter1/voltage".into(),
        payload: r.payload_json().into(),
        qos: QoS::AtLeastOnce,
        retain: false,
        created_ms: r.ts_ms,
        priority: Priority::Periodic,
        unsynced: Some(Stamp {
            boot: BOOT,
            mono_ms: r.mono_ms,
        }),
    }
}

fn rewrite(payload: &[u8], delta_ms: i64) -> Option<Vec<u8>> {
    retime_payload(payload, delta_ms, TimeMark::Corrected)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let rows: u64 = std::env::var("FIELDBRIDGE_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);

    let payload = reading(1).payload_json();
    let n = 1_000_000;
    let start = Instant::now();
    let mut bytes = 0;
    for i in 0..n {
        bytes += rewrite(payload.as_bytes(), i).map_or(0, |p| p.len());
    }
    let per = start.elapsed().as_nanos() as f64 / n as f64;
    assert!(bytes > 0);

    let dir = tempfile::tempdir().expect("tempdir");
    let queue = Queue::open(StoreConfig {
        path: dir.path().join("q.db"),
        ..StoreConfig::default()
    })
    .expect("open");
    let mut next = 0;
    while next < rows {
        let end = (next + 1024).min(rows);
        queue
            .append((next..end).map(message).collect())
            .await
            .expect("append");
        next = end;
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let start = Instant::now();
    queue
        .retime(
            BOOT,
            1_764_590_000_000,
            rewrite,
            Box::new(move |result| {
                let _ = tx.send(result);
            }),
        )
        .await;
    let done = rx.await.expect("answer").expect("retime");
    let took = start.elapsed();
    assert_eq!(done.rows, rows);
    let first = queue.next(1, DrainOrder::OldestFirst).await.expect("next");
    assert!(first[0]
        .message
        .payload
        .ends_with(br#""time":"corrected"}"#));
    queue.close().await.expect("close");

    println!("| rewrite of one reading payload | {per:.0} ns |");
    println!(
        "| correction of {rows} stored readings | {:.2} s ({:.0} rows/s) |",
        took.as_secs_f64(),
        rows as f64 / took.as_secs_f64()
    );
}
