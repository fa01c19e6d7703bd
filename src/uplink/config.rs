//! The `[upstream]` section of the config file, the broker URL and the password source.
//!
//! Invariants:
//! - Deserialization only checks shapes; [`UplinkConfig::validate`] reports every semantic
//!   problem at once, each with its dotted key path (`upstream.tls.key_file`).
//! - The password is read from its file or environment variable at each connection
//!   attempt (so it can be rotated without a restart) and lives only in [`Password`],
//!   whose `Debug` form is redacted: it never reaches a log line.

use std::fmt;
use std::path::PathBuf;

use bytes::Bytes;
use serde::Deserialize;

use crate::mqtt::{self, Protocol};
use crate::problem::{Invalid, Problems, Scope};
use crate::store::DrainOrder;

use super::error::Error;

/// Largest inflight window: packet ids left over serve status messages and SUBSCRIBE.
pub const MAX_WINDOW: u16 = 65_000;

/// The upstream MQTT client's settings (`[upstream]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkConfig {
    /// Broker URL: `mqtt://host:1883` or `mqtts://host:8883` (`tcp://` and `ssl://`, as
    /// Paho and Telegraf write them, are the same). The port defaults to 1883 for
    /// `mqtt://` and 8883 for `mqtts://`. The host is resolved again at every
    /// connection attempt. Required.
    pub url: String,
    /// Client identifier. It must be stable across restarts: the broker keeps the
    /// persistent session (and the QoS 2 flows in it) under this name.
    /// Default: `fieldbridge-<hostname>`.
    #[serde(default)]
    pub client_id: Option<String>,
    /// MQTT protocol version: `"3.1.1"` or `"5"`. Default: `"3.1.1"`.
    #[serde(default)]
    pub protocol: ProtocolVersion,
    /// User name sent in CONNECT. Default: none.
    #[serde(default)]
    pub username: Option<String>,
    /// File whose content (without a trailing newline) is the password. Default: none.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Environment variable that holds the password. Default: none.
    #[serde(default)]
    pub password_env: Option<String>,
    /// TLS settings, used with `mqtts://`.
    #[serde(default)]
    pub tls: TlsConfig,
    /// Keepalive interval in seconds; a PINGREQ goes out when either direction has been
    /// quiet this long, and a missing PINGRESP after as long again closes the connection.
    /// A 5.0 broker may override it in CONNACK. Default: 30.
    #[serde(default = "default_keep_alive_secs")]
    pub keep_alive_secs: u16,
    /// Limit for DNS, TCP, TLS and CONNACK together, in seconds. Default: 10.
    #[serde(default = "default_connect_timeout_secs")]
    pub connect_timeout_secs: u64,
    /// Maximum number of unacknowledged QoS 1/2 publishes; a 5.0 broker's receive
    /// maximum lowers it. Default: 20, mosquitto's default `max_inflight_messages`: a
    /// 3.1.1 broker cannot announce its limit, and mosquitto closes the connection of a
    /// 3.1.1 client whose open QoS 2 flows leave no room for its next PUBLISH.
    #[serde(default = "default_inflight")]
    pub inflight: u16,
    /// 5.0: how long the broker keeps the session after the connection is lost, in
    /// seconds (3.1.1 sessions last as long as the broker's own setting). Default: 86400.
    #[serde(default = "default_session_expiry_secs")]
    pub session_expiry_secs: u32,
    /// First reconnect delay in milliseconds; it doubles after each failure. Default: 500.
    #[serde(default = "default_backoff_min_ms")]
    pub backoff_min_ms: u64,
    /// Cap of the reconnect delay in milliseconds. Default: 60000.
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// Which end of the backlog goes out first: `"oldest_first"` or `"newest_first"`.
    /// Default: `"oldest_first"`.
    #[serde(default, with = "DrainOrderDef")]
    pub drain_order: DrainOrder,
    /// Messages per second for backlog replay (readings created before the current
    /// connection came up); readings produced while connected are not limited.
    /// Default: none (as fast as the broker acknowledges).
    #[serde(default)]
    pub replay_rate_limit: Option<u32>,
    /// Topic of the birth, will and offline messages. Default: `<prefix>/status`.
    #[serde(default)]
    pub status_topic: Option<String>,
    /// Retained birth payload, published after every CONNACK. Default: `"online"`.
    #[serde(default = "default_online_payload")]
    pub online_payload: String,
    /// Retained will and graceful-shutdown payload. Default: `"offline"`.
    #[serde(default = "default_offline_payload")]
    pub offline_payload: String,
    /// Topic filters to subscribe to at QoS 1 after every CONNACK; matching messages are
    /// handed to the agent. Default: none.
    #[serde(default)]
    pub subscribe: Vec<String>,
    /// Payload format upstream: `"json"` (one topic per point, as on the LAN broker) or
    /// `"sparkplug"` (Sparkplug B 3.0: an edge node with births, deaths and commands;
    /// see the README). Default: `"json"`.
    #[serde(default)]
    pub format: PayloadFormat,
    /// Sparkplug: the group the edge node belongs to. Required with `format = "sparkplug"`.
    #[serde(default)]
    pub group_id: Option<String>,
    /// Sparkplug: the edge node's name. Default: the host name.
    #[serde(default)]
    pub edge_node_id: Option<String>,
    /// Sparkplug: the primary host application whose `spBv1.0/STATE/<id>` must say
    /// online before births are sent; when it goes offline the connection is closed.
    /// Default: none (births right after connecting).
    #[serde(default)]
    pub primary_host_id: Option<String>,
}

