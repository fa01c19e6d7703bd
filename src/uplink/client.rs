//! The connection task: resolve, connect, TLS, CONNECT/CONNACK, then one loop that
//! reads packets, feeds store rows into the session and writes what the session says;
//! reconnects with backoff when anything fails.
//!
//! Invariants:
//! - Store requests are never cancelled half-way: each runs as a future owned by the
//!   task until it completes, across a lost connection too (a dropped `next` would
//!   leave rows marked in flight that no one sends).
//! - Before the session is told the connection is gone, every store request has
//!   completed, so nothing it produces leaks into the next connection.
//! - Rows are read ahead of the window (a few windows' worth, at most 1000, held in
//!   memory and returned to the store on shutdown), so store latency is off the critical path:
//!   an acknowledgement frees a slot and the next row goes out in the same turn.
//! - Writes are batched: everything the session queued after one event is encoded into
//!   one buffer and written with one call, bounded by the keepalive interval.
//! - One log line per state change (connected, lost, each backoff step), never one per
//!   message.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use crate::future::maybe;
use crate::mqtt::{self, Protocol, Publish};
use crate::store::{self, DrainOrder, Queue, Stored};

use super::backoff::Backoff;
use super::config::{BrokerUrl, UplinkConfig};
use super::error::Error;
use super::state::{DropReason, Effect, Session};
use super::status::{
    duration_words, thousands, Counters, LinkState, OutageLog, OutageNote, OUTAGE_SUMMARY_EVERY,
};

/// Largest packet accepted from the broker (announced to 5.0 brokers).
pub(super) const MAX_INCOMING_PACKET: u32 = 1 << 20;
/// Capacity of the channel of incoming messages, and our receive maximum.
pub(super) const INCOMING_CAPACITY: u16 = 64;
/// Most rows asked of the store at once, and most rows read ahead.
const FETCH_MAX: usize = 1_000;
/// Acks sent to the store in one request once this many are waiting...
const ACK_BATCH: usize = 256;
/// ...or once the first of them has waited this long.
const ACK_DELAY: Duration = Duration::from_millis(10);
/// Read-ahead in windows, without a replay limit...
const READ_AHEAD_WINDOWS: usize = 4;
/// ...and at least this many rows.
const READ_AHEAD_MIN: usize = 256;
/// A connection that lasted this long resets the backoff; a broker that accepts and
/// then drops us at once (two gateways sharing a client id) keeps backing off.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
/// Packet id and `pubrec` of each flow a persist request wrote, in request order.
type Persisted = Vec<(u16, bool)>;

/// A byte stream to the broker: TCP or TLS over TCP.
trait Transport: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Transport for T {}

/// How the handle asks the task to stop.
pub(super) enum Stop {
    /// Publish offline, wait for its acknowledgement at most this long, DISCONNECT.
    Graceful(Duration),
    /// The handle was dropped: close the socket (the broker publishes the will).
    Abandoned,
}

/// Why a connection ended.
enum End {
    Stop(Stop),
    Lost(Error),
    /// The store is closed: the uplink cannot go on.
    Store(store::Error),
}

