//! The `[upstream]` section of the config file, the broker URLs and the password source.
//!
//! Invariants:
//! - The section names its broker either with `url` (one server) or with `servers` (a
//!   list tried in order, see `failover.rs`), never both: [`UplinkConfig::server_urls`]
//!   is the one place that reads them.
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
use super::profile::{Facts, Profile};

/// Largest inflight window: packet ids left over serve status messages and SUBSCRIBE.
pub const MAX_WINDOW: u16 = 65_000;

/// The upstream MQTT client's settings (`[upstream]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkConfig {
    /// Broker URL: `mqtt://host:1883` or `mqtts://host:8883` (`tcp://` and `ssl://`, as
    /// Paho and Telegraf write them, are the same). The port defaults to 1883 for
    /// `mqtt://` and 8883 for `mqtts://`. The host is resolved again at every
    /// connection attempt. This or `servers` is required.
    #[serde(default)]
    pub url: Option<String>,
    /// Several broker URLs, tried in order: on a failure the uplink moves to the next
    /// one (after the usual backoff delay). Default: none (`url` names the one server).
    #[serde(default)]
    pub servers: Vec<String>,
    /// Return to the first server of `servers` once the connection to another one has
    /// lasted `failback_after_secs` and the first one accepts TCP connections again.
    /// Default: false (stay where the connection works).
    #[serde(default)]
    pub failback: bool,
    /// How long a connection to a later server must have lasted before failback is
    /// tried, in seconds. Default: 300.
    #[serde(default = "default_failback_after_secs")]
    pub failback_after_secs: u64,
    /// The servers are nodes of one cluster that shares sessions (EMQX, HiveMQ,
    /// VerneMQ): a switch resumes the session and QoS 2 stays exactly once. When false,
    /// a switch starts a clean session on the new server and QoS 2 flows cut by it are
    /// sent again as new flows (at least once, counted). Default: false.
    #[serde(default)]
    pub shared_sessions: bool,
    /// The service behind the URL: `"generic"`, `"aws-iot-core"` or `"azure-iot-hub"`.
    /// A cloud profile adds the service's rules to `check-config` and paces the uplink
    /// to its limits. Default: `"generic"`.
    #[serde(default)]
    pub profile: Profile,
    /// Azure IoT Hub device settings (`[upstream.azure]`), with `profile =
    /// "azure-iot-hub"`.
    #[serde(default)]
    pub azure: Option<AzureConfig>,
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

/// The payload format of `[upstream]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PayloadFormat {
    #[default]
    Json,
    Sparkplug,
}

/// The device on Azure IoT Hub (`[upstream.azure]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureConfig {
    /// The device id registered in the hub; it is the MQTT client id. Required.
    pub device_id: String,
    /// File with the device's base64 symmetric key (primary key), from which each
    /// connection's SAS token is made. Leave it out for X.509 (`tls.cert_file`).
    #[serde(default)]
    pub device_key_file: Option<PathBuf>,
    /// Lifetime of a SAS token in seconds; the uplink reconnects with a new one after
    /// four fifths of it. Default: 3600.
    #[serde(default = "default_token_ttl_secs")]
    pub token_ttl_secs: u64,
}

