//! MQTT load generator for broker benchmarks (scripts/bench-broker.sh), used against
//! every broker alike.
//!
//! ```text
//! mqtt_load fanin  --port P --qos Q [--pubs 4] [--subs 1] [--count N] [--payload 64]
//! mqtt_load fanout --port P --qos Q [--pubs 1] [--subs 10] ...
//! mqtt_load idle   --port P [--conns 1000] [--hold 10] [--subscribe 0|1]
//! common: [--keepalive 60] [--threads 1] [--timeout 60] [--inflight 20]
//!         [--rate N]   (messages per second per publisher; default: as fast as possible)
//! ```
//!
//! Every publisher sends `--count` messages on one topic as fast as the broker takes
//! them, with at most `--inflight` unacknowledged (QoS 1/2); every subscriber subscribes
//! to that topic at the same QoS and acknowledges what it gets. Payloads carry the send
//! time, so each delivery's latency is known. The run ends when every subscriber has all
//! messages or `--timeout` passes; it prints one line:
//! `rate=<deliveries/s> received=<n> expected=<n> secs=<s> p50_us=<µs> p99_us=<µs>`.
//!
//! `idle` opens `--conns` connections that each subscribe to their own topic, prints
//! `ready`, holds them `--hold` seconds, then exits (for measuring the broker's RSS).
//!
//! The clients speak MQTT 3.1.1 with the crate's codec for CONNECT and SUBSCRIBE and
//! hand-rolled framing in the hot path (pre-encoded PUBLISH, header-only parsing), so
//! the generator stays cheaper than the broker it measures.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use fieldbridge::mqtt::{
    self, Connect, EncodedPublish, Packet, Protocol, Publish, QoS, Subscribe, Subscription,
    SubscriptionOptions,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

static START: OnceLock<Instant> = OnceLock::new();

fn now_ns() -> u64 {
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

#[derive(Debug, Clone)]
struct Args {
    mode: String,
    port: u16,
    qos: QoS,
    pubs: usize,
    subs: usize,
    count: usize,
    payload: usize,
    inflight: usize,
    timeout: Duration,
    conns: usize,
    hold: Duration,
    threads: usize,
    keep_alive: u16,
    subscribe: bool,
    /// Messages per second per publisher; 0: as fast as the broker takes them.
    rate: u64,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut it = std::env::args().skip(1);
    let mode = it.next().context("mode: fanin, fanout or idle")?;
    let fanout = mode == "fanout";
    let mut a = Args {
        mode,
        port: 1883,
        qos: QoS::AtMostOnce,
        pubs: if fanout { 1 } else { 4 },
        subs: if fanout { 10 } else { 1 },
        count: 10_000,
        payload: 64,
        inflight: 20,
        timeout: Duration::from_secs(60),
        conns: 1000,
        hold: Duration::from_secs(10),
        threads: 1,
        keep_alive: 60,
        subscribe: true,
        rate: 0,
    };
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--port" => a.port = value.parse()?,
            "--qos" => a.qos = QoS::from_u8(value.parse()?).context("qos 0, 1 or 2")?,
            "--pubs" => a.pubs = value.parse()?,
            "--subs" => a.subs = value.parse()?,
            "--count" => a.count = value.parse()?,
            "--payload" => a.payload = value.parse()?,
            "--inflight" => a.inflight = value.parse()?,
            "--timeout" => a.timeout = Duration::from_secs(value.parse()?),
            "--conns" => a.conns = value.parse()?,
            "--hold" => a.hold = Duration::from_secs(value.parse()?),
            "--threads" => a.threads = value.parse()?,
            "--keepalive" => a.keep_alive = value.parse()?,
            "--subscribe" => a.subscribe = value != "0",
            "--rate" => a.rate = value.parse()?,
            _ => bail!("unknown flag {flag}"),
        }
    }
    if a.payload < 8 {
        bail!("--payload must be at least 8 bytes (it carries the send time)");
    }
    Ok(a)
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let rt = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    rt.block_on(async move {
        match args.mode.as_str() {
            "fanin" | "fanout" => run(args).await,
            "idle" => idle(args).await,
            other => bail!("unknown mode {other}"),
        }
    })
}

