//! The TOML configuration: one file composed of the sections each module owns.
//!
//! ```toml
//! [agent]          # this module: topic prefix, logging, health, pipeline bounds
//! [broker]         # broker::BrokerConfig   (optional: no section, no local broker)
//! [store]          # store::StoreConfig     (used when there is an upstream)
//! [upstream]       # uplink::UplinkConfig   (optional: no section, LAN-only)
//! [[bus]]          # field::FieldConfig buses
//! [profile.NAME]   # field::FieldConfig profiles
//! ```
//!
//! Invariants:
//! - Every problem is reported as `file:line:column: key: message`. Syntax and type
//!   errors come with a span from the parser; semantic problems come from each
//!   section's `validate()` as [`Invalid`](crate::problem::Invalid) with a dotted key
//!   path, which is looked up in the parsed document to find its position.
//! - This module composes; the rules of a section live with the section, and the
//!   problem type in the leaf [`crate::problem`], so no section imports this module.
//! - [`load`] returns a config only if it has no problem at all, so the agent never
//!   starts (or reloads into) a half-valid configuration.
//! - Reading the file is the only I/O here.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::broker::BrokerConfig;
use crate::field::{BusConfig, FieldConfig, ProfileConfig};
use crate::mqtt::QoS;
use crate::store::StoreConfig;
use crate::uplink::UplinkConfig;

use crate::problem::{Invalid, Problems};

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
    bus: Vec<BusConfig>,
    #[serde(default)]
    profile: BTreeMap<String, ProfileConfig>,
}

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
        if let Err(err) = tracing_subscriber::EnvFilter::builder().parse(&self.log_level) {
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
        problems.extend(self.field.validate());
        if self.broker.is_none() && self.upstream.is_none() {
            let message = if self.field.buses.is_empty() {
                "nothing to run: configure a [broker], an [upstream] or at least one [[bus]]"
            } else {
                "the readings would go nowhere: configure a [broker], an [upstream] or both"
            };
            problems.at("").report("", message);
        }
        problems.into_vec()
    }
}

/// The machine's host name, as used in `{hostname}`; `localhost` if it cannot be read.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|name| name.trim().to_string())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// A configuration file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
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
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&path.display().to_string(), &text)
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
        let span = err.span().unwrap_or(0..0);
        let key = entries.key_at(&span).unwrap_or_default();
        let message = crate::problem::in_plain_words(err.message().trim());
        let problem = at(span.start, key, message);
        Error::Invalid {
            problems: vec![problem],
        }
    })?;
    let config = Config {
        agent: parsed.agent,
        broker: parsed.broker,
        store: parsed.store,
        upstream: parsed.upstream,
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
}
