#!/usr/bin/env bash
# What the agent writes to the storage medium per reading (issue 14: the fast path),
# with real parts: a pymodbus slave (tests/fixtures/modbus_slave.py), the release
# fieldbridge binary, an upstream mosquitto on loopback.
#
# For each rate (10, 100, 1000 readings/s), each QoS (1, 2) and each mode (fast path off
# = every reading committed first, as before issue 14; on = the default), three phases:
#   healthy  the upstream broker is up;
#   down     it is stopped (everything goes to the store);
#   back     it is started again (the backlog drains while live readings go on).
# Per phase: the agent's write_bytes - cancelled_write_bytes from /proc/PID/io (what
# the kernel sends to the block device on the process's behalf), the growth of the
# queue file and its WAL, and the readings of the phase (counted by a subscriber on
# the agent's local broker, which gets every reading in process). Prints a table row
# per phase: bytes per reading and MiB per hour.
#
# The load has the shape of the store benchmark's wear rows (BENCHMARKS.md, Store):
# RATE/10 readings every 100 ms (one device polled every 100 ms).
#
# Usage: scripts/bench-flash.sh [SECONDS per phase, default 20] [RATES, default "10 100 1000"]
#   FIELDBRIDGE_BIN  an already built binary (skips the release build)
#   QOS              the QoS levels, default "1 2"
#   MODES            default "off on"
#   HEALTHY_SECS     the healthy phase with the fast path on, default 120: its few
#                    writes (an id reservation every 16,384 readings, counters every
#                    10 minutes) need a longer look than a phase that writes every row
#   COMMIT_MS        store.commit_interval_ms, default 100
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
export PATH="$PATH:/usr/sbin:/sbin"

secs="${1:-20}"
rates="${2:-10 100 1000}"
qos_levels="${QOS:-1 2}"
modes="${MODES:-off on}"
healthy_secs="${HEALTHY_SECS:-120}"
commit_ms="${COMMIT_MS:-100}"

bin="${FIELDBRIDGE_BIN:-}"
if [ -z "$bin" ]; then
    cargo build --release --locked >/dev/null
    bin=target/release/fieldbridge
fi
# The queue must live on a disk filesystem: on tmpfs nothing reaches a block device.
data="$(mktemp -d -p "${BENCH_DIR:-$PWD/target}" flash.XXXXXX)"
trap 'cleanup; rm -rf "$data"' EXIT
echo "binary $bin; queue on $(df -T "$data" | awk 'NR == 2 {print $2}') ($data); ${secs} s per phase (healthy with the fast path: ${healthy_secs} s); commit_interval_ms = $commit_ms"

python3 - "$work/image.json" <<'EOF'
import json, sys
units = {str(u): {"holding": {"0": [u * 100 + i for i in range(100)]}} for u in range(1, 11)}
json.dump({"units": units}, open(sys.argv[1], "w"))
EOF
start_slave "$work/image.json"

up_port=$(free_port)
upstream_conf "$up_port" "$work/mosquitto.conf"
upstream=""
start_upstream() {
    mosquitto -c "$work/mosquitto.conf" >>"$work/mosquitto.log" 2>&1 &
    upstream=$!
    pids+=("$upstream")
    wait_port "$up_port"
}
stop_upstream() {
    kill -TERM "$upstream"
    wait "$upstream" 2>/dev/null || true
}

local_port=$(free_port)
# write_config RATE QOS FAST: RATE readings/s as RATE/10 points of one device polled
# every 100 ms.
write_config() {
    local rate=$1 qos=$2 fast=$3
    local devices=1 points=$(((rate + 9) / 10))
    cat >"$work/fieldbridge.toml" <<EOF
[agent]
prefix = "bench"
log_level = "warn"
health_interval_secs = 3600
qos = $qos
retain = false

[broker]
[[broker.listeners]]
bind = "127.0.0.1:$local_port"

[store]
path = "$data/queue.db"
fast_path = $fast
commit_interval_ms = $commit_ms

[upstream]
url = "mqtt://127.0.0.1:$up_port"
client_id = "fieldbridge-flash"
backoff_min_ms = 100
backoff_max_ms = 500

[[bus]]
name = "plant"
kind = "tcp"
host = "127.0.0.1"
port = $slave_port
EOF
    for unit in $(seq 1 "$devices"); do
        printf '\n[[bus.device]]\nname = "dev%s"\nunit_id = %s\npoll_interval_ms = 100\nprofile = "p%s"\n' \
            "$unit" "$unit" "$points" >>"$work/fieldbridge.toml"
    done
    printf '\n[profile.p%s]\n' "$points" >>"$work/fieldbridge.toml"
    for i in $(seq 0 $((points - 1))); do
        printf '[[profile.p%s.point]]\nname = "r%s"\nkind = "holding"\naddress = %s\n' "$points" "$i" "$i" \
            >>"$work/fieldbridge.toml"
    done
}

written() { awk '/^write_bytes/ {w = $2} /^cancelled_write_bytes/ {c = $2} END {print w - c}' "/proc/$1/io"; }
files() { stat -c %s "$data"/queue.db "$data"/queue.db-wal 2>/dev/null | awk '{s += $1} END {print s + 0}'; }

# phase NAME [SECONDS]: measures the running agent ($secs by default), prints a row.
phase() {
    local w0 f0 w1 f1 n len=${2:-$secs}
    timeout "$len" mosquitto_sub -h 127.0.0.1 -p "$local_port" -t 'bench/+/+' >"$work/readings" 2>/dev/null &
    local counter=$!
    w0=$(written "$agent")
    f0=$(files)
    wait "$counter" || true
    w1=$(written "$agent")
    f1=$(files)
    n=$(wc -l <"$work/readings")
    [ "$n" -gt 0 ] || n=1
    printf '| %5s/s | QoS %s | %-3s | %-7s | %8d | %9.1f | %9.2f | %9.1f |\n' \
        "$rate" "$qos" "$fast_word" "$1" "$n" \
        "$(echo "($w1 - $w0) / $n" | bc -l)" \
        "$(echo "($w1 - $w0) * 3600 / $len / 1048576" | bc -l)" \
        "$(echo "($f1 - $f0) / $n" | bc -l)"
}

echo
echo "| rate | QoS | fast path | phase | readings | B/reading (io) | MiB/h (io) | B/reading (file growth) |"
echo "|---|---|---|---|---|---|---|---|"
start_upstream
for rate in $rates; do
    for qos in $qos_levels; do
        for mode in $modes; do
            fast_word=$mode
            fast=$([ "$mode" = on ] && echo true || echo false)
            write_config "$rate" "$qos" "$fast"
            rm -f "$data"/queue.db*
            "$bin" run --config "$work/fieldbridge.toml" 2>>"$work/agent.log" &
            agent=$!
            pids+=("$agent")
            wait_port "$local_port"
            sleep 5 # warm-up: first polls, connection, the store's first checkpoint
            if [ "$mode" = on ]; then phase healthy "$healthy_secs"; else phase healthy; fi
            stop_upstream
            phase down
            start_upstream
            phase back
            kill -TERM "$agent"
            wait "$agent" 2>/dev/null || true
        done
    done
done
if grep -qE "ERROR|panicked" "$work/agent.log"; then
    echo "agent log:" >&2
    grep -E "ERROR|panicked" "$work/agent.log" | head >&2
fi