/// The gateway's host name, empty when unknown.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// The payload format of `[upstream]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PayloadFormat {
    #[default]
    Json,
    Sparkplug,
}

/// TLS settings of the upstream connection (`[upstream.tls]`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the CA certificates that may sign the broker's certificate (for the
    /// system store: `/etc/ssl/certs/ca-certificates.crt`). Default: the Mozilla roots
    /// built into the binary (webpki-roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain for mutual TLS (AWS IoT). Default: none.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `cert_file`. Default: none.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Name sent in SNI and checked against the broker's certificate. Default: the URL's
    /// host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// ALPN protocols to offer, e.g. `["x-amzn-mqtt-ca"]` for AWS IoT on port 443.
    /// Default: none.
    #[serde(default)]
    pub alpn: Vec<String>,
}

impl TlsConfig {
    fn is_set(&self) -> bool {
        *self != TlsConfig::default()
    }

    /// The rules of `[upstream.tls]`, reported under `tls`.
    fn validate(&self, tls: &mut Scope<'_>) {
        if self.cert_file.is_some() != self.key_file.is_some() {
            let missing = if self.cert_file.is_some() {
                "key_file"
            } else {
                "cert_file"
            };
            tls.report(missing, "mutual TLS needs both cert_file and key_file");
        }
        if let Some(name) = &self.server_name {
            tls.check(
                rustls::pki_types::ServerName::try_from(name.as_str()).is_ok(),
                "server_name",
                format!("{name:?} is neither a DNS name nor an IP address"),
            );
        }
        for (i, proto) in self.alpn.iter().enumerate() {
            tls.check(
                (1..=255).contains(&proto.len()),
                &format!("alpn[{i}]"),
                "an ALPN protocol name has 1 to 255 bytes",
            );
        }
    }
}

/// The protocol version as written in the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum ProtocolVersion {
    #[default]
    #[serde(rename = "3.1.1")]
    V311,
    #[serde(rename = "5")]
    V5,
}

impl From<ProtocolVersion> for Protocol {
    fn from(version: ProtocolVersion) -> Protocol {
        match version {
            ProtocolVersion::V311 => Protocol::V311,
            ProtocolVersion::V5 => Protocol::V5,
        }
    }
}

/// Serde shape of the store's [`DrainOrder`], which carries no serde derive itself.
#[derive(Deserialize)]
#[serde(remote = "DrainOrder", rename_all = "snake_case")]
enum DrainOrderDef {
    OldestFirst,
    NewestFirst,
}

fn default_keep_alive_secs() -> u16 {
    30
}
fn default_connect_timeout_secs() -> u64 {
    10
}
fn default_inflight() -> u16 {
    20
}
fn default_session_expiry_secs() -> u32 {
    86_400
}
fn default_backoff_min_ms() -> u64 {
    500
}
fn default_backoff_max_ms() -> u64 {
    60_000
}
fn default_online_payload() -> String {
    "online".to_owned()
}
fn default_offline_payload() -> String {
    "offline".to_owned()
}