/// A connection after CONNACK, with its unread bytes.
struct Conn {
    stream: TcpStream,
    rbuf: BytesMut,
}

impl Conn {
    async fn open(port: u16, client_id: String, keep_alive: u16) -> anyhow::Result<Conn> {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        stream.set_nodelay(true)?;
        let mut out = BytesMut::new();
        let connect = Connect {
            protocol: Protocol::V311,
            clean_start: true,
            keep_alive,
            client_id,
            ..Connect::default()
        };
        mqtt::encode(&Packet::Connect(connect), Protocol::V311, &mut out)?;
        stream.write_all(&out).await?;
        let mut conn = Conn {
            stream,
            rbuf: BytesMut::with_capacity(4096),
        };
        match conn.next_packet().await? {
            Packet::ConnAck(ack) if ack.code.is_success() => Ok(conn),
            other => bail!("connect refused: {other:?}"),
        }
    }

    async fn next_packet(&mut self) -> anyhow::Result<Packet> {
        loop {
            if let Some(p) = mqtt::decode(&mut self.rbuf, Protocol::V311, usize::MAX)? {
                return Ok(p);
            }
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                bail!("connection closed");
            }
        }
    }

    async fn subscribe(&mut self, filter: &str, qos: QoS) -> anyhow::Result<()> {
        let mut out = BytesMut::new();
        let sub = Subscribe {
            pkid: 1,
            filters: vec![Subscription {
                filter: filter.into(),
                options: SubscriptionOptions {
                    qos,
                    ..SubscriptionOptions::default()
                },
            }],
            ..Subscribe::default()
        };
        mqtt::encode(&Packet::Subscribe(sub), Protocol::V311, &mut out)?;
        self.stream.write_all(&out).await?;
        match self.next_packet().await? {
            Packet::SubAck(ack) if ack.reasons.iter().all(|r| r.is_success()) => Ok(()),
            other => bail!("subscribe refused: {other:?}"),
        }
    }
}

/// One frame at the front of `buf`: (first byte, body), or `None` if incomplete.
fn frame(buf: &mut BytesMut) -> anyhow::Result<Option<(u8, Bytes)>> {
    let Some(h) = mqtt::check(buf, usize::MAX)? else {
        return Ok(None);
    };
    if buf.len() < h.packet_len() {
        return Ok(None);
    }
    let mut f = buf.split_to(h.packet_len());
    f.advance(h.header_len);
    Ok(Some((h.byte1, f.freeze())))
}

fn ack(out: &mut BytesMut, kind: u8, pkid: u16) {
    out.put_u8(kind);
    out.put_u8(2);
    out.put_u16(pkid);
}

/// Room made in a read buffer before each read.
const READ_SIZE: usize = 64 * 1024;

/// Silence after which a subscriber stops waiting for dropped messages.
const IDLE_END: Duration = Duration::from_secs(2);

const PUBACK: u8 = 0x40;
const PUBREC: u8 = 0x50;
const PUBREL: u8 = 0x62;
const PUBCOMP: u8 = 0x70;

async fn publisher(conn: Conn, topic: String, a: Args) -> anyhow::Result<()> {
    if a.rate > 0 {
        paced_publisher(conn, topic, a).await
    } else {
        flat_out_publisher(conn, topic, a).await
    }
}

/// Handles the acknowledgements in `rbuf`: returns how many flows completed and queues
/// PUBREL for each PUBREC.
fn handle_acks(rbuf: &mut BytesMut, wbuf: &mut BytesMut) -> anyhow::Result<usize> {
    let mut done = 0;
    while let Some((byte1, body)) = frame(rbuf)? {
        let id = u16::from_be_bytes([body[0], body[1]]);
        match byte1 {
            PUBACK | PUBCOMP => done += 1,
            PUBREC => ack(wbuf, PUBREL, id),
            other => bail!("publisher got packet {other:#x}"),
        }
    }
    Ok(done)
}

