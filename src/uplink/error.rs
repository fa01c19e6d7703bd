//! The uplink's errors, two layers as in rumqttc (`StateError` apart from
//! `ConnectionError`): [`SessionError`] is what the sans-IO session finds wrong with the
//! broker's side of the protocol; [`Error`] is what ends a connection (and leads to a
//! reconnect after a backoff step) or stops the uplink from starting, and wraps the
//! first. A leaf of `uplink/`: it imports none of its siblings.

use std::time::Duration;

/// Everything that goes wrong in the uplink. Connection-level errors end one connection
/// and lead to a reconnect after a backoff delay.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid [upstream] section: {0}")]
    Config(String),
    #[error("invalid upstream URL: {0}")]
    Url(String),
    #[error("cannot read the password from the {source_name}: {reason}")]
    Password { source_name: String, reason: String },
    #[error("TLS: {what}{}", source_suffix(.source.as_deref()))]
    Tls {
        what: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connection to the upstream broker failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("no CONNACK within the connect timeout of {0:?}")]
    ConnectTimeout(Duration),
    /// What the session state machine found wrong with the broker's side of the
    /// protocol (refusals, DISCONNECT, violations, a missing PINGRESP).
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("the upstream broker closed the connection")]
    Closed,
    #[error("malformed packet from the upstream broker: {0}")]
    Codec(#[from] crate::mqtt::Error),
    #[error("the uplink did not stop within {0:?}")]
    ShutdownTimeout(Duration),
}

impl Error {
    /// Refusals that repeat until an operator changes credentials or permissions.
    pub fn is_auth_failure(&self) -> bool {
        matches!(self, Error::Session(e) if e.is_auth_failure())
    }
}

/// `": {source}"`, or nothing: a TLS failure names its cause in its own line too, for
/// log lines that show only the top error.
fn source_suffix(source: Option<&(dyn std::error::Error + Send + Sync)>) -> String {
    source.map(|e| format!(": {e}")).unwrap_or_default()
}

/// What the broker did that ends the connection, as the session sees it. The client
/// wraps it in [`Error::Session`] beside transport, TLS and store errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// CONNACK refused the connection. `code` is a 5.0 reason code (a 3.1.1 return code
    /// decodes to its 5.0 equivalent); `v5` says which the broker sent, so the message
    /// names the number the broker's own log and documentation use.
    #[error("the upstream broker refused the connection: {}{}", refusal_text(*.code, *.v5), reason_suffix(.reason))]
    Refused { code: u8, reason: String, v5: bool },
    #[error("the upstream broker closed the session with reason {code:#04x}{}", reason_suffix(.reason))]
    ServerDisconnect { code: u8, reason: String },
    #[error("the upstream broker refused a message for now (reason code {code:#04x}); it is sent again after a reconnect, one message at a time until the refused ones are through")]
    Throttled { code: u8 },
    #[error("no PINGRESP within {0:?}: the connection is half-open")]
    PingTimeout(Duration),
    #[error("protocol violation by the upstream broker: {0}")]
    Protocol(&'static str),
    /// The host application the Sparkplug edge node works for said it went offline.
    #[error("the primary host application went offline; reconnecting")]
    HostOffline,
}

impl SessionError {
    /// Refusals that repeat until an operator changes credentials or permissions.
    pub fn is_auth_failure(&self) -> bool {
        matches!(self, SessionError::Refused { code, .. } if matches!(code, 0x86 | 0x87 | 0x8A | 0x8C))
    }
}

fn reason_suffix(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        format!(" ({reason})")
    }
}

/// A CONNACK refusal in words, with its number as the protocol in use writes it: MQTT
/// 3.1.1's return codes 1..=5, or 5.0's reason codes.
fn refusal_text(code: u8, v5: bool) -> String {
    let meaning = match code {
        0x80 => "unspecified error",
        0x81 => "malformed packet",
        0x82 => "protocol error",
        0x83 => "implementation specific error",
        0x84 => "unsupported protocol version (try the other `protocol` setting)",
        0x85 => "client identifier not valid",
        0x86 => "bad user name or password",
        0x87 => "not authorized",
        0x88 => "server unavailable",
        0x89 => "server busy",
        0x8A => "banned",
        0x8C => "bad authentication method",
        0x90 => "topic name invalid (the will topic)",
        0x95 => "packet too large",
        0x97 => "quota exceeded",
        0x99 => "payload format invalid",
        0x9A => "retain not supported (the will is retried without retain)",
        0x9B => "QoS not supported (the will is retried at QoS 0)",
        0x9C => "use another server",
        0x9D => "server moved",
        0x9F => "connection rate exceeded",
        _ => "refused",
    };
    let v311 = match code {
        0x84 => Some(1),
        0x85 => Some(2),
        0x88 => Some(3),
        0x86 => Some(4),
        0x87 => Some(5),
        _ => None,
    };
    match v311 {
        Some(return_code) if !v5 => format!("{meaning} (CONNACK return code {return_code})"),
        _ => format!("{meaning} (reason code {code:#04x})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: a 3.1.1 refusal read `reason code 0x87`, a number a 3.1.1 broker
    /// never sends (it sends return code 5, "not authorized").
    #[test]
    fn refusals_are_named_in_the_protocol_in_use() {
        let refused = |code, v5| {
            SessionError::Refused {
                code,
                reason: String::new(),
                v5,
            }
            .to_string()
        };
        assert_eq!(
            refused(0x87, false),
            "the upstream broker refused the connection: not authorized (CONNACK return code 5)"
        );
        assert_eq!(
            refused(0x86, false),
            "the upstream broker refused the connection: bad user name or password (CONNACK return code 4)"
        );
        assert_eq!(
            refused(0x87, true),
            "the upstream broker refused the connection: not authorized (reason code 0x87)"
        );
        assert_eq!(
            refused(0x97, true),
            "the upstream broker refused the connection: quota exceeded (reason code 0x97)"
        );
    }
}
