//! The topic namespace: every topic the agent publishes or subscribes to is built here.
//!
//! | topic | payload | retained | built by |
//! |---|---|---|---|
//! | `{prefix}/status` | `online` / `offline` (birth, will, shutdown; upstream: `upstream.status_topic` when set) | yes | [`Topics::status`] |
//! | `{prefix}/health` | the JSON health report | on the LAN broker (a new subscriber sees the last report at once); not upstream | [`Topics::health`] |
//! | `{prefix}/{device}/status` | the device's state: `online`, `offline`, `quarantined` | yes | [`Topics::device_status`] |
//! | `{prefix}/{device}` | one JSON object per poll (devices with `batch = true`) | no | [`Topics::device_batch`] |
//! | `{prefix}/{device}/{point}` | one reading's JSON, or the point's `topic` override verbatim | `agent.retain` locally, `agent.retain_upstream` upstream | [`Topics::point`] |
//! | `{prefix}/{device}/{point}/set` | a command to a writable point (subscribed: LAN in-process, upstream) | no | [`Topics::command`] |
//! | `{prefix}/{device}/{point}/set/result` | the command's JSON result | no | [`Topics::command_result`] |
//! | `{ha}/{component}/{node}/{object}/config` | a Home Assistant discovery message (empty: removed) | yes (LAN broker) | [`Discovery::config`] |
//! | `{ha}/status` | Home Assistant's own `online`/`offline` (subscribed: in-process tap) | — | [`Discovery::status`] |
//!
//! Invariants:
//! - The prefix has no trailing `/`: [`Topics::new`] trims it once, so no builder
//!   produces `//`. An empty prefix (which config validation rejects) yields topics
//!   without a leading `/`.
//! - A point's topic override is used verbatim, without the prefix.
//! - Every topic the agent publishes has one owner: [`collisions`] finds each topic two
//!   [`Claim`]s want, so the config composer can refuse the file (a point named
//!   `status` would overwrite its device's retained online/offline status).
//! - Discovery topics live under Home Assistant's prefix (`{ha}`, default
//!   `homeassistant`), not the agent's; their node and object ids are made of
//!   `[a-zA-Z0-9_-]` only ([`discovery_id`]), as Home Assistant requires.
//! - This module is a leaf: it imports nothing from the crate, so every layer can use it.

/// Builds the agent's topics under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    /// Without a trailing `/`.
    prefix: String,
}

impl Topics {
    /// The namespace under `prefix` (`{hostname}` already filled in); trailing `/`s are
    /// dropped.
    pub fn new(prefix: &str) -> Topics {
        Topics {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    /// The prefix, without a trailing `/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `{prefix}/status`: the agent's online/offline state.
    pub fn status(&self) -> String {
        self.join(&["status"])
    }

    /// `{prefix}/health`: the periodic health report.
    pub fn health(&self) -> String {
        self.join(&["health"])
    }

    /// `{prefix}/{device}`: one message per poll of a device in batch mode.
    pub fn device_batch(&self, device: &str) -> String {
        self.join(&[device])
    }

    /// `{prefix}/{device}/status`: the device's state.
    pub fn device_status(&self, device: &str) -> String {
        self.join(&[device, "status"])
    }

    /// `{prefix}/{device}/{point}`, or `topic_override` verbatim when the point has one.
    pub fn point(&self, device: &str, point: &str, topic_override: Option<&str>) -> String {
        match topic_override {
            Some(topic) => topic.to_string(),
            None => self.join(&[device, point]),
        }
    }

    /// `{prefix}/{device}/{point}/set`: commands to a writable point (a point's topic
    /// override does not move its command topic).
    pub fn command(&self, device: &str, point: &str) -> String {
        self.join(&[device, point, "set"])
    }

    /// `{prefix}/{device}/{point}/set/result`: the result of each command.
    pub fn command_result(&self, device: &str, point: &str) -> String {
        self.join(&[device, point, "set", "result"])
    }

    /// The `(device, point)` of a command topic, or `None` for any other topic.
    pub fn parse_command<'t>(&self, topic: &'t str) -> Option<(&'t str, &'t str)> {
        let rest = if self.prefix.is_empty() {
            topic
        } else {
            topic
                .strip_prefix(self.prefix.as_str())?
                .strip_prefix('/')?
        };
        let mut levels = rest.split('/');
        match (levels.next(), levels.next(), levels.next(), levels.next()) {
            (Some(device), Some(point), Some("set"), None) => Some((device, point)),
            _ => None,
        }
    }

    /// The prefix and `levels`, joined by `/`.
    fn join(&self, levels: &[&str]) -> String {
        let len = self.prefix.len() + levels.iter().map(|level| level.len() + 1).sum::<usize>();
        let mut topic = String::with_capacity(len);
        topic.push_str(&self.prefix);
        for (i, level) in levels.iter().enumerate() {
            if i > 0 || !self.prefix.is_empty() {
                topic.push('/');
            }
            topic.push_str(level);
        }
        topic
    }
}

/// Builds Home Assistant's discovery topics under its discovery prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovery {
    /// Without a trailing `/`.
    prefix: String,
}

