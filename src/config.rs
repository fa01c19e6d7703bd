//! The TOML configuration: one file composed of the sections each module owns.
//!
//! ```toml
//! [agent]          # this module: topic prefix, logging, health, pipeline bounds
//! [broker]         # broker::BrokerConfig   (optional: no section, no local broker)
//! [store]          # store::StoreConfig     (used when there is an upstream)
//! [upstream]       # uplink::UplinkConfig   (optional: no section, LAN-only)
//! [http]           # http::HttpConfig       (optional: no section, no HTTP endpoint)
//! [homeassistant]  # this module: MQTT discovery (optional: no section, no discovery)
//! [time]           # time::TimeConfig       (how far the wall clock is trusted)
//! [[bus]]          # field::FieldConfig buses
//! [profile.NAME]   # field::FieldConfig profiles
//! ```
//!
//! Invariants:
//! - Every problem is reported as `file:line:column: key: message`. Syntax and type
//!   errors come with a span from the parser; semantic problems come from each
//!   section's `validate()` as [`Invalid`] with a dotted key
//!   path, which is looked up in the parsed document to find its position.
//! - This module composes; the rules of a section live with the section, and the
//!   problem type in the leaf [`crate::problem`], so no section imports this module.
//! - [`load`] returns a config only if it has no problem at all, so the agent never
//!   starts (or reloads into) a half-valid configuration.
//! - Every topic the agent would publish has one owner ([`Config::claims`], checked by
//!   [`crate::topics::collisions`]): two keys wanting one topic are a problem naming both.
//! - A type error stops only its own section: each top-level section (each `[[bus]]`,
//!   each `[profile.NAME]`) is read alone when the whole file does not deserialize, so
//!   one run reports a type error in each.
//! - [`load`] reads only the config file. [`check`] (`check-config`) also opens every
//!   file the config names, with the loader of the module that will use it, and looks
//!   for the serial ports; a serial port that is missing is a warning (a USB adapter may
//!   be plugged in later), a file that cannot be read or parsed is a problem.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::broker::BrokerConfig;
use crate::field::{BusConfig, FieldConfig, ProfileConfig};
use crate::http::HttpConfig;
use crate::mqtt::QoS;
use crate::store::StoreConfig;
use crate::time::TimeConfig;
use crate::topics::{Claim, Topics};
use crate::uplink::UplinkConfig;

use crate::problem::{Invalid, Problems, Scope};

/// The whole configuration file.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// `[agent]`: always present in effect; every key has a default.
    pub agent: AgentConfig,
    /// `[broker]`: the local LAN broker. Absent: no local broker.
    pub broker: Option<BrokerConfig>,
    /// `[store]`: the store-and-forward queue, opened only when there is an upstream.
    pub store: StoreConfig,
    /// `[upstream]`: the upstream MQTT connection. Absent: LAN-only.
    pub upstream: Option<UplinkConfig>,
    /// `[http]`: the `/metrics` endpoint. Absent: no HTTP endpoint.
    pub http: Option<HttpConfig>,
    /// `[homeassistant]`: discovery on the LAN broker (and upstream). Absent: no discovery.
    pub homeassistant: Option<HomeAssistantConfig>,
    /// `[time]`: how far the wall clock is trusted; every key has a default.
    pub time: TimeConfig,
    /// `[[bus]]` and `[profile.NAME]`: the field devices.
    pub field: FieldConfig,
    /// The document as parsed, to tell which sections a reload changed.
    pub raw: toml::Table,
}

/// The file's top level as serde sees it; [`Config`] regroups the field sections.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    agent: AgentConfig,
    #[serde(default)]
    broker: Option<BrokerConfig>,
    #[serde(default)]
    store: StoreConfig,
    #[serde(default)]
    upstream: Option<UplinkConfig>,
    #[serde(default)]
    http: Option<HttpConfig>,
    homeassistant: Option<HomeAssistantConfig>,
    #[serde(default)]
    time: TimeConfig,
    #[serde(default)]
    bus: Vec<BusConfig>,
    #[serde(default)]
    profile: BTreeMap<String, ProfileConfig>,
}

/// Most runtime threads `agent.worker_threads` may ask for.
pub const MAX_WORKER_THREADS: usize = 64;

/// `[agent]`: how the parts are wired together.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Topic prefix of everything this agent publishes; `{hostname}` is replaced by the
    /// machine's host name. Default `"fieldbridge/{hostname}"`.
    pub prefix: String,
    /// Log filter, a level (`error`, `warn`, `info`, `debug`, `trace`) or a
    /// `tracing` directive list such as `"info,fieldbridge::field=debug"`. `RUST_LOG`
    /// overrides it. Default `"info"`.
    pub log_level: String,
    /// Seconds between `{prefix}/health` messages. Default 30.
    pub health_interval_secs: u64,
    /// QoS of readings queued for the upstream broker (0, 1 or 2). Default 1.
    pub qos: u8,
    /// Readings retained on the local broker, so a new LAN subscriber gets the last
    /// value at once. Default true.
    pub retain: bool,
    /// Readings also retained upstream. Default false: a backlog replayed after an
    /// outage would otherwise overwrite the retained value once per queued reading, and
    /// clouds that bill retained storage rarely want every reading kept.
    pub retain_upstream: bool,
    /// Bound of the channel from the bus tasks to the pipeline, in readings. Default 4096.
    pub channel_capacity: usize,
    /// Most readings appended to the store in one call; capped by
    /// `store.commit_max_rows`, so that under load every append commits at once.
    /// Default 1024.
    pub batch_max: usize,
    /// Time allowed for a graceful shutdown, in milliseconds. Default 4000.
    pub shutdown_timeout_ms: u64,
    /// Commands older than this (from arrival, unless the command says more) are
    /// refused as stale, in milliseconds. Default 5000.
    pub command_max_age_ms: u64,
    /// Threads of the async runtime that runs polling, the LAN broker and the uplink
    /// (the store and the broker's persistence have threads of their own). 1, the
    /// default, suits a gateway: the least memory (each worker costs a stack and a
    /// malloc arena). More spread a busy LAN broker over the cores; 0 means one per
    /// core. Read at start.
    pub worker_threads: usize,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            prefix: "fieldbridge/{hostname}".into(),
            log_level: "info".into(),
            health_interval_secs: 30,
            qos: 1,
            retain: true,
            retain_upstream: false,
            channel_capacity: 4096,
            batch_max: 1024,
            shutdown_timeout_ms: 4000,
            command_max_age_ms: 5000,
            worker_threads: 1,
        }
    }
}

