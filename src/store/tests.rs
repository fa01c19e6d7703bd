//! Queue tests on a real SQLite file in a temp dir. The test-only commands (`crash`,
//! `pragma`) reach into the store thread for faults a real part cannot produce on
//! demand: a crash between two requests, a full disk (`max_page_count`), a read-only
//! database (`query_only`). The kill -9 test in tests/store_queue.rs crashes for real.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;

use super::commit;
use super::*;
use crate::mqtt::QoS;

fn config(path: &Path) -> StoreConfig {
    StoreConfig {
        path: path.to_path_buf(),
        commit_interval_ms: 2,
        ..StoreConfig::default()
    }
}

fn message(topic: &str, n: u32, priority: Priority) -> Message {
    Message {
        topic: topic.to_string(),
        payload: Bytes::from(n.to_be_bytes().to_vec()),
        qos: QoS::AtLeastOnce,
        retain: false,
        created_ms: crate::clock::now_ms(),
        priority,
        unsynced: None,
    }
}

fn batch(topic: &str, range: std::ops::Range<u32>) -> Vec<Message> {
    range
        .map(|n| message(topic, n, Priority::Periodic))
        .collect()
}

fn numbers(stored: &[Stored]) -> Vec<u32> {
    stored
        .iter()
        .map(|s| u32::from_be_bytes(s.message.payload[..4].try_into().expect("4 bytes")))
        .collect()
}

#[tokio::test]
async fn appended_rows_are_handed_out_in_order_and_deleted_only_by_ack() {
    let dir = tempfile::tempdir().expect("tempdir");
    let queue = Queue::open(config(&dir.path().join("q.db"))).expect("open");
    let ids = queue.append(batch("a", 0..10)).await.expect("append");
    assert_eq!(ids.len(), 10);
    assert!(ids.windows(2).all(|w| w[0] < w[1]));

    let first = queue.next(4, DrainOrder::OldestFirst).await.expect("next");
    assert_eq!(numbers(&first), vec![0, 1, 2, 3]);
    assert_eq!(first[0].id, ids[0]);
    let second = queue.next(4, DrainOrder::OldestFirst).await.expect("next");
    assert_eq!(numbers(&second), vec![4, 5, 6, 7]);

    queue
        .ack(first.iter().map(|s| s.id).collect())
        .await
        .expect("ack");
    queue
        .release(second.iter().map(|s| s.id).collect())
        .await
        .expect("release");
    let again = queue
        .next(100, DrainOrder::OldestFirst)
        .await
        .expect("next");
    assert_eq!(numbers(&again), vec![4, 5, 6, 7, 8, 9]);

    let stats = queue.stats().await.expect("stats");
    assert_eq!(stats.in_flight, 6);
    queue.close().await.expect("close");

    let queue = Queue::open(config(&dir.path().join("q.db"))).expect("reopen");
    let stats = queue.stats().await.expect("stats");
    assert_eq!(
        (
            stats.depth,
            stats.in_flight,
            stats.appended,
            stats.delivered
        ),
        (6, 0, 10, 4)
    );
    let left = queue
        .next(100, DrainOrder::OldestFirst)
        .await
        .expect("next");
    assert_eq!(
        numbers(&left),
        vec![4, 5, 6, 7, 8, 9],
        "in flight at close is pending again"
    );
    queue.close().await.expect("close");
}

#[tokio::test]
async fn newest_first_hands_out_the_newest_rows_in_append_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let queue = Queue::open(config(&dir.path().join("q.db"))).expect("open");
    queue.append(batch("a", 0..10)).await.expect("append");
    let newest = queue.next(3, DrainOrder::NewestFirst).await.expect("next");
    assert_eq!(numbers(&newest), vec![7, 8, 9]);
    let newest = queue.next(3, DrainOrder::NewestFirst).await.expect("next");
    assert_eq!(numbers(&newest), vec![4, 5, 6]);
    let oldest = queue
        .next(100, DrainOrder::OldestFirst)
        .await
        .expect("next");
    assert_eq!(numbers(&oldest), vec![0, 1, 2, 3]);
    queue.close().await.expect("close");
}

#[tokio::test]
async fn flow_state_survives_a_restart_for_qos2_resumption() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("q.db");
    let queue = Queue::open(config(&path)).expect("open");
    queue.append(batch("a", 0..3)).await.expect("append");
    let out = queue.next(3, DrainOrder::OldestFirst).await.expect("next");
    assert!(out.iter().all(|s| s.pkid.is_none() && !s.pubrec));
    queue
        .set_flow(out[0].id, 17, false)
        .await
        .expect("set_flow");
    queue.set_flow(out[1].id, 18, true).await.expect("set_flow");
    queue.crash().await;

    let queue = Queue::open(config(&path)).expect("reopen");
    let out = queue.next(3, DrainOrder::OldestFirst).await.expect("next");
    let flows: Vec<_> = out.iter().map(|s| (s.pkid, s.pubrec)).collect();
    assert_eq!(
        flows,
        vec![(Some(17), false), (Some(18), true), (None, false)]
    );
    queue
        .release(out.iter().map(|s| s.id).collect())
        .await
        .expect("release");
    let again = queue.next(1, DrainOrder::OldestFirst).await.expect("next");
    assert_eq!(again[0].pkid, Some(17), "release keeps the flow state");
    queue.close().await.expect("close");
}

