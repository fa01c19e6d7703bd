//! Store benchmarks: append throughput by batch size, drain throughput (next + ack),
//! and bytes written per hour at 100 readings/s. Prints the markdown rows used in
//! BENCHMARKS.md.
//!
//! `cargo bench --bench store`; `FIELDBRIDGE_BENCH_SECS` sets the length of each
//! 100 readings/s run (default 30; the 100 ms NORMAL run is the headline one).
//! The database lives in a temp dir on the default temp filesystem (`TMPDIR`), which
//! should be a real disk for the bytes-written figures.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fieldbridge::mqtt::QoS;
use fieldbridge::store::{
    read_stats, DrainOrder, Message, Priority, Queue, StoreConfig, Synchronous,
};

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A typical reading: ~40-byte topic, ~50-byte JSON payload.
fn reading(i: u64) -> Message {
    Message {
        topic: format!("fieldbridge/gw1/meter{}/voltage_l{}", i % 10, i % 3 + 1),
        payload: Bytes::from(format!(
            "{{\"v\":{}.{:02},\"ts\":{},\"q\":\"good\"}}",
            220 + i % 20,
            i % 100,
            now_ms()
        )),
        qos: QoS::AtLeastOnce,
        retain: false,
        created_ms: now_ms(),
        priority: Priority::Periodic,
        unsynced: None,
    }
}

fn config(path: &Path) -> StoreConfig {
    StoreConfig {
        path: path.to_path_buf(),
        ..StoreConfig::default()
    }
}

/// `write_bytes - cancelled_write_bytes` of this process, from /proc/self/io.
fn proc_write_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/io").ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Some(field("write_bytes:")?.saturating_sub(field("cancelled_write_bytes:")?))
}

/// Appends `total` readings with `batch` readings per call, from enough concurrent
/// callers to fill each group commit. Returns readings/s and commits.
async fn append_throughput(dir: &Path, batch: usize, callers: usize, total: usize) -> (f64, u64) {
    let path = dir.join(format!("append-{batch}.db"));
    let queue = Queue::open(config(&path)).expect("open");
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let queue = queue.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let first = next.fetch_add(batch as u64, Ordering::Relaxed);
                if first >= total as u64 {
                    break;
                }
                let messages: Vec<Message> = (first..first + batch as u64).map(reading).collect();
                queue.append(messages).await.expect("append");
            }
        }));
    }
    for task in tasks {
        task.await.expect("appender");
    }
    let elapsed = start.elapsed();
    let stats = queue.stats().await.expect("stats");
    queue.close().await.expect("close");
    (stats.appended as f64 / elapsed.as_secs_f64(), stats.commits)
}

/// One caller awaiting each single-reading append: bounded by the commit interval.
async fn sequential_appends(dir: &Path, count: u64) -> f64 {
    let queue = Queue::open(config(&dir.join("sequential.db"))).expect("open");
    let start = Instant::now();
    for i in 0..count {
        queue.append(vec![reading(i)]).await.expect("append");
    }
    let rate = count as f64 / start.elapsed().as_secs_f64();
    queue.close().await.expect("close");
    rate
}

/// Fills `rows`, then drains with next(`max`) + ack. Returns messages/s.
async fn drain_throughput(dir: &Path, rows: u64, max: usize) -> f64 {
    let path = dir.join(format!("drain-{max}.db"));
    let queue = Queue::open(config(&path)).expect("open");
    for chunk in (0..rows).step_by(1000) {
        queue
            .append((chunk..chunk + 1000).map(reading).collect())
            .await
            .expect("fill");
    }
    let start = Instant::now();
    let mut drained = 0u64;
    loop {
        let out = queue
            .next(max, DrainOrder::OldestFirst)
            .await
            .expect("next");
        if out.is_empty() {
            break;
        }
        drained += out.len() as u64;
        queue
            .ack(out.iter().map(|s| s.id).collect())
            .await
            .expect("ack");
    }
    let rate = drained as f64 / start.elapsed().as_secs_f64();
    queue.close().await.expect("close");
    assert_eq!(drained, rows);
    rate
}

struct Wear {
    commits_per_s: f64,
    store_bytes_per_hour: f64,
    proc_bytes_per_hour: Option<f64>,
    file_bytes: u64,
}

/// Persists a QoS 2 flow as the uplink does: the packet id for a whole batch before the
/// PUBLISHes, then PUBREC received before the PUBRELs, each batch concurrently.
async fn qos2_flows(queue: &Queue, ids: &[i64]) {
    for pubrec in [false, true] {
        let mut calls = tokio::task::JoinSet::new();
        for (n, &id) in ids.iter().enumerate() {
            let queue = queue.clone();
            let pkid = (n % 65_535 + 1) as u16;
            calls.spawn(async move { queue.set_flow(id, pkid, pubrec).await });
        }
        while let Some(done) = calls.join_next().await {
            done.expect("set_flow task").expect("set_flow");
        }
    }
}