impl AgentConfig {
    /// Problems with the `[agent]` keys.
    pub fn validate(&self) -> Vec<Invalid> {
        let mut problems = Problems::new();
        let mut agent = problems.at("agent");
        agent.non_empty("prefix", self.prefix.trim_matches('/'));
        agent.check(
            !self.prefix.contains(['+', '#', '\0']),
            "prefix",
            "must not contain MQTT wildcards (`+`, `#`) or NUL",
        );
        agent.check(
            !self.prefix.starts_with('$'),
            "prefix",
            "must not start with `$` (reserved for broker topics)",
        );
        if let Err(err) = self
            .log_level
            .parse::<tracing_subscriber::filter::Targets>()
        {
            agent.report(
                "log_level",
                format!("not a level or filter directive: {err}"),
            );
        }
        agent.at_least("health_interval_secs", self.health_interval_secs, 1);
        agent.at_least("command_max_age_ms", self.command_max_age_ms, 1);
        agent.check(QoS::from_u8(self.qos).is_some(), "qos", "must be 0, 1 or 2");
        agent.at_least("channel_capacity", self.channel_capacity, 1);
        agent.at_least("batch_max", self.batch_max, 1);
        agent.at_least("shutdown_timeout_ms", self.shutdown_timeout_ms, 1);
        agent.check(
            self.worker_threads <= MAX_WORKER_THREADS,
            "worker_threads",
            format!(
                "{} is more threads than a gateway can use; at most {MAX_WORKER_THREADS} \
                 (0 = one per core)",
                self.worker_threads
            ),
        );
        problems.into_vec()
    }

    /// The prefix with `{hostname}` filled in and no trailing slash.
    pub fn resolved_prefix(&self, hostname: &str) -> String {
        self.prefix
            .replace("{hostname}", hostname)
            .trim_end_matches('/')
            .to_string()
    }

    /// The configured QoS; validation guarantees it is 0, 1 or 2.
    pub fn qos(&self) -> QoS {
        QoS::from_u8(self.qos).unwrap_or(QoS::AtLeastOnce)
    }
}

/// `[homeassistant]`: Home Assistant MQTT discovery messages on the LAN broker and
/// optionally upstream (see `agent/discovery.rs` for what is announced).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HomeAssistantConfig {
    /// Home Assistant's discovery prefix. Default `"homeassistant"`.
    pub discovery_prefix: String,
    /// The gateway's id in discovery topics and unique ids (`[a-zA-Z0-9_-]`). Default:
    /// the agent's prefix with every other character made `_`. Changing it makes Home
    /// Assistant see new entities.
    pub node_id: Option<String>,
    /// A reading older than this many poll intervals (or heartbeats, with a deadband)
    /// shows as unavailable. Default 3; 0: never.
    pub expire_after_polls: u32,
    /// Also announce on the upstream broker (retained, through the store). Default
    /// false.
    pub upstream: bool,
}

impl Default for HomeAssistantConfig {
    fn default() -> Self {
        HomeAssistantConfig {
            discovery_prefix: "homeassistant".into(),
            node_id: None,
            expire_after_polls: 3,
            upstream: false,
        }
    }
}

impl HomeAssistantConfig {
    /// Problems with the `[homeassistant]` keys.
    pub fn validate(&self) -> Vec<Invalid> {
        let mut problems = Problems::new();
        let mut ha = problems.at("homeassistant");
        let prefix = &self.discovery_prefix;
        if ha.non_empty("discovery_prefix", prefix.trim_matches('/')) {
            ha.check(
                !prefix.contains(['+', '#', '\0']) && !prefix.starts_with('$'),
                "discovery_prefix",
                "must not contain MQTT wildcards (`+`, `#`) or NUL, nor start with `$`",
            );
        }
        if let Some(node_id) = &self.node_id {
            ha.check(
                !node_id.is_empty() && crate::topics::is_discovery_id(node_id),
                "node_id",
                "must be letters, digits, `_` or `-` (Home Assistant's discovery ids)",
            );
        }
        problems.into_vec()
    }
}

impl Config {
    /// Whether the top-level `section` differs between the two files.
    pub fn section_changed(&self, other: &Config, section: &str) -> bool {
        self.raw.get(section) != other.raw.get(section)
    }

