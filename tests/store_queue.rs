//! The store-and-forward queue through its public API, on real SQLite files in temp
//! dirs: kill -9 crash consistency (a child process), retention limits and policies,
//! priority drops, the corrupt-file path, reading stats beside a running queue, and
//! space reuse after a drain.
//!
//! `every_committed_append_survives_kill_9` guards the promise that an append that
//! resolved is on disk: the child prints each committed id, is killed with SIGKILL at
//! a random moment, and every printed id must be in the reopened file.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use fieldbridge::mqtt::QoS;
use fieldbridge::store::{
    read_stats, DrainOrder, DropPolicy, Message, Priority, Queue, StoreConfig, Stored,
};

use common::util::wait_for;

const CHILD_ENV: &str = "FIELDBRIDGE_STORE_CRASH_CHILD";

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

fn config(path: &Path) -> StoreConfig {
    StoreConfig {
        path: path.to_path_buf(),
        commit_interval_ms: 2,
        ..StoreConfig::default()
    }
}

fn message(topic: &str, serial: u64, priority: Priority) -> Message {
    Message {
        topic: topic.to_string(),
        payload: Bytes::from(serial.to_string()),
        qos: QoS::AtLeastOnce,
        retain: false,
        created_ms: now_ms(),
        priority,
        unsynced: None,
    }
}

fn serial(stored: &Stored) -> u64 {
    std::str::from_utf8(&stored.message.payload)
        .expect("utf-8 payload")
        .parse()
        .expect("a serial number")
}

/// (topic, serial) of every stored row, in queue order.
async fn contents(queue: &Queue) -> Vec<(String, u64)> {
    let all = queue
        .next(usize::MAX, DrainOrder::OldestFirst)
        .await
        .expect("next");
    let ids = all.iter().map(|s| s.id).collect();
    queue.release(ids).await.expect("release");
    all.iter()
        .map(|s| (s.message.topic.clone(), serial(s)))
        .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The child side of the crash test: does nothing unless the crash test started this
/// binary with `CHILD_ENV` set. Four sources append batches as fast as commits allow and
/// print `committed <id> <topic> <serial>` for each row once its append resolved.
#[test]
fn crash_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (path, round) = spec.split_once('|').expect("path|round");
    let round: u64 = round.parse().expect("round number");
    let queue = Queue::open(StoreConfig {
        commit_interval_ms: 3,
        ..config(Path::new(path))
    })
    .expect("open in child");
    runtime().block_on(async move {
        let mut tasks = Vec::new();
        for source in 0..4u64 {
            let queue = queue.clone();
            tasks.push(tokio::spawn(async move {
                let topic = format!("src/{source}");
                let mut serial = round * 1_000_000;
                loop {
                    let n = fastrand::u64(1..60);
                    let batch: Vec<Message> = (serial..serial + n)
                        .map(|s| message(&topic, s, Priority::Periodic))
                        .collect();
                    let ids = queue.append(batch).await.expect("append in child");
                    let mut out = std::io::stdout().lock();
                    for (i, id) in ids.iter().enumerate() {
                        writeln!(out, "committed {id} {topic} {}", serial + i as u64)
                            .expect("stdout");
                    }
                    out.flush().expect("stdout");
                    serial += n;
                }
            }));
        }
        for task in tasks {
            task.await.expect("appender");
        }
    });
}

