//! The `[broker]` section of the configuration.
//!
//! Every field has a default, so an empty `[broker]` section runs a broker on
//! `127.0.0.1:1883` that accepts anonymous clients (every listener is loopback).
//! [`BrokerConfig::validate`] reports semantic problems with their key paths; the
//! agent's config module turns them into file positions.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use crate::problem::{Invalid, Problems, Scope};

/// Settings of the built-in broker. Names follow mosquitto's where one exists.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Addresses to serve. Default: one plain listener on `127.0.0.1:1883`.
    pub listeners: Vec<ListenerConfig>,
    /// Whether clients without a user name may connect. Default (unset): only when every
    /// listener is on a loopback address and no `password_file` is set (mosquitto 2.0).
    pub allow_anonymous: Option<bool>,
    /// A mosquitto password file (`user:$7$…` lines, as written by `mosquitto_passwd` or
    /// `fieldbridge passwd`). Default: none.
    pub password_file: Option<PathBuf>,
    /// A mosquitto ACL file (`user`, `topic`, `pattern` lines). Default: none, every
    /// client may read and write every topic outside the protected sensor tree.
    pub acl_file: Option<PathBuf>,
    /// SQLite file holding retained messages and persistent sessions. Default: none
    /// (nothing survives a restart).
    pub persistence_path: Option<PathBuf>,
    /// Connections served at once. When all are taken, a new connection closes the
    /// oldest one that has not logged in yet; with every one logged in, it is closed
    /// right after accept. Default: 1024.
    pub max_connections: usize,
    /// Largest packet accepted from a client, in bytes (advertised to 5.0 clients).
    /// Default: 1 MiB.
    pub max_packet_size: u32,
    /// Messages queued per client (online or offline) beyond its inflight window; more
    /// are dropped and counted. Default: 1000 (mosquitto's default).
    pub max_queued_messages: usize,
    /// Payload bytes queued per client; more are dropped and counted. Default: 1 MiB.
    pub max_queued_bytes: usize,
    /// QoS 1 and 2 messages in flight to one client, and the receive maximum advertised
    /// to 5.0 clients. Default: 20 (mosquitto's default).
    pub max_inflight_messages: u16,
    /// Seconds a new TCP connection may take to send CONNECT. Default: 10.
    pub connect_timeout_secs: u64,
    /// Largest CONNECT accepted, in bytes (at most `max_packet_size`): the most a
    /// connection that has not logged in yet can make the broker hold for it.
    /// Default: 64 KiB.
    pub max_connect_packet_size: u32,
    /// Connections that have not logged in yet (TLS handshake and CONNECT not done),
    /// served at once. When a new connection would go over this or over
    /// `max_connections`, the oldest connection that has not logged in is closed to
    /// make room, so idle connections cannot lock clients out. Default: 64.
    pub max_pending_connections: usize,
    /// Largest keepalive granted, in seconds. A 5.0 client asking for more (or for none)
    /// is told this value; a 3.1.1 client asking for more is refused. Default: unset.
    pub max_keep_alive: Option<u16>,
    /// Seconds between `$SYS/broker/...` updates; 0 disables them. Default: 10.
    pub sys_interval_secs: u64,
    /// Upper bound on how long an offline persistent session is kept, in seconds
    /// (3.1.1 sessions and 5.0 session expiry intervals alike). Default: unset (a 3.1.1
    /// persistent session never expires, a 5.0 one when its interval says so).
    pub persistent_session_expiry_secs: Option<u64>,
    /// Topic aliases a 5.0 client may use towards the broker. Default: 10.
    pub max_topic_alias: u16,
    /// Subscriptions one client may hold; more are refused with "quota exceeded".
    /// Default: 10000.
    pub max_subscriptions_per_client: usize,
    /// Retained messages stored (one per topic); a retained message for a new topic
    /// beyond this is delivered but not kept. Default: 100000.
    pub max_retained_messages: usize,
    /// Offline persistent sessions kept; when another one goes offline, the one offline
    /// the longest ends (its queued messages are counted as lost). Default: 5000
    /// (about 3 KiB of RSS each, see BENCHMARKS.md).
    pub max_sessions: usize,
    /// Bytes queued for offline sessions, all of them together (topic, payload and
    /// about 100 bytes of bookkeeping per queued copy). Messages for clients online are
    /// not held to it but count towards it, and so do queue changes not yet written to
    /// `persistence_path`. Default: 8 MiB (RSS grows by about 3.4 times this under
    /// churn, see BENCHMARKS.md).
    pub max_queued_bytes_total: usize,
    /// What gives way at `max_queued_bytes_total`: `drop_newest` (default, as
    /// mosquitto: the new message is not queued, the backlog is kept) or `drop_oldest`
    /// (the oldest messages queued for the session the new one is for; costs a queue
    /// change, and with a persistence file a write, per message and offline session).
    /// Counted either way.
    pub queue_budget_policy: QueuePolicy,
    /// Seconds an offline MQTT 3.1.1 persistent session (clean session 0) is kept: 3.1.1
    /// has no session expiry of its own. Default: 259200 (3 days, a weekend with the
    /// consumer switched off). `persistent_session_expiry_secs` caps it.
    pub v311_session_expiry_secs: u64,
    /// Group commit of the persistence file: at most one transaction per this many
    /// milliseconds. A kill -9 loses the queue changes of at most this long.
    /// Default: 100.
    pub persistence_commit_ms: u64,
}

