//! Serial-line sensors over a socat pty pair: fieldbridge opens one end with tokio-serial,
//! the test plays the sensor on the other end.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::slave::PtyPair;
use fieldbridge::field::{self, DeviceState, FieldConfig, FieldEvent, Quality, Reading, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

fn open(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open the sensor end of the pty")
}

async fn next_reading(
    rx: &mut mpsc::Receiver<FieldEvent>,
    what: &str,
    mut pred: impl FnMut(&Reading) -> bool,
) -> Reading {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(FieldEvent::Reading(r))) if pred(&r) => return r,
            Ok(Some(_)) => {}
            Ok(None) => panic!("channel closed waiting for {what}"),
            Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
        }
    }
}

/// Writes `line` every 50 ms until stopped (the reader may not have opened its end yet).
fn keep_writing(path: &Path, line: &'static str) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let (flag, path) = (Arc::clone(&stop), path.to_path_buf());
    std::thread::spawn(move || {
        let mut end = open(&path);
        while !flag.load(Ordering::SeqCst) {
            if end.write_all(line.as_bytes()).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    stop
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_nmea_sensor_with_garbage_silence_and_an_unplugged_port() {
    let mut pty = PtyPair::new();
    let config: FieldConfig = toml::from_str(&format!(
        r#"
        [[bus]]
        name = "weather"
        kind = "lines"
        port = "{}"
        checksum = "nmea"
        max_line = 80
        [[bus.device]]
        name = "ws"
        timeout_ms = 400
        regex = '^\$WIMDA,(?P<p>[0-9.]+),I,(?P<bar>[0-9.]+),B,(?P<t>-?[0-9.]+),C'
        [[bus.device.point]]
        name = "pressure"
        field = "bar"
        unit = "bar"
        [[bus.device.point]]
        name = "temperature"
        field = "t"
        unit = "°C"
        "#,
        pty.master_end().display()
    ))
    .unwrap();
    let buses = field::resolve(&config).unwrap();
    let (tx, mut rx) = mpsc::channel(64);
    let shutdown = CancellationToken::new();
    let task = field::spawn_bus(&buses[0], tx, shutdown.clone());

    // A good sentence (checksum 0x36 = XOR of the bytes between '$' and '*').
    let good = "$WIMDA,29.9350,I,1.0137,B,21.5,C*36\r\n";
    let writer = keep_writing(&pty.slave_end(), good);
    let r = next_reading(&mut rx, "temperature", |r| r.point == "temperature").await;
    assert_eq!(
        (r.value, r.quality, r.unit.as_deref()),
        (Some(Value::Float(21.5)), Quality::Good, Some("°C"))
    );
    writer.store(true, Ordering::SeqCst);

    // Garbage: a bad checksum, an overlong line, a line the regex does not match; then a
    // good one. None of them may produce a reading.
    let garbage_before = buses[0].stats().garbage_lines;
    let mut end = open(&pty.slave_end());
    let long = format!("$WIMDA,{}*00\r\n", "9".repeat(500));
    let batch = format!(
        "$WIMDA,29.9350,I,1.0137,B,99.9,C*00\r\n{long}$GPGGA,1*4B\r\n$WIMDA,29.9350,I,1.0200,B,22.0,C*37\r\n"
    );
    end.write_all(batch.as_bytes()).unwrap();
    let r = next_reading(&mut rx, "the next good temperature", |r| {
        r.point == "temperature" && r.value != Some(Value::Float(21.5))
    })
    .await;
    assert_eq!(
        r.value,
        Some(Value::Float(22.0)),
        "garbage never becomes a value"
    );
    assert!(
        buses[0].stats().garbage_lines >= garbage_before + 3,
        "{:?}",
        buses[0].stats()
    );

    // Silence beyond timeout_ms: bad quality, no stale value.
    let r = next_reading(&mut rx, "a timeout", |r| {
        r.point == "temperature" && r.quality != Quality::Good
    })
    .await;
    assert_eq!((r.quality, r.value), (Quality::Timeout, None));

    // Unplugged: disconnected. Plugged back: good again without a restart.
    drop(end);
    pty.kill();
    let r = next_reading(&mut rx, "disconnected", |r| {
        r.quality == Quality::Disconnected
    })
    .await;
    assert_eq!(r.value, None);
    pty.restart();
    let writer = keep_writing(&pty.slave_end(), good);
    next_reading(&mut rx, "good after replug", |r| {
        r.point == "temperature" && r.quality == Quality::Good
    })
    .await;
    writer.store(true, Ordering::SeqCst);

    shutdown.cancel();
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polled_sensors_answer_garble_or_stay_silent() {
    let pty = PtyPair::new();
    let config: FieldConfig = toml::from_str(&format!(
        r#"
        [[bus]]
        name = "probes"
        kind = "lines"
        port = "{}"
        mode = "poll"
        [[bus.device]]
        name = "s1"
        request = "R1\r\n"
        poll_interval_ms = 100
        timeout_ms = 300
        batch = true
        [[bus.device.point]]
        name = "temp"
        [[bus.device.point]]
        name = "hum"
        type = "u16"
        [[bus.device]]
        name = "s2"
        request = "R2\r\n"
        poll_interval_ms = 100
        [[bus.device.point]]
        name = "temp"
        [[bus.device]]
        name = "s3"
        request = "R3\r\n"
        poll_interval_ms = 100
        timeout_ms = 100
        retries = 0
        quarantine_after = 2
        [[bus.device.point]]
        name = "temp"
        "#,
        pty.master_end().display()
    ))
    .unwrap();

    // The sensors: s1 answers key=value pairs, s2 answers noise, s3 never answers.
    let requests = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    {
        let (mut end, seen) = (open(&pty.slave_end()), Arc::clone(&requests));
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            let mut pending = String::new();
            while let Ok(n) = end.read(&mut buf) {
                if n == 0 {
                    return;
                }
                pending.push_str(&String::from_utf8_lossy(&buf[..n]));
                while let Some(i) = pending.find("\r\n") {
                    let request: String = pending.drain(..i + 2).collect();
                    let answer = match request.trim() {
                        "R1" => "temp=21.5, hum=40\r\n",
                        "R2" => "#?!\r\n",
                        _ => "",
                    };
                    seen.lock().unwrap().push(request.trim().to_string());
                    if end.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                }
            }
        });
    }

    let (tx, mut rx) = mpsc::channel(64);
    let shutdown = CancellationToken::new();
    let tasks = field::spawn_buses(&config, tx, shutdown.clone()).unwrap();
    let (mut s1, mut s2, mut s3, mut batch, mut quarantined) = (None, None, None, None, false);
    let deadline = tokio::time::Instant::now() + WAIT;
    while s1.is_none() || s2.is_none() || s3.is_none() || batch.is_none() || !quarantined {
        let event = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out: s1 {s1:?} s2 {s2:?} s3 {s3:?} batch {batch:?}"))
            .expect("open channel");
        match event {
            FieldEvent::Reading(r) if r.device == "s1" && r.point == "hum" => s1 = Some(r),
            FieldEvent::Reading(r) if r.device == "s2" => s2 = Some(r),
            FieldEvent::Reading(r) if r.device == "s3" => s3 = Some(r),
            FieldEvent::Batch {
                device,
                payload_json,
                ..
            } if device == "s1" => batch = Some(payload_json),
            FieldEvent::DeviceState { device, state } if device == "s3" => {
                quarantined |= state == DeviceState::Quarantined
            }
            _ => {}
        }
    }
    let s1 = s1.unwrap();
    assert_eq!(
        (s1.value, s1.quality),
        (Some(Value::UInt(40)), Quality::Good)
    );
    let s2 = s2.unwrap();
    assert_eq!((s2.value, s2.quality), (None, Quality::Parse));
    let s3 = s3.unwrap();
    assert_eq!((s3.value, s3.quality), (None, Quality::Timeout));
    let batch: serde_json::Value = serde_json::from_str(&batch.unwrap()).unwrap();
    assert_eq!(batch["points"]["temp"]["value"], 21.5);
    assert_eq!(batch["points"]["hum"]["value"], 40);
    let seen = requests.lock().unwrap().clone();
    assert!(
        ["R1", "R2", "R3"]
            .iter()
            .all(|r| seen.iter().any(|s| s == r)),
        "{seen:?}"
    );

    shutdown.cancel();
    for t in tasks {
        tokio::time::timeout(WAIT, t).await.unwrap().unwrap();
    }
}