/// One message every 1/rate seconds, acknowledgements handled in between.
async fn paced_publisher(mut conn: Conn, topic: String, a: Args) -> anyhow::Result<()> {
    let template = EncodedPublish::new(
        &Publish {
            qos: a.qos,
            topic,
            payload: Bytes::from(vec![0u8; a.payload]),
            ..Publish::default()
        },
        Protocol::V311,
    )?;
    let period = Duration::from_nanos(1_000_000_000 / a.rate);
    let mut next = tokio::time::Instant::now();
    let mut wbuf = BytesMut::new();
    let (mut sent, mut inflight, mut pkid) = (0, 0, 0u16);
    while sent < a.count || inflight > 0 {
        let may_send = sent < a.count && (a.qos == QoS::AtMostOnce || inflight < a.inflight);
        conn.rbuf.reserve(READ_SIZE);
        tokio::select! {
            () = tokio::time::sleep_until(next), if may_send => {
                pkid = pkid.checked_add(1).unwrap_or(1);
                template.write(pkid, false, &mut wbuf);
                let at = wbuf.len() - a.payload;
                wbuf[at..at + 8].copy_from_slice(&now_ns().to_le_bytes());
                sent += 1;
                if a.qos != QoS::AtMostOnce {
                    inflight += 1;
                }
                next += period;
            }
            n = conn.stream.read_buf(&mut conn.rbuf), if a.qos != QoS::AtMostOnce => {
                if n? == 0 {
                    bail!("publisher connection closed");
                }
                inflight -= handle_acks(&mut conn.rbuf, &mut wbuf)?;
            }
        }
        if !wbuf.is_empty() {
            conn.stream.write_all(&wbuf).await?;
            wbuf.clear();
        }
    }
    Ok(())
}

/// Writes in 16 KiB batches as fast as the broker reads, within the inflight window.
async fn flat_out_publisher(mut conn: Conn, topic: String, a: Args) -> anyhow::Result<()> {
    let template = EncodedPublish::new(
        &Publish {
            qos: a.qos,
            topic,
            payload: Bytes::from(vec![0u8; a.payload]),
            ..Publish::default()
        },
        Protocol::V311,
    )?;
    let mut wbuf = BytesMut::with_capacity(64 * 1024);
    let mut sent = 0;
    let mut inflight = 0;
    let mut pkid: u16 = 0;
    while sent < a.count || inflight > 0 {
        while sent < a.count
            && (a.qos == QoS::AtMostOnce || inflight < a.inflight)
            && wbuf.len() < 16 * 1024
        {
            pkid = pkid.checked_add(1).unwrap_or(1);
            template.write(pkid, false, &mut wbuf);
            let at = wbuf.len() - a.payload;
            wbuf[at..at + 8].copy_from_slice(&now_ns().to_le_bytes());
            sent += 1;
            if a.qos != QoS::AtMostOnce {
                inflight += 1;
            }
        }
        if !wbuf.is_empty() {
            conn.stream.write_all(&wbuf).await?;
            wbuf.clear();
        }
        if a.qos == QoS::AtMostOnce || (inflight < a.inflight && sent < a.count) {
            continue;
        }
        conn.rbuf.reserve(READ_SIZE);
        if conn.stream.read_buf(&mut conn.rbuf).await? == 0 {
            bail!("publisher connection closed");
        }
        inflight -= handle_acks(&mut conn.rbuf, &mut wbuf)?;
    }
    Ok(())
}

