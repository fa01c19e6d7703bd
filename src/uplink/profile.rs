//! Cloud profiles (`upstream.profile`): the rules of a managed MQTT service that a
//! generic client breaks silently, checked by `check-config`, and the pace the uplink
//! keeps so the service never throttles it.
//!
//! Invariants:
//! - A config the service would refuse or degrade is refused with the reason; nothing
//!   is downgraded in silence (a QoS 2 config stays an error, it does not become QoS 1).
//! - Low in `uplink/`: it imports only `azure.rs` and `bucket.rs`. `config.rs` hands it the
//!   [`Facts`] of the `[upstream]` section, `config.rs` of the crate the agent's QoS,
//!   retain setting and topics.
//! - The limits and their sources are in the README's upstream section; each number
//!   here is one of them.

use serde::Deserialize;
use tokio::time::Instant;

use crate::mqtt::QoS;
use crate::problem::Scope;

use super::bucket::TokenBucket;

/// Which service the upstream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Profile {
    /// Any standard MQTT broker: no extra rules.
    #[default]
    Generic,
    /// AWS IoT Core.
    AwsIotCore,
    /// Azure IoT Hub (device endpoint).
    AzureIotHub,
}

/// AWS IoT Core: longest client id, in bytes.
pub const AWS_CLIENT_ID_MAX: usize = 128;
/// AWS IoT Core: longest topic, in bytes.
pub const AWS_TOPIC_MAX: usize = 256;
/// AWS IoT Core: most slashes in a topic or filter.
pub const AWS_TOPIC_SLASHES_MAX: usize = 7;
/// AWS IoT Core: most unacknowledged inbound publishes per connection.
pub const AWS_INFLIGHT_MAX: u16 = 100;
/// AWS IoT Core: publishes per second per connection.
pub const AWS_PUBLISHES_PER_SEC: u32 = 100;
/// AWS IoT Core: throughput per connection, bytes per second.
pub const AWS_BYTES_PER_SEC: u32 = 512 * 1024;
/// AWS IoT Core: largest keepalive, in seconds.
pub const AWS_KEEP_ALIVE_MAX: u16 = 1_200;
/// AWS IoT Core: most filters in one SUBSCRIBE.
pub const AWS_FILTERS_PER_SUBSCRIBE: usize = 8;
/// The ALPN protocol of MQTT with a client certificate on port 443.
pub const AWS_ALPN: &str = "x-amzn-mqtt-ca";

/// What the profile rules need to know of the `[upstream]` section.
#[derive(Debug, Clone)]
pub struct Facts<'a> {
    /// `(key, tls, port)` of each server URL that parses.
    pub servers: Vec<(String, bool, u16)>,
    pub v5: bool,
    pub client_id: String,
    pub client_id_set: bool,
    pub inflight: u16,
    pub keep_alive_secs: u16,
    pub client_certificate: bool,
    pub alpn: &'a [String],
    pub username: bool,
    pub password: bool,
    pub subscribe: &'a [String],
    pub status_topic: Option<&'a str>,
    /// `[upstream.azure]` is there, with its device id.
    pub azure_device: Option<&'a str>,
    /// `[upstream.azure]` names a device key file.
    pub azure_key: bool,
}

impl Profile {
    /// The rules of the service on the `[upstream]` section, under `upstream`.
    pub fn validate(self, facts: &Facts<'_>, up: &mut Scope<'_>) {
        match self {
            Profile::Generic => {
                up.check(
                    facts.azure_device.is_none(),
                    "azure",
                    "[upstream.azure] is used only with profile = \"azure-iot-hub\"",
                );
            }
            Profile::AwsIotCore => aws(facts, up),
            Profile::AzureIotHub => azure(facts, up),
        }
    }

