//! Feeds arbitrary bytes to the MQTT decoder in both protocol versions.
//!
//! Checked on every input: no panic; a packet the decoder accepts re-encodes and decodes
//! back to the same packet; every prefix of an accepted packet asks for more bytes and
//! consumes nothing.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

#[path = "../../src/mqtt/mod.rs"]
// The target uses only part of the module's API.
#[allow(dead_code, unused_imports)]
mod mqtt;

use mqtt::{decode, encode, Packet, Protocol};

const MAX: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the version the stream is decoded as.
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    let version = if selector & 1 == 0 {
        Protocol::V311
    } else {
        Protocol::V5
    };
    let mut buf = BytesMut::from(bytes);
    while let Ok(Some(packet)) = decode(&mut buf, version, MAX) {
        let stream_version = match &packet {
            Packet::Connect(c) => c.protocol,
            _ => version,
        };
        let mut out = BytesMut::new();
        if let Err(e) = encode(&packet, stream_version, &mut out) {
            panic!("decoded {packet:?} but cannot encode it: {e}");
        }
        let encoded = out.clone().freeze();
        for cut in 0..encoded.len() {
            let mut prefix = BytesMut::from(&encoded[..cut]);
            assert_eq!(decode(&mut prefix, version, MAX), Ok(None));
            assert_eq!(prefix.len(), cut);
        }
        assert_eq!(decode(&mut out, version, MAX), Ok(Some(packet)));
    }
});
