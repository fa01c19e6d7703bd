use prost::Message as _;

use super::*;
use crate::sparkplug::payload::PropertyKind;

fn node() -> EdgeNode {
    EdgeNode::new(
        NodeConfig {
            group_id: "plant".into(),
            edge_node_id: "gw1".into(),
            devices: vec![
                DeviceSpec {
                    name: "meter".into(),
                    metrics: vec![
                        MetricSpec {
                            name: "power".into(),
                            datatype: datatype::FLOAT,
                            unit: Some("kW".into()),
                        },
                        MetricSpec {
                            name: "count".into(),
                            datatype: datatype::UINT32,
                            unit: None,
                        },
                    ],
                },
                DeviceSpec {
                    name: "pump".into(),
                    metrics: vec![MetricSpec {
                        name: "running".into(),
                        datatype: datatype::BOOLEAN,
                        unit: None,
                    }],
                },
            ],
        },
        100,
    )
}

fn decode(out: &Outgoing) -> Payload {
    Payload::decode(&out.1[..]).expect("decodes")
}

fn good(value: Value, ts_ms: u64) -> Sample {
    Sample {
        value: Some(value),
        quality: QUALITY_GOOD,
        ts_ms,
    }
}

fn property<'a>(metric: &'a Metric, key: &str) -> Option<&'a PropertyKind> {
    let set = metric.properties.as_ref()?;
    let i = set.keys.iter().position(|k| k == key)?;
    set.values[i].value.as_ref()
}

#[test]
fn nbirth_has_seq_zero_bdseq_and_rebirth_and_ndeath_the_same_bdseq_without_seq() {
    let mut node = node();
    node.set_bd_seq(7);
    let births = node.births(1_000);
    assert_eq!(births[0].0, "spBv1.0/plant/NBIRTH/gw1");
    let nbirth = decode(&births[0]);
    assert_eq!(nbirth.seq, Some(0));
    assert_eq!(nbirth.metrics[0].name.as_deref(), Some(BD_SEQ));
    assert_eq!(nbirth.metrics[0].value, Some(Value::LongValue(7)));
    assert_eq!(nbirth.metrics[1].name.as_deref(), Some(REBIRTH));
    assert_eq!(nbirth.metrics[1].value, Some(Value::BooleanValue(false)));
    let death = node.death(2_000);
    assert_eq!(death.0, "spBv1.0/plant/NDEATH/gw1");
    let death = decode(&death);
    assert_eq!(death.seq, None);
    assert_eq!(death.metrics[0].value, Some(Value::LongValue(7)));
}

#[test]
fn dbirth_declares_every_metric_with_alias_type_unit_and_quality() {
    let mut node = node();
    node.record("meter", "power", good(Value::FloatValue(1.5), 900));
    let births = node.births(1_000);
    assert_eq!(births.len(), 3, "NBIRTH and one DBIRTH per device");
    assert_eq!(births[1].0, "spBv1.0/plant/DBIRTH/gw1/meter");
    let dbirth = decode(&births[1]);
    assert_eq!(dbirth.seq, Some(1));
    let power = &dbirth.metrics[0];
    assert_eq!(power.name.as_deref(), Some("power"));
    assert_eq!(power.alias, Some(1));
    assert_eq!(power.datatype, Some(datatype::FLOAT));
    assert_eq!(power.value, Some(Value::FloatValue(1.5)));
    assert_eq!(power.timestamp, Some(900));
    assert_eq!(
        property(power, UNIT_PROPERTY),
        Some(&PropertyKind::StringValue("kW".into()))
    );
    assert_eq!(
        property(power, QUALITY_PROPERTY),
        Some(&PropertyKind::IntValue(192))
    );
    let count = &dbirth.metrics[1];
    assert_eq!(
        (count.alias, count.is_null, count.value.as_ref()),
        (Some(2), Some(true), None)
    );
    let pump = decode(&births[2]);
    assert_eq!(
        pump.metrics[0].alias,
        Some(3),
        "aliases are unique across the node"
    );
    assert_eq!(pump.seq, Some(2));
}

