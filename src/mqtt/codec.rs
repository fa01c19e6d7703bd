//! Encoding and decoding of control packets (placeholder signatures; see issue 2).

use bytes::BytesMut;

use super::packet::{Packet, Protocol};

/// Everything that can be wrong with bytes received from a peer or a packet to send.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    PacketTooLarge { size: usize, max: usize },
}

/// The fixed header of a packet: type and flags byte, remaining length, header length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedHeader {
    pub byte1: u8,
    pub remaining_len: usize,
    pub header_len: usize,
}

/// Reads only the fixed header. `Ok(None)` when it is incomplete; an error when the
/// announced packet is larger than `max_packet_size` (checked before buffering).
pub fn check(_buf: &[u8], _max_packet_size: usize) -> Result<Option<FixedHeader>, Error> {
    todo!("issue 2")
}

/// Decodes one packet from the front of `buf`. CONNECT carries its own protocol level;
/// every other packet is decoded as `version`.
pub fn decode(
    _buf: &mut BytesMut,
    _version: Protocol,
    _max_packet_size: usize,
) -> Result<Option<Packet>, Error> {
    todo!("issue 2")
}

/// Appends the encoding of `packet` as `version` to `out`.
pub fn encode(_packet: &Packet, _version: Protocol, _out: &mut BytesMut) -> Result<(), Error> {
    todo!("issue 2")
}
