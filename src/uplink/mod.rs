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
//! | `format.rs` | the hook of a payload format other than JSON (Sparkplug B): will, births, rows at send time, incoming commands |
//! | `client.rs` | the connection task: connect, serve, reconnect; store requests |
//! | `error.rs` | `Error`: what ends a connection or stops the start |
//! | `status.rs` | `LinkState`, the counters and their `UplinkStats` snapshot |
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
mod error;
pub mod format;
pub mod state;
mod status;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::mqtt::Publish;
use crate::store::Queue;

pub use config::{BrokerUrl, Password, PayloadFormat, ProtocolVersion, TlsConfig, UplinkConfig};
pub use error::{Error, SessionError};
pub use format::{Format, Incoming};
pub use status::{Counters, LinkState, UplinkStats};

/// Time the task gets beyond the shutdown timeout to return rows to the store.
const RELEASE_GRACE: Duration = Duration::from_secs(2);

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
        Uplink::spawn_with_format(config, prefix, queue, None)
    }

    /// [`Uplink::spawn`], sending rows in `format` (Sparkplug B) instead of as stored;
    /// the format's subscriptions are added to the configured ones.
    ///
    /// # Errors
    /// As [`Uplink::spawn`].
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn spawn_with_format(
        config: UplinkConfig,
        prefix: String,
        queue: Queue,
        format: Option<Box<dyn Format>>,
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
            subscribe: config
                .subscribe
                .iter()
                .cloned()
                .chain(format.iter().flat_map(|f| f.subscriptions()))
                .collect(),
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
        let mut session = state::Session::new(session_config, counters.clone());
        if let Some(format) = format {
            session.set_format(format);
        }
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
