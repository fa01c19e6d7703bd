//! Wiring, lifecycle, shutdown, reload and systemd notify.
//!
//! ```text
//! bus tasks ──(bounded mpsc)──► pipeline ─┬─► local broker (in-process publish)
//!  (supervised)                           └─► store ◄── uplink drains it
//! health ──► local broker + store        signals ──► reload / shutdown
//! http (/metrics, /, /api/status) ◄── the health report's counters + recent (per point)
//! ```
//!
//! Invariants:
//! - Startup order: signals, local broker, store, uplink, pipeline, buses, health, the
//!   HTTP endpoint; then READY=1 (the broker listens and the buses poll).
//! - Shutdown order (SIGTERM/SIGINT): stop polling; let the pipeline commit what it
//!   holds; publish `offline` and disconnect upstream; `offline` on the local broker;
//!   stop the broker; close the store. The whole sequence is bounded by
//!   `agent.shutdown_timeout_ms`.
//! - A reload (SIGHUP) replaces the bus tasks and re-reads the broker's password and
//!   ACL files; the store, the upstream session and the pipeline are never touched. A
//!   new config that fails validation is rejected and the running one stays.
//! - With `[homeassistant]`, the discovery messages go out once the broker runs (and
//!   the store is open, with `upstream = true`) and follow each reload of the device
//!   maps ([`discovery`]).
//! - A panicking bus task is restarted with backoff by `supervisor`; it never ends
//!   the agent.

mod commands;
pub mod demo;
pub mod discovery;
mod health;
mod metrics;
mod pipeline;
mod recent;
pub mod signals;
mod sparkplug;
mod status;
mod supervisor;
pub mod systemd;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use sd_notify::NotifyState;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::broker::{self, Broker, BrokerConfig, BrokerHandle};
use crate::config::{self, Config};
use crate::field::{self, FieldEvent, ResolvedBus};
use crate::http::{self, HttpHandle};
use crate::mqtt::QoS;
use crate::store::{self, Queue};
use crate::time::{TimeCounters, TimeKeeper};
use crate::topics::Topics;
use crate::uplink::{self, Uplink, UplinkHandle};

use pipeline::Counters;
use signals::{Command, SignalListener};
use systemd::Heartbeat;