async fn subscriber(
    mut conn: Conn,
    expected: usize,
    deadline: tokio::time::Instant,
) -> anyhow::Result<(usize, Vec<u32>, u64)> {
    let mut latencies = Vec::with_capacity(expected);
    let mut received = 0;
    let mut last = 0;
    let mut wbuf = BytesMut::with_capacity(16 * 1024);
    while received < expected {
        // Once messages flow, a long silence means the rest were dropped (QoS 0).
        let until = if received == 0 {
            deadline
        } else {
            deadline.min(tokio::time::Instant::now() + IDLE_END)
        };
        // Without room, `read_buf` reads 64 bytes at a time.
        conn.rbuf.reserve(READ_SIZE);
        let n = match tokio::time::timeout_at(until, conn.stream.read_buf(&mut conn.rbuf)).await {
            Ok(n) => n?,
            Err(_) => break,
        };
        if n == 0 {
            bail!("subscriber connection closed");
        }
        let now = now_ns();
        while let Some((byte1, body)) = frame(&mut conn.rbuf)? {
            match byte1 >> 4 {
                3 => {
                    let qos = (byte1 >> 1) & 3;
                    let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
                    let mut at = 2 + topic_len;
                    if qos > 0 {
                        let id = u16::from_be_bytes([body[at], body[at + 1]]);
                        at += 2;
                        ack(&mut wbuf, if qos == 1 { PUBACK } else { PUBREC }, id);
                    }
                    let mut stamp = [0u8; 8];
                    stamp.copy_from_slice(&body[at..at + 8]);
                    let sent = u64::from_le_bytes(stamp);
                    latencies
                        .push(u32::try_from(now.saturating_sub(sent) / 1000).unwrap_or(u32::MAX));
                    received += 1;
                    last = now;
                }
                6 => {
                    let id = u16::from_be_bytes([body[0], body[1]]);
                    ack(&mut wbuf, PUBCOMP, id);
                }
                other => bail!("subscriber got packet type {other}"),
            }
        }
        if !wbuf.is_empty() {
            conn.stream.write_all(&wbuf).await?;
            wbuf.clear();
        }
    }
    Ok((received, latencies, last))
}

async fn run(a: Args) -> anyhow::Result<()> {
    let run_id = std::process::id();
    let mut subs = Vec::new();
    for i in 0..a.subs {
        let mut c = Conn::open(a.port, format!("load-sub-{run_id}-{i}"), a.keep_alive).await?;
        c.subscribe(&format!("load/{run_id}/#"), a.qos).await?;
        subs.push(c);
    }
    let mut pubs = Vec::new();
    for i in 0..a.pubs {
        pubs.push(Conn::open(a.port, format!("load-pub-{run_id}-{i}"), a.keep_alive).await?);
    }
    let expected = a.pubs * a.count;
    let start = now_ns();
    let deadline = tokio::time::Instant::now() + a.timeout;
    let sub_tasks: Vec<_> = subs
        .into_iter()
        .map(|c| tokio::spawn(subscriber(c, expected, deadline)))
        .collect();
    let pub_tasks: Vec<_> = pubs
        .into_iter()
        .enumerate()
        .map(|(i, c)| tokio::spawn(publisher(c, format!("load/{run_id}/{i}"), a.clone())))
        .collect();
    for t in pub_tasks {
        match tokio::time::timeout_at(deadline, t).await {
            Ok(r) => r??,
            Err(_) => bail!("publishers did not finish within {:?}", a.timeout),
        }
    }
    let mut received = 0;
    let mut latencies = Vec::new();
    let mut end = start;
    for t in sub_tasks {
        let (n, l, last) = t.await??;
        received += n;
        latencies.extend(l);
        end = end.max(last);
    }
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    let secs = (end - start) as f64 / 1e9;
    println!(
        "rate={:.0} received={} expected={} secs={:.3} p50_us={} p99_us={}",
        received as f64 / secs.max(1e-9),
        received,
        expected * a.subs,
        secs,
        pct(0.50),
        pct(0.99)
    );
    Ok(())
}

async fn idle(a: Args) -> anyhow::Result<()> {
    let run_id = std::process::id();
    let mut conns = Vec::with_capacity(a.conns);
    for i in 0..a.conns {
        let mut c = Conn::open(a.port, format!("idle-{run_id}-{i}"), a.keep_alive).await?;
        if a.subscribe {
            c.subscribe(&format!("idle/{run_id}/{i}"), QoS::AtLeastOnce)
                .await?;
        }
        conns.push(c);
    }
    println!("ready {}", conns.len());
    tokio::time::sleep(a.hold).await;
    Ok(())
}