#[test]
fn a_stored_reading_goes_out_by_alias_with_the_next_seq_and_historical_when_older() {
    let mut node = node();
    let old = node.data_row("meter", "count", &good(Value::IntValue(5), 500));
    node.record("meter", "count", good(Value::IntValue(5), 500));
    node.births(1_000);
    let sent = node
        .send_row(&old.0, &old.1, 500, 1_100)
        .expect("row")
        .expect("sent");
    assert_eq!(sent.0, "spBv1.0/plant/DDATA/gw1/meter");
    let data = decode(&sent);
    assert_eq!(data.seq, Some(3));
    let metric = &data.metrics[0];
    assert_eq!(metric.name, None, "data carries the alias only");
    assert_eq!(metric.alias, Some(2));
    assert_eq!(metric.is_historical, Some(true));
    assert_eq!(metric.timestamp, Some(500), "the original timestamp");
    assert_eq!(data.timestamp, Some(500));

    let live = node.data_row("meter", "count", &good(Value::IntValue(6), 1_200));
    let data = decode(
        &node
            .send_row(&live.0, &live.1, 1_200, 1_200)
            .expect("row")
            .expect("sent"),
    );
    assert_eq!(data.seq, Some(4));
    assert_eq!(data.metrics[0].is_historical, None);
}

/// Regression: the first readings of a fresh start, taken just before the births (so
/// not in the DBIRTH, which was null), went out historical, and a host kept the metric
/// null until the next poll.
#[test]
fn the_first_value_of_a_metric_born_null_is_live_but_a_value_of_an_earlier_run_is_not() {
    let mut node = node();
    node.births(1_000);
    let first = node.data_row("meter", "power", &good(Value::FloatValue(1.0), 990));
    let sent = node
        .send_row(&first.0, &first.1, 990, 1_010)
        .expect("row")
        .expect("sent");
    assert_eq!(decode(&sent).metrics[0].is_historical, None);
    let earlier = node.data_row("meter", "power", &good(Value::FloatValue(1.0), 50));
    let sent = node
        .send_row(&earlier.0, &earlier.1, 50, 1_010)
        .expect("row")
        .expect("sent");
    assert_eq!(decode(&sent).metrics[0].is_historical, Some(true));
}

#[test]
fn seq_wraps_from_255_to_0() {
    let mut node = node();
    node.births(0);
    let row = node.data_row("pump", "running", &good(Value::BooleanValue(true), 1));
    let mut seqs = Vec::new();
    for _ in 0..300 {
        let sent = node
            .send_row(&row.0, &row.1, 1, 1)
            .expect("row")
            .expect("sent");
        seqs.push(decode(&sent).seq.expect("seq"));
    }
    assert_eq!(seqs[0], 3);
    let wrap = seqs.iter().position(|&s| s == 255).expect("reaches 255");
    assert_eq!(seqs[wrap + 1], 0);
}

#[test]
fn device_states_become_ddeath_and_dbirth_and_offline_devices_die_after_their_birth() {
    let mut node = node();
    node.births(0);
    let dead = node.state_row("pump", false, 10);
    let sent = node
        .send_row(&dead.0, &dead.1, 10, 10)
        .expect("row")
        .expect("sent");
    assert_eq!(sent.0, "spBv1.0/plant/DDEATH/gw1/pump");
    assert_eq!(decode(&sent).seq, Some(3));
    assert_eq!(
        node.births(15).len(),
        3,
        "a replayed change is not the present state"
    );
    assert!(node.set_online("pump", false));
    assert!(!node.set_online("pump", false), "no change");
    let births = node.births(20);
    let topics: Vec<&str> = births.iter().map(|b| b.0.as_str()).collect();
    assert_eq!(
        topics,
        [
            "spBv1.0/plant/NBIRTH/gw1",
            "spBv1.0/plant/DBIRTH/gw1/meter",
            "spBv1.0/plant/DBIRTH/gw1/pump",
            "spBv1.0/plant/DDEATH/gw1/pump",
        ]
    );
    let back = node.state_row("pump", true, 30);
    let sent = node
        .send_row(&back.0, &back.1, 30, 30)
        .expect("row")
        .expect("sent");
    assert_eq!(sent.0, "spBv1.0/plant/DBIRTH/gw1/pump");
    assert_eq!(decode(&sent).metrics.len(), 1);
}

