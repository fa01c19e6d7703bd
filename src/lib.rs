//! fieldbridge: an edge data-collection agent for Raspberry Pi-class gateways.
//!
//! # Layout
//!
//! | module | owns |
//! |---|---|
//! | [`mqtt`] | the MQTT 3.1.1/5.0 wire protocol: packets, codec, topics; no I/O |
//! | [`broker`] | the local LAN broker: listeners, sessions, subscriptions, retained store, auth, `$SYS` |
//! | [`uplink`] | the upstream MQTT client: connection state machine, inflight window, reconnect, TLS |
//! | [`store`] | the SQLite store-and-forward queue |
//! | [`field`] | Modbus RTU/TCP and serial-line buses, read plans, decoding, scheduling, writes |
//! | [`sparkplug`] | Sparkplug B 3.0: the payload schema (prost), the edge node's births, deaths, data, `seq` and `bdSeq`; no network I/O |
//! | [`problem`] | config problems with key paths and the collector validators write rules into (a leaf) |
//! | [`config`] | composes the sections' schemas and validation; spans for `file:line:column` |
//! | [`agent`] | wiring, lifecycle, shutdown, reload, systemd notify, the command router |
//! | [`clock`] | the clocks: wall (ms since the epoch), boot clock, sync status behind the `ClockSource` trait (a leaf) |
//! | [`time`] | the `[time]` section and the time keeper: `unsynced` and `corrected` readings |
//! | [`future`] | small future helpers for `select!` loops (an optional future as a disabled arm) |
//! | [`http`] | the `[http]` endpoint: a small read-only HTTP/1.1 server serving the routes the agent gives it |
//! | [`topics`] | the topic namespace: every topic the agent publishes or subscribes to |
//! | [`files`] | private modes of created files, user and group names, why a file cannot be read (a leaf) |
//!
//! See `ARCHITECTURE.md` for the data flow and the invariants across modules.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod agent;
pub mod broker;
pub mod clock;
pub mod config;
pub mod field;
pub mod files;
pub mod future;
pub mod http;
pub mod mqtt;
pub mod problem;
pub mod sparkplug;
pub mod store;
pub mod time;
pub mod topics;
pub mod uplink;