/// 100 readings/s as ten readings every 100 ms, drained as they come (the uplink keeps
/// up; with `qos2` it also persists both flow steps of each message), for `secs`
/// seconds; the queue's own count and the kernel's are extrapolated to an hour.
async fn wear(dir: &Path, name: &str, config: StoreConfig, secs: u64, qos2: bool) -> Wear {
    let path = dir.join(format!("wear-{name}.db"));
    let queue = Queue::open(StoreConfig {
        path: path.clone(),
        ..config
    })
    .expect("open");
    let proc_before = proc_write_bytes();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let uplink = {
        let queue = queue.clone();
        tokio::spawn(async move {
            let mut pending = queue.pending();
            while Instant::now() < deadline {
                let out = queue
                    .next(1000, DrainOrder::OldestFirst)
                    .await
                    .expect("next");
                if out.is_empty() {
                    let _ =
                        tokio::time::timeout(Duration::from_millis(200), pending.changed()).await;
                    continue;
                }
                let ids: Vec<i64> = out.iter().map(|s| s.id).collect();
                if qos2 {
                    qos2_flows(&queue, &ids).await;
                }
                queue.ack(ids).await.expect("ack");
            }
        })
    };
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut serial = 0;
    while Instant::now() < deadline {
        tick.tick().await;
        let q = queue.clone();
        let batch: Vec<Message> = (serial..serial + 10).map(reading).collect();
        serial += 10;
        // A poller does not wait for the commit before its next poll.
        tokio::spawn(async move { q.append(batch).await.expect("append") });
    }
    uplink.await.expect("uplink");
    queue.close().await.expect("close");
    let elapsed = start.elapsed().as_secs_f64();
    let proc_after = proc_write_bytes();
    let stats = read_stats(&path).expect("stats");
    let per_hour = 3600.0 / elapsed;
    Wear {
        commits_per_s: stats.commits as f64 / elapsed,
        store_bytes_per_hour: stats.bytes_written as f64 * per_hour,
        proc_bytes_per_hour: proc_before
            .zip(proc_after)
            .map(|(b, a)| a.saturating_sub(b) as f64 * per_hour),
        file_bytes: std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0),
    }
}

fn mib(bytes: f64) -> String {
    format!("{:.2} MiB", bytes / (1024.0 * 1024.0))
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing and expects
    // a quick pass.
    let quick = !std::env::args().any(|a| a == "--bench");
    let secs: u64 = std::env::var("FIELDBRIDGE_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if quick { 1 } else { 30 });
    let scale = if quick { 100 } else { 1 };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    runtime.block_on(async {
        println!("| measurement | result |");
        println!("|---|---|");
        for (batch, callers, total) in [(1, 4000, 200_000), (100, 40, 500_000), (1000, 4, 500_000)] {
            let (rate, commits) = append_throughput(dir.path(), batch, callers, total / scale).await;
            println!(
                "| append, batch {batch}, {callers} concurrent callers | {:.0} readings/s ({commits} commits) |",
                rate
            );
        }
        let seq = sequential_appends(dir.path(), if quick { 3 } else { 30 }).await;
        println!("| append, batch 1, one caller awaiting each commit | {seq:.1} readings/s |");
        for max in [100, 1000] {
            let rate = drain_throughput(dir.path(), 200_000 / scale as u64, max).await;
            println!("| drain, next({max}) + ack | {rate:.0} messages/s |");
        }
        // Fast path off: every reading committed, then read back (as before issue 14).
        let before = StoreConfig {
            fast_path: false,
            ..StoreConfig::default()
        };
        let runs = [
            ("100 ms, normal", before.clone(), secs, false),
            ("100 ms, normal, QoS 2 flows", before.clone(), secs.div_ceil(2), true),
            (
                "1000 ms, normal",
                StoreConfig { commit_interval_ms: 1000, ..before.clone() },
                secs.div_ceil(2),
                false,
            ),
            (
                "100 ms, full",
                StoreConfig { synchronous: Synchronous::Full, ..before.clone() },
                secs.div_ceil(2),
                false,
            ),
            ("100 ms, normal, fast path", StoreConfig::default(), secs, false),
            (
                "100 ms, normal, QoS 2 flows, fast path",
                StoreConfig::default(),
                secs,
                true,
            ),
        ];
        for (name, config, secs, qos2) in runs {
            let tag = name.replace([' ', ','], "");
            let w = wear(dir.path(), &tag, config, secs, qos2).await;
            println!(
                "| 100 readings/s for {secs} s, commit {name} | {:.1} commits/s; {} per hour counted by the store; {} per hour by /proc/self/io; file {} KiB after |",
                w.commits_per_s,
                mib(w.store_bytes_per_hour),
                w.proc_bytes_per_hour.map_or("n/a".to_string(), mib),
                w.file_bytes / 1024
            );
        }
    });
}
