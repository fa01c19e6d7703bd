//! The store on a real small filesystem (a tmpfs mounted by the test) that fills up:
//! readings keep being taken (memory buffer, then the drop policy, counted), delivered
//! rows are deleted although the filesystem is full, the file shrinks after the drain,
//! and a restart on a full filesystem opens the store and recovers once space returns.
//!
//! The agent test runs the `fieldbridge` binary with its store on such a disk (filled
//! by another file, as a runaway log would), a pymodbus slave and mosquitto_sub on the
//! LAN broker, with the upstream down: polling, LAN readings and health reports go on,
//! and a restart on the full disk comes up.
//!
//! Mounting needs root (or CAP_SYS_ADMIN). Where the machine does not allow it, these
//! tests print why and pass; the same faults are then still exercised with SQLite's
//! page-count limit by the unit tests in `src/store/tests.rs` (`disk_full_*`,
//! `acked_rows_are_deleted_in_steps_on_a_full_disk_*`, `opening_*`) and
//! `agent::pipeline::tests`, and `scripts/fault-full-disk.sh` runs the whole scenario
//! end to end with the agent binary.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fieldbridge::mqtt::QoS;
use fieldbridge::store::{DiskState, DrainOrder, Message, Priority, Queue, Stats, StoreConfig};

use common::agent::Agent;
use common::clients::Sub;
use common::slave::Slave;
use common::util::{free_port, poll_until, poll_until_async, wait_for_port};

const WAIT: Duration = Duration::from_secs(30);