#[tokio::test]
async fn pending_watch_changes_on_commit_and_release() {
    let dir = tempfile::tempdir().expect("tempdir");
    let queue = Queue::open(config(&dir.path().join("q.db"))).expect("open");
    let mut pending = queue.pending();
    assert_eq!(*pending.borrow_and_update(), 0);
    queue.append(batch("a", 0..5)).await.expect("append");
    assert!(pending.has_changed().expect("sender alive"));
    assert_eq!(*pending.borrow_and_update(), 5);
    let out = queue.next(5, DrainOrder::OldestFirst).await.expect("next");
    assert!(!pending.has_changed().expect("sender alive"));
    queue.release(vec![out[0].id]).await.expect("release");
    assert!(pending.has_changed().expect("sender alive"));
    assert_eq!(*pending.borrow_and_update(), 1);
    queue.close().await.expect("close");
}

#[tokio::test]
async fn a_closed_queue_hands_an_append_its_batch_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let queue = Queue::open(config(&dir.path().join("q.db"))).expect("open");
    let other = queue.clone();
    queue.close().await.expect("close");
    match other.append(batch("a", 0..2)).await {
        Err(Error::Closed(back)) => assert_eq!(back.len(), 2),
        other => panic!("expected Closed with the batch, got {other:?}"),
    }
    assert!(matches!(other.stats().await, Err(Error::Closed(_))));
}

#[tokio::test]
async fn a_row_id_of_i64_max_in_the_file_is_not_an_overflow_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("q.db");
    let queue = Queue::open(config(&path)).expect("open");
    queue.append(batch("a", 0..1)).await.expect("append");
    queue.close().await.expect("close");
    rusqlite::Connection::open(&path)
        .expect("sqlite")
        .execute_batch("UPDATE message SET id = 9223372036854775807")
        .expect("rewrite the id");

    let queue = Queue::open(config(&path)).expect("reopen");
    let out = queue.next(10, DrainOrder::OldestFirst).await.expect("next");
    assert_eq!(out.iter().map(|s| s.id).collect::<Vec<_>>(), vec![i64::MAX]);
    queue.ack(vec![i64::MAX]).await.expect("ack");
    let stats = wait_stats(&queue, "the ack committed", |s| s.depth == 0).await;
    assert_eq!(stats.delivered, 1);
    queue.close().await.expect("close");
}

#[tokio::test]
async fn set_flow_commits_without_waiting_for_the_group_interval() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = StoreConfig {
        commit_interval_ms: 60_000,
        commit_max_rows: 1,
        ..config(&dir.path().join("q.db"))
    };
    let queue = Queue::open(cfg).expect("open");
    queue.append(batch("a", 0..20)).await.expect("append");
    let rows = queue.next(20, DrainOrder::OldestFirst).await.expect("next");
    let before = queue.stats().await.expect("stats").commits;
    // A whole window at once, as the uplink does: it resolves long before the
    // 60 s group interval, and shares commits.
    let calls = rows.iter().enumerate().map(|(n, s)| {
        let queue = queue.clone();
        let id = s.id;
        tokio::spawn(async move { queue.set_flow(id, n as u16 + 1, true).await })
    });
    let calls: Vec<_> = calls.collect();
    tokio::time::timeout(Duration::from_secs(30), async {
        for call in calls {
            call.await.expect("task").expect("set_flow");
        }
    })
    .await
    .expect("set_flow resolves without the group-commit interval");
    let commits = queue.stats().await.expect("stats").commits - before;
    assert!((1..=20).contains(&commits), "{commits} commits");
    queue.crash().await;
    let queue = Queue::open(StoreConfig {
        commit_interval_ms: 60_000,
        ..config(&dir.path().join("q.db"))
    })
    .expect("reopen");
    let again = queue.next(20, DrainOrder::OldestFirst).await.expect("next");
    let flows: Vec<_> = again.iter().map(|s| (s.pkid, s.pubrec)).collect();
    let want: Vec<_> = (1..=20).map(|p| (Some(p), true)).collect();
    assert_eq!(flows, want, "flow state committed before set_flow resolved");
    queue.close().await.expect("close");
}