    /// Problems across all sections, each with its dotted key path.
    pub fn validate(&self) -> Vec<Invalid> {
        let mut problems = Problems::new();
        problems.extend(self.agent.validate());
        problems.extend(self.broker.iter().flat_map(BrokerConfig::validate));
        problems.extend(self.store.validate());
        problems.extend(self.upstream.iter().flat_map(UplinkConfig::validate));
        problems.extend(self.http.iter().flat_map(HttpConfig::validate));
        problems.extend(self.time.validate());
        let has_users = self
            .broker
            .as_ref()
            .is_some_and(|broker| broker.password_file.is_some());
        if self.http.as_ref().is_some_and(HttpConfig::needs_login) && !has_users {
            problems.at("http").report(
                "bind",
                "outside loopback the endpoint asks for a login: set [broker] password_file (its users log in), or bind 127.0.0.1",
            );
        }
        problems.extend(
            self.homeassistant
                .iter()
                .flat_map(HomeAssistantConfig::validate),
        );
        if let Some(ha) = &self.homeassistant {
            if ha.upstream && self.upstream.is_none() {
                problems
                    .at("homeassistant")
                    .report("upstream", "discovery upstream needs an [upstream] section");
            } else if !ha.upstream && self.broker.is_none() {
                problems.at("homeassistant").report(
                    "",
                    "discovery is announced on the LAN broker: configure a [broker] too, or set upstream = true",
                );
            }
        }
        problems.extend(self.field.validate());
        if self.broker.is_none() && self.upstream.is_none() {
            let message = if self.field.buses.is_empty() {
                "nothing to run: configure a [broker], an [upstream] or at least one [[bus]]"
            } else {
                "the readings would go nowhere: configure a [broker], an [upstream] or both"
            };
            problems.at("").report("", message);
        }
        if let Some(upstream) = &self.upstream {
            let topics = Topics::new(&self.agent.resolved_prefix(&hostname()));
            let claimed: Vec<(String, String)> = self
                .claims(&topics)
                .into_iter()
                .map(|claim| (claim.key, claim.topic))
                .collect();
            upstream.profile.validate_agent(
                self.agent.qos(),
                self.agent.retain_upstream,
                &claimed,
                &mut problems.at(""),
            );
        }
        // Duplicate device or point names are reported by their sections; their topics
        // would only repeat that.
        if problems.is_empty() {
            let topics = Topics::new(&self.agent.resolved_prefix(&hostname()));
            let claims = self.claims(&topics);
            for (first, second) in crate::topics::collisions(&claims) {
                let fix = if second.key.ends_with(".name") {
                    "rename it or give it a `topic`"
                } else {
                    "choose another topic"
                };
                problems.at("").report(
                    &second.key,
                    format!(
                        "{} would publish on {:?}, which is already {} ({}); every topic \
                         needs one owner: {fix}",
                        second.what, second.topic, first.what, first.key
                    ),
                );
            }
            if let Some(ha) = &self.homeassistant {
                let discovery = ha.discovery_prefix.trim_end_matches('/');
                if topics.prefix() == discovery {
                    problems.at("homeassistant").report(
                        "discovery_prefix",
                        format!(
                            "{discovery:?} is also agent.prefix: the agent's status would be \
                             taken for Home Assistant's; choose another prefix for one of them"
                        ),
                    );
                }
                for (key, message) in self.ha_component_problems() {
                    problems.at("").report(&key, message);
                }
                for (first, second, id) in self.discovery_id_clashes() {
                    problems.at("").report(
                        &second,
                        format!(
                            "is {id:?} as a Home Assistant id, like {first}; rename one \
                             (ids keep only letters, digits, `_` and `-`)"
                        ),
                    );
                }
            }
        }
        problems.into_vec()
    }

    /// Every topic the agent publishes on with this config, each with the key that
    /// makes it publish there: the agent's status and health, the upstream status
    /// topic, then per device its status, its batch topic and its points.
    pub fn claims(&self, topics: &Topics) -> Vec<Claim> {
        let mut claims = vec![
            Claim::new(
                topics.status(),
                "agent.prefix",
                "the agent's online/offline status",
            ),
            Claim::new(topics.health(), "agent.prefix", "the health report"),
        ];
        if let Some(status) = self.upstream.as_ref().and_then(|u| u.status_topic.clone()) {
            if status != topics.status() {
                claims.push(Claim::new(
                    status,
                    "upstream.status_topic",
                    "the upstream online/offline status",
                ));
            }
        }
        for (b, bus) in self.field.buses.iter().enumerate() {
            for (d, device) in bus.devices.iter().enumerate() {
                let at = format!("bus[{b}].device[{d}]");
                let name = &device.name;
                claims.push(Claim::new(
                    topics.device_status(name),
                    format!("{at}.name"),
                    format!("the online/offline status of device {name:?}"),
                ));
                if device.batch {
                    claims.push(Claim::new(
                        topics.device_batch(name),
                        format!("{at}.batch"),
                        format!("the batch message of device {name:?}"),
                    ));
                }
                for (key, point) in self.points_of(&at, device) {
                    let field = if point.topic.is_some() {
                        "topic"
                    } else {
                        "name"
                    };
                    claims.push(Claim::new(
                        topics.point(name, &point.name, point.topic.as_deref()),
                        format!("{key}.{field}"),
                        format!("point {:?} of device {name:?}", point.name),
                    ));
                }
            }
        }
        claims
    }