impl Discovery {
    /// The discovery namespace under `prefix`; trailing `/`s are dropped.
    pub fn new(prefix: &str) -> Discovery {
        Discovery {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    /// `{ha}/{component}/{node}/{object}/config`: one entity's discovery message. The
    /// ids are passed through [`discovery_id`].
    pub fn config(&self, component: &str, node: &str, object: &str) -> String {
        format!(
            "{}/{component}/{}/{}/config",
            self.prefix,
            discovery_id(node),
            discovery_id(object)
        )
    }

    /// `{ha}/+/{node}/+/config`: every discovery message of one gateway.
    pub fn node_filter(&self, node: &str) -> String {
        format!("{}/+/{}/+/config", self.prefix, discovery_id(node))
    }

    /// `{ha}/status`: Home Assistant announces `online` there when it (re)starts.
    pub fn status(&self) -> String {
        format!("{}/status", self.prefix)
    }
}

/// Whether `id` is made only of the characters Home Assistant allows in discovery ids.
pub fn is_discovery_id(id: &str) -> bool {
    id.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `text` as a discovery id: every character outside `[a-zA-Z0-9_-]` becomes `_`.
pub fn discovery_id(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The object id of a point's entity: `{device}__{point}`, as a discovery id.
pub fn discovery_object_id(device: &str, point: &str) -> String {
    discovery_id(&format!("{device}__{point}"))
}

/// One topic the configuration makes the agent publish on, and who wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub topic: String,
    /// The config key that makes the agent publish there (`bus[0].device[1].point[2].name`).
    pub key: String,
    /// What is published there, for a message: `the status of device "meter1"`.
    pub what: String,
}

impl Claim {
    pub fn new(topic: String, key: impl Into<String>, what: impl Into<String>) -> Claim {
        Claim {
            topic,
            key: key.into(),
            what: what.into(),
        }
    }
}

/// Every claim on a topic an earlier claim already holds, paired with that earlier one
/// (`(first, second)`), in the order of the claims.
pub fn collisions(claims: &[Claim]) -> Vec<(&Claim, &Claim)> {
    let mut owners: std::collections::HashMap<&str, &Claim> = std::collections::HashMap::new();
    let mut found = Vec::new();
    for claim in claims {
        match owners.get(claim.topic.as_str()) {
            Some(first) => found.push((*first, claim)),
            None => {
                owners.insert(claim.topic.as_str(), claim);
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_topic_claimed_twice_names_both_claims() {
        let topics = Topics::new("site/gw1");
        let claims = [
            Claim::new(topics.status(), "agent.prefix", "the agent's status"),
            Claim::new(
                topics.device_status("meter1"),
                "bus[0].device[0].name",
                "the status of device \"meter1\"",
            ),
            Claim::new(
                topics.point("meter1", "status", None),
                "bus[0].device[0].point[0].name",
                "point \"status\"",
            ),
            Claim::new(
                topics.point("meter1", "x", Some("site/gw1/status")),
                "bus[0].device[0].point[1].topic",
                "point \"x\"",
            ),
            Claim::new(
                topics.point("meter1", "voltage", None),
                "bus[0].device[0].point[2].name",
                "point \"voltage\"",
            ),
        ];
        let found: Vec<(&str, &str)> = collisions(&claims)
            .into_iter()
            .map(|(first, second)| (first.key.as_str(), second.key.as_str()))
            .collect();
        assert_eq!(
            found,
            [
                ("bus[0].device[0].name", "bus[0].device[0].point[0].name"),
                ("agent.prefix", "bus[0].device[0].point[1].topic"),
            ]
        );
    }

    #[test]
    fn every_topic_is_under_the_prefix() {
        let topics = Topics::new("site/gw1");
        assert_eq!(topics.prefix(), "site/gw1");
        assert_eq!(topics.status(), "site/gw1/status");
        assert_eq!(topics.health(), "site/gw1/health");
        assert_eq!(topics.device_batch("meter1"), "site/gw1/meter1");
        assert_eq!(topics.device_status("meter1"), "site/gw1/meter1/status");
        assert_eq!(
            topics.point("meter1", "voltage", None),
            "site/gw1/meter1/voltage"
        );
    }

    #[test]
    fn command_topics_round_trip() {
        let topics = Topics::new("site/gw1");
        let set = topics.command("boiler", "setpoint");
        assert_eq!(set, "site/gw1/boiler/setpoint/set");
        assert_eq!(
            topics.command_result("boiler", "setpoint"),
            "site/gw1/boiler/setpoint/set/result"
        );
        assert_eq!(topics.parse_command(&set), Some(("boiler", "setpoint")));
        for other in [
            "site/gw1/boiler/setpoint",
            "site/gw1/boiler/setpoint/set/result",
            "site/gw10/boiler/setpoint/set",
            "other/boiler/setpoint/set",
        ] {
            assert_eq!(topics.parse_command(other), None, "{other}");
        }
    }

    #[test]
    fn trailing_slashes_are_trimmed_once_for_all_topics() {
        let topics = Topics::new("site/a//");
        assert_eq!(topics, Topics::new("site/a"));
        assert_eq!(topics.prefix(), "site/a");
        assert_eq!(topics.status(), "site/a/status");
        assert_eq!(
            topics.point("meter1", "voltage", None),
            "site/a/meter1/voltage"
        );
    }

    #[test]
    fn a_point_override_is_used_verbatim() {
        let topics = Topics::new("site/a");
        assert_eq!(
            topics.point("meter1", "voltage", Some("plant/l1/v")),
            "plant/l1/v"
        );
    }

    #[test]
    fn an_empty_prefix_gives_no_leading_slash() {
        let topics = Topics::new("");
        assert_eq!(topics.status(), "status");
        assert_eq!(topics.health(), "health");
        assert_eq!(topics.device_batch("meter1"), "meter1");
        assert_eq!(topics.device_status("meter1"), "meter1/status");
        assert_eq!(topics.point("meter1", "voltage", None), "meter1/voltage");
        assert_eq!(Topics::new("/").status(), "status");
    }

    #[test]
    fn discovery_topics_use_only_id_characters() {
        let ha = Discovery::new("homeassistant/");
        assert_eq!(
            ha.config("sensor", "site/gw 1", "meter.1__voltage"),
            "homeassistant/sensor/site_gw_1/meter_1__voltage/config"
        );
        assert_eq!(ha.node_filter("gw1"), "homeassistant/+/gw1/+/config");
        assert_eq!(ha.status(), "homeassistant/status");
        assert!(is_discovery_id("gw-1_A"));
        assert!(!is_discovery_id("gw/1"));
        assert!(!is_discovery_id("zähler"));
        assert_eq!(discovery_id("zähler"), "z_hler");
    }

    #[test]
    fn a_leading_slash_is_kept() {
        // Only trailing slashes are trimmed; `/site` is a different topic tree.
        assert_eq!(Topics::new("/site").status(), "/site/status");
    }
}