#[tokio::test]
async fn released_rows_behind_the_cursor_come_out_first_in_queue_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let queue = Queue::open(StoreConfig {
        commit_interval_ms: 1,
        ..config(&dir.path().join("q.db"))
    })
    .expect("open");
    queue.append(batch("a", 0..10)).await.expect("append");
    let first = queue.next(6, DrainOrder::OldestFirst).await.expect("next");
    assert_eq!(numbers(&first), (0..6).collect::<Vec<_>>());
    queue
        .ack(vec![first[0].id, first[2].id])
        .await
        .expect("ack");
    queue
        .release(vec![first[4].id, first[1].id])
        .await
        .expect("release");
    queue.append(batch("a", 10..12)).await.expect("append");
    let second = queue.next(4, DrainOrder::OldestFirst).await.expect("next");
    assert_eq!(numbers(&second), vec![1, 4, 6, 7]);
    // The newest end takes released rows too; they are not handed out twice.
    queue.release(vec![first[1].id]).await.expect("release");
    let newest = queue.next(5, DrainOrder::NewestFirst).await.expect("next");
    assert_eq!(numbers(&newest), vec![1, 8, 9, 10, 11]);
    let rest = queue.next(10, DrainOrder::OldestFirst).await.expect("next");
    assert!(rest.is_empty(), "{:?}", numbers(&rest));
    queue.close().await.expect("close");
}

#[test]
fn config_defaults_and_validation_use_key_paths() {
    let parsed: StoreConfig = toml::from_str("").expect("empty section");
    assert_eq!(parsed, StoreConfig::default());
    assert!(parsed.validate().is_empty());
    let parsed: StoreConfig =
        toml::from_str("policy = \"drop_newest\"\nsynchronous = \"full\"\nmax_rows = 0\n")
            .expect("parse");
    assert_eq!(parsed.policy, DropPolicy::DropNewest);
    assert_eq!(parsed.synchronous, Synchronous::Full);
    let keys: Vec<String> = parsed.validate().into_iter().map(|p| p.key).collect();
    assert_eq!(keys, vec!["store.max_rows"]);
    assert!(toml::from_str::<StoreConfig>("max_rowz = 1").is_err());
}

fn big(topic: &str, n: u32, priority: Priority) -> Message {
    let mut m = message(topic, n, priority);
    let mut payload = n.to_be_bytes().to_vec();
    payload.resize(2000, 0xA5);
    m.payload = Bytes::from(payload);
    m
}

/// An append that waits for its commit in a task of its own, while the test goes on.
fn spawn_append(
    queue: &Queue,
    batch: Vec<Message>,
) -> tokio::task::JoinHandle<Result<Vec<i64>, Error>> {
    let queue = queue.clone();
    tokio::spawn(async move { queue.append(batch).await })
}