#[test]
fn every_committed_append_survives_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("q.db");
    let exe = std::env::current_exe().expect("test binary path");
    let mut reported: BTreeMap<i64, (String, u64)> = BTreeMap::new();
    for round in 1..=6u64 {
        let mut child = Command::new(&exe)
            .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, format!("{}|{round}", path.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the child");
        let stdout = child.stdout.take().expect("piped stdout");
        let (lines_tx, lines) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Kill at a random point: after a random number of committed rows.
        let kill_after = fastrand::usize(1..3000);
        let mut seen = 0;
        let mut collected = Vec::new();
        wait_for("the child to commit rows", Duration::from_secs(20), || {
            while let Ok(line) = lines.try_recv() {
                seen += usize::from(line.starts_with("committed "));
                collected.push(line);
            }
            (seen >= kill_after).then_some(())
        });
        child.kill().expect("SIGKILL the child");
        child.wait().expect("reap the child");
        reader.join().expect("reader thread");
        collected.extend(lines.try_iter());
        for line in collected {
            let mut words = line.split_whitespace();
            if words.next() != Some("committed") {
                continue;
            }
            let id: i64 = words.next().expect("id").parse().expect("numeric id");
            let topic = words.next().expect("topic").to_string();
            let serial: u64 = words
                .next()
                .expect("serial")
                .parse()
                .expect("numeric serial");
            reported.insert(id, (topic, serial));
        }
    }
    assert!(reported.len() > 6, "the children committed something");

    runtime().block_on(async {
        let queue = Queue::open(config(&path)).expect("reopen after kill -9");
        let all = queue
            .next(usize::MAX, DrainOrder::OldestFirst)
            .await
            .expect("next");
        let stored: BTreeMap<i64, (String, u64)> = all
            .iter()
            .map(|s| (s.id, (s.message.topic.clone(), serial(s))))
            .collect();
        for (id, row) in &reported {
            assert_eq!(
                stored.get(id),
                Some(row),
                "committed row {id} lost or changed"
            );
        }
        // Per-source order is append order.
        let mut last: BTreeMap<&str, u64> = BTreeMap::new();
        for (topic, serial) in stored.values() {
            if let Some(previous) = last.insert(topic, *serial) {
                assert!(*serial > previous, "{topic}: {serial} after {previous}");
            }
        }
        queue.close().await.expect("close");
    });
}

#[tokio::test]
async fn max_rows_with_drop_oldest_drops_periodic_before_events_before_alarms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let queue = Queue::open(StoreConfig {
        max_rows: 10,
        ..config(&dir.path().join("q.db"))
    })
    .expect("open");
    let make = |topic: &str, range: std::ops::Range<u64>, p| -> Vec<Message> {
        range.map(|s| message(topic, s, p)).collect()
    };
    queue
        .append(make("alarm", 0..4, Priority::Alarm))
        .await
        .expect("append");
    queue
        .append(make("event", 10..14, Priority::Event))
        .await
        .expect("append");
    queue
        .append(make("periodic", 20..24, Priority::Periodic))
        .await
        .expect("append");
    queue
        .append(make("periodic", 24..30, Priority::Periodic))
        .await
        .expect("append");
    queue
        .append(make("alarm", 4..7, Priority::Alarm))
        .await
        .expect("append");

    let kept: Vec<u64> = contents(&queue).await.into_iter().map(|(_, s)| s).collect();
    // Periodic values went first (oldest first), then the oldest event.
    assert_eq!(kept, vec![0, 1, 2, 3, 11, 12, 13, 4, 5, 6]);
    let stats = queue.stats().await.expect("stats");
    assert_eq!((stats.depth, stats.dropped.max_rows), (10, 11));
    assert_eq!(stats.dropped.total(), 11);
    queue.close().await.expect("close");
}

#[tokio::test]
async fn max_rows_with_drop_newest_keeps_the_backlog_but_not_over_an_alarm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let queue = Queue::open(StoreConfig {
        max_rows: 5,
        policy: DropPolicy::DropNewest,
        ..config(&dir.path().join("q.db"))
    })
    .expect("open");
    let first: Vec<Message> = (0..5)
        .map(|s| message("p", s, Priority::Periodic))
        .collect();
    queue.append(first).await.expect("append");
    let refused: Vec<Message> = (5..7)
        .map(|s| message("p", s, Priority::Periodic))
        .collect();
    let ids = queue.append(refused).await.expect("append");
    assert_eq!(
        ids.len(),
        2,
        "ids are reported even for rows dropped in the same commit"
    );
    queue
        .append(vec![message("a", 100, Priority::Alarm)])
        .await
        .expect("append");

    let kept: Vec<u64> = contents(&queue).await.into_iter().map(|(_, s)| s).collect();
    assert_eq!(
        kept,
        vec![0, 1, 2, 3, 100],
        "the alarm displaced the newest periodic row"
    );
    let stats = queue.stats().await.expect("stats");
    assert_eq!(stats.dropped.max_rows, 3);
    queue.close().await.expect("close");
}