#[test]
fn rows_of_metrics_no_longer_configured_are_left_out() {
    let mut node = node();
    let gone = node.data_row("boiler", "temp", &good(Value::DoubleValue(1.0), 1));
    assert_eq!(node.send_row(&gone.0, &gone.1, 1, 1).expect("row"), None);
    let gone = node.data_row("meter", "voltage", &good(Value::DoubleValue(1.0), 1));
    assert_eq!(node.send_row(&gone.0, &gone.1, 1, 1).expect("row"), None);
    assert!(node.send_row("fb/meter/power", b"{}", 1, 1).is_err());
    assert!(node
        .send_row("spBv1.0/plant/DDATA/gw1/meter", &[0xff], 1, 1)
        .is_err());
}

#[test]
fn ncmd_rebirth_and_dcmd_by_name_or_alias() {
    let node = node();
    let rebirth = Payload {
        timestamp: Some(1),
        metrics: vec![Metric {
            name: Some(REBIRTH.into()),
            value: Some(Value::BooleanValue(true)),
            ..Metric::default()
        }],
        ..Payload::default()
    };
    assert_eq!(
        node.command("spBv1.0/plant/NCMD/gw1", &rebirth.encode_to_vec())
            .expect("ncmd"),
        Some(Command::Rebirth)
    );
    let write = Payload {
        timestamp: Some(5),
        metrics: vec![
            Metric {
                alias: Some(2),
                value: Some(Value::IntValue(9)),
                ..Metric::default()
            },
            Metric {
                name: Some("power".into()),
                timestamp: Some(6),
                value: Some(Value::FloatValue(2.0)),
                ..Metric::default()
            },
        ],
        ..Payload::default()
    };
    assert_eq!(
        node.command("spBv1.0/plant/DCMD/gw1/meter", &write.encode_to_vec())
            .expect("dcmd"),
        Some(Command::Write {
            device: "meter".into(),
            writes: vec![
                ("count".into(), Value::IntValue(9), Some(5)),
                ("power".into(), Value::FloatValue(2.0), Some(6)),
            ],
        })
    );
    let unknown = Payload {
        metrics: vec![Metric {
            alias: Some(3),
            value: Some(Value::BooleanValue(true)),
            ..Metric::default()
        }],
        ..Payload::default()
    };
    assert!(matches!(
        node.command("spBv1.0/plant/DCMD/gw1/meter", &unknown.encode_to_vec()),
        Err(Error::UnknownMetric { .. })
    ));
}

#[test]
fn host_state_payloads() {
    assert_eq!(host_online(br#"{"online":true,"timestamp":1}"#), Some(true));
    assert_eq!(
        host_online(br#"{"online":false,"timestamp":1}"#),
        Some(false)
    );
    assert_eq!(host_online(b"ONLINE"), None);
}

/// Regression: a device's first `online` state, right after the births that had
/// already born it, made a second DBIRTH (hosts see a rebirth of every device at
/// every start).
#[test]
fn a_device_reported_online_after_its_birth_changes_nothing() {
    let mut node = node();
    node.births(0);
    assert!(!node.set_online("meter", true), "born online already");
    assert!(node.set_online("meter", false));
    assert!(node.set_online("meter", true));
    assert!(!node.set_online("boiler", false), "not configured");
}
