//! Decoding and encoding a QoS 1 PUBLISH with a 64-byte payload, in both versions,
//! plus the fan-out path (one shared encoding, patched per subscriber), side by side
//! with rumqttc's codec (`rumqttc_decode`, `rumqttc_encode`) in the same run: the
//! machine is shared and noisy, so the ratio is the figure to read.
//!
//! Run: `cargo bench --bench codec -- --warm-up-time 1 --measurement-time 3`.
//! Throughput is reported in packets (elements) per second.

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use fieldbridge::mqtt::{
    decode, encode, EncodedPublish, Packet, Properties, Protocol, Publish, QoS,
};

/// Packets per decode batch: decoding walks a buffer of back-to-back packets, as a
/// connection's read buffer does.
const BATCH: usize = 1000;

fn publish(version: Protocol) -> Publish {
    Publish {
        qos: QoS::AtLeastOnce,
        pkid: 4242,
        topic: "fieldbridge/plant-1/line-2/temperature".into(),
        payload: Bytes::from(vec![0x5A; 64]),
        properties: match version {
            Protocol::V5 => Properties {
                message_expiry_interval: Some(3600),
                ..Properties::default()
            },
            Protocol::V311 => Properties::default(),
        },
        ..Publish::default()
    }
}

fn bench(c: &mut Criterion) {
    for (name, version) in [("v311", Protocol::V311), ("v5", Protocol::V5)] {
        let packet = Packet::Publish(publish(version));
        let mut one = BytesMut::new();
        encode(&packet, version, &mut one).expect("encodes");
        let mut stream = BytesMut::with_capacity(one.len() * BATCH);
        for _ in 0..BATCH {
            stream.extend_from_slice(&one);
        }

        let mut group = c.benchmark_group(format!("publish_qos1_64B_{name}"));
        group.throughput(Throughput::Elements(BATCH as u64));
        group.bench_function("decode", |b| {
            b.iter_batched(
                || stream.clone(),
                |mut buf| {
                    while let Some(p) = decode(&mut buf, version, 1 << 20).expect("decodes") {
                        std::hint::black_box(p);
                    }
                },
                BatchSize::LargeInput,
            )
        });

        group.throughput(Throughput::Elements(1));
        let mut out = BytesMut::with_capacity(4096);
        group.bench_function("encode", |b| {
            b.iter(|| {
                out.clear();
                encode(std::hint::black_box(&packet), version, &mut out).expect("encodes");
            })
        });

        let theirs_v4 = rumqttc::mqttbytes::v4::Publish {
            dup: false,
            qos: rumqttc::mqttbytes::QoS::AtLeastOnce,
            retain: false,
            topic: "fieldbridge/plant-1/line-2/temperature".into(),
            pkid: 4242,
            payload: Bytes::from(vec![0x5A; 64]),
        };
        let theirs_v5 = rumqttc::v5::mqttbytes::v5::Publish {
            qos: rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            topic: Bytes::from_static(b"fieldbridge/plant-1/line-2/temperature"),
            pkid: 4242,
            payload: Bytes::from(vec![0x5A; 64]),
            properties: Some(rumqttc::v5::mqttbytes::v5::PublishProperties {
                message_expiry_interval: Some(3600),
                ..Default::default()
            }),
            ..Default::default()
        };
        group.throughput(Throughput::Elements(BATCH as u64));
        group.bench_function("rumqttc_decode", |b| {
            b.iter_batched(
                || stream.clone(),
                |mut buf| {
                    while !buf.is_empty() {
                        match version {
                            Protocol::V311 => {
                                let p = rumqttc::mqttbytes::v4::read(&mut buf, 1 << 20);
                                std::hint::black_box(p.expect("rumqttc decodes"));
                            }
                            Protocol::V5 => {
                                let p = rumqttc::v5::mqttbytes::v5::Packet::read(
                                    &mut buf,
                                    Some(1 << 20),
                                );
                                std::hint::black_box(p.expect("rumqttc decodes"));
                            }
                        }
                    }
                },
                BatchSize::LargeInput,
            )
        });
        group.throughput(Throughput::Elements(1));
        group.bench_function("rumqttc_encode", |b| {
            b.iter(|| {
                out.clear();
                let written = match version {
                    Protocol::V311 => std::hint::black_box(&theirs_v4).write(&mut out).ok(),
                    Protocol::V5 => std::hint::black_box(&theirs_v5).write(&mut out).ok(),
                };
                written.expect("rumqttc encodes");
            })
        });

        let shared = EncodedPublish::new(&publish(version), version).expect("encodes");
        let mut pkid = 0u16;
        group.bench_function("fan_out_write", |b| {
            b.iter(|| {
                out.clear();
                pkid = pkid.wrapping_add(1).max(1);
                shared.write(pkid, false, &mut out);
            })
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