    /// The rules of the service on what the agent publishes: its QoS, retain setting
    /// and each topic (`(key, topic)`), reported at the agent's keys.
    pub fn validate_agent(
        self,
        qos: QoS,
        retain_upstream: bool,
        topics: &[(String, String)],
        scope: &mut Scope<'_>,
    ) {
        let name = match self {
            Profile::Generic => return,
            Profile::AwsIotCore => "AWS IoT Core",
            Profile::AzureIotHub => "Azure IoT Hub",
        };
        scope.check(
            qos != QoS::ExactlyOnce,
            "agent.qos",
            format!(
                "{name} takes QoS 0 and 1 only; set agent.qos = 1 (at least once: the \
                 store deletes a reading only after the acknowledgement)"
            ),
        );
        if self == Profile::AzureIotHub {
            scope.check(
                !retain_upstream,
                "agent.retain_upstream",
                "Azure IoT Hub keeps no retained messages; set agent.retain_upstream = false",
            );
            return;
        }
        for (key, topic) in topics {
            aws_topic(scope, key, topic);
        }
    }

    /// How fast the uplink may publish on one connection, when the service limits it.
    pub fn pacing(self) -> Option<Pacer> {
        match self {
            Profile::AwsIotCore => Some(Pacer::new(AWS_PUBLISHES_PER_SEC, AWS_BYTES_PER_SEC)),
            Profile::Generic | Profile::AzureIotHub => None,
        }
    }

    /// The profile's name as written in the config.
    pub fn name(self) -> &'static str {
        match self {
            Profile::Generic => "generic",
            Profile::AwsIotCore => "aws-iot-core",
            Profile::AzureIotHub => "azure-iot-hub",
        }
    }
}

fn aws_topic(scope: &mut Scope<'_>, key: &str, topic: &str) -> bool {
    let slashes = topic.bytes().filter(|&b| b == b'/').count();
    scope.check(
        topic.len() <= AWS_TOPIC_MAX && slashes <= AWS_TOPIC_SLASHES_MAX,
        key,
        format!(
            "AWS IoT Core takes topics of at most {AWS_TOPIC_MAX} bytes with at most \
             {AWS_TOPIC_SLASHES_MAX} slashes; {topic:?} has {} bytes and {slashes} slashes \
             (shorten the prefix or the names)",
            topic.len()
        ),
    )
}

fn aws(facts: &Facts<'_>, up: &mut Scope<'_>) {
    for (key, tls, port) in &facts.servers {
        let ok = up.check(
            *tls && (*port == 8883 || *port == 443),
            key,
            "AWS IoT Core takes MQTT over TLS on port 8883, or 443 with ALPN: use \
             mqtts://<endpoint>:8883",
        );
        if ok && *port == 443 {
            up.check(
                facts.alpn.iter().any(|p| p == AWS_ALPN),
                "tls.alpn",
                format!("port 443 needs tls.alpn = [\"{AWS_ALPN}\"] for a client certificate"),
            );
        }
    }
    up.check(
        facts.client_certificate,
        "tls.cert_file",
        "AWS IoT Core authenticates devices by certificate: set tls.cert_file and \
         tls.key_file (the thing's certificate and private key)",
    );
    up.check(
        facts.client_id.len() <= AWS_CLIENT_ID_MAX,
        "client_id",
        format!("AWS IoT Core takes client ids of at most {AWS_CLIENT_ID_MAX} bytes"),
    );
    up.check(
        facts.inflight <= AWS_INFLIGHT_MAX,
        "inflight",
        format!(
            "AWS IoT Core accepts at most {AWS_INFLIGHT_MAX} unacknowledged publishes per \
             connection"
        ),
    );
    up.check(
        facts.keep_alive_secs <= AWS_KEEP_ALIVE_MAX,
        "keep_alive_secs",
        format!("AWS IoT Core takes a keepalive of at most {AWS_KEEP_ALIVE_MAX} s"),
    );
    up.check(
        facts.subscribe.len() <= AWS_FILTERS_PER_SUBSCRIBE,
        "subscribe",
        format!(
            "AWS IoT Core takes at most {AWS_FILTERS_PER_SUBSCRIBE} filters in one \
             SUBSCRIBE, and the uplink sends them in one"
        ),
    );
    for (i, filter) in facts.subscribe.iter().enumerate() {
        aws_topic(up, &format!("subscribe[{i}]"), filter);
    }
    if let Some(topic) = facts.status_topic {
        aws_topic(up, "status_topic", topic);
    }
    up.check(
        facts.azure_device.is_none(),
        "azure",
        "[upstream.azure] is used only with profile = \"azure-iot-hub\"",
    );
}