/// What gives way when the broker-wide queue budget is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueuePolicy {
    /// Keep the newest: the oldest queued messages of the offline session receiving
    /// the new one go first.
    DropOldest,
    /// Keep the backlog: the new message is not queued.
    #[default]
    DropNewest,
}

/// One listening socket.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Address and port, e.g. `"0.0.0.0:1883"`; as in mosquitto, `"localhost:1883"` is
    /// loopback (`127.0.0.1`) and a port alone (`"1883"` or `1883`) is every interface
    /// (`0.0.0.0`). Port 0 picks a free port.
    #[serde(deserialize_with = "bind_address")]
    pub bind: SocketAddr,
    /// Serve MQTT over TLS on this listener. Default: plain TCP.
    #[serde(default)]
    pub tls: Option<TlsListenerConfig>,
}

/// `bind` as written: `IP:PORT`, `[IPv6]:PORT`, `localhost:PORT`, or a port alone.
fn bind_address<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<SocketAddr, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Bind {
        Port(u16),
        Text(String),
    }
    let text = match Bind::deserialize(deserializer)? {
        Bind::Port(port) => return Ok(SocketAddr::from(([0, 0, 0, 0], port))),
        Bind::Text(text) => text,
    };
    parse_bind(&text).map_err(serde::de::Error::custom)
}

/// See [`bind_address`]; the error is the message for the config file.
fn parse_bind(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    if let Some(port) = text.strip_prefix("localhost:") {
        if let Ok(port) = port.parse::<u16>() {
            return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
        }
    }
    Err(format!(
        "{text:?} is not a listen address: write IP:PORT (\"0.0.0.0:1883\", \"[::]:1883\"), \
         \"localhost:PORT\", or the port alone for every interface"
    ))
}

/// Certificate and key of a TLS listener (PEM files).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsListenerConfig {
    /// The certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

impl Default for BrokerConfig {
    fn default() -> BrokerConfig {
        BrokerConfig {
            listeners: vec![ListenerConfig {
                bind: SocketAddr::from(([127, 0, 0, 1], 1883)),
                tls: None,
            }],
            allow_anonymous: None,
            password_file: None,
            acl_file: None,
            persistence_path: None,
            max_connections: 1024,
            max_packet_size: 1024 * 1024,
            max_queued_messages: 1000,
            max_queued_bytes: 1024 * 1024,
            max_inflight_messages: 20,
            connect_timeout_secs: 10,
            max_connect_packet_size: 64 * 1024,
            max_pending_connections: 64,
            max_keep_alive: None,
            sys_interval_secs: 10,
            persistent_session_expiry_secs: None,
            max_topic_alias: 10,
            max_subscriptions_per_client: 10_000,
            max_retained_messages: 100_000,
            max_sessions: 5_000,
            max_queued_bytes_total: 8 * 1024 * 1024,
            queue_budget_policy: QueuePolicy::DropNewest,
            v311_session_expiry_secs: 3 * 24 * 3600,
            persistence_commit_ms: 100,
        }
    }
}

/// The smallest packet size a 5.0 client can be held to (CONNACK with properties).
const MIN_PACKET_SIZE: u32 = 128;
/// The largest remaining length MQTT can express, plus the five-byte fixed header.
const MAX_PACKET_SIZE: u32 = 268_435_455 + 5;