/// Polls the queue's stats until `check` holds, or panics after 10 s: this file's one
/// poll loop (unit tests cannot use `tests/common/util.rs`'s `wait_for`, which this
/// mirrors). Tests wait for a state through it, never with a sleep of their own.
async fn wait_stats(queue: &Queue, what: &str, check: impl Fn(&Stats) -> bool) -> Stats {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let stats = queue.stats().await.expect("stats");
        if check(&stats) {
            return stats;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {stats:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn disk_full_holds_batches_in_memory_drops_newest_beyond_and_recovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let queue = Queue::open(StoreConfig {
        memory_buffer_rows: 20,
        policy: DropPolicy::DropNewest,
        ..config(&dir.path().join("q.db"))
    })
    .expect("open");
    queue
        .append(vec![big("a", 0, Priority::Periodic)])
        .await
        .expect("append");
    // Lower than the file: SQLite caps the file at its current size.
    queue
        .pragma("PRAGMA max_page_count = 1")
        .await
        .expect("max_page_count");

    let held = spawn_append(
        &queue,
        (1..11).map(|n| big("a", n, Priority::Periodic)).collect(),
    );
    wait_stats(&queue, "a failed commit", |s| {
        s.commit_failures >= 1 && s.buffered == 10
    })
    .await;
    let held2 = spawn_append(
        &queue,
        (11..21).map(|n| big("a", n, Priority::Event)).collect(),
    );
    wait_stats(&queue, "second batch buffered", |s| s.buffered == 20).await;
    // Over the memory bound: drop_newest refuses the newest batch of the lowest class.
    match queue
        .append((21..24).map(|n| big("a", n, Priority::Periodic)).collect())
        .await
    {
        Err(Error::Dropped {
            rows: 3,
            reason: DropReason::DiskFull,
        }) => {}
        other => panic!("expected the newest periodic batch dropped, got {other:?}"),
    }
    assert!(
        !held.is_finished(),
        "an append resolves only once committed"
    );

    queue
        .pragma("PRAGMA max_page_count = 1048576")
        .await
        .expect("space returns");
    let ids1 = held
        .await
        .expect("task")
        .expect("committed after space returned");
    let ids2 = held2
        .await
        .expect("task")
        .expect("committed after space returned");
    assert_eq!((ids1.len(), ids2.len()), (10, 10));
    let out = queue
        .next(100, DrainOrder::OldestFirst)
        .await
        .expect("next");
    assert_eq!(numbers(&out), (0..21).collect::<Vec<_>>());
    let stats = queue.stats().await.expect("stats");
    assert_eq!(stats.dropped.disk_full, 3);
    assert_eq!(stats.buffered, 0);
    queue.close().await.expect("close");
}

#[tokio::test]
async fn disk_full_with_drop_oldest_evicts_old_periodic_rows_to_store_new_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let queue = Queue::open(StoreConfig {
        memory_buffer_rows: 5,
        ..config(&dir.path().join("q.db"))
    })
    .expect("open");
    queue
        .append(vec![big("alarm", 0, Priority::Alarm)])
        .await
        .expect("append");
    queue
        .append((1..31).map(|n| big("a", n, Priority::Periodic)).collect())
        .await
        .expect("append");
    queue
        .pragma("PRAGMA max_page_count = 1")
        .await
        .expect("max_page_count");

    let new: Vec<Message> = (100..110)
        .map(|n| big("a", n, Priority::Periodic))
        .collect();
    let ids = queue
        .append(new)
        .await
        .expect("stored after evicting old rows");
    assert_eq!(ids.len(), 10);
    let stats = queue.stats().await.expect("stats");
    assert!(stats.dropped.disk_full >= 10, "{stats:?}");
    assert!(stats.commit_failures >= 1);
    let out = queue
        .next(1000, DrainOrder::OldestFirst)
        .await
        .expect("next");
    let got = numbers(&out);
    assert_eq!(got[0], 0, "the alarm outlives periodic rows");
    assert!(got.ends_with(&(100..110).collect::<Vec<_>>()), "{got:?}");
    assert_eq!(out.len() as u64 + stats.dropped.disk_full, 41);
    queue.close().await.expect("close");
}

#[tokio::test]
async fn a_read_only_database_holds_appends_and_acks_in_memory_until_writable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let queue = Queue::open(config(&dir.path().join("q.db"))).expect("open");
    queue.append(batch("a", 0..3)).await.expect("append");
    let out = queue.next(3, DrainOrder::OldestFirst).await.expect("next");
    queue
        .pragma("PRAGMA query_only = 1")
        .await
        .expect("read-only");

    let held = spawn_append(&queue, batch("a", 3..5));
    queue.ack(vec![out[0].id]).await.expect("ack");
    wait_stats(&queue, "two failed commits", |s| {
        s.commit_failures >= 2 && s.buffered == 2
    })
    .await;
    assert!(!held.is_finished());
    let again = queue.next(10, DrainOrder::OldestFirst).await.expect("next");
    assert!(
        again.is_empty(),
        "acked and in-flight rows are not handed out: {again:?}"
    );

    queue
        .pragma("PRAGMA query_only = 0")
        .await
        .expect("writable again");
    let ids = held.await.expect("task").expect("committed once writable");
    assert_eq!(ids.len(), 2);
    queue
        .release(out[1..].iter().map(|s| s.id).collect())
        .await
        .expect("release");
    let left = queue.next(10, DrainOrder::OldestFirst).await.expect("next");
    assert_eq!(numbers(&left), vec![1, 2, 3, 4]);
    let stats = queue.stats().await.expect("stats");
    assert_eq!((stats.delivered, stats.depth), (1, 4));
    queue.close().await.expect("close");
}

/// A full disk (the file capped by `max_page_count`): more acknowledged rows than one
/// small delete step are all deleted, in steps, while appends cannot be written, and
/// the held batch is stored afterwards.
#[tokio::test]
async fn acked_rows_are_deleted_in_steps_on_a_full_disk_and_the_held_batch_is_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let queue = Queue::open(config(&dir.path().join("q.db"))).expect("open");
    let stored = 3 * commit::SMALL_DELETES as u32;
    queue
        .append(
            (0..stored)
                .map(|n| big("a", n, Priority::Periodic))
                .collect(),
        )
        .await
        .expect("append");
    queue
        .pragma("PRAGMA max_page_count = 1")
        .await
        .expect("max_page_count");
    let held = spawn_append(
        &queue,
        (stored..stored + 10)
            .map(|n| big("a", n, Priority::Periodic))
            .collect(),
    );
    wait_stats(&queue, "a failed commit", |s| {
        s.commit_failures >= 1 && s.buffered == 10
    })
    .await;

    let out = queue
        .next(stored as usize, DrainOrder::OldestFirst)
        .await
        .expect("next");
    queue
        .ack(out.iter().map(|s| s.id).collect())
        .await
        .expect("ack");
    let ids = held
        .await
        .expect("task")
        .expect("stored once rows were deleted");
    assert_eq!(ids.len(), 10);
    let stats = wait_stats(&queue, "every acked row deleted", |s| {
        s.delivered == u64::from(stored) && s.depth == 10
    })
    .await;
    assert_eq!(stats.buffered, 0, "{stats:?}");
    queue.close().await.expect("close");
}