fn azure(facts: &Facts<'_>, up: &mut Scope<'_>) {
    up.check(
        !facts.v5,
        "protocol",
        "Azure IoT Hub's device endpoint speaks MQTT 3.1.1: set protocol = \"3.1.1\"",
    );
    for (key, tls, port) in &facts.servers {
        up.check(
            *tls && *port == 8883,
            key,
            "Azure IoT Hub takes MQTT over TLS on port 8883 only (443 is MQTT over \
             WebSockets): use mqtts://<hub>.azure-devices.net:8883",
        );
    }
    let Some(device) = facts.azure_device else {
        up.report(
            "azure",
            "profile \"azure-iot-hub\" needs [upstream.azure] with device_id (and \
             device_key_file, or tls.cert_file/key_file for X.509)",
        );
        return;
    };
    let mut azure = up.at("azure");
    azure.check(!device.is_empty(), "device_id", "must not be empty");
    azure.check(
        facts.azure_key != facts.client_certificate,
        "device_key_file",
        "set either device_key_file (SAS token) or tls.cert_file/key_file (X.509), one of them",
    );
    up.check(
        !facts.client_id_set || facts.client_id == device,
        "client_id",
        "Azure IoT Hub takes the device id as client id: leave client_id out",
    );
    up.check(
        !facts.username,
        "username",
        "the user name is made from the hub and the device id: leave username out",
    );
    up.check(
        !facts.password,
        "password_file",
        "the password is a SAS token made from azure.device_key_file: leave \
         password_file/password_env out",
    );
    let allowed = super::azure::devicebound_filter(device);
    for (i, filter) in facts.subscribe.iter().enumerate() {
        up.check(
            *filter == allowed,
            &format!("subscribe[{i}]"),
            format!("Azure IoT Hub lets a device subscribe to {allowed:?} only"),
        );
    }
}

/// Publishes and bytes per second on one connection (two token buckets, a tenth of a
/// second's burst each).
#[derive(Debug, Clone)]
pub struct Pacer {
    publishes: TokenBucket,
    bytes: TokenBucket,
}

impl Pacer {
    pub fn new(publishes_per_sec: u32, bytes_per_sec: u32) -> Pacer {
        Pacer {
            publishes: TokenBucket::new(publishes_per_sec),
            bytes: TokenBucket::new(bytes_per_sec),
        }
    }

