#!/usr/bin/env python3
"""Hostile first packets against one MQTT broker on loopback (run by
scripts/bench-hostile.sh, once per broker, in the same run).

Prints one `key=value` line per scenario:

- `publish_first`: CONNS connections each send a PUBLISH announcing SIZE bytes as their
  first packet, then all of it but the last byte as fast as the broker takes it, and
  wait. RSS of the broker before, while the connections are open, its peak, and how
  many connections the broker closed.
- `connect_oversize`: the same with a CONNECT announcing SIZE bytes.
- `connect_trickle`: CONNS connections each send the first 60,000 bytes of a 60,001-byte
  CONNECT and wait (the most a connection that has not logged in can make us hold).
- `close_time`: time from sending one bad first byte (0x30) to the broker closing the
  connection, over ROUNDS connections one after the other (at most 15 s in all).
- `idle_flood`: IDLE connections that never send anything, then how long a real client
  (CONNECT, CONNACK) takes to get in.
"""

import argparse
import math
import select
import socket
import statistics
import time


def status_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key}")


def rss_kib(pid):
    return status_kib(pid, "VmRSS")


def vbi(n):
    out = bytearray()
    while True:
        byte = n % 128
        n //= 128
        if n:
            byte |= 0x80
        out.append(byte)
        if not n:
            return bytes(out)


def connect_packet(client_id=b"real"):
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(client_id).to_bytes(2, "big") + client_id
    return b"\x10" + vbi(len(body)) + body


def is_closed(sock):
    """True when the broker closed `sock` (EOF or reset); False when it is still open."""
    try:
        return sock.recv(65536) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def hostile(port, pid, conns, first, body, settle):
    """Opens `conns` connections, each sending `first` then as much of `body` as the
    broker takes within `settle` seconds, and keeps them open. Returns (RSS before,
    RSS after, peak RSS, closed)."""
    before = rss_kib(pid)
    socks = []
    for _ in range(conns):
        s = socket.create_connection(("127.0.0.1", port))
        s.setblocking(False)
        socks.append([s, first + body, False])
    deadline = time.monotonic() + settle
    while time.monotonic() < deadline:
        writers = [e[0] for e in socks if e[1] and not e[2]]
        readers = [e[0] for e in socks if not e[2]]
        if not readers:
            break
        r, w, _ = select.select(readers, writers, [], 0.1)
        for e in socks:
            s = e[0]
            if s in r and is_closed(s):
                e[2] = True
            elif s in w:
                try:
                    n = s.send(e[1][:262144])
                    e[1] = e[1][n:]
                except OSError:
                    e[2] = True
    # Let the broker finish whatever it does with what it got.
    time.sleep(1.0)
    for e in socks:
        if not e[2] and is_closed(e[0]):
            e[2] = True
    after = rss_kib(pid)
    peak = status_kib(pid, "VmHWM")
    closed = sum(1 for e in socks if e[2])
    for e in socks:
        e[0].close()
    return before, after, peak, closed


def close_time(port, rounds, budget=15.0):
    """Closing times of one bad first byte, one connection after the other, for
    `rounds` connections or `budget` seconds, whichever ends first."""
    times = []
    end = time.monotonic() + budget
    for _ in range(rounds):
        if time.monotonic() > end:
            break
        s = socket.create_connection(("127.0.0.1", port))
        s.settimeout(30)
        start = time.perf_counter()
        s.sendall(b"\x30")
        try:
            s.recv(1)
        except OSError:
            pass
        times.append((time.perf_counter() - start) * 1e6)
        s.close()
    times.sort()
    p99 = times[min(len(times), math.ceil(len(times) * 0.99)) - 1]
    return len(times), statistics.median(times), p99, times[-1]


def idle_flood(port, idle):
    flood = []
    for _ in range(idle):
        try:
            flood.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        except OSError:
            break
    start = time.monotonic()
    got_in = None
    attempts = 0
    while time.monotonic() - start < 30:
        attempts += 1
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(connect_packet())
            ack = s.recv(4)
            s.close()
            if ack[:1] == b"\x20" and ack[3:4] == b"\x00":
                got_in = time.monotonic() - start
                break
        except OSError:
            pass
        time.sleep(0.05)
    for s in flood:
        s.close()
    return len(flood), got_in, attempts


def main():
    p = argparse.ArgumentParser()
    p.add_argument("scenario", choices=[
        "publish_first", "connect_oversize", "connect_trickle", "close_time", "idle_flood",
    ])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--conns", type=int, default=200)
    p.add_argument("--size", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--idle", type=int, default=1100)
    p.add_argument("--settle", type=float, default=5.0)
    a = p.parse_args()

    # All of the announced packet but its last byte: the broker has to hold it all.
    body = b"\x00\x01t" + b"x" * (a.size - 4)
    if a.scenario in ("publish_first", "connect_oversize", "connect_trickle"):
        if a.scenario == "publish_first":
            first = b"\x30" + vbi(a.size)
        elif a.scenario == "connect_oversize":
            first = b"\x10" + vbi(a.size)
        else:
            # The first 60,000 bytes of a 60,001-byte CONNECT (a client id that long).
            first = b"\x10" + vbi(60_001)
            body = (b"\x00\x04MQTT\x04\x02\x00\x3c\xea\x55" + b"x" * 60_000)[:60_000]
        before, after, peak, closed = hostile(a.port, a.pid, a.conns, first, body, a.settle)
        print(
            f"{a.scenario} rss_before_kib={before} rss_kib={after} peak_kib={peak} "
            f"closed={closed}/{a.conns}"
        )
    elif a.scenario == "close_time":
        n, p50, p99, worst = close_time(a.port, a.rounds)
        print(f"close_time n={n} p50_us={p50:.0f} p99_us={p99:.0f} max_us={worst:.0f}")
    else:
        opened, got_in, attempts = idle_flood(a.port, a.idle)
        got = "never" if got_in is None else f"{got_in * 1000:.0f}"
        print(f"idle_flood idle={opened} client_in_ms={got} attempts={attempts}")


if __name__ == "__main__":
    main()