/// Regression (issue 11): every open wrote `PRAGMA user_version`, so a restart on a
/// full or read-only disk failed and the agent never started. Reopening an existing
/// file of the current format must write nothing: its WAL stays empty.
#[tokio::test]
async fn opening_an_existing_file_writes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("q.db");
    let queue = Queue::open(config(&path)).expect("open");
    queue.append(batch("a", 0..3)).await.expect("append");
    queue.close().await.expect("close");

    let queue = Queue::open(config(&path)).expect("reopen");
    // A round trip: the store thread runs and has read the file.
    let stats = queue.stats().await.expect("stats");
    assert_eq!(stats.depth, 3);
    let wal = std::fs::metadata(dir.path().join("q.db-wal")).map_or(0, |m| m.len());
    assert_eq!(wal, 0, "opening wrote to the file");
    queue.close().await.expect("close");
}

mod model {
    //! Model-based test: random sequences of append, next, ack, release, set_flow,
    //! close + reopen and crash + reopen against a plain in-memory model. Nothing
    //! accepted is lost, queue order is kept, nothing is handed out twice within a
    //! session, and after a crash only rows whose ack was not yet committed come back.

    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Append(Vec<(u8, u8)>),
        Next(usize, bool),
        Ack(Vec<usize>),
        Release(Vec<usize>),
        SetFlow(usize, u16, bool),
        Reopen,
        Crash,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => prop::collection::vec((0u8..3, 0u8..3), 1..6).prop_map(Op::Append),
            4 => (1usize..8, any::<bool>()).prop_map(|(n, newest)| Op::Next(n, newest)),
            3 => prop::collection::vec(any::<usize>(), 1..4).prop_map(Op::Ack),
            2 => prop::collection::vec(any::<usize>(), 1..4).prop_map(Op::Release),
            2 => (any::<usize>(), 1u16.., any::<bool>()).prop_map(|(i, p, r)| Op::SetFlow(i, p, r)),
            1 => Just(Op::Reopen),
            1 => Just(Op::Crash),
        ]
    }

    #[derive(Debug, Clone, PartialEq)]
    struct Row {
        message: Message,
        pkid: Option<u16>,
        pubrec: bool,
    }

    #[derive(Default)]
    struct Model {
        /// Committed and not acknowledged.
        rows: BTreeMap<i64, Row>,
        in_flight: BTreeSet<i64>,
        /// Acknowledged, but the delete may not be committed yet.
        acked: BTreeMap<i64, Row>,
        serial: u32,
    }

    impl Model {
        fn pick(&self, i: usize) -> Option<i64> {
            let n = self.in_flight.len();
            (n > 0).then(|| *self.in_flight.iter().nth(i % n).expect("index below len"))
        }

        fn pending(&self) -> Vec<i64> {
            self.rows
                .keys()
                .filter(|id| !self.in_flight.contains(id))
                .copied()
                .collect()
        }
    }

    fn check(stored: &Stored, row: &Row) {
        assert_eq!(&stored.message, &row.message, "row {}", stored.id);
        assert_eq!(
            (stored.pkid, stored.pubrec),
            (row.pkid, row.pubrec),
            "flow of row {}",
            stored.id
        );
    }

    /// The queue under test and the model it must match.
    struct Harness {
        cfg: StoreConfig,
        queue: Queue,
        model: Model,
        /// The last id appended since the last crash.
        last_id: i64,
    }

    impl Harness {
        /// Appends one batch; its ids grow past every id seen.
        async fn append(&mut self, spec: Vec<(u8, u8)>) {
            let batch: Vec<Message> = spec
                .iter()
                .map(|&(topic, class)| {
                    self.model.serial += 1;
                    let priority =
                        [Priority::Periodic, Priority::Event, Priority::Alarm][class as usize];
                    let mut m = message(&format!("t/{topic}"), self.model.serial, priority);
                    m.qos = QoS::from_u8(class).expect("0..3");
                    m.retain = topic == 1;
                    m
                })
                .collect();
            let ids = self.queue.append(batch.clone()).await.expect("append");
            assert_eq!(ids.len(), batch.len());
            let floor = self
                .model
                .rows
                .keys()
                .chain(self.model.acked.keys())
                .max()
                .copied()
                .unwrap_or(0)
                .max(self.last_id);
            assert!(ids[0] > floor, "ids grow: {ids:?} after {floor}");
            assert!(ids.windows(2).all(|w| w[0] < w[1]));
            self.last_id = *ids.last().expect("non-empty");
            for (id, message) in ids.into_iter().zip(batch) {
                self.model.rows.insert(
                    id,
                    Row {
                        message,
                        pkid: None,
                        pubrec: false,
                    },
                );
            }
        }

        /// Hands out rows; they are the model's pending rows from the chosen end.
        async fn next(&mut self, max: usize, newest: bool) {
            let order = if newest {
                DrainOrder::NewestFirst
            } else {
                DrainOrder::OldestFirst
            };
            let got = self.queue.next(max, order).await.expect("next");
            let pending = self.model.pending();
            let want: Vec<i64> = if newest {
                pending[pending.len().saturating_sub(max)..].to_vec()
            } else {
                pending.into_iter().take(max).collect()
            };
            assert_eq!(got.iter().map(|s| s.id).collect::<Vec<_>>(), want);
            for stored in &got {
                check(stored, &self.model.rows[&stored.id]);
                self.model.in_flight.insert(stored.id);
            }
        }

        /// Acknowledges some in-flight rows.
        async fn ack(&mut self, picks: Vec<usize>) {
            let ids: BTreeSet<i64> = picks.iter().filter_map(|&i| self.model.pick(i)).collect();
            self.queue
                .ack(ids.iter().copied().collect())
                .await
                .expect("ack");
            for id in ids {
                self.model.in_flight.remove(&id);
                let row = self.model.rows.remove(&id).expect("acked rows are stored");
                self.model.acked.insert(id, row);
            }
        }

        /// Releases some in-flight rows.
        async fn release(&mut self, picks: Vec<usize>) {
            let ids: BTreeSet<i64> = picks.iter().filter_map(|&i| self.model.pick(i)).collect();
            self.queue
                .release(ids.iter().copied().collect())
                .await
                .expect("release");
            for id in ids {
                self.model.in_flight.remove(&id);
            }
        }

        /// Persists the flow state of one in-flight row.
        async fn set_flow(&mut self, i: usize, pkid: u16, pubrec: bool) {
            if let Some(id) = self.model.pick(i) {
                self.queue
                    .set_flow(id, pkid, pubrec)
                    .await
                    .expect("set_flow");
                let row = self
                    .model
                    .rows
                    .get_mut(&id)
                    .expect("in flight rows are stored");
                row.pkid = Some(pkid);
                row.pubrec = pubrec;
            }
        }

        /// Close and reopen: acknowledged rows are gone, nothing is in flight.
        async fn reopen(&mut self) {
            self.queue.clone().close().await.expect("close");
            self.queue = Queue::open(self.cfg.clone()).expect("reopen");
            self.model.acked.clear();
            self.model.in_flight.clear();
            let stats = self.queue.stats().await.expect("stats");
            assert_eq!(stats.depth, self.model.rows.len() as u64);
            assert_eq!(stats.pending, stats.depth);
        }

        /// Crash and reopen: committed rows are all back, and only rows whose ack may not
        /// have been committed come back besides.
        async fn crash(&mut self) {
            self.queue.clone().crash().await;
            self.queue = Queue::open(self.cfg.clone()).expect("reopen after crash");
            self.model.in_flight.clear();
            // Everything comes back pending; acks not yet committed may undo.
            let all = self
                .queue
                .next(usize::MAX, DrainOrder::OldestFirst)
                .await
                .expect("next");
            let ids: Vec<i64> = all.iter().map(|s| s.id).collect();
            assert!(
                ids.windows(2).all(|w| w[0] < w[1]),
                "queue order after crash"
            );
            let got: BTreeSet<i64> = ids.iter().copied().collect();
            for id in self.model.rows.keys() {
                assert!(got.contains(id), "committed row {id} lost in a crash");
            }
            for stored in &all {
                match (
                    self.model.rows.get(&stored.id),
                    self.model.acked.get(&stored.id),
                ) {
                    (Some(row), _) | (None, Some(row)) => check(stored, row),
                    (None, None) => panic!("row {} came back from nowhere", stored.id),
                }
            }
            let acked = std::mem::take(&mut self.model.acked);
            for (id, row) in acked {
                if got.contains(&id) {
                    self.model.rows.insert(id, row);
                }
            }
            self.queue.release(ids).await.expect("release");
            // Ids of rows whose delete was committed may be handed out again
            // after a crash (the persisted id counter lags); harmless, since
            // in-flight state does not survive a crash either.
            self.last_id = 0;
        }
    }

    async fn run(ops: Vec<Op>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = StoreConfig {
            commit_interval_ms: 1,
            ..config(&dir.path().join("q.db"))
        };
        let mut h = Harness {
            queue: Queue::open(cfg.clone()).expect("open"),
            cfg,
            model: Model::default(),
            last_id: 0,
        };
        for op in ops {
            match op {
                Op::Append(spec) => h.append(spec).await,
                Op::Next(max, newest) => h.next(max, newest).await,
                Op::Ack(picks) => h.ack(picks).await,
                Op::Release(picks) => h.release(picks).await,
                Op::SetFlow(i, pkid, pubrec) => h.set_flow(i, pkid, pubrec).await,
                Op::Reopen => h.reopen().await,
                Op::Crash => h.crash().await,
            }
            let stats = h.queue.stats().await.expect("stats");
            assert_eq!(stats.in_flight, h.model.in_flight.len() as u64);
        }
        h.queue.close().await.expect("close");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn queue_matches_the_model(ops in prop::collection::vec(op(), 1..40)) {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(run(ops));
        }
    }
}