impl BrokerConfig {
    /// The listeners: no address twice, TLS files named, and no LAN listener that
    /// would refuse every client.
    fn validate_listeners(&self, broker: &mut Scope<'_>) {
        for (i, listener) in self.listeners.iter().enumerate() {
            let mut at = broker.at(&format!("listeners[{i}]"));
            let earlier = &self.listeners[..i];
            at.check(
                listener.bind.port() == 0 || !earlier.iter().any(|l| l.bind == listener.bind),
                "bind",
                format!("{} is listed twice", listener.bind),
            );
            if let Some(tls) = &listener.tls {
                at.check(
                    !tls.cert_file.as_os_str().is_empty(),
                    "tls.cert_file",
                    "a TLS listener needs a certificate file",
                );
                at.check(
                    !tls.key_file.as_os_str().is_empty(),
                    "tls.key_file",
                    "a TLS listener needs a private key file",
                );
            }
        }
        broker.check(
            !self.listeners.is_empty(),
            "listeners",
            "the broker needs at least one listener",
        );
        if self.allow_anonymous.is_none() && self.password_file.is_none() {
            if let Some(i) = self
                .listeners
                .iter()
                .position(|l| !l.bind.ip().is_loopback())
            {
                broker.report(
                    &format!("listeners[{i}].bind"),
                    format!(
                        "{} is reachable from the network but no password_file is set, so \
                         every client would be refused; set password_file, or \
                         allow_anonymous = true to let anyone on the LAN in",
                        self.listeners[i].bind
                    ),
                );
            }
        }
    }

    /// The CONNECT size limit in force: `max_connect_packet_size`, capped by
    /// `max_packet_size`.
    pub fn connect_packet_limit(&self) -> u32 {
        self.max_connect_packet_size.min(self.max_packet_size)
    }

    /// Whether clients without credentials may connect (see `allow_anonymous`).
    pub fn anonymous_allowed(&self) -> bool {
        match self.allow_anonymous {
            Some(allowed) => allowed,
            None => {
                self.password_file.is_none()
                    && self.listeners.iter().all(|l| l.bind.ip().is_loopback())
            }
        }
    }

