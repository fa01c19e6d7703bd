#!/usr/bin/env python3
"""Command -> result latency of fieldbridge writes, measured from a LAN client (paho-mqtt).

Sends COUNT commands with ids to PREFIX/dev0/setpoint/set on the agent's local broker,
spaced by a random 20-60 ms, and times each from the publish to its result on
.../set/result. Also reads two health reports BEAT seconds apart to get the bus's
requests per second while it polls continuously: one poll request takes 1/rate.

Prints one JSON line: {"p50_ms", "p99_ms", "max_ms", "ok", "count", "request_ms"}.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import threading
import time

import paho.mqtt.client as mqtt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--bus", required=True)
    parser.add_argument("--count", type=int, default=300)
    args = parser.parse_args()

    sent: dict[str, float] = {}
    wall: dict[str, float] = {}
    parts: list[tuple[float, float, float, float]] = []
    took: list[float] = []
    ok = 0
    health: list[tuple[float, int]] = []
    done = threading.Event()
    lock = threading.Lock()
    result_topic = f"{args.prefix}/dev0/setpoint/set/result"

    def on_message(_client, _userdata, msg):
        nonlocal ok
        now = time.perf_counter()
        if msg.topic == result_topic:
            body = json.loads(msg.payload)
            with lock:
                start = sent.pop(str(body.get("id")), None)
                if start is not None:
                    took.append((now - start) * 1000.0)
                    sent_ms = wall.pop(str(body.get("id")))
                    arrived_ms = time.time() * 1000.0
                    parts.append((
                        body["received_ms"] - sent_ms,
                        body["written_ms"] - body["received_ms"],
                        body["done_ms"] - body["written_ms"],
                        arrived_ms - body["done_ms"],
                    ))
                    ok += bool(body.get("ok"))
                    if len(took) == args.count:
                        done.set()
        else:
            body = json.loads(msg.payload)
            requests = body["buses"][args.bus]["requests"]
            health.append((now, requests))

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-writes")
    client.on_message = on_message
    client.connect("127.0.0.1", args.port)
    # paho leaves Nagle on: its PUBLISH would wait for the ACK of its previous segment
    # (up to the peer's delayed-ACK time), which is the client's latency, not ours.
    client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.subscribe([(result_topic, 1), (f"{args.prefix}/health", 0)])
    client.loop_start()
    time.sleep(1.0)
    for i in range(args.count):
        with lock:
            sent[str(i)] = time.perf_counter()
            wall[str(i)] = time.time() * 1000.0
        value = 10 + (i % 100) / 10
        client.publish(f"{args.prefix}/dev0/setpoint/set", json.dumps({"value": value, "id": str(i)}), qos=1)
        time.sleep(random.uniform(0.02, 0.06))
    done.wait(30)
    client.loop_stop()
    took.sort()
    (t0, r0), (t1, r1) = health[0], health[-1]
    request_ms = (t1 - t0) * 1000.0 / max(1, r1 - r0)
    print(json.dumps({
        "count": len(took),
        "ok": ok,
        "p50_ms": round(statistics.median(took), 2),
        "p99_ms": round(took[int(len(took) * 0.99) - 1], 2),
        "max_ms": round(took[-1], 2),
        "request_ms": round(request_ms, 2),
        # Medians of: client -> router, router -> write on the wire (queue wait),
        # write + read-back, result -> client (wall clock, ms resolution).
        "median_parts_ms": [round(statistics.median(p[k] for p in parts), 1) for k in range(4)],
    }))


if __name__ == "__main__":
    main()