/// Token bucket for backlog replay.
#[derive(Debug)]
struct ReplayLimiter {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl ReplayLimiter {
    fn new(per_sec: u32, now: Instant) -> ReplayLimiter {
        let per_sec = f64::from(per_sec.max(1));
        // A tenth of a second's worth, at least one message.
        let burst = (per_sec / 10.0).max(1.0);
        ReplayLimiter {
            per_sec,
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        self.last = now;
    }

    /// Whether one message may go now.
    fn allows(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= 1.0
    }

    /// Spends one message.
    fn spend(&mut self) {
        self.tokens -= 1.0;
    }

    /// When one message may go again.
    fn ready_at(&self) -> Instant {
        let missing = (1.0 - self.tokens).max(0.0);
        self.last + Duration::from_secs_f64(missing / self.per_sec)
    }
}

/// Completes with the first of `futures` to finish (the oldest when several are
/// ready) and removes it; pending forever when there are none. Dropping this future
/// cancels nothing: the futures stay in the vector.
async fn first_done<T>(futures: &mut Vec<BoxFuture<T>>) -> T {
    if futures.is_empty() {
        return std::future::pending().await;
    }
    std::future::poll_fn(|cx| {
        for i in 0..futures.len() {
            if let Poll::Ready(value) = futures[i].as_mut().poll(cx) {
                drop(futures.remove(i));
                return Poll::Ready(value);
            }
        }
        Poll::Pending
    })
    .await
}

/// Runs futures concurrently, first polled in order (so store requests are queued in
/// order), and returns their outputs in order.
async fn join_all<T>(futures: Vec<BoxFuture<T>>) -> Vec<T> {
    let mut futures: Vec<Option<BoxFuture<T>>> = futures.into_iter().map(Some).collect();
    let mut outputs: Vec<Option<T>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (slot, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if let Some(future) = slot {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => {
                        *output = Some(value);
                        *slot = None;
                    }
                    Poll::Pending => done = false,
                }
            }
        }
        if done {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Store requests in progress and the work waiting for them.
struct StoreWork {
    queue: Queue,
    order: DrainOrder,
    fetch: Option<BoxFuture<Result<Vec<Stored>, store::Error>>>,
    /// How many rows the running fetch asked for.
    fetch_asked: usize,
    /// The last fetch came back short: wait for the store to report new rows.
    drained: bool,
    pending: watch::Receiver<u64>,
    /// Rows fetched and not yet offered to the session.
    ready: VecDeque<Stored>,
    acks: Vec<i64>,
    /// When the oldest id in `acks` arrived.
    acks_since: Option<Instant>,
    acking: Option<BoxFuture<Result<(), store::Error>>>,
    flows: Vec<(i64, u16, bool)>,
    /// Flow batches being persisted. Several may run: the store thread takes requests
    /// in order and answers them at its commits, so they finish in order.
    persisting: Vec<BoxFuture<Result<Persisted, store::Error>>>,
}

impl StoreWork {
    fn start_fetch(&mut self, max: usize) {
        self.pending.borrow_and_update();
        let queue = self.queue.clone();
        let order = self.order;
        self.fetch_asked = max;
        self.fetch = Some(Box::pin(async move { queue.next(max, order).await }));
    }

    /// Starts the ack and flow requests that have work and none running.
    /// Starts the flow persists at once and the ack when it is worth a round trip to
    /// the store thread (a full batch, `ACK_DELAY` after the first waiting id, or
    /// `force`). Deletes become durable only at the store's next commit anyway.
    fn start_writes(&mut self, now: Instant, force: bool) {
        if self.acks.is_empty() {
            self.acks_since = None;
        } else if self.acking.is_none()
            && (force
                || self.acks.len() >= ACK_BATCH
                || self
                    .acks_since
                    .is_some_and(|since| now >= since + ACK_DELAY))
        {
            self.acks_since = None;
            let ids = std::mem::take(&mut self.acks);
            let queue = self.queue.clone();
            self.acking = Some(Box::pin(async move { queue.ack(ids).await }));
        }
        if !self.flows.is_empty() {
            let flows = std::mem::take(&mut self.flows);
            let queue = self.queue.clone();
            self.persisting.push(Box::pin(async move {
                let done: Persisted = flows.iter().map(|&(_, p, r)| (p, r)).collect();
                let calls = flows
                    .into_iter()
                    .map(|(id, pkid, pubrec)| {
                        let queue = queue.clone();
                        Box::pin(async move { queue.set_flow(id, pkid, pubrec).await })
                            as BoxFuture<_>
                    })
                    .collect();
                for result in join_all(calls).await {
                    result?;
                }
                Ok(done)
            }));
        }
    }

    fn busy(&self) -> bool {
        self.fetch.is_some()
            || self.acking.is_some()
            || !self.acks.is_empty()
            || !self.persisting.is_empty()
    }

    /// When waiting acks are due, if they wait.
    fn ack_due(&self) -> Option<Instant> {
        match (&self.acking, self.acks_since) {
            (None, Some(since)) => Some(since + ACK_DELAY),
            _ => None,
        }
    }

    /// Takes a fetch result into the read-ahead buffer.
    fn fetched(&mut self, rows: Vec<Stored>) {
        if rows.len() < self.fetch_asked {
            self.drained = true;
        }
        self.ready.extend(rows);
    }
}

/// Everything the connection task owns.
pub(super) struct Client {
    pub config: UplinkConfig,
    pub url: BrokerUrl,
    pub protocol: Protocol,
    pub tls: Option<(TlsConnector, ServerName<'static>)>,
    pub session: Session,
    pub counters: Arc<Counters>,
    pub state: watch::Sender<LinkState>,
    pub incoming: mpsc::Sender<Publish>,
    pub backoff: Backoff,
    store: StoreWork,
    limiter: Option<ReplayLimiter>,
    /// What is worth logging about outages and backlogs.
    outage: OutageLog,
    /// Wall clock at the last CONNACK: rows created before it are backlog.
    connected_at_ms: i64,
    too_large_logged: bool,
    incoming_drop_logged: bool,
}

impl Client {
    #[allow(clippy::too_many_arguments)] // the parts of the uplink, each owned once
    pub fn new(
        config: UplinkConfig,
        url: BrokerUrl,
        tls: Option<(TlsConnector, ServerName<'static>)>,
        session: Session,
        counters: Arc<Counters>,
        state: watch::Sender<LinkState>,
        incoming: mpsc::Sender<Publish>,
        queue: Queue,
    ) -> Client {
        let backoff = Backoff::new(
            Duration::from_millis(config.backoff_min_ms),
            Duration::from_millis(config.backoff_max_ms),
        );
        let pending = queue.pending();
        Client {
            protocol: config.protocol.into(),
            store: StoreWork {
                queue,
                order: config.drain_order,
                fetch: None,
                fetch_asked: 0,
                drained: false,
                pending,
                ready: VecDeque::new(),
                acks: Vec::new(),
                acks_since: None,
                acking: None,
                flows: Vec::new(),
                persisting: Vec::new(),
            },
            limiter: None,
            outage: OutageLog::default(),
            connected_at_ms: 0,
            too_large_logged: false,
            incoming_drop_logged: false,
            config,
            url,
            tls,
            session,
            counters,
            state,
            incoming,
            backoff,
        }
    }

    fn set_state(&self, state: LinkState) {
        self.state.send_replace(state);
    }

    /// The task: connect, serve, back off, until stopped.
    pub async fn run(mut self, mut stop: oneshot::Receiver<Duration>) {
        match self.store.queue.unswept_flows().await {
            Ok(pkids) => self.session.sweep(pkids),
            Err(error) => {
                tracing::error!(%error, "the store failed; the uplink stops");
                self.finish(Stop::Abandoned).await;
                return;
            }
        }
        let connect_timeout = Duration::from_secs(self.config.connect_timeout_secs);
        let stop = loop {
            let attempt = self.backoff.attempt() + 1;
            self.set_state(LinkState::Connecting { attempt });
            let established = tokio::select! {
                result = tokio::time::timeout(connect_timeout, self.establish()) => {
                    result.unwrap_or(Err(Error::ConnectTimeout(connect_timeout)))
                }
                received = &mut stop => break stop_kind(received),
            };
            let (error, lost) = match established {
                Ok((stream, rbuf)) => {
                    let since = Instant::now();
                    self.counters.connects.fetch_add(1, Ordering::Relaxed);
                    self.set_state(LinkState::Connected {
                        session_present: self.session.session_present(),
                    });
                    match self.serve(stream, rbuf, &mut stop).await {
                        End::Stop(stop) => break stop,
                        End::Store(error) => {
                            tracing::error!(%error, "the store failed; the uplink stops");
                            break Stop::Abandoned;
                        }
                        End::Lost(error) => {
                            if since.elapsed() >= STABLE_CONNECTION {
                                self.backoff.reset();
                            }
                            (error, true)
                        }
                    }
                }
                Err(error) => {
                    self.session.disconnected();
                    self.counters
                        .connect_failures
                        .fetch_add(1, Ordering::Relaxed);
                    if error.is_auth_failure() {
                        self.counters.auth_failures.fetch_add(1, Ordering::Relaxed);
                    }
                    (error, false)
                }
            };
            let delay = self.backoff.next_delay();
            let attempt = self.backoff.attempt();
            self.log_failure(&error, lost, attempt, delay);
            self.set_state(LinkState::Backoff {
                attempt,
                delay,
                error: error.to_string(),
            });
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                received = &mut stop => break stop_kind(received),
            }
        };
        self.finish(stop).await;
    }

    /// One line when an outage starts, a summary every few minutes while it lasts;
    /// each attempt in between only at debug level.
    /// `lost`: the error ended a connection (rather than an attempt to connect).
    fn log_failure(&mut self, error: &Error, lost: bool, attempt: u32, delay: Duration) {
        let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        let auth = error.is_auth_failure();
        let rows = thousands(*self.store.pending.borrow());
        match self.outage.failed(Instant::now(), auth) {
            Some(OutageNote::Down) if auth => tracing::error!(
                %error,
                "the upstream broker rejects our credentials; check upstream.username and the password (retrying with backoff; a summary follows every {})",
                duration_words(OUTAGE_SUMMARY_EVERY)
            ),
            Some(OutageNote::Down) => tracing::warn!(
                %error,
                "{}; retrying with backoff (a summary follows every {} while it lasts)",
                if lost {
                    "upstream connection lost"
                } else {
                    "upstream connection failed"
                },
                duration_words(OUTAGE_SUMMARY_EVERY)
            ),
            Some(OutageNote::StillDown { down_for, failures }) => tracing::warn!(
                failures,
                "upstream down for {}, {rows} rows waiting, last error: {error}",
                duration_words(down_for)
            ),
            _ => tracing::debug!(%error, attempt, delay_ms, "upstream connection attempt failed"),
        }
    }

    /// Releases the rows the session holds and reports the end.
    async fn finish(&mut self, stop: Stop) {
        if let Stop::Abandoned = stop {
            tracing::info!("uplink handle dropped; stopping without DISCONNECT");
        }
        self.settle().await;
        let mut rows = self.session.held_rows();
        rows.extend(self.store.ready.drain(..).map(|row| row.id));
        if !rows.is_empty() {
            if let Err(error) = self.store.queue.release(rows).await {
                tracing::warn!(%error, "could not return in-flight rows to the store");
            }
        }
        self.set_state(LinkState::Stopped);
        tracing::info!("uplink stopped");
    }

    /// Waits for every store request in progress (and what they lead to).
    async fn settle(&mut self) {
        self.apply_effects();
        self.store.start_writes(Instant::now(), true);
        while self.store.busy() {
            let now = Instant::now();
            tokio::select! {
                result = maybe(&mut self.store.fetch) => {
                    self.store.fetch = None;
                    if let Ok(rows) = result {
                        self.store.fetched(rows);
                    }
                }
                result = maybe(&mut self.store.acking) => {
                    self.store.acking = None;
                    if let Err(error) = result {
                        tracing::warn!(%error, "store ack failed");
                    }
                }
                result = first_done(&mut self.store.persisting) => {
                    if let Ok(done) = result {
                        for (pkid, pubrec) in done {
                            self.session.flow_persisted(pkid, pubrec, now);
                        }
                    }
                }
            }
            self.apply_effects();
            self.store.start_writes(Instant::now(), true);
        }
    }

    /// DNS, TCP, TLS, CONNECT, CONNACK.
    async fn establish(&mut self) -> Result<(Box<dyn Transport>, BytesMut), Error> {
        let host = self.url.host.as_str();
        let addrs: Vec<_> = tokio::net::lookup_host((host, self.url.port))
            .await
            .map_err(|source| Error::Resolve {
                host: host.to_owned(),
                source,
            })?
            .collect();
        let mut last_error = None;
        let mut tcp = None;
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(stream) => {
                    tcp = Some(stream);
                    break;
                }
                Err(e) => last_error = Some(e),
            }
        }
        let tcp = match (tcp, last_error) {
            (Some(tcp), _) => tcp,
            (None, Some(e)) => return Err(Error::Io(e)),
            (None, None) => {
                return Err(Error::Resolve {
                    host: host.to_owned(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses"),
                })
            }
        };
        tcp.set_nodelay(true)?;
        let mut stream: Box<dyn Transport> = match &self.tls {
            Some((connector, name)) => Box::new(
                connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|source| super::tls::handshake_error(host, source))?,
            ),
            None => Box::new(tcp),
        };
        let password = self.config.password()?;
        let connect = self.session.connect(password);
        let mut wbuf = BytesMut::new();
        mqtt::encode(&connect, self.protocol, &mut wbuf)?;
        stream.write_all(&wbuf).await?;
        stream.flush().await?;
        let mut rbuf = BytesMut::with_capacity(4096);
        loop {
            while let Some(packet) =
                mqtt::decode(&mut rbuf, self.protocol, MAX_INCOMING_PACKET as usize)?
            {
                self.session.handle(packet, Instant::now())?;
                if self.session.is_connected() {
                    return Ok((stream, rbuf));
                }
            }
            if stream.read_buf(&mut rbuf).await? == 0 {
                return Err(Error::Closed);
            }
        }
    }

    /// One connection, from CONNACK to its end.
    async fn serve(
        &mut self,
        mut stream: Box<dyn Transport>,
        mut rbuf: BytesMut,
        stop: &mut oneshot::Receiver<Duration>,
    ) -> End {
        let limits = self.session.limits();
        self.connected_at_ms = wall_ms();
        self.too_large_logged = false;
        self.limiter = self
            .config
            .replay_rate_limit
            .map(|rate| ReplayLimiter::new(rate, Instant::now()));
        self.store.drained = false;
        let waiting = *self.store.pending.borrow();
        if let Some(OutageNote::Recovered { down_for, rows }) =
            self.outage.connected(Instant::now(), waiting)
        {
            tracing::info!(
                "upstream connected again after {} down, {} rows waiting",
                duration_words(down_for),
                thousands(rows)
            );
        }
        tracing::info!(
            session_present = self.session.session_present(),
            receive_maximum = limits.receive_maximum,
            maximum_packet_size = limits.maximum_packet_size,
            maximum_qos = limits.maximum_qos as u8,
            retain_available = limits.retain_available,
            topic_alias_maximum = limits.topic_alias_maximum,
            keep_alive = limits.keep_alive,
            "upstream connected"
        );
        let end = self.serve_loop(&mut stream, &mut rbuf, stop).await;
        let end = match end {
            End::Stop(Stop::Graceful(timeout)) => {
                self.graceful(&mut stream, &mut rbuf, timeout).await;
                End::Stop(Stop::Graceful(timeout))
            }
            other => other,
        };
        self.settle().await;
        self.session.disconnected();
        end
    }

    async fn serve_loop(
        &mut self,
        stream: &mut Box<dyn Transport>,
        rbuf: &mut BytesMut,
        stop: &mut oneshot::Receiver<Duration>,
    ) -> End {
        let mut wbuf = BytesMut::with_capacity(16 * 1024);
        let write_timeout = Duration::from_secs(self.session.limits().keep_alive.max(1).into());
        let mut keepalive = Box::pin(tokio::time::sleep(write_timeout));
        let mut ack_timer = Box::pin(tokio::time::sleep(ACK_DELAY));
        loop {
            let now = Instant::now();
            let throttled_until = self.feed(now);
            if self.store.drained && self.store.fetch.is_none() && self.store.ready.is_empty() {
                if let Some(OutageNote::Drained { took, rows }) = self.outage.drained(now) {
                    tracing::info!(
                        "backlog drained in {} ({} rows)",
                        duration_words(took),
                        thousands(rows)
                    );
                }
            }
            if let Err(error) = self.flush(stream, &mut wbuf, write_timeout).await {
                return End::Lost(error);
            }
            self.apply_effects();
            self.store.start_writes(now, false);
            self.start_fetch();
            // One timer for the connection, moved only when the deadline moves: a new
            // one per turn would cost a timer-wheel insert per batch of packets.
            let deadline = self
                .session
                .next_timer()
                .unwrap_or_else(|| now + Duration::from_secs(3600));
            if keepalive.deadline() != deadline {
                keepalive.as_mut().reset(deadline);
            }
            let ack_due = self.store.ack_due();
            if let Some(due) = ack_due {
                if ack_timer.deadline() != due {
                    ack_timer.as_mut().reset(due);
                }
            }
            let drained = self.store.drained && self.store.fetch.is_none();
            rbuf.reserve(8 * 1024);
            tokio::select! {
                received = &mut *stop => return End::Stop(stop_kind(received)),
                read = stream.read_buf(rbuf) => {
                    match read {
                        Ok(0) => return End::Lost(Error::Closed),
                        Ok(_) => {
                            if let Err(error) = self.decode_all(rbuf) {
                                return End::Lost(error);
                            }
                        }
                        Err(e) => return End::Lost(Error::Io(e)),
                    }
                }
                result = maybe(&mut self.store.fetch) => {
                    self.store.fetch = None;
                    match result {
                        Ok(rows) => self.store.fetched(rows),
                        Err(error) => return End::Store(error),
                    }
                }
                result = maybe(&mut self.store.acking) => {
                    self.store.acking = None;
                    if let Err(error) = result {
                        return End::Store(error);
                    }
                }
                result = first_done(&mut self.store.persisting) => {
                    match result {
                        Ok(done) => {
                            let now = Instant::now();
                            for (pkid, pubrec) in done {
                                self.session.flow_persisted(pkid, pubrec, now);
                            }
                        }
                        Err(error) => return End::Store(error),
                    }
                }
                changed = self.store.pending.changed(), if drained => {
                    if changed.is_err() {
                        return End::Store(store::Error::Closed(Vec::new()));
                    }
                    self.store.drained = false;
                }
                () = &mut ack_timer, if ack_due.is_some() => {}
                () = &mut keepalive => {
                    if let Err(error) = self.session.on_timer(Instant::now()) {
                        return End::Lost(error.into());
                    }
                }
                () = sleep_until_opt(throttled_until) => {}
            }
        }
    }

    /// Reads ahead: four windows' worth and at least 256 rows (each `next` scans past the
    /// rows in flight, so fewer, larger fetches cost less), but only one window under a
    /// replay limit, so live rows never queue behind many throttled backlog rows.
    fn start_fetch(&mut self) {
        if self.store.fetch.is_some() || self.store.drained || !self.session.is_connected() {
            return;
        }
        let window = usize::from(self.config.inflight);
        let target = if self.limiter.is_some() {
            window
        } else {
            window
                .saturating_mul(READ_AHEAD_WINDOWS)
                .max(READ_AHEAD_MIN)
        }
        .min(FETCH_MAX);
        if self.store.ready.len() * 2 <= target {
            self.store.start_fetch(target - self.store.ready.len());
        }
    }

    /// Offers read-ahead rows while the window has room and the replay limit allows.
    /// Returns when to try again if the limit holds rows back.
    fn feed(&mut self, now: Instant) -> Option<Instant> {
        while self.session.room() > 0 {
            let Some(row) = self.store.ready.front() else {
                break;
            };
            if let Some(limiter) = &mut self.limiter {
                if row.message.created_ms < self.connected_at_ms {
                    if !limiter.allows(now) {
                        return Some(limiter.ready_at());
                    }
                    limiter.spend();
                }
            }
            if let Some(row) = self.store.ready.pop_front() {
                self.session.offer(row, now);
            }
        }
        None
    }

    fn decode_all(&mut self, rbuf: &mut BytesMut) -> Result<(), Error> {
        let now = Instant::now();
        while let Some(packet) = mqtt::decode(rbuf, self.protocol, MAX_INCOMING_PACKET as usize)? {
            self.session.handle(packet, now)?;
        }
        Ok(())
    }

    /// Encodes what the session queued and writes it in one go.
    async fn flush(
        &mut self,
        stream: &mut Box<dyn Transport>,
        wbuf: &mut BytesMut,
        limit: Duration,
    ) -> Result<(), Error> {
        for packet in self.session.take_outbox() {
            mqtt::encode(&packet, self.protocol, wbuf)?;
        }
        if wbuf.is_empty() {
            return Ok(());
        }
        let write = async {
            stream.write_all(wbuf).await?;
            stream.flush().await
        };
        match tokio::time::timeout(limit, write).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the broker took no data for {limit:?}"),
                )))
            }
        }
        wbuf.clear();
        Ok(())
    }

    /// Turns the session's effects into store work and deliveries.
    fn apply_effects(&mut self) {
        let effects: Vec<Effect> = self.session.take_effects().collect();
        for effect in effects {
            match effect {
                Effect::Delete(id) => {
                    self.counters.acked.fetch_add(1, Ordering::Relaxed);
                    self.store.acks.push(id);
                }
                Effect::Drop { id, reason } => {
                    self.store.acks.push(id);
                    match reason {
                        DropReason::TooLarge { size, max } => {
                            self.counters
                                .dropped_too_large
                                .fetch_add(1, Ordering::Relaxed);
                            if !self.too_large_logged {
                                self.too_large_logged = true;
                                tracing::warn!(
                                    id,
                                    size,
                                    max,
                                    "message larger than the upstream broker's maximum packet size dropped (further drops are only counted)"
                                );
                            }
                        }
                        DropReason::InvalidTopic(error) => {
                            self.counters
                                .dropped_invalid
                                .fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(id, %error, "message with an invalid topic dropped");
                        }
                        DropReason::Rejected(_) => {
                            self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Effect::PersistFlow { id, pkid, pubrec } => {
                    self.store.flows.push((id, pkid, pubrec))
                }
                Effect::Swept => {
                    // Answered in order with the flow persists; it persists nothing.
                    let queue = self.store.queue.clone();
                    self.store.persisting.push(Box::pin(async move {
                        queue.flows_swept().await?;
                        Ok(Vec::new())
                    }));
                }
                Effect::Incoming(publish) => {
                    self.counters.incoming.fetch_add(1, Ordering::Relaxed);
                    if let Err(mpsc::error::TrySendError::Full(_)) =
                        self.incoming.try_send(*publish)
                    {
                        self.counters
                            .incoming_dropped
                            .fetch_add(1, Ordering::Relaxed);
                        if !self.incoming_drop_logged {
                            self.incoming_drop_logged = true;
                            tracing::warn!(
                                "incoming messages dropped: the consumer is not keeping up"
                            );
                        }
                    }
                }
            }
        }
        if !self.store.acks.is_empty() && self.store.acks_since.is_none() {
            self.store.acks_since = Some(Instant::now());
        }
    }

    /// Offline status, its acknowledgement (bounded), DISCONNECT.
    async fn graceful(
        &mut self,
        stream: &mut Box<dyn Transport>,
        rbuf: &mut BytesMut,
        timeout: Duration,
    ) {
        let deadline = Instant::now() + timeout;
        let mut wbuf = BytesMut::new();
        if let Some(pkid) = self.session.publish_offline(Instant::now()) {
            while self.session.is_pending(pkid) {
                if self.flush(stream, &mut wbuf, timeout).await.is_err() {
                    return;
                }
                self.apply_effects();
                self.store.start_writes(Instant::now(), true);
                rbuf.reserve(4096);
                let read = tokio::time::timeout_at(deadline, stream.read_buf(rbuf)).await;
                match read {
                    Ok(Ok(n)) if n > 0 => {
                        if self.decode_all(rbuf).is_err() {
                            return;
                        }
                    }
                    Ok(_) => return,
                    Err(_) => {
                        tracing::warn!(
                            "no acknowledgement of the offline status before the shutdown timeout"
                        );
                        break;
                    }
                }
            }
        }
        let disconnect = self.session.disconnect();
        wbuf.clear();
        if mqtt::encode(&disconnect, self.protocol, &mut wbuf).is_ok() {
            let remaining = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(100));
            let _ = tokio::time::timeout(remaining, async {
                stream.write_all(&wbuf).await?;
                stream.shutdown().await
            })
            .await;
        }
    }
}

fn stop_kind(received: Result<Duration, oneshot::error::RecvError>) -> Stop {
    match received {
        Ok(timeout) => Stop::Graceful(timeout),
        Err(_) => Stop::Abandoned,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