fn default_token_ttl_secs() -> u64 {
    3_600
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

fn default_failback_after_secs() -> u64 {
    300
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
            url: Some(url.into()),
            servers: Vec::new(),
            failback: false,
            failback_after_secs: default_failback_after_secs(),
            shared_sessions: false,
            profile: Profile::default(),
            azure: None,
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
        if let Some(azure) = &self.azure {
            up.at("azure")
                .at_least("token_ttl_secs", azure.token_ttl_secs, 60);
        }
        self.profile.validate(&self.facts(), &mut up);
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
        up.check(
            self.profile != Profile::AzureIotHub,
            "format",
            "Azure IoT Hub takes device messages only on devices/{id}/messages/events/, so \
             Sparkplug's spBv1.0/... topics would be refused; use format = \"json\" with \
             this profile",
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
            None => crate::files::host_name().map_or_else(
                || "fieldbridge".to_owned(),
                |host| host.replace(['/', '+', '#'], "_"),
            ),
        }
    }

    /// Where to connect and as whom: URLs, client id, user name and password source.
    fn validate_identity(&self, up: &mut Scope<'_>) {
        self.validate_servers(up);
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

    /// `url` or `servers`, each a broker URL, TLS ones when TLS settings are given;
    /// failback only with a list to fall back in.
    fn validate_servers(&self, up: &mut Scope<'_>) {
        match (&self.url, self.servers.is_empty()) {
            (Some(_), false) => {
                up.report(
                    "servers",
                    "set either url (one server) or servers (a list), not both; \
                     put the url first in servers",
                );
                return;
            }
            (None, true) => {
                up.report(
                    "url",
                    "the upstream broker is missing: set url = \"mqtt://host:1883\" \
                     (or servers = [...] for several)",
                );
                return;
            }
            _ => {}
        }
        let many = self.url.is_none();
        for (i, text) in self.server_urls().into_iter().enumerate() {
            let key = if many {
                format!("servers[{i}]")
            } else {
                "url".to_owned()
            };
            match BrokerUrl::parse(text) {
                Ok(url) => {
                    up.check(
                        url.tls || !self.tls.is_set(),
                        if many { &key } else { "tls" },
                        "TLS settings are given but the URL is not a TLS one; use mqtts:// \
                         (or ssl://) to connect with TLS",
                    );
                }
                Err(reason) => up.report(&key, reason),
            }
            if many && self.servers[..i].contains(&self.servers[i]) {
                up.report(&key, format!("{text:?} is listed twice"));
            }
        }
        up.check(
            !self.failback || self.servers.len() > 1,
            "failback",
            "failback returns to the first of several servers: list them in servers",
        );
        up.at_least("failback_after_secs", self.failback_after_secs, 1);
    }

    /// What the profile rules look at.
    fn facts(&self) -> Facts<'_> {
        let many = self.url.is_none();
        let servers = self
            .server_urls()
            .into_iter()
            .enumerate()
            .filter_map(|(i, text)| {
                let url = BrokerUrl::parse(text).ok()?;
                let key = if many {
                    format!("servers[{i}]")
                } else {
                    "url".to_owned()
                };
                Some((key, url.tls, url.port))
            })
            .collect();
        Facts {
            servers,
            v5: self.protocol == ProtocolVersion::V5,
            client_id: self.client_id.clone().unwrap_or_else(|| self.client_id()),
            client_id_set: self.client_id.is_some(),
            inflight: self.inflight,
            keep_alive_secs: self.keep_alive_secs,
            client_certificate: self.tls.cert_file.is_some(),
            alpn: &self.tls.alpn,
            username: self.username.is_some(),
            password: self.password_file.is_some() || self.password_env.is_some(),
            subscribe: &self.subscribe,
            status_topic: self.status_topic.as_deref(),
            azure_device: self.azure.as_ref().map(|a| a.device_id.as_str()),
            azure_key: self
                .azure
                .as_ref()
                .is_some_and(|a| a.device_key_file.is_some()),
        }
    }

    /// The broker URLs in the order they are tried: `url`, or `servers`.
    pub fn server_urls(&self) -> Vec<&str> {
        match &self.url {
            Some(url) => vec![url.as_str()],
            None => self.servers.iter().map(String::as_str).collect(),
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

    /// The client identifier: the configured one, the Azure device id, or
    /// `fieldbridge-<hostname>`.
    pub fn client_id(&self) -> String {
        match (&self.client_id, &self.azure) {
            (Some(id), _) => id.clone(),
            (None, Some(azure)) => azure.device_id.clone(),
            (None, None) => crate::files::host_name().map_or_else(
                || "fieldbridge".to_owned(),
                |host| format!("fieldbridge-{host}"),
            ),
        }
    }

    /// The status topic for an agent whose topic prefix is `prefix`.
    pub fn status_topic(&self, prefix: &str) -> String {
        match &self.status_topic {
            Some(topic) => topic.clone(),
            None => crate::topics::Topics::new(prefix).status(),
        }
    }

    /// What `check-config` says of the upstream: the servers, the profile and its rules,
    /// and where each of `topics` (what the agent publishes, under `prefix`) goes.
    pub fn describe(&self, prefix: &str, topics: &[String]) -> String {
        use super::profile as p;
        let mut out = format!("upstream: {}\n", self.server_urls().join(", "));
        if self.servers.len() > 1 {
            out.push_str(&format!(
                "failover: next server on each failure; failback {}; sessions {}\n",
                if self.failback {
                    format!("after {} s", self.failback_after_secs)
                } else {
                    "off".to_owned()
                },
                if self.shared_sessions {
                    "shared (QoS 2 exactly once across a switch)"
                } else {
                    "not shared (QoS 2 at least once across a switch)"
                }
            ));
        }
        let rules = match self.profile {
            Profile::Generic => "no service rules".to_owned(),
            Profile::AwsIotCore => format!(
                "QoS 0/1, mutual TLS, at most {} unacknowledged, paced to {} publishes/s and \
                 {} KiB/s, topics of at most {} bytes and {} slashes",
                p::AWS_INFLIGHT_MAX,
                p::AWS_PUBLISHES_PER_SEC,
                p::AWS_BYTES_PER_SEC / 1024,
                p::AWS_TOPIC_MAX,
                p::AWS_TOPIC_SLASHES_MAX
            ),
            Profile::AzureIotHub => format!(
                "MQTT 3.1.1 over TLS on 8883, QoS 0/1, no retained messages, user {}, {}",
                self.username().unwrap_or_default(),
                match &self.azure {
                    Some(AzureConfig {
                        device_key_file: Some(_),
                        token_ttl_secs,
                        ..
                    }) => format!(
                        "SAS token valid {token_ttl_secs} s, renewed after {} s",
                        token_ttl_secs * 4 / 5
                    ),
                    _ => "X.509 client certificate".to_owned(),
                }
            ),
        };
        out.push_str(&format!(
            "upstream profile: {} ({rules})\n",
            self.profile.name()
        ));
        if let (Profile::AzureIotHub, Some(azure)) = (self.profile, &self.azure) {
            out.push_str("upstream topics (agent topic -> IoT Hub topic):\n");
            for topic in topics {
                out.push_str(&format!(
                    "  {topic} -> {}\n",
                    super::azure::event_topic(&azure.device_id, prefix, topic)
                ));
            }
        } else {
            out.push_str("upstream topics: the agent's topics, unchanged\n");
        }
        out
    }

    /// The user name sent in CONNECT: the configured one, or for Azure IoT Hub the one
    /// made from the hub (the first server's host) and the device id.
    pub fn username(&self) -> Option<String> {
        if let (Profile::AzureIotHub, Some(azure)) = (self.profile, &self.azure) {
            let url = BrokerUrl::parse(self.server_urls().first()?).ok()?;
            return Some(super::azure::username(&url.host, &azure.device_id));
        }
        self.username.clone()
    }

    /// The password for a connection attempt to `host` at `now_secs` (Unix time): a
    /// fresh SAS token with `[upstream.azure]` and a device key, else what
    /// [`UplinkConfig::password`] reads. With a token, also when it expires.
    ///
    /// # Errors
    /// [`Error::Password`] when the key or password cannot be read or used.
    pub fn password_at(
        &self,
        host: &str,
        now_secs: u64,
    ) -> Result<(Option<Password>, Option<u64>), Error> {
        let Some((azure, path)) = self
            .azure
            .as_ref()
            .and_then(|a| Some((a, a.device_key_file.as_ref()?)))
        else {
            return Ok((self.password()?, None));
        };
        let source_name = format!("device key file {}", path.display());
        let key = std::fs::read_to_string(path).map_err(|e| Error::Password {
            source_name: source_name.clone(),
            reason: e.to_string(),
        })?;
        let expiry = now_secs.saturating_add(azure.token_ttl_secs);
        let token = super::azure::sas_token(host, &azure.device_id, &key, expiry).map_err(|e| {
            Error::Password {
                source_name,
                reason: e.to_string(),
            }
        })?;
        Ok((Some(Password::new(token)), Some(azure.token_ttl_secs)))
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
    fn sparkplug_is_refused_with_the_azure_profile() {
        let mut config: UplinkConfig =
            toml::from_str("url = \"mqtt://h\"\nformat = \"sparkplug\"\ngroup_id = \"plant\"")
                .expect("parses");
        assert!(!keys(&config).contains(&"upstream.format".to_string()));
        config.profile = Profile::AzureIotHub;
        assert!(
            keys(&config).contains(&"upstream.format".to_string()),
            "{:?}",
            config.validate()
        );
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
        config.url = Some("tcp://broker.example.com".into());
        assert_eq!(keys(&config), ["upstream.tls"]);
    }

    #[test]
    fn servers_replace_url_and_both_or_neither_is_refused() {
        let config: UplinkConfig = toml::from_str(
            r#"
            servers = ["mqtt://a:1883", "mqtts://b"]
            failback = true
            failback_after_secs = 60
            "#,
        )
        .unwrap();
        assert_eq!(config.server_urls(), ["mqtt://a:1883", "mqtts://b"]);
        assert!(config.validate().is_empty(), "{:?}", config.validate());
        assert!(!config.shared_sessions);

        let both: UplinkConfig =
            toml::from_str("url = \"mqtt://a\"\nservers = [\"mqtt://b\"]").unwrap();
        let problems = both.validate();
        assert_eq!(problems[0].key, "upstream.servers");
        assert!(problems[0].message.contains("not both"), "{problems:?}");

        let neither: UplinkConfig = toml::from_str("client_id = \"gw\"").unwrap();
        assert_eq!(keys(&neither), ["upstream.url"]);

        let mut config = UplinkConfig::new("mqtt://a");
        config.failback = true;
        assert_eq!(keys(&config), ["upstream.failback"]);
        config.url = None;
        config.servers = vec!["mqtt://a".into(), "http://b".into(), "mqtt://a".into()];
        config.tls.alpn = vec!["x".into()];
        assert_eq!(
            keys(&config),
            [
                "upstream.servers[0]",
                "upstream.servers[1]",
                "upstream.servers[2]",
                "upstream.servers[2]",
            ]
        );
    }

    #[test]
    fn check_config_shows_the_profile_and_the_azure_topic_mapping() {
        let config: UplinkConfig = toml::from_str(
            r#"
            url = "mqtts://plant-7.azure-devices.net:8883"
            profile = "azure-iot-hub"
            [azure]
            device_id = "gw-17"
            device_key_file = "/etc/fieldbridge/azure.key"
            "#,
        )
        .unwrap();
        assert!(config.validate().is_empty(), "{:?}", config.validate());
        assert_eq!(config.client_id(), "gw-17");
        let text = config.describe("site/gw", &["site/gw/meter1/voltage".to_owned()]);
        assert!(text.contains("upstream profile: azure-iot-hub"), "{text}");
        assert!(
            text.contains("user plant-7.azure-devices.net/gw-17/?api-version=2021-04-12"),
            "{text}"
        );
        assert!(
            text.contains(
                "  site/gw/meter1/voltage -> devices/gw-17/messages/events/\
                 topic=site%2Fgw%2Fmeter1%2Fvoltage&device=meter1&point=voltage"
            ),
            "{text}"
        );

        // Each attempt's password is a fresh token from the key file (the vector of
        // azure.rs, made by Python's hmac).
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("azure.key");
        std::fs::write(&key, "c2VjcmV0LWRldmljZS1rZXktZm9yLXRlc3Rz\n").unwrap();
        let mut config = config;
        if let Some(azure) = &mut config.azure {
            azure.device_key_file = Some(key);
        }
        let (password, ttl) = config
            .password_at("plant-7.azure-devices.net", 1_800_000_000 - 3_600)
            .unwrap();
        assert_eq!(ttl, Some(3_600));
        assert_eq!(
            password.unwrap().into_bytes(),
            Bytes::from_static(
                b"SharedAccessSignature sr=plant-7.azure-devices.net%2Fdevices%2Fgw-17\
                  &sig=P0gC991LfUT6rG8XBNJRrHf4WcXhcOz%2FQo1vgnCrSQI%3D&se=1800000000"
            )
        );

        let mut aws = UplinkConfig::new("mqtts://a1b2-ats.iot.eu-west-1.amazonaws.com:443");
        aws.profile = Profile::AwsIotCore;
        aws.tls.cert_file = Some("/c.pem".into());
        aws.tls.key_file = Some("/k.pem".into());
        assert_eq!(keys(&aws), ["upstream.tls.alpn"]);
        aws.tls.alpn = vec!["x-amzn-mqtt-ca".into()];
        assert!(aws.validate().is_empty(), "{:?}", aws.validate());
        let text = aws.describe("site/gw", &[]);
        assert!(
            text.contains("paced to 100 publishes/s and 512 KiB/s"),
            "{text}"
        );
        assert!(text.contains("the agent's topics, unchanged"), "{text}");
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