impl UplinkConfig {
    /// A config with every default and the given URL.
    pub fn new(url: impl Into<String>) -> UplinkConfig {
        UplinkConfig {
            url: url.into(),
            client_id: None,
            protocol: ProtocolVersion::default(),
            username: None,
            password_file: None,
            password_env: None,
            tls: TlsConfig::default(),
            keep_alive_secs: default_keep_alive_secs(),
            connect_timeout_secs: default_connect_timeout_secs(),
            inflight: default_inflight(),
            session_expiry_secs: default_session_expiry_secs(),
            backoff_min_ms: default_backoff_min_ms(),
            backoff_max_ms: default_backoff_max_ms(),
            drain_order: DrainOrder::default(),
            replay_rate_limit: None,
            status_topic: None,
            online_payload: default_online_payload(),
            offline_payload: default_offline_payload(),
            subscribe: Vec::new(),
            format: PayloadFormat::default(),
            group_id: None,
            edge_node_id: None,
            primary_host_id: None,
        }
    }

    /// Every semantic problem of the section, with key paths under `upstream.`.
    pub fn validate(&self) -> Vec<Invalid> {
        let mut problems = Problems::new();
        let mut up = problems.at("upstream");
        self.validate_identity(&mut up);
        self.tls.validate(&mut up.at("tls"));
        self.validate_limits(&mut up);
        self.validate_topics(&mut up);
        self.validate_sparkplug(&mut up);
        problems.into_vec()
    }

    /// Sparkplug's ids: set only for that format, each one topic level.
    fn validate_sparkplug(&self, up: &mut Scope<'_>) {
        let ids = [
            ("group_id", &self.group_id),
            ("edge_node_id", &self.edge_node_id),
            ("primary_host_id", &self.primary_host_id),
        ];
        if self.format != PayloadFormat::Sparkplug {
            for (key, value) in ids {
                up.only_for(key, value.is_some(), "format = \"sparkplug\"");
            }
            return;
        }
        up.check(
            self.group_id.is_some(),
            "group_id",
            "is required with format = \"sparkplug\": the Sparkplug group of this gateway",
        );
        for (key, value) in ids {
            if let Some(id) = value {
                if up.non_empty(key, id) {
                    up.check(
                        !id.contains(['/', '+', '#']),
                        key,
                        format!("{id:?} must be one topic level: no '/', '+' or '#'"),
                    );
                }
            }
        }
    }

    /// Sparkplug's edge node id: the configured one, or the host name.
    pub fn edge_node_id(&self) -> String {
        match &self.edge_node_id {
            Some(id) => id.clone(),
            None => {
                let host = host_name().replace(['/', '+', '#'], "_");
                if host.is_empty() {
                    "fieldbridge".to_owned()
                } else {
                    host
                }
            }
        }
    }

    /// Where to connect and as whom: URL, client id, user name and password source.
    fn validate_identity(&self, up: &mut Scope<'_>) {
        match BrokerUrl::parse(&self.url) {
            Ok(url) => {
                up.check(
                    url.tls || !self.tls.is_set(),
                    "tls",
                    "TLS settings are given but the URL is not a TLS one; use mqtts:// \
                     (or ssl://) to connect with TLS",
                );
            }
            Err(reason) => up.report("url", reason),
        }
        if let Some(id) = &self.client_id {
            let named = up.check(
                !id.is_empty(),
                "client_id",
                "must not be empty: the persistent session needs a stable name",
            );
            if named {
                up.check(
                    id.len() <= usize::from(u16::MAX),
                    "client_id",
                    "is longer than 65535 bytes",
                );
            }
        }
        up.check(
            self.password_file.is_none() || self.password_env.is_none(),
            "password_env",
            "set either password_file or password_env, not both",
        );
        let has_password = self.password_file.is_some() || self.password_env.is_some();
        up.check(
            !has_password || self.username.is_some() || self.protocol != ProtocolVersion::V311,
            "username",
            "MQTT 3.1.1 sends a password only together with a user name",
        );
        if let Some(name) = &self.password_env {
            up.check(
                !(name.is_empty() || name.contains('=') || name.contains('\0')),
                "password_env",
                format!("{name:?} is not an environment variable name"),
            );
        }
    }

    /// Timers, the inflight window, backoff and the replay rate.
    fn validate_limits(&self, up: &mut Scope<'_>) {
        up.check(
            self.keep_alive_secs >= 1,
            "keep_alive_secs",
            "must be at least 1: without keepalive a half-open connection goes unnoticed",
        );
        up.at_least("connect_timeout_secs", self.connect_timeout_secs, 1);
        up.check(
            (1..=MAX_WINDOW).contains(&self.inflight),
            "inflight",
            format!("must be between 1 and {}", MAX_WINDOW),
        );
        up.check(
            self.backoff_min_ms >= 1,
            "backoff_min_ms",
            "must be at least 1 so a failing broker is not hammered",
        );
        up.check(
            self.backoff_max_ms >= self.backoff_min_ms,
            "backoff_max_ms",
            format!("must not be below backoff_min_ms ({})", self.backoff_min_ms),
        );
        up.check(
            self.replay_rate_limit != Some(0),
            "replay_rate_limit",
            "must be at least 1 message per second, or left out for no limit",
        );
    }