/// Time the uplink may take beyond its shutdown timeout to return in-flight rows.
const UPLINK_RELEASE_GRACE: Duration = Duration::from_secs(2);

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error("local broker: {0}")]
    Broker(#[from] broker::Error),
    #[error("store: {0}")]
    Store(#[from] store::Error),
    #[error("upstream: {0}")]
    Uplink(#[from] uplink::Error),
    #[error(transparent)]
    Field(#[from] field::Error),
    #[error("{0}")]
    Io(#[source] std::io::Error),
    #[error("http endpoint: {0}")]
    Http(#[from] http::Error),
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
}

/// The runtime the agent runs on: `agent.worker_threads` threads (1: tokio's
/// `current_thread`; 0: one worker per core). A gateway's work (a few buses, the LAN
/// broker, the uplink) is mostly waiting, and the store and the broker's persistence
/// have threads of their own for their blocking I/O; every worker thread would cost a
/// stack and a malloc arena of its own (measured in BENCHMARKS.md, "Footprint"), so the
/// default is 1. Nothing on it may block.
///
/// # Errors
/// The runtime cannot be built (no threads or no epoll for this process).
pub fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
    };
    builder.enable_all().build()
}

/// Runs the agent on `config` until SIGTERM or SIGINT. `config_path` is re-read on
/// SIGHUP; without one (the demo) SIGHUP only logs.
///
/// # Errors
/// A part that cannot start (broker port taken, store unreadable, bad TLS files);
/// everything after startup is handled and logged, not returned.
pub async fn run(config: Config, config_path: Option<PathBuf>) -> Result<(), Error> {
    let (_signals, mut commands) = SignalListener::start().map_err(Error::Signals)?;
    let mut agent = Agent::start(config).await?;
    systemd::notify(NotifyState::Ready);
    loop {
        match commands.recv().await {
            Some(Command::Reload) => match &config_path {
                Some(path) => agent.reload(path).await,
                None => tracing::warn!("SIGHUP ignored: no configuration file to reload"),
            },
            Some(Command::Shutdown(signal)) => {
                tracing::info!(signal, "shutting down");
                break;
            }
            None => break,
        }
    }
    systemd::notify(NotifyState::Stopping);
    agent.shutdown().await;
    Ok(())
}

/// The bus tasks of one field configuration, under one supervisor.
struct Buses {
    stop: CancellationToken,
    supervisor: JoinHandle<()>,
}

impl Buses {
    /// Cancels every bus task and waits until all have ended.
    async fn stop(self) {
        self.stop.cancel();
        if let Err(err) = self.supervisor.await {
            tracing::error!(error = %err, "bus supervisor failed");
        }
    }
}

/// Everything [`run`] started.
pub struct Agent {
    started: Instant,
    config: Config,
    outputs: Outputs,
    events: mpsc::Sender<FieldEvent>,
    /// `None` only while a reload swaps them.
    buses: Option<Buses>,
    bus_map: health::BusMap,
    supervisor_beat: Heartbeat,
    pipeline: JoinHandle<()>,
    background: CancellationToken,
    health: JoinHandle<()>,
    http: Option<HttpHandle>,
    watchdog: Option<JoinHandle<()>>,
    discovery: Option<discovery::Announcer>,
}

impl Agent {
    /// Starts every configured part.
    ///
    /// # Errors
    /// See [`run`].
    pub async fn start(config: Config) -> Result<Agent, Error> {
        let started = Instant::now();
        let topics = Topics::new(&config.agent.resolved_prefix(&config::hostname()));
        let resolved = field::resolve(&config.field)?;
        let writable = resolved.iter().any(ResolvedBus::has_writable_points);
        let broker = start_broker(&config, &topics).await?;
        let time = TimeKeeper::new(
            config.time.source(),
            config.time.require_sync,
            Arc::default(),
        );
        let (queue, uplink, upstream_commands, sparkplug) =
            open_upstream(&config, &topics, writable, &resolved, time.holds_upstream()).await?;
        let outputs = Outputs {
            topics,
            broker,
            queue,
            uplink,
            sparkplug,
            counters: Arc::default(),
            devices: Arc::default(),
            commands: Arc::default(),
            time: time.counters().clone(),
            recent: Arc::default(),
        };
        outputs.recent.configure(&resolved);

        let (events, events_rx) = mpsc::channel(config.agent.channel_capacity);
        let pipeline_beat = Heartbeat::new("pipeline");
        let pipeline = tokio::spawn(
            outputs
                .pipeline(&config, time)
                .run(events_rx, pipeline_beat.clone()),
        );

        let supervisor_beat = Heartbeat::new("bus supervisor");
        let bus_map: health::BusMap = Arc::new(Mutex::new(resolved.clone()));
        let buses = start_buses(resolved, events.clone(), supervisor_beat.clone());

        let background = CancellationToken::new();
        let discovery = outputs
            .start_discovery(&config, &bus_map, &background)
            .await;
        if writable {
            outputs.start_commands(&config, &bus_map, &events, upstream_commands, &background);
        }
        let health_beat = Heartbeat::new("health");
        let report = Arc::new(outputs.health(&config, started, bus_map.clone()));
        let health = tokio::spawn(report.clone().run(background.clone(), health_beat.clone()));
        let http = match &config.http {
            Some(http_config) => {
                let routes = routes(report, outputs.recent.clone(), &config)?;
                let handle = http::start(http_config, routes, background.clone()).await?;
                tracing::info!(addr = %handle.local_addr(), "http endpoint listening");
                Some(handle)
            }
            None => None,
        };
        let beats = vec![pipeline_beat, supervisor_beat.clone(), health_beat];
        let watchdog = spawn_watchdog(beats, &background);

        outputs.log_running(&config);
        Ok(Agent {
            started,
            config,
            outputs,
            events,
            buses: Some(buses),
            bus_map,
            supervisor_beat,
            pipeline,
            background,
            health,
            http,
            watchdog,
            discovery,
        })
    }

    /// Re-reads `path`; applies new device maps and the broker's password/ACL files.
    pub async fn reload(&mut self, path: &Path) {
        systemd::notify(NotifyState::Reloading);
        match config::load(path) {
            Err(err) => {
                tracing::error!("reload rejected, the running configuration stays:\n{err}");
            }
            Ok(new) => self.apply(new).await,
        }
        systemd::notify(NotifyState::Ready);
    }

    async fn apply(&mut self, new: Config) {
        let maps_changed = self.config.section_changed(&new, "bus")
            || self.config.section_changed(&new, "profile");
        // Resolve first, so that nothing is applied from a file that cannot be applied
        // in full.
        let resolved = if maps_changed {
            match field::resolve(&new.field) {
                Ok(resolved) => Some(resolved),
                Err(err) => {
                    tracing::error!(error = %err, "reload rejected: device maps do not resolve");
                    return;
                }
            }
        } else {
            None
        };
        if maps_changed && self.outputs.sparkplug.is_some() {
            tracing::warn!(
                "devices or points changed: Sparkplug births keep the devices and metrics \
                 of the start until the next restart (readings of new points are not sent \
                 upstream until then)"
            );
        }
        for section in [
            "agent",
            "store",
            "upstream",
            "http",
            "homeassistant",
            "time",
        ] {
            if self.config.section_changed(&new, section) {
                tracing::warn!(
                    section,
                    "[{section}] changed: takes effect at the next restart"
                );
            }
        }
        let restart_only = |broker: &Option<BrokerConfig>| {
            broker.as_ref().map(|broker| {
                let mut broker = broker.clone();
                // The only broker settings a reload applies: the files' contents.
                broker.password_file = None;
                broker.acl_file = None;
                broker
            })
        };
        let file_paths = |broker: &Option<BrokerConfig>| {
            broker
                .as_ref()
                .map(|broker| (broker.password_file.clone(), broker.acl_file.clone()))
        };
        if restart_only(&self.config.broker) != restart_only(&new.broker)
            || file_paths(&self.config.broker) != file_paths(&new.broker)
        {
            tracing::warn!("[broker] settings changed: take effect at the next restart");
        }
        if let Some(broker) = &self.outputs.broker {
            match broker.reload_auth().await {
                Ok(()) => tracing::info!("broker password and ACL files reloaded"),
                Err(err) => {
                    tracing::error!(error = %err, "broker password/ACL reload failed; the old ones stay")
                }
            }
        }
        match resolved {
            Some(resolved) => {
                // The old bus tasks end before the new ones open the same ports.
                if let Some(old) = self.buses.take() {
                    old.stop().await;
                }
                if let Ok(mut map) = self.bus_map.lock() {
                    map.clone_from(&resolved);
                }
                self.outputs.recent.configure(&resolved);
                if let (Some(announcer), Some(ha)) = (&self.discovery, &self.config.homeassistant) {
                    announcer
                        .update(discovery::announcements(
                            ha,
                            &self.outputs.topics,
                            &resolved,
                        ))
                        .await;
                }
                let count = resolved.len();
                self.buses = Some(start_buses(
                    resolved,
                    self.events.clone(),
                    self.supervisor_beat.clone(),
                ));
                self.config.field = new.field;
                for section in ["bus", "profile"] {
                    match new.raw.get(section) {
                        Some(value) => self.config.raw.insert(section.to_string(), value.clone()),
                        None => self.config.raw.remove(section),
                    };
                }
                tracing::info!(buses = count, "device maps reloaded");
            }
            None => tracing::info!("device maps unchanged"),
        }
    }

    /// The graceful shutdown; see the module invariants for the order.
    pub async fn shutdown(self) {
        let timeout = Duration::from_millis(self.config.agent.shutdown_timeout_ms);
        let stopping = Instant::now();
        let deadline = stopping + timeout;

        self.background.cancel();
        if let Some(buses) = self.buses {
            if tokio::time::timeout_at(deadline, buses.stop())
                .await
                .is_err()
            {
                tracing::warn!("bus tasks did not stop in time");
            }
        }
        drop(self.events);
        let _ = tokio::time::timeout_at(deadline, self.health).await;
        if let Some(http) = self.http {
            let _ = tokio::time::timeout_at(deadline, http.stopped()).await;
        }
        match tokio::time::timeout_at(deadline, self.pipeline).await {
            Ok(_) => tracing::info!(
                accepted = self
                    .outputs
                    .counters
                    .accepted
                    .load(std::sync::atomic::Ordering::Relaxed),
                "pipeline committed"
            ),
            Err(_) => tracing::error!("pipeline did not finish committing in time"),
        }
        if let Some(watchdog) = self.watchdog {
            let _ = watchdog.await;
        }

        // Offline goes to the local broker first, so LAN clients get it while the
        // upstream takes its round trip for the offline acknowledgement.
        if let Some(broker) = &self.outputs.broker {
            broker.publish(
                &self.outputs.topics.status(),
                Bytes::from_static(b"offline"),
                QoS::AtLeastOnce,
                true,
            );
        }
        if let Some(uplink) = self.outputs.uplink {
            // The health task and the HTTP endpoint have ended, so this is the last
            // reference.
            match Arc::into_inner(uplink) {
                Some(uplink) => {
                    // The uplink takes up to UPLINK_RELEASE_GRACE beyond its timeout to
                    // hand in-flight rows back to the store.
                    let left = deadline
                        .saturating_duration_since(Instant::now())
                        .saturating_sub(UPLINK_RELEASE_GRACE)
                        .max(Duration::from_millis(500));
                    match uplink.shutdown(left).await {
                        Ok(()) => tracing::info!("upstream disconnected"),
                        Err(err) => {
                            tracing::warn!(error = %err, "upstream did not disconnect cleanly")
                        }
                    }
                }
                None => tracing::error!("upstream still in use: stopped without DISCONNECT"),
            }
        }
        if let Some(broker) = self.outputs.broker {
            broker.shutdown().await;
        }
        if let Some(queue) = self.outputs.queue {
            if let Err(err) = queue.close().await {
                tracing::error!(error = %err, "store did not close cleanly");
            }
        }
        tracing::info!(
            shutdown_ms = stopping.elapsed().as_millis() as u64,
            uptime_secs = self.started.elapsed().as_secs(),
            "fieldbridge stopped"
        );
    }
}

/// Starts the local broker, when there is a `[broker]`, and announces `online` there.
async fn start_broker(config: &Config, topics: &Topics) -> Result<Option<BrokerHandle>, Error> {
    let Some(broker_config) = &config.broker else {
        return Ok(None);
    };
    let handle = Broker::start(broker_config.clone(), vec![topics.prefix().to_string()]).await?;
    for addr in handle.local_addrs() {
        tracing::info!(%addr, "local broker listening");
    }
    handle.publish(
        &topics.status(),
        Bytes::from_static(b"online"),
        QoS::AtLeastOnce,
        true,
    );
    Ok(Some(handle))
}

/// Opens the store and spawns the uplink that drains it, when there is an
/// `[upstream]`; LAN-only there is neither. With `hold` (`time.require_sync` before
/// the sync) the store holds its rows back from the uplink from the start.
/// With `writable` points the uplink also subscribes to the command topics, and their
/// messages are returned for the command router.
/// With `format = "sparkplug"` the edge node is returned too, for the pipeline, and
/// DCMD writes reach the router as set commands.
type UpstreamParts = (
    Option<Queue>,
    Option<Arc<UplinkHandle>>,
    Option<mpsc::Receiver<crate::mqtt::Publish>>,
    Option<sparkplug::Node>,
);

async fn open_upstream(
    config: &Config,
    topics: &Topics,
    writable: bool,
    buses: &[ResolvedBus],
    hold: bool,
) -> Result<UpstreamParts, Error> {
    let Some(upstream) = &config.upstream else {
        tracing::info!("no [upstream]: LAN-only, no store");
        return Ok((None, None, None, None));
    };
    let queue = Queue::open(config.store.clone())?;
    if hold {
        queue.hold(true).await;
        tracing::info!(
            "time.require_sync: readings wait in the store until the clock is synchronized"
        );
    }
    let mut upstream = upstream.clone();
    if writable {
        upstream.subscribe.push(topics.command("+", "+"));
    }
    let node = (upstream.format == uplink::PayloadFormat::Sparkplug)
        .then(|| sparkplug::Node::new(&upstream, buses));
    let format = node.as_ref().map(|node| {
        let bd_seq = crate::sparkplug::BdSeqFile::beside(&config.store.path);
        node.format(&upstream, bd_seq, writable)
    });
    let mut uplink =
        Uplink::spawn_with_format(upstream, topics.prefix().to_string(), queue.clone(), format)?;
    let incoming = if writable {
        uplink.take_incoming()
    } else {
        None
    };
    let incoming = match (&node, incoming) {
        (Some(node), Some(incoming)) => Some(node.commands(incoming, topics.clone())),
        (_, incoming) => incoming,
    };
    Ok((Some(queue), Some(Arc::new(uplink)), incoming, node))
}

/// Where the pipeline and the health report send things, and the figures they share.
struct Outputs {
    topics: Topics,
    broker: Option<BrokerHandle>,
    queue: Option<Queue>,
    uplink: Option<Arc<UplinkHandle>>,
    /// The Sparkplug edge node, with `[upstream] format = "sparkplug"`.
    sparkplug: Option<sparkplug::Node>,
    counters: Arc<Counters>,
    devices: pipeline::DeviceStates,
    commands: Arc<commands::CommandCounters>,
    time: Arc<TimeCounters>,
    /// Every point's last readings, for the status page and `/metrics`.
    recent: Arc<recent::Recent>,
}

impl Outputs {
    /// Starts the command router on the LAN broker's command topics (in process) and
    /// on what the uplink receives on its command subscription, until `stop`.
    fn start_commands(
        &self,
        config: &Config,
        buses: &health::BusMap,
        events: &mpsc::Sender<FieldEvent>,
        upstream: Option<mpsc::Receiver<crate::mqtt::Publish>>,
        stop: &CancellationToken,
    ) {
        let filter = self.topics.command("+", "+");
        let lan = self
            .broker
            .as_ref()
            .map(|broker| broker.tap(&filter, field::command::QUEUE_CAPACITY * 4));
        tracing::info!(
            lan = lan.is_some(),
            upstream = upstream.is_some(),
            topics = %filter,
            "taking commands for writable points"
        );
        let router = commands::Router::new(
            self.topics.clone(),
            Duration::from_millis(config.agent.command_max_age_ms),
            buses.clone(),
            self.devices.clone(),
            events.clone(),
            self.broker.clone(),
            self.queue.clone(),
            self.commands.clone(),
        );
        tokio::spawn(router.run(lan, upstream, stop.clone()));
    }

    /// Announces the devices of `buses` to Home Assistant on the LAN broker and, with
    /// `upstream = true`, upstream, when there is a `[homeassistant]` (validation makes
    /// it come with the parts it announces on).
    async fn start_discovery(
        &self,
        config: &Config,
        buses: &health::BusMap,
        stop: &CancellationToken,
    ) -> Option<discovery::Announcer> {
        let ha = config.homeassistant.as_ref()?;
        let upstream = match (&self.queue, ha.upstream) {
            (Some(queue), true) => Some(discovery::Upstream {
                queue: queue.clone(),
                qos: config.agent.qos(),
            }),
            _ => None,
        };
        if self.broker.is_none() && upstream.is_none() {
            return None;
        }
        let announcements = match buses.lock() {
            Ok(buses) => discovery::announcements(ha, &self.topics, &buses),
            Err(_) => return None,
        };
        Some(
            discovery::Announcer::start(
                self.broker.clone(),
                upstream,
                ha,
                &discovery::node_id(ha, &self.topics),
                announcements,
                stop.clone(),
            )
            .await,
        )
    }

    /// The pipeline, sending to these outputs.
    fn pipeline(&self, config: &Config, time: TimeKeeper) -> pipeline::Pipeline {
        pipeline::Pipeline {
            topics: self.topics.clone(),
            qos: config.agent.qos(),
            retain: config.agent.retain,
            retain_upstream: config.agent.retain_upstream,
            // A full batch reaches the store's row threshold and commits at once
            // instead of waiting for the group-commit interval.
            batch_max: config.agent.batch_max.min(config.store.commit_max_rows),
            broker: self.broker.clone(),
            queue: self.queue.clone(),
            counters: self.counters.clone(),
            devices: self.devices.clone(),
            time,
            recent: self.recent.clone(),
            sparkplug: self.sparkplug.clone(),
        }
    }

    /// The health report on these outputs, about the buses in `buses`.
    fn health(&self, config: &Config, started: Instant, buses: health::BusMap) -> health::Health {
        health::Health {
            topics: self.topics.clone(),
            started,
            interval: Duration::from_secs(config.agent.health_interval_secs),
            qos: config.agent.qos(),
            broker: self.broker.clone(),
            queue: self.queue.clone(),
            uplink: self.uplink.clone(),
            counters: self.counters.clone(),
            devices: self.devices.clone(),
            buses,
            commands: self.commands.clone(),
            time: self.time.clone(),
        }
    }

    /// The one line that says the agent is up and what it runs.
    fn log_running(&self, config: &Config) {
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            prefix = %self.topics.prefix(),
            broker = self.broker.is_some(),
            upstream = self.uplink.is_some(),
            buses = config.field.buses.len(),
            "fieldbridge running"
        );
    }
}

/// The HTTP endpoint's pages: `/metrics`, the status page `/` and its `/api/status`,
/// from the health report's sources and the points' recent readings.
///
/// A bind outside loopback asks for the users of the broker's password file (the
/// config refuses such a bind without one); the file is read at start.
fn routes(
    health: Arc<health::Health>,
    recent: Arc<recent::Recent>,
    config: &Config,
) -> Result<http::Routes, Error> {
    let metrics = Arc::new(metrics::Metrics {
        health: health.clone(),
        recent: recent.clone(),
    });
    let status = Arc::new(status::Status { health, recent });
    let routes = http::Routes::default()
        .get("/metrics", move || {
            let metrics = metrics.clone();
            async move { metrics.page().await }
        })
        .get("/", || async { status::Status::html() })
        .get("/api/status", move || {
            let status = status.clone();
            async move { status.page().await }
        });
    let needs_login = config
        .http
        .as_ref()
        .is_some_and(http::HttpConfig::needs_login);
    let password_file = config
        .broker
        .as_ref()
        .and_then(|broker| broker.password_file.as_ref());
    match (needs_login, password_file) {
        (true, Some(path)) => {
            let users = broker::PasswordFile::load(path).map_err(broker::Error::from)?;
            Ok(routes.login(Arc::new(move |user, password| users.verify(user, password))))
        }
        _ => Ok(routes),
    }
}

/// Spawns the systemd watchdog when the service manager asked for one: WATCHDOG=1
/// while every heartbeat in `beats` is fresh, until `stop`.
fn spawn_watchdog(beats: Vec<Heartbeat>, stop: &CancellationToken) -> Option<JoinHandle<()>> {
    let interval = systemd::watchdog_interval()?;
    tracing::info!(
        interval_ms = interval.as_millis() as u64,
        "systemd watchdog enabled"
    );
    Some(tokio::spawn(systemd::run_watchdog(
        interval,
        beats,
        stop.clone(),
    )))
}

/// Starts one supervised task per bus. The resolved buses keep their counters across
/// restarts of their task.
fn start_buses(
    buses: Vec<ResolvedBus>,
    events: mpsc::Sender<FieldEvent>,
    beat: Heartbeat,
) -> Buses {
    let stop = CancellationToken::new();
    let names = buses.iter().map(|bus| bus.name().to_string()).collect();
    let bus_stop = stop.clone();
    let spawn = move |index: usize| {
        Ok(field::spawn_bus(
            &buses[index],
            events.clone(),
            bus_stop.clone(),
        ))
    };
    let supervisor = tokio::spawn(supervisor::supervise(names, spawn, stop.clone(), beat));
    Buses { stop, supervisor }
}