/// A store whose group commit waits long enough for a test to act inside the window.
fn slow_commit(path: &Path, commit_interval_ms: u64) -> StoreConfig {
    StoreConfig {
        commit_interval_ms,
        ..config(path)
    }
}

/// Submits a batch; the receiver gets its answer (the earlier of commit and ack).
async fn submit(queue: &Queue, batch: Vec<Message>) -> tokio::sync::oneshot::Receiver<Vec<i64>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    queue
        .submit(
            batch,
            Box::new(move |result| {
                let _ = tx.send(result.expect("accepted"));
            }),
        )
        .await;
    rx
}

fn qos2(mut batch: Vec<Message>) -> Vec<Message> {
    for m in &mut batch {
        m.qos = QoS::ExactlyOnce;
    }
    batch
}

#[tokio::test]
async fn fast_path_a_reading_acked_within_the_window_is_accepted_and_never_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("q.db");
    let queue = Queue::open(slow_commit(&path, 60_000)).expect("open");
    let accepted = submit(&queue, batch("a", 0..5)).await;
    let fresh = queue.next(10, DrainOrder::OldestFirst).await.expect("next");
    assert_eq!(
        numbers(&fresh),
        vec![0, 1, 2, 3, 4],
        "offered before any commit"
    );
    queue
        .ack(fresh.iter().map(|s| s.id).collect())
        .await
        .expect("ack");
    let ids = tokio::time::timeout(Duration::from_secs(5), accepted)
        .await
        .expect("accepted on the ack, not at a commit a minute later")
        .expect("answer");
    assert_eq!(ids, fresh.iter().map(|s| s.id).collect::<Vec<_>>());
    let stats = queue.stats().await.expect("stats");
    assert_eq!((stats.depth, stats.buffered, stats.in_flight), (0, 0, 0));
    assert_eq!((stats.appended, stats.delivered), (5, 5));
    // A crash now: had the rows been written, their deletes (not committed) would bring
    // them back.
    queue.crash().await;
    let queue = Queue::open(config(&path)).expect("reopen");
    assert!(queue
        .next(10, DrainOrder::OldestFirst)
        .await
        .expect("next")
        .is_empty());
    queue.close().await.expect("close");
}

