//! The upstream MQTT client: drains the store to the upstream broker.
//!
//! # Layout
//!
//! | file | owns |
//! |---|---|
//! | `config.rs` | `[upstream]` settings, the broker URL, the password source |
//! | `state.rs` | the session state with no I/O: CONNECT/CONNACK, inflight window, QoS 1/2 flows, resume, topic aliases, keepalive |
//! | `backoff.rs` | reconnect delays with jitter and a cap |
//! | `tls.rs` | the rustls client configuration |
//! | `client.rs` | the connection task: connect, serve, reconnect; store requests |
//!
//! # Invariants
//!
//! - A row is deleted from the store only after PUBACK (QoS 1) or PUBCOMP (QoS 2), or
//!   when the broker can never take it (too large for its maximum packet size, invalid
//!   topic, refused with an error reason code); each such drop is counted.
//! - The session is persistent (3.1.1: clean session 0; 5.0: clean start 0 and a session
//!   expiry) under a stable client id, so unacknowledged flows resume after a reconnect
//!   and, through the flow state persisted in the store, after a restart.
//! - Secrets never reach a log line: the password is read per connection attempt into a
//!   redacted type.
//! - Everything is bounded: the inflight window, the incoming channel, the packet sizes
//!   read from the broker.

pub mod backoff;
mod client;
pub mod config;
pub mod state;
pub mod tls;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::mqtt::Publish;
use crate::store::Queue;

pub use config::{BrokerUrl, Password, ProtocolVersion, TlsConfig, UplinkConfig};

/// Time the task gets beyond the shutdown timeout to return rows to the store.
const RELEASE_GRACE: Duration = Duration::from_secs(2);

/// Where the connection stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// Resolving, connecting, handshaking or waiting for CONNACK.
    Connecting { attempt: u32 },
    /// CONNACK received; `session_present` as the broker said.
    Connected { session_present: bool },
    /// Waiting `delay` before attempt `attempt + 1` because of `error`.
    Backoff {
        attempt: u32,
        delay: Duration,
        error: String,
    },
    /// The uplink has stopped.
    Stopped,
}

/// The upstream MQTT client.
pub struct Uplink;

impl Uplink {
    /// Checks the config, reads the TLS files and spawns the connection task on the
    /// current tokio runtime. `prefix` is the agent's topic prefix; the status topic is
    /// `{prefix}/status` unless configured.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid config, [`Error::Tls`] for unusable TLS files,
    /// [`Error::Password`] when the password source cannot be read.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn spawn(
        config: UplinkConfig,
        prefix: String,
        queue: Queue,
    ) -> Result<UplinkHandle, Error> {
        if let Some(text) = crate::problem::Invalid::summary(&config.validate()) {
            return Err(Error::Config(text));
        }
        let url = BrokerUrl::parse(&config.url).map_err(Error::Url)?;
        let tls = if url.tls {
            let client_config = tls::client_config(&config.tls)?;
            let name = tls::server_name(&config.tls, &url.host)?;
            Some((tokio_rustls::TlsConnector::from(client_config), name))
        } else {
            None
        };
        config.password()?;
        let session_config = state::SessionConfig {
            protocol: config.protocol.into(),
            client_id: config.client_id(),
            username: config.username.clone(),
            keep_alive: config.keep_alive_secs,
            session_expiry: config.session_expiry_secs,
            inflight: config.inflight,
            status_topic: config.status_topic(&prefix),
            online_payload: Bytes::from(config.online_payload.clone()),
            offline_payload: Bytes::from(config.offline_payload.clone()),
            subscribe: config.subscribe.clone(),
            max_incoming_packet: client::MAX_INCOMING_PACKET,
            incoming_receive_maximum: client::INCOMING_CAPACITY,
        };
        let counters = Arc::new(Counters::default());
        let (state_tx, state_rx) = watch::channel(LinkState::Connecting { attempt: 1 });
        let (incoming_tx, incoming_rx) = mpsc::channel(usize::from(client::INCOMING_CAPACITY));
        let (stop_tx, stop_rx) = oneshot::channel();
        let span = tracing::info_span!(
            "uplink",
            url = %config.url,
            client_id = %session_config.client_id
        );
        let session = state::Session::new(session_config, counters.clone());
        let client = client::Client::new(
            config,
            url,
            tls,
            session,
            counters.clone(),
            state_tx,
            incoming_tx,
            queue,
        );
        let task = tokio::spawn(client.run(stop_rx).instrument(span));
        Ok(UplinkHandle {
            state: state_rx,
            counters,
            incoming: Some(incoming_rx),
            stop: stop_tx,
            task,
        })
    }
}

/// Control of a running uplink. Dropping it stops the uplink without DISCONNECT (the
/// broker then publishes the will), returning in-flight rows to the store.
#[derive(Debug)]
pub struct UplinkHandle {
    state: watch::Receiver<LinkState>,
    counters: Arc<Counters>,
    incoming: Option<mpsc::Receiver<Publish>>,
    stop: oneshot::Sender<Duration>,
    task: JoinHandle<()>,
}

impl UplinkHandle {
    /// The connection state, updated at each change.
    pub fn state(&self) -> watch::Receiver<LinkState> {
        self.state.clone()
    }