    /// The status topic and the subscriptions.
    fn validate_topics(&self, up: &mut Scope<'_>) {
        if let Some(topic) = &self.status_topic {
            if let Err(e) = mqtt::topic::validate_topic_name(topic) {
                up.report("status_topic", e.to_string());
            }
        }
        for (i, filter) in self.subscribe.iter().enumerate() {
            if let Err(e) = mqtt::topic::validate_topic_filter(filter) {
                up.report(&format!("subscribe[{i}]"), e.to_string());
            }
        }
    }

    /// The client identifier: the configured one or `fieldbridge-<hostname>`.
    pub fn client_id(&self) -> String {
        match &self.client_id {
            Some(id) => id.clone(),
            None => {
                let host = host_name();
                if host.is_empty() {
                    "fieldbridge".to_owned()
                } else {
                    format!("fieldbridge-{host}")
                }
            }
        }
    }

    /// The status topic for an agent whose topic prefix is `prefix`.
    pub fn status_topic(&self, prefix: &str) -> String {
        match &self.status_topic {
            Some(topic) => topic.clone(),
            None => crate::topics::Topics::new(prefix).status(),
        }
    }

    /// Reads the password from its file or environment variable, if one is configured.
    ///
    /// # Errors
    /// [`Error::Password`] when the file cannot be read or the variable is not set; the
    /// message names the source, never the content.
    pub fn password(&self) -> Result<Option<Password>, Error> {
        if let Some(path) = &self.password_file {
            let mut text = std::fs::read(path).map_err(|e| Error::Password {
                source_name: format!("file {}", path.display()),
                reason: e.to_string(),
            })?;
            while matches!(text.last(), Some(b'\n' | b'\r')) {
                text.pop();
            }
            return Ok(Some(Password(Bytes::from(text))));
        }
        if let Some(name) = &self.password_env {
            let value = std::env::var_os(name).ok_or_else(|| Error::Password {
                source_name: format!("environment variable {name}"),
                reason: "it is not set".to_owned(),
            })?;
            return Ok(Some(Password(Bytes::from(value.into_encoded_bytes()))));
        }
        Ok(None)
    }
}

/// A password on its way into CONNECT. `Debug` shows no content.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(Bytes);

impl Password {
    pub fn new(bytes: impl Into<Bytes>) -> Password {
        Password(bytes.into())
    }