#[tokio::test]
async fn fast_path_an_unacknowledged_reading_is_committed_after_the_window_with_its_flow() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("q.db");
    let queue = Queue::open(slow_commit(&path, 200)).expect("open");
    let accepted = submit(&queue, qos2(batch("a", 0..3))).await;
    let fresh = queue.next(10, DrainOrder::OldestFirst).await.expect("next");
    assert_eq!(fresh.len(), 3);
    // PUBREC of the first one while it is in memory: recorded at once, no commit.
    queue
        .set_flow(fresh[0].id, 42, true)
        .await
        .expect("set_flow");
    assert_eq!(queue.stats().await.expect("stats").depth, 0);
    queue.ack(vec![fresh[2].id]).await.expect("ack");
    tokio::time::timeout(Duration::from_secs(5), accepted)
        .await
        .expect("committed within the window")
        .expect("answer");
    let stats = queue.stats().await.expect("stats");
    assert_eq!((stats.depth, stats.in_flight), (2, 2));
    assert!(
        queue
            .next(10, DrainOrder::OldestFirst)
            .await
            .expect("next")
            .is_empty(),
        "committed rows stay in flight, never handed out twice"
    );
    queue.crash().await;
    let queue = Queue::open(config(&path)).expect("reopen");
    let back = queue.next(10, DrainOrder::OldestFirst).await.expect("next");
    assert_eq!(
        numbers(&back),
        vec![0, 1],
        "the acked one was never written"
    );
    assert_eq!((back[0].pkid, back[0].pubrec), (Some(42), true));
    assert_eq!((back[1].pkid, back[1].pubrec), (None, false));
    queue.close().await.expect("close");
}