    /// The points of `device` (at key path `at`): its profile's, then its own, each with
    /// its key path.
    fn points_of<'c>(
        &'c self,
        at: &'c str,
        device: &'c crate::field::DeviceConfig,
    ) -> impl Iterator<Item = (String, &'c crate::field::PointConfig)> + 'c {
        let profile = device
            .profile
            .as_ref()
            .and_then(|profile| self.field.profiles.get(profile).map(|p| (profile, p)));
        let from_profile = profile.into_iter().flat_map(|(profile, p)| {
            p.points
                .iter()
                .enumerate()
                .map(move |(i, point)| (format!("profile.{profile}.point[{i}]"), point))
        });
        let own = device
            .points
            .iter()
            .enumerate()
            .map(move |(i, point)| (format!("{at}.point[{i}]"), point));
        from_profile.chain(own)
    }

    /// Points whose `ha_component` cannot work: a command entity (number, switch,
    /// select) on a point that is not writable, a select without `allowed`.
    fn ha_component_problems(&self) -> Vec<(String, &'static str)> {
        use crate::field::HaComponent;
        let mut found = Vec::new();
        for (b, bus) in self.field.buses.iter().enumerate() {
            for (d, device) in bus.devices.iter().enumerate() {
                let at = format!("bus[{b}].device[{d}]");
                for (key, point) in self.points_of(&at, device) {
                    let message = match point.ha_component {
                        Some(HaComponent::Number | HaComponent::Switch | HaComponent::Select)
                            if !point.writable =>
                        {
                            "a number, switch or select sends commands: the point needs `writable = true`"
                        }
                        Some(HaComponent::Select) if point.allowed.is_none() => {
                            "a select offers the `allowed` values: the point needs `allowed`"
                        }
                        _ => continue,
                    };
                    found.push((format!("{key}.ha_component"), message));
                }
            }
        }
        found
    }

    /// Devices or points whose Home Assistant ids (names with other characters than
    /// `[a-zA-Z0-9_-]` made `_`) are the same: `(first key, second key, id)`.
    fn discovery_id_clashes(&self) -> Vec<(String, String, String)> {
        let mut owners: std::collections::HashMap<String, String> = Default::default();
        let mut clashes = Vec::new();
        let mut claim = |id: String, key: String| match owners.get(&id) {
            Some(first) => clashes.push((first.clone(), key, id)),
            None => {
                owners.insert(id, key);
            }
        };
        for (b, bus) in self.field.buses.iter().enumerate() {
            for (d, device) in bus.devices.iter().enumerate() {
                let at = format!("bus[{b}].device[{d}]");
                let device_id = crate::topics::discovery_id(&device.name);
                claim(device_id.clone(), format!("{at}.name"));
                for (key, point) in self.points_of(&at, device) {
                    let id = crate::topics::discovery_object_id(&device.name, &point.name);
                    claim(format!("{device_id}/{id}"), format!("{key}.name"));
                }
            }
        }
        clashes
    }

    /// Opens every file the config names and looks for its serial ports.
    pub fn check_files(&self) -> FileCheck {
        let mut errors = Problems::new();
        let mut warnings = Problems::new();
        if let Some(broker) = &self.broker {
            let mut at = errors.at("broker");
            if let Some(path) = &broker.password_file {
                check_file(&mut at, "password_file", path, |path| {
                    crate::broker::PasswordFile::load(path).map(drop)
                });
            }
            if let Some(path) = &broker.acl_file {
                check_file(&mut at, "acl_file", path, |path| {
                    crate::broker::Acl::load(path).map(drop)
                });
            }
            for (i, listener) in broker.listeners.iter().enumerate() {
                let Some(tls) = &listener.tls else { continue };
                let mut at = at.at(&format!("listeners[{i}].tls"));
                let both = readable(&mut at, "cert_file", &tls.cert_file)
                    & readable(&mut at, "key_file", &tls.key_file);
                if both {
                    if let Err(err) = crate::broker::server_config(tls) {
                        let files = [("cert_file", &tls.cert_file), ("key_file", &tls.key_file)];
                        report_at_file(&mut at, &files, crate::problem::each_cause_once(&err));
                    }
                }
            }
        }
        if let Some(upstream) = &self.upstream {
            let mut at = errors.at("upstream");
            if let Some(path) = &upstream.password_file {
                readable(&mut at, "password_file", path);
            }
            let tls = &upstream.tls;
            let mut at = at.at("tls");
            let files: Vec<(&str, &PathBuf)> = [
                ("ca_file", &tls.ca_file),
                ("cert_file", &tls.cert_file),
                ("key_file", &tls.key_file),
            ]
            .into_iter()
            .filter_map(|(key, path)| Some((key, path.as_ref()?)))
            .collect();
            let mut all_read = true;
            for (key, path) in &files {
                all_read &= readable(&mut at, key, path);
            }
            let uses_tls = upstream
                .server_urls()
                .into_iter()
                .any(|url| crate::uplink::BrokerUrl::parse(url).is_ok_and(|u| u.tls));
            if all_read && uses_tls {
                if let Err(err) = crate::uplink::tls::client_config(tls) {
                    report_at_file(&mut at, &files, crate::problem::each_cause_once(&err));
                }
            }
        }
        for (b, bus) in self.field.buses.iter().enumerate() {
            if let Some(port) = bus.serial_path() {
                warnings.at(format!("bus[{b}]")).check(
                    Path::new(port).exists(),
                    "port",
                    format!(
                        "serial port {port} does not exist (yet): the bus retries until it \
                         appears; check the adapter or HAT and its device name (ls /dev/tty*)"
                    ),
                );
            }
        }
        FileCheck {
            problems: errors.into_vec(),
            warnings: warnings.into_vec(),
        }
    }
}

/// What [`Config::check_files`] found, each with the key that names the file or port.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileCheck {
    /// A file that cannot be read or parsed.
    pub problems: Vec<Invalid>,
    /// A serial port that does not exist (yet).
    pub warnings: Vec<Invalid>,
}

/// Opens `path` (named by `key`) and hands it to `load`; reports what fails with the
/// path and the reason. Returns whether the file could be read.
fn check_file<E: std::error::Error>(
    at: &mut Scope<'_>,
    key: &str,
    path: &Path,
    load: impl FnOnce(&Path) -> Result<(), E>,
) -> bool {
    if let Err(err) = std::fs::File::open(path) {
        let hint = denied_hint(&err, path)
            .map(|hint| format!(": {hint}"))
            .unwrap_or_default();
        at.report(key, format!("cannot read {}: {err}{hint}", path.display()));
        return false;
    }
    if let Err(err) = load(path) {
        at.report(key, crate::problem::each_cause_once(&err));
    }
    true
}

