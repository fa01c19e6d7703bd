//! Shared support for the integration tests: real parts (mosquitto, mosquitto_sub/pub,
//! an independent Modbus slave) spawned on free loopback ports, and waiting on events
//! with timeouts instead of sleeping.
//!
//! Each integration test binary uses only some of these helpers.
#![allow(dead_code)]

pub mod agent;
pub mod clients;
pub mod http;
pub mod mosquitto;
pub mod slave;
pub mod util;