#[tokio::test]
async fn max_bytes_bounds_the_stored_bytes_and_counts_its_drops() {
    let dir = tempfile::tempdir().expect("tempdir");
    let max_bytes = 64 * 1024;
    let queue = Queue::open(StoreConfig {
        max_bytes,
        ..config(&dir.path().join("q.db"))
    })
    .expect("open");
    let mut appended = 0;
    for chunk in 0..6u64 {
        let batch: Vec<Message> = (chunk * 100..chunk * 100 + 100)
            .map(|s| {
                let mut m = message("b", s, Priority::Periodic);
                m.payload = Bytes::from(format!("{s:0>100}"));
                m
            })
            .collect();
        appended += batch.len() as u64;
        queue.append(batch).await.expect("append");
    }
    let stats = queue.stats().await.expect("stats");
    assert!(stats.bytes <= max_bytes, "{stats:?}");
    assert!(stats.dropped.max_bytes > 0);
    assert_eq!(stats.depth + stats.dropped.max_bytes, appended);
    assert_eq!(stats.dropped.max_rows, 0);
    // The newest rows are the ones kept.
    let kept: Vec<u64> = contents(&queue).await.into_iter().map(|(_, s)| s).collect();
    assert_eq!(kept.last(), Some(&599));
    assert!(kept.windows(2).all(|w| w[1] == w[0] + 1));
    queue.close().await.expect("close");
}

#[tokio::test]
async fn max_age_drops_old_rows_but_spares_rows_stamped_by_an_unset_clock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let queue = Queue::open(StoreConfig {
        max_age_secs: 3600,
        ..config(&dir.path().join("q.db"))
    })
    .expect("open");
    let mut unset_clock = message("t", 1, Priority::Alarm);
    unset_clock.created_ms = 5_000; // 1970: a Pi that booted without RTC or NTP
    let mut old = message("t", 2, Priority::Alarm);
    old.created_ms = now_ms() - 2 * 3600 * 1000;
    let fresh = message("t", 3, Priority::Periodic);
    queue
        .append(vec![unset_clock, old, fresh])
        .await
        .expect("append");
    let kept: Vec<u64> = contents(&queue).await.into_iter().map(|(_, s)| s).collect();
    assert_eq!(kept, vec![1, 3]);
    let stats = queue.stats().await.expect("stats");
    assert_eq!(stats.dropped.max_age, 1);
    queue.close().await.expect("close");
}

#[tokio::test]
async fn rows_in_flight_are_never_dropped_by_retention_but_are_once_released() {
    let dir = tempfile::tempdir().expect("tempdir");
    let queue = Queue::open(StoreConfig {
        max_rows: 3,
        ..config(&dir.path().join("q.db"))
    })
    .expect("open");
    let batch = |r: std::ops::Range<u64>| r.map(|s| message("p", s, Priority::Periodic)).collect();
    queue.append(batch(0..3)).await.expect("append");
    let out = queue.next(3, DrainOrder::OldestFirst).await.expect("next");
    queue.append(batch(3..5)).await.expect("append");
    let stats = queue.stats().await.expect("stats");
    assert_eq!(stats.dropped.max_rows, 2, "the new pending rows gave way");
    // Released, the old rows are the oldest again and go first.
    queue
        .release(out.iter().map(|s| s.id).collect())
        .await
        .expect("release");
    queue.append(batch(5..6)).await.expect("append");
    let kept: Vec<u64> = contents(&queue).await.into_iter().map(|(_, s)| s).collect();
    assert_eq!(kept, vec![1, 2, 5]);
    let out = queue.next(3, DrainOrder::OldestFirst).await.expect("next");
    queue
        .ack(out.iter().map(|s| s.id).collect())
        .await
        .expect("ack");
    queue.close().await.expect("close");
    let stats = read_stats(&dir.path().join("q.db")).expect("read_stats");
    assert_eq!(
        (stats.depth, stats.delivered, stats.dropped.max_rows),
        (0, 3, 3)
    );
}

fn corrupt_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.to_string_lossy().contains(".corrupt-"))
        .collect()
}

