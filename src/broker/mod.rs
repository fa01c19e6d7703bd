//! The built-in MQTT broker (3.1.1 and 5.0) serving LAN subscribers, also usable on its
//! own.
//!
//! # Layout
//!
//! | file | owns |
//! |---|---|
//! | `config.rs` | the `[broker]` section |
//! | `server.rs` | listeners, TLS handshakes, the socket task of each connection (CONNECT, the connection loop) |
//! | `connection.rs` | one connection's stream with its read and write buffers: packets in, bytes out |
//! | `conn.rs` | the protocol of one connection, no I/O (CONNECT to DISCONNECT) |
//! | `router.rs` | routing: tree, retained, policy, counters; a session's start and end (subscriptions, wills) |
//! | `registry.rs` | sessions by client id: online or parked, takeover, pending wills, expiry |
//! | `session.rs` | messages, mailboxes (per-client bounded queues), the queue budget, queue journals, inflight window |
//! | `tree.rs` | the subscription tree (`+`, `#`, shared groups) |
//! | `retained.rs` | retained messages by topic level |
//! | `auth.rs` | password file, ACL file, protected topic trees |
//! | `tap.rs` | LAN publishes on chosen filters handed to the agent in process (commands) |
//! | `persist.rs` | SQLite persistence of retained messages, sessions and their queues |
//! | `sys.rs` | `$SYS` topics and housekeeping |
//!
//! # Invariants
//!
//! - Publishers never wait for subscribers: routing pushes into bounded per-client
//!   mailboxes; what does not fit is dropped and counted in [`BrokerStats::dropped`].
//! - Every resource is bounded: connections, packet size, queued messages and bytes
//!   per client, queued bytes for offline clients broker-wide, offline sessions,
//!   inflight window, topic aliases, subscriptions per client, retained messages.
//! - LAN clients may read the protected topic trees but may publish into them only
//!   with an ACL write grant; [`BrokerHandle::publish`] (the agent) always may.
//! - A malformed packet or protocol error closes that one connection.

mod auth;
mod config;
mod conn;
mod connection;
mod persist;
mod registry;
mod retained;
mod router;
mod server;
mod session;
mod sys;
mod tap;
mod tree;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use auth::{passwd_line, set_password, Acl, AuthError, PasswdChange, PasswordFile};
pub use config::{BrokerConfig, ListenerConfig, QueuePolicy, TlsListenerConfig};
pub use persist::PersistError;
pub use router::BrokerStats;
pub use tap::Tapped;

use auth::Policy;
use persist::Persister;
use router::{Router, Settings};
use session::{Kick, Message};

use crate::mqtt::{topic, QoS};

/// The broker cannot start or reload.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS listener {addr}: {source}")]
    Tls { addr: SocketAddr, source: TlsError },
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Persist(#[from] PersistError),
    #[error("invalid broker configuration: {0}")]
    Config(String),
    /// A start-up task that reads files on a blocking thread panicked or was cancelled.
    #[error("{what} failed: {source}")]
    Loader {
        what: &'static str,
        source: tokio::task::JoinError,
    },
}

/// Why a TLS listener's certificate or key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid PEM.
    #[error("{path}: {source}")]
    Pem {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no private key")]
    NoPrivateKey { path: PathBuf },
    /// rustls refuses the protocol versions, the certificate or the key.
    #[error("{0}")]
    Rustls(#[source] rustls::Error),
}

/// The broker. See [`Broker::start`].
pub struct Broker;

struct Inner {
    router: Arc<Router>,
    addrs: Vec<SocketAddr>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    config: BrokerConfig,
    protected: Vec<String>,
}

/// A running broker. Cheap to clone.
#[derive(Clone)]
pub struct BrokerHandle {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for BrokerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerHandle")
            .field("addrs", &self.inner.addrs)
            .finish_non_exhaustive()
    }
}

fn tls_acceptor(addr: SocketAddr, tls: &TlsListenerConfig) -> Result<TlsAcceptor, Error> {
    server_config(tls)
        .map(|config| TlsAcceptor::from(Arc::new(config)))
        .map_err(|source| Error::Tls { addr, source })
}

