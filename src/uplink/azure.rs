//! Azure IoT Hub's MQTT rules that are computed rather than configured: the user name,
//! the SAS token used as the password, and the device-to-cloud topic with the reading's
//! topic carried as message properties.
//!
//! Invariants:
//! - The SAS token is `SharedAccessSignature sr={resource}&sig={signature}&se={expiry}`
//!   where `resource` is the URL-encoded `{hub host}/devices/{device id}` and
//!   `signature` the URL-encoded base64 HMAC-SHA256, keyed with the base64-decoded
//!   device key, of `resource + "\n" + expiry` (Microsoft's "Control access to IoT
//!   Hub with SAS tokens"). Nothing here reads a clock: the caller passes the expiry.
//! - Every reading goes to `devices/{device id}/messages/events/` followed by a
//!   property bag: `topic={the agent's topic}`, and for `{prefix}/{device}/{point}` also
//!   `device=…&point=…`; keys and values are URL-encoded, so the mapping is lossless and
//!   a topic never reaches IoT Hub with characters it refuses.

use base64::Engine as _;

/// The api-version IoT Hub's MQTT endpoint is asked for in the user name.
pub const API_VERSION: &str = "2021-04-12";

/// Why a SAS token cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the device key is not base64 (copy the primary key of the device from the hub)")]
    KeyNotBase64,
    #[error("the device key is empty")]
    KeyEmpty,
}

/// `{hub host}/{device id}/?api-version=…`, the user name IoT Hub expects.
pub fn username(hub_host: &str, device_id: &str) -> String {
    format!("{hub_host}/{device_id}/?api-version={API_VERSION}")
}

/// The SAS token for `device_id` on `hub_host`, valid until `expiry` (seconds since the
/// Unix epoch), signed with the base64 `device_key`.
///
/// # Errors
/// [`TokenError`] when the key is empty or not base64.
pub fn sas_token(
    hub_host: &str,
    device_id: &str,
    device_key: &str,
    expiry: u64,
) -> Result<String, TokenError> {
    let key = base64::engine::general_purpose::STANDARD
        .decode(device_key.trim())
        .map_err(|_| TokenError::KeyNotBase64)?;
    if key.is_empty() {
        return Err(TokenError::KeyEmpty);
    }
    let resource = url_encode(&format!("{hub_host}/devices/{device_id}"));
    let to_sign = format!("{resource}\n{expiry}");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    let tag = ring::hmac::sign(&key, to_sign.as_bytes());
    let signature = base64::engine::general_purpose::STANDARD.encode(tag.as_ref());
    Ok(format!(
        "SharedAccessSignature sr={resource}&sig={}&se={expiry}",
        url_encode(&signature)
    ))
}

/// The device-to-cloud topic for a message the agent publishes on `topic`, for an
/// agent whose topic prefix is `prefix`.
pub fn event_topic(device_id: &str, prefix: &str, topic: &str) -> String {
    let mut out = format!(
        "devices/{device_id}/messages/events/topic={}",
        url_encode(topic)
    );
    let below = topic
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('/'));
    if let Some((device, point)) = below.and_then(|rest| rest.split_once('/')) {
        if !point.contains('/') {
            out.push_str("&device=");
            out.push_str(&url_encode(device));
            out.push_str("&point=");
            out.push_str(&url_encode(point));
        }
    }
    out
}

/// The filter of cloud-to-device messages for `device_id`, the only one IoT Hub lets a
/// device subscribe to (besides its twin and methods topics).
pub fn devicebound_filter(device_id: &str) -> String {
    format!("devices/{device_id}/messages/devicebound/#")
}

/// Percent-encoding of everything but RFC 3986's unreserved characters.
fn url_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3 / 2);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    const HUB: &str = "plant-7.azure-devices.net";
    const KEY: &str = "c2VjcmV0LWRldmljZS1rZXktZm9yLXRlc3Rz";

    /// The same token computed by Python's hmac, hashlib, base64 and urllib, the way
    /// Microsoft's documentation writes it (`generate_sas_token`).
    fn python_token(resource: &str, key: &str, expiry: u64) -> Option<String> {
        let script = r#"
import base64, hashlib, hmac, sys, urllib.parse
uri, key, expiry = sys.argv[1], sys.argv[2], sys.argv[3]
resource = urllib.parse.quote_plus(uri)
sign = (resource + "\n" + expiry).encode()
sig = base64.b64encode(hmac.new(base64.b64decode(key), sign, hashlib.sha256).digest())
print("SharedAccessSignature sr={}&sig={}&se={}".format(
    resource, urllib.parse.quote_plus(sig.decode()), expiry), end="")
"#;
        let output = Command::new("python3")
            .args(["-c", script, resource, key, &expiry.to_string()])
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    }

    #[test]
    fn sas_token_matches_an_independent_python_computation() {
        let expiry = 1_800_000_000;
        let ours = sas_token(HUB, "gw-17", KEY, expiry).unwrap();
        // Fixed vector, generated once with the script above (python3 3.11), so the
        // test holds where python3 is missing too.
        assert_eq!(
            ours,
            "SharedAccessSignature sr=plant-7.azure-devices.net%2Fdevices%2Fgw-17\
             &sig=P0gC991LfUT6rG8XBNJRrHf4WcXhcOz%2FQo1vgnCrSQI%3D&se=1800000000"
        );
        for (device, expiry) in [("gw-17", 1_800_000_000), ("press#3:a(1)", 42)] {
            let resource = format!("{HUB}/devices/{device}");
            let Some(python) = python_token(&resource, KEY, expiry) else {
                panic!("python3 is needed for this test (apt-get install python3)");
            };
            assert_eq!(sas_token(HUB, device, KEY, expiry).unwrap(), python);
        }
    }

    #[test]
    fn bad_keys_are_refused_with_a_reason() {
        assert_eq!(
            sas_token(HUB, "d", "not base64!", 1),
            Err(TokenError::KeyNotBase64)
        );
        assert_eq!(sas_token(HUB, "d", "", 1), Err(TokenError::KeyEmpty));
    }

    #[test]
    fn username_and_topics() {
        assert_eq!(
            username(HUB, "gw-17"),
            "plant-7.azure-devices.net/gw-17/?api-version=2021-04-12"
        );
        assert_eq!(
            event_topic("gw-17", "site/gw", "site/gw/meter1/voltage_l1"),
            "devices/gw-17/messages/events/topic=site%2Fgw%2Fmeter1%2Fvoltage_l1\
             &device=meter1&point=voltage_l1"
        );
        assert_eq!(
            event_topic("gw-17", "site/gw", "site/gw/status"),
            "devices/gw-17/messages/events/topic=site%2Fgw%2Fstatus"
        );
        assert_eq!(
            event_topic("gw-17", "site/gw", "elsewhere/a b&c=d"),
            "devices/gw-17/messages/events/topic=elsewhere%2Fa%20b%26c%3Dd"
        );
        assert_eq!(
            devicebound_filter("gw-17"),
            "devices/gw-17/messages/devicebound/#"
        );
    }
}