    pub(crate) fn into_bytes(self) -> Bytes {
        self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// A parsed `mqtt://` or `mqtts://` URL (or `tcp://`, `ssl://`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// `mqtts://`.
    pub tls: bool,
    /// Host name or IP address, without IPv6 brackets.
    pub host: String,
    pub port: u16,
}

impl BrokerUrl {
    /// Parses `mqtt[s]://host[:port][/]`; `tcp://` is `mqtt://` and `ssl://` is
    /// `mqtts://`, as Paho and Telegraf users write them.
    ///
    /// # Errors
    /// A sentence saying what is wrong, for a config error message.
    pub fn parse(url: &str) -> Result<BrokerUrl, String> {
        let scheme = |prefix: &str| url.strip_prefix(prefix);
        let (tls, rest) = if let Some(rest) = scheme("mqtts://").or_else(|| scheme("ssl://")) {
            (true, rest)
        } else if let Some(rest) = scheme("mqtt://").or_else(|| scheme("tcp://")) {
            (false, rest)
        } else {
            return Err(format!(
                "{url:?} must start with mqtt:// or mqtts:// (or tcp://, ssl://)"
            ));
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains('/') || authority.contains('?') || authority.contains('#') {
            return Err(format!(
                "{url:?} has a path or query; an MQTT broker URL is only scheme, host and port"
            ));
        }
        if authority.contains('@') {
            return Err(format!(
                "{url:?} carries credentials; put them in username and password_file instead"
            ));
        }
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| format!("{url:?} has an unclosed IPv6 bracket"))?;
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!("{url:?}: {host:?} is not an IPv6 address"));
            }
            match after {
                "" => (host, None),
                _ => match after.strip_prefix(':') {
                    Some(port) => (host, Some(port)),
                    None => return Err(format!("{url:?} has text after the IPv6 address")),
                },
            }
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(format!("{url:?} has no host"));
        }
        let port = match port {
            None => default_port,
            Some(text) => match text.parse::<u16>() {
                Ok(port) if port != 0 => port,
                _ => return Err(format!("{url:?}: {text:?} is not a port number (1-65535)")),
            },
        };
        Ok(BrokerUrl {
            tls,
            host: host.to_owned(),
            port,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(config: &UplinkConfig) -> Vec<String> {
        config.validate().into_iter().map(|i| i.key).collect()
    }

    #[test]
    fn url_forms() {
        let url = BrokerUrl::parse("mqtt://broker.example.com").unwrap();
        assert_eq!(
            (url.tls, url.host.as_str(), url.port),
            (false, "broker.example.com", 1883)
        );
        let url = BrokerUrl::parse("mqtts://broker.example.com/").unwrap();
        assert_eq!((url.tls, url.port), (true, 8883));
        let url = BrokerUrl::parse("mqtts://10.0.0.1:443").unwrap();
        assert_eq!((url.host.as_str(), url.port), ("10.0.0.1", 443));
        let url = BrokerUrl::parse("mqtt://[::1]:1884").unwrap();
        assert_eq!((url.host.as_str(), url.port), ("::1", 1884));
        let url = BrokerUrl::parse("mqtt://[fe80::1]").unwrap();
        assert_eq!((url.host.as_str(), url.port), ("fe80::1", 1883));
        for bad in [
            "http://host:1883",
            "ws://host:1883",
            "host:1883",
            "mqtt://",
            "mqtt://:1883",
            "mqtt://host:0",
            "mqtt://host:70000",
            "mqtt://host:port",
            "mqtt://host/path",
            "mqtt://user:pw@host",
            "mqtt://[::1",
            "mqtt://[nothex]:1",
            "mqtt://[::1]x",
        ] {
            assert!(BrokerUrl::parse(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn defaults_from_a_minimal_section() {
        let config: UplinkConfig = toml::from_str(r#"url = "mqtt://localhost""#).unwrap();
        assert_eq!(config, UplinkConfig::new("mqtt://localhost"));
        assert_eq!(config.keep_alive_secs, 30);
        assert_eq!(config.inflight, 20);
        assert_eq!(config.drain_order, DrainOrder::OldestFirst);
        assert!(config.validate().is_empty());
        assert_eq!(config.status_topic("site/gw1"), "site/gw1/status");
    }

    #[test]
    fn full_section_parses() {
        let config: UplinkConfig = toml::from_str(
            r#"
            url = "mqtts://a1b2.iot.eu-west-1.amazonaws.com:443"
            client_id = "gw-17"
            protocol = "5"
            username = "gw"
            password_env = "UPLINK_PW"
            keep_alive_secs = 60
            connect_timeout_secs = 5
            inflight = 20
            session_expiry_secs = 3600
            backoff_min_ms = 100
            backoff_max_ms = 1000
            drain_order = "newest_first"
            replay_rate_limit = 200
            status_topic = "gw/17/state"
            online_payload = "up"
            offline_payload = "down"
            subscribe = ["gw/17/cmd/#"]
            [tls]
            ca_file = "/etc/fieldbridge/ca.pem"
            cert_file = "/etc/fieldbridge/cert.pem"
            key_file = "/etc/fieldbridge/key.pem"
            server_name = "a1b2.iot.eu-west-1.amazonaws.com"
            alpn = ["x-amzn-mqtt-ca"]
            "#,
        )
        .unwrap();
        assert_eq!(config.protocol, ProtocolVersion::V5);
        assert_eq!(config.drain_order, DrainOrder::NewestFirst);
        assert_eq!(config.status_topic("ignored"), "gw/17/state");
        assert_eq!(config.client_id(), "gw-17");
        assert!(config.validate().is_empty(), "{:?}", config.validate());
    }

    #[test]
    fn unknown_keys_are_rejected() {
        assert!(toml::from_str::<UplinkConfig>("url = \"mqtt://h\"\nkeepalive = 5").is_err());
        assert!(toml::from_str::<UplinkConfig>("url = \"mqtt://h\"\n[tls]\nca = \"x\"").is_err());
        assert!(toml::from_str::<UplinkConfig>("url = \"mqtt://h\"\nprotocol = \"4\"").is_err());
    }

    #[test]
    fn sparkplug_ids_are_one_topic_level_and_only_for_that_format() {
        let mut config: UplinkConfig = toml::from_str(
            "url = \"mqtt://h\"\nformat = \"sparkplug\"\nedge_node_id = \"gw/1\"\nprimary_host_id = \"\"",
        )
        .expect("parses");
        assert_eq!(config.format, PayloadFormat::Sparkplug);
        assert_eq!(
            keys(&config),
            [
                "upstream.group_id",
                "upstream.edge_node_id",
                "upstream.primary_host_id"
            ]
        );
        config.group_id = Some("plant".into());
        config.edge_node_id = None;
        config.primary_host_id = None;
        assert!(keys(&config).is_empty());
        assert!(!config.edge_node_id().contains('/'));
        config.format = PayloadFormat::Json;
        assert_eq!(keys(&config), ["upstream.group_id"], "only for Sparkplug");
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let mut config = UplinkConfig::new("mqtt://host");
        config.client_id = Some(String::new());
        config.password_file = Some("/run/pw".into());
        config.password_env = Some("PW".into());
        config.tls.cert_file = Some("/c.pem".into());
        config.tls.alpn = vec![String::new()];
        config.keep_alive_secs = 0;
        config.connect_timeout_secs = 0;
        config.inflight = 0;
        config.backoff_min_ms = 10;
        config.backoff_max_ms = 5;
        config.replay_rate_limit = Some(0);
        config.status_topic = Some("a/+/status".into());
        config.subscribe = vec!["ok/#".into(), "bad/#/x".into()];
        assert_eq!(
            keys(&config),
            [
                "upstream.tls",
                "upstream.client_id",
                "upstream.password_env",
                "upstream.username",
                "upstream.tls.key_file",
                "upstream.tls.alpn[0]",
                "upstream.keep_alive_secs",
                "upstream.connect_timeout_secs",
                "upstream.inflight",
                "upstream.backoff_max_ms",
                "upstream.replay_rate_limit",
                "upstream.status_topic",
                "upstream.subscribe[1]",
            ]
        );
        let config = UplinkConfig::new("http://host");
        assert_eq!(keys(&config), ["upstream.url"]);
    }

    /// Regression: `tcp://` and `ssl://` URLs (what Paho and Telegraf users type) were
    /// refused.
    #[test]
    fn tcp_and_ssl_urls_are_aliases_of_mqtt_and_mqtts() {
        assert_eq!(
            BrokerUrl::parse("tcp://broker.example.com"),
            BrokerUrl::parse("mqtt://broker.example.com")
        );
        let url = BrokerUrl::parse("ssl://broker.example.com").unwrap();
        assert_eq!((url.tls, url.port), (true, 8883));
        let url = BrokerUrl::parse("ssl://10.0.0.1:443/").unwrap();
        assert_eq!(
            (url.tls, url.host.as_str(), url.port),
            (true, "10.0.0.1", 443)
        );
        let mut config = UplinkConfig::new("ssl://broker.example.com");
        config.tls.server_name = Some("broker.example.com".into());
        assert!(config.validate().is_empty(), "{:?}", config.validate());
        config.url = "tcp://broker.example.com".into();
        assert_eq!(keys(&config), ["upstream.tls"]);
    }

    #[test]
    fn password_from_file_and_env_is_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\n").unwrap();
        let mut config = UplinkConfig::new("mqtt://h");
        config.username = Some("u".into());
        config.password_file = Some(path);
        let password = config.password().unwrap().unwrap();
        assert_eq!(password.clone().into_bytes(), Bytes::from_static(b"s3cret"));
        assert!(!format!("{password:?}").contains("s3cret"));

        config.password_file = Some(dir.path().join("missing"));
        let err = config.password().unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");

        config.password_file = None;
        config.password_env = Some("FIELDBRIDGE_TEST_UNSET_PASSWORD_VARIABLE".into());
        let err = config.password().unwrap_err().to_string();
        assert!(
            err.contains("FIELDBRIDGE_TEST_UNSET_PASSWORD_VARIABLE"),
            "{err}"
        );
        assert!(err.contains("not set"), "{err}");

        config.password_env = Some("PATH".into());
        let from_env = config.password().unwrap().unwrap();
        assert!(!format!("{from_env:?}").contains('/'));
    }
}