/// The rustls configuration of a TLS listener (also what `check-config` loads).
pub fn server_config(tls: &TlsListenerConfig) -> Result<rustls::ServerConfig, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let pem = |path: &Path| {
        let path = path.to_owned();
        move |source| TlsError::Pem { path, source }
    };
    let cert_pem = read(&tls.cert_file)?;
    let key_pem = read(&tls.key_file)?;
    let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem(&tls.cert_file))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: tls.cert_file.clone(),
        });
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(pem(&tls.key_file))?
        .ok_or_else(|| TlsError::NoPrivateKey {
            path: tls.key_file.clone(),
        })?;
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Rustls)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::Rustls)
}

impl Broker {
    /// Loads the password, ACL and persistence files, binds every listener and starts
    /// serving; returns once listening. `protected_prefixes` are topic trees LAN clients
    /// may read but not publish into (unless the ACL grants write).
    ///
    /// # Errors
    /// When the configuration is invalid, a file cannot be loaded, or a listener cannot
    /// be bound.
    pub async fn start(
        config: BrokerConfig,
        protected_prefixes: Vec<String>,
    ) -> Result<BrokerHandle, Error> {
        if let Some(text) = crate::problem::Invalid::summary(&config.validate()) {
            return Err(Error::Config(text));
        }
        let policy = load_policy(&config, protected_prefixes.clone()).await?;
        let (persister, loaded) = match &config.persistence_path {
            Some(path) => {
                let path = path.clone();
                let interval = Duration::from_millis(config.persistence_commit_ms);
                let (p, l) = tokio::task::spawn_blocking(move || Persister::open(&path, interval))
                    .await
                    .map_err(|source| Error::Loader {
                        what: "persistence loader",
                        source,
                    })??;
                (Some(p), l)
            }
            None => (None, persist::Loaded::default()),
        };
        let router = Arc::new(Router::new(
            Settings::from_config(&config),
            policy,
            persister,
        ));
        let (retained, sessions) = (loaded.retained.len(), loaded.sessions.len());
        let queued: usize = loaded.sessions.iter().map(|(_, _, q)| q.len()).sum();
        router.restore(loaded);
        if config.persistence_path.is_some() {
            tracing::info!(retained, sessions, queued, "restored broker state");
        }

        let mut bound = Vec::new();
        for l in &config.listeners {
            let tls = l
                .tls
                .as_ref()
                .map(|t| tls_acceptor(l.bind, t))
                .transpose()?;
            let listener = TcpListener::bind(l.bind)
                .await
                .map_err(|source| Error::Bind {
                    addr: l.bind,
                    source,
                })?;
            let addr = listener.local_addr().map_err(|source| Error::Bind {
                addr: l.bind,
                source,
            })?;
            bound.push((listener, tls, addr));
        }
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let shared = server::Shared {
            router: router.clone(),
            slots: Arc::new(Semaphore::new(config.max_connections)),
            lobby: Arc::new(server::Lobby::new(
                config.max_pending_connections,
                config.connect_packet_limit() as usize,
            )),
            cancel: cancel.clone(),
            tracker: tracker.clone(),
        };
        let mut addrs = Vec::new();
        for (listener, tls, addr) in bound {
            tracing::info!(%addr, tls = tls.is_some(), anonymous = config.anonymous_allowed(), "broker listening");
            addrs.push(addr);
            tracker.spawn(server::accept_loop(listener, tls, shared.clone()));
        }
        tracker.spawn(sys::maintenance(
            router.clone(),
            Duration::from_secs(config.sys_interval_secs),
            cancel.clone(),
        ));
        Ok(BrokerHandle {
            inner: Arc::new(Inner {
                router,
                addrs,
                cancel,
                tracker,
                config,
                protected: protected_prefixes,
            }),
        })
    }
}

