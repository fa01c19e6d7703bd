#!/usr/bin/env bash
# Command -> result latency on a bus that polls continuously, with real parts: the
# pymodbus slave (tests/fixtures/modbus_slave.py) with 10 units, the release fieldbridge
# binary polling them back to back (poll_interval_ms = 1) on one bus, and a paho-mqtt LAN
# client (scripts/bench_writes.py) that sends commands and times their results.
# Once over Modbus TCP, once over RTU at 19200 baud through a socat pty pair.
#
# Usage: scripts/bench-writes.sh [COMMANDS per bus kind, default 300]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
export PATH="$PATH:/usr/sbin:/sbin"

count="${1:-300}"


# FIELDBRIDGE_BIN: an already built binary (skips the release build).
bin="${FIELDBRIDGE_BIN:-}"
if [ -z "$bin" ]; then
    cargo build --release --locked --quiet
    bin=target/release/fieldbridge
fi

units='{'
for u in $(seq 1 10); do
    units+="\"$u\": {\"holding\": {\"0\": [0,0,0,0,0,0,0,0,0,0]}}"
    [ "$u" -lt 10 ] && units+=','
done
units+='}'
echo "{\"units\": $units}" > "$work/image.json"
echo "topic readwrite bench/#" > "$work/acl"

config() { # $1 = bus table, $2 = broker port
    {
        printf '[agent]\nprefix = "bench"\nhealth_interval_secs = 1\n\n'
        printf '[broker]\nacl_file = "%s"\n[[broker.listeners]]\nbind = "127.0.0.1:%s"\n\n' "$work/acl" "$2"
        printf '%s\n' "$1"
        for u in $(seq 1 10); do
            printf '[[bus.device]]\nname = "dev%s"\nunit_id = %s\npoll_interval_ms = 1\n' $((u - 1)) "$u"
            for a in $(seq 0 9); do
                if [ "$u" = 1 ] && [ "$a" = 0 ]; then
                    printf '[[bus.device.point]]\nname = "setpoint"\nkind = "holding"\naddress = 0\nscale = 0.1\nwritable = true\n'
                else
                    printf '[[bus.device.point]]\nname = "p%s"\nkind = "holding"\naddress = %s\n' "$a" "$a"
                fi
            done
        done
    } > "$work/fieldbridge.toml"
}

measure() { # $1 = label, $2 = bus name
    local port="$3"
    "$bin" run --config "$work/fieldbridge.toml" 2> "$work/agent-$1.log" &
    local agent=$!
    pids+=("$agent")
    wait_port "$port"
    sleep 2
    local line
    line="$(python3 scripts/bench_writes.py --port "$port" --prefix bench --bus "$2" --count "$count")"
    kill "$agent"; wait "$agent" 2>/dev/null || true
    echo "$1: $line"
}

# Modbus TCP.
slave_port="$(free_port)"
python3 tests/fixtures/modbus_slave.py --tcp "$slave_port" --image "@$work/image.json" > /dev/null &
pids+=($!)
wait_port "$slave_port"
broker_port="$(free_port)"
config "$(printf '[[bus]]\nname = "tcp"\nkind = "tcp"\nhost = "127.0.0.1"\nport = %s\n' "$slave_port")" "$broker_port"
measure tcp tcp "$broker_port"

[ "${BENCH_TCP_ONLY:-}" = 1 ] && exit 0
# RTU at 19200 baud over a socat pty pair.
socat "pty,raw,echo=0,link=$work/ttyA" "pty,raw,echo=0,link=$work/ttyB" &
pids+=($!)
for _ in $(seq 1 100); do [ -e "$work/ttyB" ] && break; sleep 0.05; done
python3 tests/fixtures/modbus_slave.py --rtu "$work/ttyB" --baud 19200 --parity N --image "@$work/image.json" > /dev/null &
pids+=($!)
sleep 1
broker_port="$(free_port)"
config "$(printf '[[bus]]\nname = "rtu"\nkind = "rtu"\nport = "%s"\nbaud = 19200\nparity = "none"\n' "$work/ttyA")" "$broker_port"
measure rtu rtu "$broker_port"