    /// Spends one publish of `bytes` if the pace allows it now; otherwise when to try
    /// again.
    pub fn take(&mut self, now: Instant, bytes: usize) -> Result<(), Instant> {
        let bytes = bytes as f64;
        let wait = [
            self.publishes.ready_at(now, 1.0),
            self.bytes.ready_at(now, bytes),
        ]
        .into_iter()
        .flatten()
        .max();
        match wait {
            Some(at) => Err(at),
            None => {
                self.publishes.spend(1.0);
                self.bytes.spend(bytes);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problem::Problems;
    use std::time::Duration;

    fn facts() -> Facts<'static> {
        Facts {
            servers: vec![("url".to_owned(), true, 8883)],
            v5: false,
            client_id: "gw-17".to_owned(),
            client_id_set: true,
            inflight: 20,
            keep_alive_secs: 30,
            client_certificate: true,
            alpn: &[],
            username: false,
            password: false,
            subscribe: &[],
            status_topic: None,
            azure_device: None,
            azure_key: false,
        }
    }

    fn keys(profile: Profile, facts: &Facts<'_>) -> Vec<String> {
        let mut problems = Problems::new();
        profile.validate(facts, &mut problems.at("upstream"));
        problems.into_vec().into_iter().map(|p| p.key).collect()
    }

    #[test]
    fn aws_refuses_what_the_service_would_refuse() {
        assert!(keys(Profile::AwsIotCore, &facts()).is_empty());
        let long = "x".repeat(129);
        let deep = ["a/b/c/d/e/f/g/h/i".to_owned()];
        let filters: Vec<String> = (0..9).map(|i| format!("cmd/{i}")).collect();
        let mut bad = facts();
        bad.servers = vec![
            ("servers[0]".to_owned(), false, 1883),
            ("servers[1]".to_owned(), true, 443),
        ];
        bad.client_id = long;
        bad.inflight = 101;
        bad.keep_alive_secs = 1_201;
        bad.client_certificate = false;
        bad.subscribe = &filters;
        assert_eq!(
            keys(Profile::AwsIotCore, &bad),
            [
                "upstream.servers[0]",
                "upstream.tls.alpn",
                "upstream.tls.cert_file",
                "upstream.client_id",
                "upstream.inflight",
                "upstream.keep_alive_secs",
                "upstream.subscribe",
            ]
        );
        let mut bad = facts();
        bad.subscribe = &deep;
        assert_eq!(keys(Profile::AwsIotCore, &bad), ["upstream.subscribe[0]"]);

        let mut problems = Problems::new();
        Profile::AwsIotCore.validate_agent(
            QoS::ExactlyOnce,
            false,
            &[
                ("bus[0].device[0].point[0]".to_owned(), "a/b".to_owned()),
                ("agent.prefix".to_owned(), "a/b/c/d/e/f/g/h/i".to_owned()),
            ],
            &mut problems.at(""),
        );
        let problems = problems.into_vec();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert_eq!(problems[0].key, "agent.qos");
        assert!(problems[0].message.contains("QoS 0 and 1"));
        assert_eq!(problems[1].key, "agent.prefix");
    }

    #[test]
    fn azure_needs_a_device_and_one_way_to_authenticate() {
        let mut ok = facts();
        ok.client_id = "gw-17".to_owned();
        ok.client_certificate = false;
        ok.azure_device = Some("gw-17");
        ok.azure_key = true;
        assert!(keys(Profile::AzureIotHub, &ok).is_empty());

        let mut bad = ok.clone();
        bad.v5 = true;
        bad.servers = vec![("url".to_owned(), true, 443)];
        bad.client_id = "other".to_owned();
        bad.client_certificate = true;
        bad.username = true;
        bad.password = true;
        let filters = ["gw/cmd".to_owned()];
        bad.subscribe = &filters;
        assert_eq!(
            keys(Profile::AzureIotHub, &bad),
            [
                "upstream.protocol",
                "upstream.url",
                "upstream.azure.device_key_file",
                "upstream.client_id",
                "upstream.username",
                "upstream.password_file",
                "upstream.subscribe[0]",
            ]
        );
        let mut missing = ok;
        missing.azure_device = None;
        assert_eq!(keys(Profile::AzureIotHub, &missing), ["upstream.azure"]);

        let mut problems = Problems::new();
        Profile::AzureIotHub.validate_agent(QoS::ExactlyOnce, true, &[], &mut problems.at(""));
        let keys: Vec<String> = problems.into_vec().into_iter().map(|p| p.key).collect();
        assert_eq!(keys, ["agent.qos", "agent.retain_upstream"]);
    }

    #[tokio::test(start_paused = true)]
    async fn pacer_keeps_to_publishes_and_bytes_per_second() {
        let mut pacer = Pacer::new(AWS_PUBLISHES_PER_SEC, AWS_BYTES_PER_SEC);
        let start = Instant::now();
        let mut sent = 0u32;
        while start.elapsed() < Duration::from_secs(10) {
            match pacer.take(Instant::now(), 100) {
                Ok(()) => sent += 1,
                Err(at) => tokio::time::sleep_until(at).await,
            }
        }
        // 100/s for 10 s, plus the first tenth of a second's burst.
        assert!((1_000..=1_011).contains(&sent), "{sent}");

        let mut pacer = Pacer::new(AWS_PUBLISHES_PER_SEC, AWS_BYTES_PER_SEC);
        let start = Instant::now();
        let mut bytes = 0usize;
        while start.elapsed() < Duration::from_secs(10) {
            match pacer.take(Instant::now(), 64 * 1024) {
                Ok(()) => bytes += 64 * 1024,
                Err(at) => tokio::time::sleep_until(at).await,
            }
        }
        let per_sec = bytes / 10;
        assert!(
            per_sec <= AWS_BYTES_PER_SEC as usize + 64 * 1024 / 10 + 6_000,
            "{per_sec} B/s"
        );
        assert!(
            per_sec >= AWS_BYTES_PER_SEC as usize * 9 / 10,
            "{per_sec} B/s"
        );
    }
}