async fn load_policy(config: &BrokerConfig, protected: Vec<String>) -> Result<Policy, Error> {
    let passwords = config.password_file.clone();
    let acl = config.acl_file.clone();
    let anonymous = config.anonymous_allowed();
    tokio::task::spawn_blocking(move || {
        Policy::load(passwords.as_deref(), acl.as_deref(), anonymous, protected)
    })
    .await
    .map_err(|source| Error::Loader {
        what: "policy loader",
        source,
    })?
    .map_err(Error::from)
}

impl BrokerHandle {
    /// The addresses actually bound (port 0 in the configuration resolved).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.inner.addrs.clone()
    }

    /// Publishes from inside the process (the agent's readings): no TCP hop, no access
    /// check, and it never waits on slow subscribers. An invalid topic name is logged and
    /// dropped.
    pub fn publish(&self, topic: &str, payload: Bytes, qos: QoS, retain: bool) {
        if topic::validate_topic_name(topic).is_err() {
            tracing::warn!(topic, "in-process publish to an invalid topic name dropped");
            return;
        }
        self.inner.router.publish(Message {
            topic: topic.to_string(),
            payload,
            qos,
            retain,
            properties: None,
            expires_at: None,
            origin: 0,
        });
    }

    /// The topics of the retained messages matching `filter` (the agent's own
    /// announcements from an earlier run); an invalid filter matches nothing.
    pub fn retained_topics(&self, filter: &str) -> Vec<String> {
        if topic::validate_topic_filter(filter).is_err() {
            return Vec::new();
        }
        self.inner.router.retained_topics(filter)
    }

    /// Publishes from inside the process with 5.0 correlation data (an answer on a
    /// command's response topic); otherwise as [`BrokerHandle::publish`].
    pub fn publish_response(&self, topic: &str, payload: Bytes, correlation: Option<Bytes>) {
        if topic::validate_topic_name(topic).is_err() {
            tracing::warn!(topic, "in-process publish to an invalid topic name dropped");
            return;
        }
        let properties = correlation.map(|data| {
            Box::new(crate::mqtt::Properties {
                correlation_data: Some(data),
                ..Default::default()
            })
        });
        self.inner.router.publish(Message {
            topic: topic.to_string(),
            payload,
            qos: QoS::AtLeastOnce,
            retain: false,
            properties,
            expires_at: None,
            origin: 0,
        });
    }

    /// What LAN clients publish on topics matching `filter`, once the ACL allowed it,
    /// with who published it; `capacity` bounds the channel (a full one drops).
    pub fn tap(&self, filter: &str, capacity: usize) -> tokio::sync::mpsc::Receiver<Tapped> {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity);
        self.inner.router.taps.add(filter.to_string(), tx);
        rx
    }

    /// Re-reads the password and ACL files (SIGHUP) and applies them to open
    /// connections too: a client whose credentials the new files withdrew is
    /// disconnected, subscriptions the new ACL no longer grants are dropped (see
    /// `conn.rs`). On error the old ones stay in force.
    ///
    /// # Errors
    /// When a file cannot be read or parsed.
    pub async fn reload_auth(&self) -> Result<(), Error> {
        let policy = load_policy(&self.inner.config, self.inner.protected.clone()).await?;
        self.inner.router.set_policy(policy);
        tracing::info!("password and ACL files reloaded");
        Ok(())
    }

    /// The broker's counters now.
    pub fn stats(&self) -> BrokerStats {
        self.inner.router.stats()
    }

    /// Stops the listeners, disconnects every client, writes the persistence snapshot
    /// and waits for every task.
    pub async fn shutdown(self) {
        let inner = &self.inner;
        inner.cancel.cancel();
        inner.router.cancel.cancel();
        inner.router.kick_all(Kick::Shutdown);
        inner.tracker.close();
        inner.tracker.wait().await;
        let router = inner.router.clone();
        if router.persister().is_some() {
            let written = tokio::task::spawn_blocking(move || router.persist_and_close()).await;
            if written.is_err() {
                tracing::error!("persistence snapshot failed");
            }
        }
        tracing::info!("broker stopped");
    }
}
