//! The MQTT codec against independent implementations and arbitrary input.
//!
//! - `capture`: what mosquitto_pub and mosquitto_sub (3.1.1 and 5.0) send to a raw TCP
//!   listener, decoded and re-encoded byte for byte; our server packets must satisfy
//!   them. The captures are also committed under tests/fixtures/mqtt/.
//! - `rumqttc`: server-to-client packets cross-checked with rumqttc's codec both ways.
//! - `props`: property-based round trips and arbitrary bytes.

mod common;

#[path = "mqtt_codec/capture.rs"]
mod capture;
#[path = "mqtt_codec/props.rs"]
mod props;
#[path = "mqtt_codec/rumqttc.rs"]
mod rumqttc_check;