/// Reports `message` at the key of the file it names (the first one whose path it
/// shows), or at the scope itself.
fn report_at_file(at: &mut Scope<'_>, files: &[(&str, &PathBuf)], message: String) {
    let key = files
        .iter()
        .find(|(_, path)| message.contains(&path.display().to_string()))
        .map_or("", |(key, _)| *key);
    at.report(key, message);
}

/// Opens `path` (named by `key`); reports it with the reason when it cannot be read.
fn readable(at: &mut Scope<'_>, key: &str, path: &Path) -> bool {
    check_file(at, key, path, |_| Ok::<(), std::io::Error>(()))
}

/// For a permission error: who may read `path` and how to get in.
fn denied_hint(err: &std::io::Error, path: &Path) -> Option<String> {
    if err.kind() == std::io::ErrorKind::PermissionDenied {
        crate::files::why_denied(path)
    } else {
        None
    }
}

/// The machine's host name, as used in `{hostname}`; `localhost` if it cannot be read.
pub fn hostname() -> String {
    crate::files::host_name().unwrap_or_else(|| "localhost".to_string())
}

/// A configuration file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: cannot read: {source}{}", path.display(), hint.as_deref().map(|hint| format!("; {hint}")).unwrap_or_default())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
        /// Who may read the file, when permission was denied.
        hint: Option<String>,
    },
    #[error("{}", render(problems))]
    Invalid { problems: Vec<Problem> },
}

/// One problem with its position, printed as `file:line:column: key: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
    /// Dotted key path; empty for the document as a whole.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

fn render(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Reads, parses and validates a configuration file.
///
/// # Errors
/// [`Error::Read`] if the file cannot be read; [`Error::Invalid`] with every problem
/// found, each with its position.
pub fn load(path: &Path) -> Result<Config, Error> {
    parse(&path.display().to_string(), &read(path)?)
}

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Read {
        hint: denied_hint(&source, path),
        path: path.to_path_buf(),
        source,
    })
}

/// A configuration that `check-config` accepts, and what it warns about.
#[derive(Debug)]
pub struct Checked {
    pub config: Config,
    /// Positioned like problems: a serial port that does not exist.
    pub warnings: Vec<Problem>,
}

/// What `check-config` does: [`load`], then open every file the config names
/// ([`Config::check_files`]).
///
/// # Errors
/// As [`load`]; [`Error::Invalid`] also for each named file that cannot be read or
/// parsed, at the key that names it.
pub fn check(path: &Path) -> Result<Checked, Error> {
    let text = read(path)?;
    let file = path.display().to_string();
    let config = parse(&file, &text)?;
    let FileCheck { problems, warnings } = config.check_files();
    let entries = toml_edit::ImDocument::parse(text.as_str())
        .map(|doc| Entries::of(&doc))
        .unwrap_or(Entries(Vec::new()));
    let locate = |found: Vec<Invalid>| -> Vec<Problem> {
        found
            .into_iter()
            .map(|problem| {
                let (line, column) = line_column(&text, entries.offset_of(&problem.key));
                Problem {
                    file: file.clone(),
                    line,
                    column,
                    key: problem.key,
                    message: problem.message,
                }
            })
            .collect()
    };
    if !problems.is_empty() {
        return Err(Error::Invalid {
            problems: locate(problems),
        });
    }
    Ok(Checked {
        warnings: locate(warnings),
        config,
    })
}

/// Parses and validates configuration text; `file` names it in problems.
///
/// # Errors
/// [`Error::Invalid`] with every problem found, each with its position.
pub fn parse(file: &str, text: &str) -> Result<Config, Error> {
    let at = |offset: usize, key: String, message: String| {
        let (line, column) = line_column(text, offset);
        Problem {
            file: file.to_string(),
            line,
            column,
            key,
            message,
        }
    };
    let doc = toml_edit::ImDocument::parse(text).map_err(|err| {
        let offset = err.span().map_or(0, |span| span.start);
        let problem = at(offset, String::new(), err.message().trim().to_string());
        Error::Invalid {
            problems: vec![problem],
        }
    })?;
    let entries = Entries::of(&doc);
    let parsed: File = toml::from_str(text).map_err(|err| {
        let first = (err.span().unwrap_or(0..0), err.message().trim().to_string());
        let mut found = section_type_errors(&doc);
        if !found.iter().any(|(span, _)| span.start == first.0.start) {
            found.push(first);
        }
        found.sort_by_key(|(span, _)| span.start);
        let problems = found
            .into_iter()
            .map(|(span, message)| {
                let key = entries.key_at(&span).unwrap_or_default();
                at(span.start, key, crate::problem::in_plain_words(&message))
            })
            .collect();
        Error::Invalid { problems }
    })?;
    let config = Config {
        agent: parsed.agent,
        broker: parsed.broker,
        store: parsed.store,
        upstream: parsed.upstream,
        http: parsed.http,
        homeassistant: parsed.homeassistant,
        time: parsed.time,
        field: FieldConfig {
            buses: parsed.bus,
            profiles: parsed.profile,
        },
        raw: toml::from_str(text).unwrap_or_default(),
    };
    let invalid = config.validate();
    if invalid.is_empty() {
        return Ok(config);
    }
    let problems = invalid
        .into_iter()
        .map(|problem| {
            at(
                entries.offset_of(&problem.key),
                problem.key,
                problem.message,
            )
        })
        .collect();
    Err(Error::Invalid { problems })
}