#[tokio::test]
async fn a_corrupt_file_is_moved_aside_and_a_fresh_queue_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("q.db");
    let garbage = vec![0x42u8; 8192];
    std::fs::write(&path, &garbage).expect("write garbage");
    let queue = Queue::open(config(&path)).expect("open over garbage");
    let aside = corrupt_files(dir.path());
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(
        std::fs::read(&aside[0]).expect("read aside"),
        garbage,
        "kept for forensics"
    );
    let name = aside[0]
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    assert!(
        regex_lite::Regex::new(r"^q\.db\.corrupt-\d{8}T\d{6}Z$")
            .expect("regex")
            .is_match(&name),
        "{name}"
    );
    queue
        .append(vec![message("t", 1, Priority::Periodic)])
        .await
        .expect("append");
    assert_eq!(contents(&queue).await, vec![("t".to_string(), 1)]);
    queue.close().await.expect("close");

    // A real queue file whose b-tree pages were overwritten.
    let queue = Queue::open(config(&path)).expect("open");
    let batch: Vec<Message> = (0..2000)
        .map(|s| message("t", s, Priority::Periodic))
        .collect();
    queue.append(batch).await.expect("append");
    queue.close().await.expect("close");
    let mut bytes = std::fs::read(&path).expect("read db");
    assert!(bytes.len() > 5 * 4096);
    for b in &mut bytes[3 * 4096..5 * 4096] {
        *b = 0xEE;
    }
    std::fs::write(&path, &bytes).expect("damage db");
    let queue = Queue::open(config(&path)).expect("open over a damaged file");
    assert_eq!(corrupt_files(dir.path()).len(), 2);
    assert_eq!(queue.stats().await.expect("stats").depth, 0);
    queue.close().await.expect("close");
}

#[tokio::test]
async fn stats_can_be_read_beside_a_running_queue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("q.db");
    assert!(read_stats(&path).is_err(), "no file yet");
    let queue = Queue::open(config(&path)).expect("open");
    let batch: Vec<Message> = (0..10)
        .map(|s| message("t", s, Priority::Periodic))
        .collect();
    queue.append(batch).await.expect("append");
    let out = queue.next(3, DrainOrder::OldestFirst).await.expect("next");
    let outside = read_stats(&path).expect("read_stats while running");
    let inside = queue.stats().await.expect("stats");
    assert_eq!((outside.depth, inside.depth), (10, 10));
    assert_eq!(outside.bytes, inside.bytes);
    assert_eq!(inside.in_flight, 3);
    assert!(outside.oldest_age_ms.is_some());
    queue
        .ack(out.iter().map(|s| s.id).collect())
        .await
        .expect("ack");
    queue.close().await.expect("close");
    let after = read_stats(&path).expect("read_stats");
    assert_eq!((after.depth, after.appended, after.delivered), (7, 10, 3));
    assert!(after.commits >= 2 && after.bytes_written > 0, "{after:?}");
    let json = serde_json::to_value(&after).expect("stats serialize");
    assert_eq!(json["dropped"]["max_rows"], 0);
}

#[tokio::test]
async fn freed_space_is_reused_and_the_file_shrinks_after_a_drain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("q.db");
    let db_size = || std::fs::metadata(&path).expect("db file").len();
    let mut peak = Vec::new();
    let mut drained = Vec::new();
    for cycle in 0..3u64 {
        let queue = Queue::open(config(&path)).expect("open");
        let batch: Vec<Message> = (0..4000)
            .map(|s| {
                let mut m = message("t", cycle * 10_000 + s, Priority::Periodic);
                m.payload = Bytes::from(vec![b'x'; 1000]);
                m
            })
            .collect();
        queue.append(batch).await.expect("append");
        queue.close().await.expect("close");
        peak.push(db_size());

        let queue = Queue::open(config(&path)).expect("open");
        loop {
            let out = queue
                .next(500, DrainOrder::OldestFirst)
                .await
                .expect("next");
            if out.is_empty() {
                break;
            }
            queue
                .ack(out.iter().map(|s| s.id).collect())
                .await
                .expect("ack");
        }
        queue.close().await.expect("close");
        drained.push(db_size());
    }
    assert!(peak[0] > 4_000_000, "{peak:?}");
    for (p, d) in peak.iter().zip(&drained) {
        // 1 MiB of free pages stays for reuse.
        assert!(*d < p / 4, "the file shrank after the drain: {p} -> {d}");
    }
    assert!(
        peak[2] <= peak[0] + peak[0] / 10,
        "no growth across cycles: {peak:?}"
    );
}