    /// Counters since the uplink started.
    pub fn stats(&self) -> UplinkStats {
        self.counters.snapshot()
    }

    /// Messages received on the configured subscriptions; `Some` once. When nobody
    /// reads them, they are dropped and counted once the channel is full.
    pub fn take_incoming(&mut self) -> Option<mpsc::Receiver<Publish>> {
        self.incoming.take()
    }

    /// Graceful stop: publish the offline status, wait for its acknowledgement (at most
    /// `timeout`), send DISCONNECT, return in-flight rows to the store.
    ///
    /// # Errors
    /// [`Error::ShutdownTimeout`] when the task did not finish in time (it is aborted;
    /// the store makes its in-flight rows pending again when it reopens).
    pub async fn shutdown(self, timeout: Duration) -> Result<(), Error> {
        let UplinkHandle { stop, mut task, .. } = self;
        // The task may have stopped already (store closed); then there is nothing to do.
        let _ = stop.send(timeout);
        match tokio::time::timeout(timeout + RELEASE_GRACE, &mut task).await {
            Ok(_) => Ok(()),
            Err(_) => {
                task.abort();
                Err(Error::ShutdownTimeout(timeout))
            }
        }
    }
}

/// Everything that goes wrong in the uplink. Connection-level errors end one connection
/// and lead to a reconnect after a backoff delay.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid [upstream] section: {0}")]
    Config(String),
    #[error("invalid upstream URL: {0}")]
    Url(String),
    #[error("cannot read the password from the {source_name}: {reason}")]
    Password { source_name: String, reason: String },
    #[error("TLS: {what}{}", source_suffix(.source.as_deref()))]
    Tls {
        what: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connection to the upstream broker failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("no CONNACK within the connect timeout of {0:?}")]
    ConnectTimeout(Duration),
    /// What the session state machine found wrong with the broker's side of the
    /// protocol (refusals, DISCONNECT, violations, a missing PINGRESP).
    #[error(transparent)]
    Session(#[from] state::SessionError),
    #[error("the upstream broker closed the connection")]
    Closed,
    #[error("malformed packet from the upstream broker: {0}")]
    Codec(#[from] crate::mqtt::Error),
    #[error("the uplink did not stop within {0:?}")]
    ShutdownTimeout(Duration),
}

impl Error {
    /// Refusals that repeat until an operator changes credentials or permissions.
    pub fn is_auth_failure(&self) -> bool {
        matches!(self, Error::Session(e) if e.is_auth_failure())
    }
}

/// `": {source}"`, or nothing: a TLS failure names its cause in its own line too, for
/// log lines that show only the top error.
fn source_suffix(source: Option<&(dyn std::error::Error + Send + Sync)>) -> String {
    source.map(|e| format!(": {e}")).unwrap_or_default()
}

/// Counters shared between the connection task and [`UplinkStats`] snapshots.
#[derive(Debug, Default)]
pub struct Counters {
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
    pub auth_failures: AtomicU64,
    pub published: AtomicU64,
    pub resent: AtomicU64,
    pub acked: AtomicU64,
    pub dropped_too_large: AtomicU64,
    pub dropped_invalid: AtomicU64,
    pub rejected: AtomicU64,
    pub throttled: AtomicU64,
    pub incoming: AtomicU64,
    pub incoming_dropped: AtomicU64,
}

impl Counters {
    /// A consistent-enough copy for status output.
    pub fn snapshot(&self) -> UplinkStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        UplinkStats {
            connects: get(&self.connects),
            connect_failures: get(&self.connect_failures),
            auth_failures: get(&self.auth_failures),
            published: get(&self.published),
            resent: get(&self.resent),
            acked: get(&self.acked),
            dropped_too_large: get(&self.dropped_too_large),
            dropped_invalid: get(&self.dropped_invalid),
            rejected: get(&self.rejected),
            throttled: get(&self.throttled),
            incoming: get(&self.incoming),
            incoming_dropped: get(&self.incoming_dropped),
        }
    }
}

/// What the uplink has done since it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UplinkStats {
    /// Successful CONNACKs.
    pub connects: u64,
    /// Connection attempts that failed (network, TLS, refused, timeout).
    pub connect_failures: u64,
    /// Of those, refusals for credentials or permissions.
    pub auth_failures: u64,
    /// PUBLISH packets of rows sent for the first time.
    pub published: u64,
    /// PUBLISH packets sent again with DUP after a reconnect.
    pub resent: u64,
    /// Rows deleted after the broker's acknowledgement.
    pub acked: u64,
    /// Rows dropped because they exceed the broker's maximum packet size.
    pub dropped_too_large: u64,
    /// Rows dropped because their topic is not a valid topic name.
    pub dropped_invalid: u64,
    /// Rows the broker refused with an error reason code (5.0).
    pub rejected: u64,
    /// Messages the broker refused for now (0x97 quota exceeded, 0x91 packet id in
    /// use); each was kept and sent again.
    pub throttled: u64,
    /// Messages received on the configured subscriptions.
    pub incoming: u64,
    /// Of those, dropped because the consumer's channel was full.
    pub incoming_dropped: u64,
}