/// The sections a file may have, in the order serde names them.
const SECTIONS: [&str; 9] = [
    "agent",
    "broker",
    "store",
    "upstream",
    "http",
    "homeassistant",
    "time",
    "bus",
    "profile",
];

/// The type errors of each top-level section read alone (each `[[bus]]` and each
/// `[profile.NAME]` apart), and unknown sections, with their spans.
fn section_type_errors(doc: &toml_edit::ImDocument<&str>) -> Vec<(Range<usize>, String)> {
    let mut found = Vec::new();
    for (name, item) in doc.as_table() {
        if !SECTIONS.contains(&name) {
            let span = doc
                .as_table()
                .get_key_value(name)
                .and_then(|(key, _)| key.span())
                .or(item.span())
                .unwrap_or(0..0);
            let expected: Vec<String> = SECTIONS.iter().map(|s| format!("`{s}`")).collect();
            found.push((
                span,
                format!(
                    "unknown field `{name}`, expected one of {}",
                    expected.join(", ")
                ),
            ));
            continue;
        }
        match (name, item) {
            ("agent", _) => found.extend(type_error::<AgentConfig>(item)),
            ("broker", _) => found.extend(type_error::<BrokerConfig>(item)),
            ("store", _) => found.extend(type_error::<StoreConfig>(item)),
            ("upstream", _) => found.extend(type_error::<UplinkConfig>(item)),
            ("http", _) => found.extend(type_error::<HttpConfig>(item)),
            ("homeassistant", _) => found.extend(type_error::<HomeAssistantConfig>(item)),
            ("time", _) => found.extend(type_error::<TimeConfig>(item)),
            ("bus", toml_edit::Item::ArrayOfTables(buses)) => {
                for bus in buses {
                    let bus = toml_edit::Item::Table(bus.clone());
                    found.extend(type_error::<BusConfig>(&bus));
                }
            }
            ("profile", toml_edit::Item::Table(profiles)) => {
                for (_, profile) in profiles {
                    found.extend(type_error::<ProfileConfig>(profile));
                }
            }
            ("bus", _) => found.extend(type_error::<Vec<BusConfig>>(item)),
            ("profile", _) => found.extend(type_error::<BTreeMap<String, ProfileConfig>>(item)),
            _ => {}
        }
    }
    found
}

/// The error of deserializing `item` alone as a `T`, at its span (or the item's own
/// span, for an error about the table as a whole such as a missing key).
fn type_error<T: serde::de::DeserializeOwned>(
    item: &toml_edit::Item,
) -> Option<(Range<usize>, String)> {
    use serde::de::IntoDeserializer;
    let whole = item.span();
    let value = item.clone().into_value().ok()?;
    let err = T::deserialize(value.into_deserializer()).err()?;
    let span = err.span().or(whole).unwrap_or(0..0);
    Some((span, err.message().trim().to_string()))
}

/// 1-based line and character column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |at| at + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Every key of a parsed document with its dotted path and positions.
struct Entries(Vec<Entry>);

struct Entry {
    path: String,
    key_span: Option<Range<usize>>,
    /// The value, or the `[header]` of a table.
    value_span: Option<Range<usize>>,
}

impl Entries {
    fn of(doc: &toml_edit::ImDocument<&str>) -> Entries {
        let mut entries = Vec::new();
        walk_table(
            "",
            doc.as_table() as &dyn toml_edit::TableLike,
            &mut entries,
        );
        Entries(entries)
    }

    /// Byte offset for a dotted key path: its value if present, else the closest
    /// ancestor that is, else the start of the document.
    fn offset_of(&self, path: &str) -> usize {
        let mut path = path;
        loop {
            if let Some(entry) = self.0.iter().find(|entry| entry.path == path) {
                if let Some(span) = entry.value_span.as_ref().or(entry.key_span.as_ref()) {
                    return span.start;
                }
            }
            match path.rfind(['.', '[']) {
                Some(cut) => path = &path[..cut],
                None => return 0,
            }
        }
    }