/// A tmpfs of a given size mounted on a temp dir; unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// Mounts a tmpfs of `size` (mount's syntax: `4m`), or says why it cannot.
    fn mount(size: &str) -> Result<SmallDisk, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("tmpfs")
            .arg(dir.path())
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(SmallDisk { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Fills what is left of the filesystem with a file of its own (what a runaway log
    /// does), and returns its path.
    fn fill(&self) -> PathBuf {
        let path = self.path("filler");
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("create filler");
        let block = vec![0u8; 4096];
        while file.write_all(&block).is_ok() {}
        let _ = file.sync_all();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Mounts a small disk, or prints why the test does not run here.
fn small_disk(size: &str) -> Option<SmallDisk> {
    match SmallDisk::mount(size) {
        Ok(disk) => Some(disk),
        Err(why) => {
            eprintln!(
                "not run here ({why}); src/store/tests.rs covers the same faults with \
                 SQLite's page-count limit"
            );
            None
        }
    }
}

fn config(path: &Path) -> StoreConfig {
    StoreConfig {
        path: path.to_path_buf(),
        commit_interval_ms: 5,
        memory_buffer_rows: 2_000,
        ..StoreConfig::default()
    }
}

fn message(serial: u64) -> Message {
    Message {
        topic: "fb/meter/power".to_string(),
        // About what a reading's JSON weighs, padded so the disk fills quickly.
        payload: Bytes::from(format!(
            "{{\"value\":{serial},\"pad\":\"{}\"}}",
            "x".repeat(160)
        )),
        qos: QoS::AtLeastOnce,
        retain: false,
        created_ms: fieldbridge::clock::now_ms(),
        priority: Priority::Periodic,
        unsynced: None,
    }
}

/// Outcomes of submitted batches, in rows.
#[derive(Default)]
struct Outcomes {
    stored: AtomicU64,
    refused: AtomicU64,
}

impl Outcomes {
    fn done(self: &Arc<Self>, rows: u64) -> fieldbridge::store::Done {
        let me = Arc::clone(self);
        Box::new(move |result| {
            let counter = if result.is_ok() {
                &me.stored
            } else {
                &me.refused
            };
            counter.fetch_add(rows, Ordering::Relaxed);
        })
    }

    fn answered(&self) -> u64 {
        self.stored.load(Ordering::Relaxed) + self.refused.load(Ordering::Relaxed)
    }
}

async fn wait_stats(queue: &Queue, what: &str, check: impl Fn(&Stats) -> bool) -> Stats {
    let last = std::sync::Mutex::new(None);
    let found = poll_until_async(WAIT, || async {
        let stats = queue.stats().await.expect("stats");
        let ok = check(&stats);
        *last.lock().expect("lock") = Some(stats.clone());
        ok.then_some(stats)
    })
    .await;
    found.unwrap_or_else(|| {
        panic!(
            "timed out waiting for {what}: {:?}",
            last.lock().expect("lock")
        )
    })
}

/// Submits batches of 100 rows until the store reports a full disk and the memory
/// buffer has overflowed, as the pipeline would while upstream is down; returns the
/// rows submitted.
async fn fill_store(queue: &Queue, outcomes: &Arc<Outcomes>, from: u64) -> u64 {
    let mut serial = from;
    loop {
        let batch: Vec<Message> = (serial..serial + 100).map(message).collect();
        serial += 100;
        tokio::time::timeout(
            Duration::from_secs(5),
            queue.submit(batch, outcomes.done(100)),
        )
        .await
        .expect("the store takes batches while its disk is full");
        let stats = queue.stats().await.expect("stats");
        if stats.disk == DiskState::Full && stats.dropped.disk_full > 0 {
            return serial - from;
        }
        assert!(
            serial - from < 2_000_000,
            "the disk never filled: {stats:?}"
        );
        if stats.buffered > 0 {
            // Let the store thread retry (it backs off), as real readings would.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// Drains the queue as the uplink does once upstream is back: next, then ack.
async fn drain(queue: &Queue) -> u64 {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut delivered = 0;
    loop {
        let rows = queue
            .next(500, DrainOrder::OldestFirst)
            .await
            .expect("next");
        if rows.is_empty() {
            let stats = queue.stats().await.expect("stats");
            if stats.depth == 0 && stats.buffered == 0 {
                return delivered;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "delivered rows are not deleted: {delivered} delivered, {stats:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        delivered += rows.len() as u64;
        queue
            .ack(rows.iter().map(|r| r.id).collect())
            .await
            .expect("ack");
    }
}

/// Regression (issue 11): on a full filesystem deleting delivered rows needed WAL
/// space it could not get, so a drain left most rows behind (to be sent again after a
/// restart), and nothing was counted as dropped.
#[tokio::test]
async fn a_full_filesystem_keeps_taking_readings_then_drains_deletes_and_shrinks() {
    let Some(disk) = small_disk("4m") else {
        return;
    };
    let queue = Queue::open(config(&disk.path("q.db"))).expect("open");
    let outcomes = Arc::new(Outcomes::default());
    let submitted = fill_store(&queue, &outcomes, 0).await;
    let full = queue.stats().await.expect("stats");
    assert!(full.commit_failures > 0, "{full:?}");
    assert!(
        full.buffered <= 2_000,
        "the memory buffer is bounded: {full:?}"
    );

    // Upstream is back: every stored row is delivered and deleted, while the
    // filesystem stays as full as it was.
    let delivered = drain(&queue).await;
    let stats = wait_stats(&queue, "an empty queue, writable again", |s| {
        s.depth == 0 && s.disk == DiskState::Writable && outcomes.answered() == submitted
    })
    .await;
    assert_eq!(stats.delivered, delivered, "{stats:?}");
    assert_eq!(
        outcomes.stored.load(Ordering::Relaxed),
        stats.appended,
        "{stats:?}"
    );
    assert_eq!(
        delivered + stats.dropped.total(),
        submitted,
        "every row was delivered or counted as dropped: {stats:?}"
    );
    let after = wait_stats(&queue, "the file to shrink", |s| {
        s.file_bytes < full.file_bytes / 2
    })
    .await;
    eprintln!(
        "submitted {submitted}, delivered {delivered}, dropped {:?}, file {} -> {} bytes",
        after.dropped, full.file_bytes, after.file_bytes
    );
    // And new readings are stored again.
    queue.append(vec![message(u64::MAX)]).await.expect("append");
    queue.close().await.expect("close");
}

/// A queue file on `disk` with 100 rows, closed (as before a restart); returns its path.
async fn stored_and_closed(disk: &SmallDisk) -> PathBuf {
    let path = disk.path("q.db");
    let queue = Queue::open(config(&path)).expect("open");
    queue
        .append((0..100).map(message).collect())
        .await
        .expect("append");
    queue.close().await.expect("close");
    path
}

/// Regression (issue 11): opening the store wrote to the file (`PRAGMA user_version`),
/// so a restart on a full filesystem exited at once and the agent never started.
#[tokio::test]
async fn a_restart_on_a_full_filesystem_opens_the_store_and_recovers_when_space_returns() {
    let Some(disk) = small_disk("4m") else {
        return;
    };
    let path = stored_and_closed(&disk).await;
    let filler = disk.fill();

    let queue = Queue::open(config(&path)).expect("the store opens on a full filesystem");
    let stats = queue.stats().await.expect("stats");
    assert_eq!(stats.depth, 100, "{stats:?}");
    let outcomes = Arc::new(Outcomes::default());
    queue
        .submit((100..200).map(message).collect(), outcomes.done(100))
        .await;
    // Delivery goes on while the disk is full.
    let rows = queue.next(50, DrainOrder::OldestFirst).await.expect("next");
    assert_eq!(rows.len(), 50);
    queue
        .ack(rows.iter().map(|r| r.id).collect())
        .await
        .expect("ack");
    wait_stats(&queue, "the 50 delivered rows deleted", |s| {
        s.delivered == 50
    })
    .await;

    std::fs::remove_file(filler).expect("space returns");
    wait_stats(&queue, "the buffered batch committed", |s| {
        s.disk == DiskState::Writable && s.buffered == 0
    })
    .await;
    assert_eq!(outcomes.stored.load(Ordering::Relaxed), 100);
    queue.close().await.expect("close");
}

/// With no room even for the `-shm` file and no reserve, the store still opens (with
/// exclusive locking), hands out its rows and holds new ones in memory; they are
/// committed once space returns.
#[tokio::test]
async fn with_no_room_at_all_the_store_still_opens_hands_out_rows_and_recovers() {
    let Some(disk) = small_disk("4m") else {
        return;
    };
    let path = stored_and_closed(&disk).await;
    std::fs::remove_file(disk.path("q.db.reserve")).expect("a reserve was written");
    let filler = disk.fill();

    let queue = Queue::open(config(&path)).expect("the store opens with no room at all");
    let rows = queue.next(10, DrainOrder::OldestFirst).await.expect("next");
    assert_eq!(rows.len(), 10);
    let outcomes = Arc::new(Outcomes::default());
    queue
        .submit((100..110).map(message).collect(), outcomes.done(10))
        .await;
    let stats = wait_stats(&queue, "the batch held in memory", |s| {
        s.buffered == 10 && s.disk == DiskState::Full
    })
    .await;
    assert_eq!(stats.depth, 100, "{stats:?}");

    std::fs::remove_file(filler).expect("space returns");
    wait_stats(&queue, "the held batch committed", |s| {
        s.disk == DiskState::Writable && s.buffered == 0 && s.depth == 110
    })
    .await;
    assert_eq!(outcomes.stored.load(Ordering::Relaxed), 10);
    queue.close().await.expect("close");
}

/// The last health report mosquitto_sub printed (`-v`: `topic payload`).
fn last_health(sub: &Sub) -> Option<serde_json::Value> {
    let line = sub
        .messages()
        .into_iter()
        .rev()
        .find(|l| l.starts_with("fb/health "))?;
    serde_json::from_str(line.split_once(' ')?.1).ok()
}

/// Waits for a health report that satisfies `check`, newer than the `after`-th line.
fn wait_health(
    sub: &Sub,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    poll_until(WAIT, || last_health(sub).filter(|h| check(h))).unwrap_or_else(|| {
        panic!(
            "timed out waiting for {what}; last report: {:?}",
            last_health(sub)
        )
    })
}

/// Waits until `n` more readings than `before` arrived on the LAN.
fn wait_readings(sub: &Sub, before: usize, n: usize, what: &str) -> usize {
    poll_until(WAIT, || {
        let count = sub
            .messages()
            .iter()
            .filter(|l| l.starts_with("fb/meter/"))
            .count();
        (count >= before + n).then_some(count)
    })
    .unwrap_or_else(|| panic!("timed out waiting for {n} readings on the LAN {what}"))
}

/// Regression (issue 11): a full disk stopped polling, the LAN readings and the health
/// report (each waited for a commit), and a restart on the full disk exited at once.
#[test]
fn the_agent_polls_serves_the_lan_and_reports_health_on_a_full_disk_and_restarts_there() {
    let Some(disk) = small_disk("4m") else {
        return;
    };
    let image = serde_json::json!({"units": {"1": {
        "holding": {"0": vec![0; 10]},
        "counter": (0..10).map(|a| serde_json::json!({"kind": "holding", "address": a})).collect::<Vec<_>>(),
    }}});
    let slave = Slave::tcp(&image);
    let lan = free_port();
    let conf = tempfile::tempdir().expect("tempdir");
    let points: String = (0..10)
        .map(|a| format!("[[bus.device.point]]\nname = \"p{a}\"\nkind = \"holding\"\naddress = {a}\ntype = \"u16\"\n"))
        .collect();
    let config = format!(
            "[agent]\nprefix = \"fb\"\nhealth_interval_secs = 1\n\n\
             [broker]\n[[broker.listeners]]\nbind = \"127.0.0.1:{lan}\"\n\n\
             [store]\npath = {store:?}\ncommit_interval_ms = 20\nmemory_buffer_rows = 200\n\n\
             [upstream]\nurl = \"mqtt://127.0.0.1:{down}\"\nbackoff_min_ms = 100\nbackoff_max_ms = 500\n\n\
             [[bus]]\nname = \"plant\"\nkind = \"tcp\"\nhost = \"127.0.0.1\"\nport = {port}\n\n\
             [[bus.device]]\nname = \"meter\"\nunit_id = 1\npoll_interval_ms = 20\n\n{points}",
            store = disk.path("queue.db").display().to_string(),
            down = free_port(),
            port = slave.port(),
        );

    let mut agent = Agent::start(conf.path(), &config);
    wait_for_port(lan, WAIT);
    let sub = Sub::start(lan, &["-t", "fb/#", "-v"]);
    sub.wait_subscribed(WAIT);
    wait_health(&sub, "a first health report", |h| {
        h["disk"]["state"] == "writable"
    });
    let filler = disk.fill();
    let full = wait_health(
        &sub,
        "the store full, dropping beyond its memory buffer",
        |h| h["disk"]["state"] == "full" && h["queue"]["dropped"]["disk_full"].as_u64() > Some(0),
    );
    assert!(full["queue"]["buffered"].as_u64() <= Some(200), "{full}");
    let seen = sub
        .messages()
        .iter()
        .filter(|l| l.starts_with("fb/meter/"))
        .count();
    wait_readings(&sub, seen, 200, "while the disk is full");
    let reports = sub
        .messages()
        .iter()
        .filter(|l| l.starts_with("fb/health "))
        .count();
    poll_until(WAIT, || {
        let now = sub
            .messages()
            .iter()
            .filter(|l| l.starts_with("fb/health "))
            .count();
        (now >= reports + 2).then_some(())
    })
    .expect("health reports go on while the disk is full");
    assert_eq!(
        agent.log().matches("store full:").count(),
        1,
        "one line per state change"
    );
    stop(&mut agent);
    drop(sub);

    agent.launch();
    wait_for_port(lan, WAIT);
    let sub = Sub::start(lan, &["-t", "fb/#", "-v"]);
    sub.wait_subscribed(WAIT);
    wait_readings(&sub, 0, 200, "after a restart on the full disk");
    wait_health(&sub, "a health report after the restart", |h| {
        h["disk"]["state"] == "full"
    });

    std::fs::remove_file(filler).expect("space returns");
    wait_health(&sub, "the store writable again", |h| {
        h["disk"]["state"] == "writable" && h["disk"]["buffered"] == 0
    });
    assert!(
        agent.log().contains("store accepts readings again"),
        "{}",
        agent.log()
    );
    stop(&mut agent);
}

/// SIGTERM, then waits for the exit, whatever its status.
fn stop(agent: &mut Agent) {
    agent.signal("TERM");
    agent.wait_exit(WAIT);
}