    /// Semantic problems, with key paths below `broker.`.
    pub fn validate(&self) -> Vec<Invalid> {
        let mut problems = Problems::new();
        let mut broker = problems.at("broker");
        self.validate_listeners(&mut broker);
        broker.at_least("max_connections", self.max_connections, 1);
        broker.check(
            (MIN_PACKET_SIZE..=MAX_PACKET_SIZE).contains(&self.max_packet_size),
            "max_packet_size",
            format!("must be between {MIN_PACKET_SIZE} and {MAX_PACKET_SIZE} bytes"),
        );
        broker.at_least(
            "max_subscriptions_per_client",
            self.max_subscriptions_per_client,
            1,
        );
        broker.at_least("max_inflight_messages", self.max_inflight_messages, 1);
        broker.check(
            self.connect_timeout_secs >= 1,
            "connect_timeout_secs",
            "must be at least 1 second",
        );
        broker.check(
            self.max_connect_packet_size >= MIN_PACKET_SIZE,
            "max_connect_packet_size",
            format!("must be at least {MIN_PACKET_SIZE} bytes"),
        );
        broker.at_least("max_pending_connections", self.max_pending_connections, 1);
        broker.check(
            self.max_keep_alive != Some(0),
            "max_keep_alive",
            "must be at least 1 second (leave it unset for no limit)",
        );
        broker.at_least("max_sessions", self.max_sessions, 1);
        broker.check(
            (1..=60_000).contains(&self.persistence_commit_ms),
            "persistence_commit_ms",
            "must be between 1 and 60000 milliseconds",
        );
        problems.into_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_section_is_a_loopback_broker_open_to_anonymous_clients() {
        let config: BrokerConfig = toml::from_str("").unwrap();
        assert_eq!(config, BrokerConfig::default());
        assert_eq!(config.listeners[0].bind, "127.0.0.1:1883".parse().unwrap());
        assert!(config.anonymous_allowed());
        assert!(config.validate().is_empty());
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = toml::from_str::<BrokerConfig>("max_conections = 3").unwrap_err();
        assert!(err.to_string().contains("max_conections"), "{err}");
    }

    #[test]
    fn lan_listener_without_credentials_is_reported() {
        let config: BrokerConfig = toml::from_str(
            r#"
            [[listeners]]
            bind = "127.0.0.1:1883"
            [[listeners]]
            bind = "0.0.0.0:1883"
            "#,
        )
        .unwrap();
        assert!(!config.anonymous_allowed());
        let problems = config.validate();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].key, "broker.listeners[1].bind");
    }

    #[test]
    fn password_file_closes_anonymous_access_even_on_loopback() {
        let config: BrokerConfig = toml::from_str(r#"password_file = "/etc/fb/passwd""#).unwrap();
        assert!(!config.anonymous_allowed());
        let config: BrokerConfig =
            toml::from_str("allow_anonymous = true\n[[listeners]]\nbind = \"0.0.0.0:1883\"\n")
                .unwrap();
        assert!(config.anonymous_allowed());
        assert!(config.validate().is_empty());
    }

    #[test]
    fn limits_are_checked_with_their_key_paths() {
        let config = BrokerConfig {
            max_connections: 0,
            max_packet_size: 10,
            max_inflight_messages: 0,
            connect_timeout_secs: 0,
            max_connect_packet_size: 100,
            max_pending_connections: 0,
            max_keep_alive: Some(0),
            ..BrokerConfig::default()
        };
        let keys: Vec<_> = config.validate().into_iter().map(|p| p.key).collect();
        assert_eq!(
            keys,
            [
                "broker.max_connections",
                "broker.max_packet_size",
                "broker.max_inflight_messages",
                "broker.connect_timeout_secs",
                "broker.max_connect_packet_size",
                "broker.max_pending_connections",
                "broker.max_keep_alive"
            ]
        );
    }

    /// Regression: `bind = "localhost:1883"` and `bind = "1883"` were refused; mosquitto
    /// takes both (`listener 1883 localhost`, `listener 1883`).
    #[test]
    fn bind_takes_localhost_and_a_bare_port_like_mosquitto() {
        let binds = |text: &str| -> Vec<SocketAddr> {
            let config: BrokerConfig = toml::from_str(text).unwrap();
            config.listeners.iter().map(|l| l.bind).collect()
        };
        assert_eq!(
            binds("[[listeners]]\nbind = \"localhost:1883\"\n[[listeners]]\nbind = \"1884\"\n[[listeners]]\nbind = 1885\n[[listeners]]\nbind = \"[::1]:1886\"\n"),
            [
                "127.0.0.1:1883".parse().unwrap(),
                "0.0.0.0:1884".parse().unwrap(),
                "0.0.0.0:1885".parse().unwrap(),
                "[::1]:1886".parse().unwrap(),
            ]
        );
        let err = toml::from_str::<BrokerConfig>("[[listeners]]\nbind = \"gateway:1883\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"localhost:PORT\""), "{err}");
        assert!(toml::from_str::<BrokerConfig>("[[listeners]]\nbind = 70000\n").is_err());
    }

    #[test]
    fn a_small_max_packet_size_caps_the_connect_limit() {
        let config: BrokerConfig = toml::from_str("max_packet_size = 4096").unwrap();
        assert!(config.validate().is_empty());
        assert_eq!(config.connect_packet_limit(), 4096);
        assert_eq!(BrokerConfig::default().connect_packet_limit(), 64 * 1024);
    }

    #[test]
    fn memory_bounds_are_checked_with_their_key_paths() {
        let config: BrokerConfig = toml::from_str(
            "max_sessions = 0\npersistence_commit_ms = 0\n\
             queue_budget_policy = \"drop_oldest\"\n",
        )
        .unwrap();
        assert_eq!(config.queue_budget_policy, QueuePolicy::DropOldest);
        let keys: Vec<_> = config.validate().into_iter().map(|p| p.key).collect();
        assert_eq!(
            keys,
            ["broker.max_sessions", "broker.persistence_commit_ms"]
        );
    }

    #[test]
    fn tls_listener_parses() {
        let config: BrokerConfig = toml::from_str(
            r#"
            [[listeners]]
            bind = "127.0.0.1:8883"
            tls = { cert_file = "/etc/fb/cert.pem", key_file = "/etc/fb/key.pem" }
            "#,
        )
        .unwrap();
        let tls = config.listeners[0].tls.as_ref().unwrap();
        assert_eq!(tls.key_file, PathBuf::from("/etc/fb/key.pem"));
    }
}