    /// The innermost key whose key or value span holds `span`.
    fn key_at(&self, span: &Range<usize>) -> Option<String> {
        let holding_len = |outer: &Option<Range<usize>>| {
            outer
                .as_ref()
                .filter(|outer| {
                    outer.start <= span.start && span.end <= outer.end.max(outer.start + 1)
                })
                .map(|outer| outer.len())
        };
        self.0
            .iter()
            .filter_map(|entry| {
                let key = holding_len(&entry.key_span);
                let value = holding_len(&entry.value_span);
                key.into_iter().chain(value).min().map(|len| (len, entry))
            })
            .min_by_key(|(len, _)| *len)
            .map(|(_, entry)| entry.path.clone())
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

fn walk_table(prefix: &str, table: &dyn toml_edit::TableLike, out: &mut Vec<Entry>) {
    for (name, _) in table.iter() {
        let Some((key, item)) = table.get_key_value(name) else {
            continue;
        };
        let path = join(prefix, name);
        walk_item(path, key.span(), item, out);
    }
}

fn walk_item(
    path: String,
    key_span: Option<Range<usize>>,
    item: &toml_edit::Item,
    out: &mut Vec<Entry>,
) {
    match item {
        toml_edit::Item::None => {}
        toml_edit::Item::Value(value) => walk_value(path, key_span, value, out),
        toml_edit::Item::Table(table) => {
            out.push(Entry {
                path: path.clone(),
                key_span,
                value_span: table.span(),
            });
            walk_table(&path, table, out);
        }
        toml_edit::Item::ArrayOfTables(tables) => {
            out.push(Entry {
                path: path.clone(),
                key_span,
                value_span: tables.span(),
            });
            for (index, table) in tables.iter().enumerate() {
                let element = format!("{path}[{index}]");
                out.push(Entry {
                    path: element.clone(),
                    key_span: None,
                    value_span: table.span(),
                });
                walk_table(&element, table, out);
            }
        }
    }
}

fn walk_value(
    path: String,
    key_span: Option<Range<usize>>,
    value: &toml_edit::Value,
    out: &mut Vec<Entry>,
) {
    out.push(Entry {
        path: path.clone(),
        key_span,
        value_span: value.span(),
    });
    match value {
        toml_edit::Value::InlineTable(table) => walk_table(&path, table, out),
        toml_edit::Value::Array(array) => {
            for (index, element) in array.iter().enumerate() {
                walk_value(format!("{path}[{index}]"), None, element, out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        match parse("test.toml", text) {
            Ok(_) => Vec::new(),
            Err(Error::Invalid { problems }) => problems.iter().map(ToString::to_string).collect(),
            Err(other) => vec![other.to_string()],
        }
    }

    #[test]
    fn defaults_are_valid_with_a_broker() {
        let config = parse("test.toml", "[broker]\n").expect("valid");
        assert_eq!(config.agent, AgentConfig::default());
        assert!(config.upstream.is_none());
    }

    #[test]
    fn http_is_off_unless_configured_and_outside_loopback_needs_a_password_file() {
        let config = parse("test.toml", "[broker]\n").expect("valid");
        assert!(config.http.is_none());
        let config = parse("test.toml", "[broker]\n[http]\n").expect("valid");
        let http = config.http.expect("[http] given");
        assert!(http.bind.ip().is_loopback() && !http.needs_login());
        let found = problems("[broker]\n[http]\nbind = \"0.0.0.0:9771\"\n");
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("test.toml:3:8: http.bind: outside loopback"),
            "{found:?}"
        );
        let with_users = "[broker]\npassword_file = \"/etc/fieldbridge/passwd\"\n\
                          [http]\nbind = \"0.0.0.0:9771\"\n";
        assert!(problems(with_users).is_empty());
    }

    #[test]
    fn an_empty_file_has_nothing_to_run() {
        let found = problems("");
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("test.toml:1:1: nothing to run"),
            "{found:?}"
        );
    }

    #[test]
    fn buses_without_a_destination_are_rejected() {
        let text = "[[bus]]\nname = \"plc\"\nkind = \"tcp\"\nhost = \"10.0.0.5\"\n\
                    [[bus.device]]\nname = \"press\"\n\
                    [[bus.device.point]]\nname = \"p\"\nkind = \"coil\"\naddress = 0\n";
        let found = problems(text);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].contains("the readings would go nowhere"),
            "{found:?}"
        );
    }

    #[test]
    fn semantic_problem_points_at_the_value() {
        let text = "[broker]\n\n[agent]\nprefix = \"site/#\"\nqos = 3\n";
        let found = problems(text);
        assert_eq!(
            found,
            vec![
                "test.toml:4:10: agent.prefix: must not contain MQTT wildcards (`+`, `#`) or NUL",
                "test.toml:5:7: agent.qos: must be 0, 1 or 2",
            ]
        );
    }

    #[test]
    fn worker_threads_default_to_one_and_are_bounded() {
        let config = parse("test.toml", "[broker]\n").expect("valid");
        assert_eq!(
            config.agent.worker_threads, 1,
            "a gateway runs on one thread"
        );
        assert!(problems("[broker]\n[agent]\nworker_threads = 0\n").is_empty());
        assert_eq!(
            problems("[broker]\n[agent]\nworker_threads = 65\n"),
            vec![
                "test.toml:3:18: agent.worker_threads: 65 is more threads than a gateway can \
                 use; at most 64 (0 = one per core)"
            ]
        );
    }

    #[test]
    fn unknown_key_is_reported_with_its_position_and_section() {
        let text = "[broker]\n[agent]\nprefx = \"a\"\n";
        let found = problems(text);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("test.toml:3:1: agent.prefx: unknown field `prefx`"),
            "{found:?}"
        );
    }

