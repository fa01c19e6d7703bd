//! The MQTT 3.1.1 and 5.0 wire protocol, with no I/O.
//!
//! Shared by the upstream client (`uplink`) and the local broker (`broker`).
//!
//! Invariants:
//! - Decoding reads from a `BytesMut`. `Ok(None)` means "need more bytes" and consumes
//!   nothing; `Ok(Some(packet))` consumes exactly that packet's bytes; `Err` means the
//!   stream is malformed and the connection must be closed.
//! - The maximum packet size is checked from the fixed header, before the body is
//!   buffered or anything is allocated for it.
//! - No input makes the decoder panic.
//! - Whatever `encode` accepts, `decode` accepts back as the same packet (5.0-only
//!   fields aside when the version is 3.1.1).

pub mod codec;
pub mod packet;
mod properties;
pub mod topic;
mod wire;

pub use codec::{check, decode, encode, publish_size, EncodedPublish, FixedHeader};
pub use packet::*;
pub use wire::{varint_len, Error, MAX_PACKET_SIZE, MAX_REMAINING_LENGTH};