#[tokio::test]
async fn fast_path_a_crash_reports_the_packet_ids_of_flows_held_only_in_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("q.db");
    // A stored QoS 2 row, in flight: its packet id is its own flow's, never swept.
    let queue = Queue::open(config(&path)).expect("open");
    let stored = queue.append(qos2(batch("a", 0..1))).await.expect("append");
    queue.close().await.expect("close");
    let queue = Queue::open(slow_commit(&path, 60_000)).expect("open");
    let _accepted = submit(&queue, qos2(batch("a", 1..4))).await;
    let out = queue.next(10, DrainOrder::OldestFirst).await.expect("next");
    assert_eq!(out.len(), 4);
    assert_eq!(out[0].id, stored[0]);
    queue.ack(vec![out[1].id]).await.expect("ack");
    queue.crash().await;

    let queue = Queue::open(config(&path)).expect("reopen");
    let unswept = queue.unswept_flows().await.expect("unswept");
    for row in &out[1..] {
        assert!(
            unswept.contains(&pkid_for_row(row.id)),
            "memory row {} may hold its packet id at the broker",
            row.id
        );
    }
    assert!(!unswept.contains(&pkid_for_row(stored[0])));
    // New rows never reuse an id (hence a packet id) a memory row may have had.
    let new = queue.append(batch("b", 0..1)).await.expect("append");
    assert!(
        new[0] > out[3].id + 1000,
        "ids restart above the reservation"
    );
    assert!(!unswept.contains(&pkid_for_row(new[0])));
    queue.flows_swept().await.expect("swept");
    queue.close().await.expect("close");
    let queue = Queue::open(config(&path)).expect("reopen");
    assert!(queue.unswept_flows().await.expect("unswept").is_empty());
    queue.close().await.expect("close");
}

#[tokio::test]
async fn fast_path_a_graceful_close_stores_rows_held_in_memory_and_leaves_nothing_to_sweep() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("q.db");
    let queue = Queue::open(slow_commit(&path, 60_000)).expect("open");
    let _accepted = submit(&queue, qos2(batch("a", 0..3))).await;
    let out = queue.next(10, DrainOrder::OldestFirst).await.expect("next");
    queue
        .set_flow(out[1].id, out[1].id as u16, true)
        .await
        .expect("set_flow");
    queue.close().await.expect("close");
    let queue = Queue::open(config(&path)).expect("reopen");
    assert!(queue.unswept_flows().await.expect("unswept").is_empty());
    let back = queue.next(10, DrainOrder::OldestFirst).await.expect("next");
    assert_eq!(numbers(&back), vec![0, 1, 2]);
    assert!(back[1].pubrec);
    queue.close().await.expect("close");
}

#[tokio::test]
async fn fast_path_off_hands_out_only_committed_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let queue = Queue::open(StoreConfig {
        fast_path: false,
        ..slow_commit(&dir.path().join("q.db"), 300)
    })
    .expect("open");
    let accepted = submit(&queue, batch("a", 0..2)).await;
    assert!(queue
        .next(10, DrainOrder::OldestFirst)
        .await
        .expect("next")
        .is_empty());
    accepted.await.expect("committed");
    assert_eq!(
        queue
            .next(10, DrainOrder::OldestFirst)
            .await
            .expect("next")
            .len(),
        2
    );
    queue.close().await.expect("close");
}

#[tokio::test]
async fn fast_path_backlog_goes_before_fresh_rows_oldest_first_and_after_newest_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("q.db");
    let queue = Queue::open(config(&path)).expect("open");
    queue.append(batch("old", 0..3)).await.expect("append");
    queue.close().await.expect("close");
    let queue = Queue::open(slow_commit(&path, 60_000)).expect("open");
    let _accepted = submit(&queue, batch("new", 3..6)).await;
    let first = queue.next(4, DrainOrder::OldestFirst).await.expect("next");
    assert_eq!(numbers(&first), vec![0, 1, 2, 3]);
    queue
        .release(first.iter().map(|s| s.id).collect())
        .await
        .expect("release");
    let newest = queue.next(4, DrainOrder::NewestFirst).await.expect("next");
    assert_eq!(numbers(&newest), vec![2, 3, 4, 5]);
    queue.close().await.expect("close");
}

#[tokio::test]
async fn fast_path_a_hold_keeps_buffered_rows_back_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let queue = Queue::open(slow_commit(&dir.path().join("q.db"), 60_000)).expect("open");
    queue.hold(true).await;
    let _accepted = submit(&queue, batch("a", 0..3)).await;
    assert!(
        queue
            .next(10, DrainOrder::OldestFirst)
            .await
            .expect("next")
            .is_empty(),
        "held (time.require_sync before the first sync): nothing leaves, from memory either"
    );
    queue.hold(false).await;
    let fresh = queue.next(10, DrainOrder::OldestFirst).await.expect("next");
    assert_eq!(numbers(&fresh), vec![0, 1, 2]);
    queue.close().await.expect("close");
}