    #[test]
    fn wrong_type_is_reported_at_the_value() {
        let text = "[broker]\n[agent]\nhealth_interval_secs = \"often\"\n";
        let found = problems(text);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("test.toml:3:24: agent.health_interval_secs: "),
            "{found:?}"
        );
    }

    #[test]
    fn syntax_error_has_a_position() {
        let found = problems("[agent]\nprefix = \n");
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].starts_with("test.toml:2:10: "), "{found:?}");
    }

    #[test]
    fn missing_key_falls_back_to_the_nearest_ancestor() {
        let text = "[broker]\n\n[[bus]]\nname = \"a\"\n\n[[bus]]\nname = \"b\"\n";
        let doc = toml_edit::ImDocument::parse(text).expect("parses");
        let entries = Entries::of(&doc);
        let at = entries.offset_of("bus[1].device[0].unit_id");
        assert_eq!(line_column(text, at), (6, 1));
        let at = entries.offset_of("bus[0].name");
        assert_eq!(line_column(text, at), (4, 8));
        assert_eq!(entries.offset_of("nowhere.at.all"), 0);
    }

    #[test]
    fn key_paths_cover_inline_tables_and_arrays() {
        let text = "[profile.m]\npoint = [ { name = \"v\", address = 1 }, { name = \"i\", address = 99999 } ]\n";
        let doc = toml_edit::ImDocument::parse(text).expect("parses");
        let entries = Entries::of(&doc);
        let at = entries.offset_of("profile.m.point[1].address");
        assert_eq!(&text[at..at + 5], "99999");
    }

    /// Regression: only the first type error was reported; each section is read alone.
    #[test]
    fn a_type_error_in_each_section_is_reported() {
        let text = "[agent]\nhealth_interval_secs = \"often\"\n\
                    [broker]\nmax_connections = \"many\"\n\
                    [[bus]]\nname = \"a\"\nkind = \"tcp\"\nhost = \"h\"\n\
                    [[bus.device]]\nname = \"d\"\nunit_id = 300\n\
                    [[bus]]\nname = \"b\"\n\
                    [profile.x]\n[[profile.x.point]]\nname = \"p\"\nscale = \"big\"\n";
        let found = problems(text);
        let keys: Vec<&str> = found
            .iter()
            .map(|p| p.split(": ").next().unwrap_or_default())
            .collect();
        assert_eq!(
            keys,
            [
                "test.toml:2:24",
                "test.toml:4:19",
                "test.toml:11:11",
                "test.toml:12:1",
                "test.toml:17:9",
            ],
            "{found:#?}"
        );
        assert!(
            found[1].contains("broker.max_connections: invalid type"),
            "{found:#?}"
        );
        assert!(found[2].contains("bus[0].device[0].unit_id"), "{found:#?}");
        assert!(
            found[3].contains("bus[1]: missing field `kind`"),
            "{found:#?}"
        );
        assert!(found[4].contains("profile.x.point[0].scale"), "{found:#?}");
    }

    #[test]
    fn an_unknown_section_is_still_reported_beside_type_errors() {
        let found = problems("[broker]\nmax_connections = \"many\"\n[brokr]\n");
        assert_eq!(found.len(), 2, "{found:#?}");
        assert!(found[1].contains("unknown field `brokr`"), "{found:#?}");
    }

    const METER: &str = "[broker]\n[agent]\nprefix = \"site/gw\"\n\
                         [[bus]]\nname = \"plc\"\nkind = \"tcp\"\nhost = \"10.0.0.5\"\n\
                         [[bus.device]]\nname = \"meter\"\n\
                         [[bus.device.point]]\nname = \"voltage\"\nkind = \"input\"\naddress = 0\n";

    /// Regression: a point named `status` published on `{prefix}/{device}/status` and
    /// overwrote the device's retained online/offline status.
    #[test]
    fn a_point_named_status_is_refused_naming_both_keys() {
        let text = format!(
            "{METER}[[bus.device.point]]\nname = \"status\"\nkind = \"holding\"\naddress = 0\n"
        );
        let found = problems(&text);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(
            found[0].starts_with(
                "test.toml:15:8: bus[0].device[0].point[1].name: point \"status\" of device \
                 \"meter\" would publish on \"site/gw/meter/status\", which is already the \
                 online/offline status of device \"meter\" (bus[0].device[0].name)"
            ),
            "{found:#?}"
        );
    }

    #[test]
    fn a_custom_topic_taken_by_health_another_point_or_the_upstream_status_is_refused() {
        let point = |name: &str, topic: &str| {
            format!(
                "[[bus.device.point]]\nname = \"{name}\"\nkind = \"input\"\naddress = 1\n\
                 topic = \"{topic}\"\n"
            )
        };
        let text = format!(
            "{METER}{}{}{}[upstream]\nurl = \"mqtt://h\"\nstatus_topic = \"plant/v\"\n",
            point("h", "site/gw/health"),
            point("v", "site/gw/meter/voltage"),
            point("w", "plant/v"),
        );
        let found = problems(&text);
        let keys: Vec<String> = found
            .iter()
            .map(|p| p.split(": ").nth(1).unwrap_or_default().to_string())
            .collect();
        assert_eq!(
            keys,
            [
                "bus[0].device[0].point[1].topic",
                "bus[0].device[0].point[2].topic",
                "bus[0].device[0].point[3].topic",
            ],
            "{found:#?}"
        );
        assert!(
            found[0].contains("the health report (agent.prefix)"),
            "{found:#?}"
        );
        assert!(found[0].ends_with("choose another topic"), "{found:#?}");
        assert!(
            found[1]
                .contains("point \"voltage\" of device \"meter\" (bus[0].device[0].point[0].name)"),
            "{found:#?}"
        );
        assert!(found[2].contains("(upstream.status_topic)"), "{found:#?}");
    }

    #[test]
    fn distinct_topics_pass_and_claims_list_every_topic() {
        let config = parse("test.toml", METER).expect("valid");
        let topics: Vec<String> = config
            .claims(&Topics::new("site/gw"))
            .into_iter()
            .map(|claim| claim.topic)
            .collect();
        assert_eq!(
            topics,
            [
                "site/gw/status",
                "site/gw/health",
                "site/gw/meter/status",
                "site/gw/meter/voltage"
            ]
        );
    }

    #[test]
    fn prefix_substitutes_the_host_name() {
        let agent = AgentConfig::default();
        assert_eq!(agent.resolved_prefix("pi-7"), "fieldbridge/pi-7");
        let agent = AgentConfig {
            prefix: "plant/".into(),
            ..AgentConfig::default()
        };
        assert_eq!(agent.resolved_prefix("x"), "plant");
    }

    #[test]
    fn the_time_section_has_defaults_and_its_rules_point_at_the_value() {
        let config = parse("test.toml", "[broker]\n").expect("valid");
        assert_eq!(config.time, TimeConfig::default());
        let text =
            "[broker]\n[time]\ntrust = \"always\"\nrequire_sync = true\nsync_file = \"run/flag\"\n";
        let found = problems(text);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found[0].starts_with("test.toml:5:13: time.sync_file: must be an absolute path"),
            "{found:?}"
        );
        assert!(
            found[1].starts_with("test.toml:4:16: time.require_sync: "),
            "{found:?}"
        );
        let found = problems("[broker]\n[time]\ntrust = \"gps\"\n");
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("test.toml:3:9: time.trust: unknown variant `gps`"),
            "{found:?}"
        );
    }
}
