#!/usr/bin/env bash
# The full-disk fault, end to end, with real parts: the fieldbridge binary with its
# store on a small tmpfs, a pymodbus slave polled fast, the LAN broker watched by
# mosquitto_sub, and an upstream mosquitto that is down until the store is full.
#
#   1. fill:     upstream down; readings fill the store until the disk is full (the
#                store reports "full", the memory buffer overflows, drops are counted);
#                polling, LAN readings and health reports must go on.
#   2. restart:  SIGTERM, the rest of the filesystem filled by another file (as a
#                runaway log would), the agent started again on the full disk: it must
#                come up, poll and serve the LAN.
#   3. upstream: mosquitto started; the backlog drains while the disk is still full;
#                every delivered row must be deleted and the file must shrink.
#   4. space:    the other file removed; the store must accept readings again.
#
# Prints rows accepted (committed), delivered, dropped by reason, left, what the
# upstream subscriber received, and the WAL and file sizes seen.
#
# Needs root (mount -t tmpfs), mosquitto, mosquitto_sub, python3 with pymodbus.
# Usage: scripts/fault-full-disk.sh [tmpfs size, default 16m]
# FIELDBRIDGE_BIN: an already built binary (skips the release build).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"

size="${1:-16m}"
work="$(mktemp -d)"
disk="$work/disk"
pids=()
agent=""
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    umount -l "$disk" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 1 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listens on $1" >&2
    exit 1
}
# The last health report's field $1 (a Python expression on `h`), or "" before any.
health() {
    python3 - "$work/health.log" "$1" <<'EOF'
import json, sys
lines = [l for l in open(sys.argv[1]) if l.strip()]
if not lines:
    sys.exit(0)
h = json.loads(lines[-1].split(" ", 1)[1])
try:
    print(eval(sys.argv[2]))
except (KeyError, TypeError):
    print("")
EOF
}
# Waits up to $2 seconds for the Python condition $1 on the last health report.
wait_health() {
    for _ in $(seq 1 $(($2 * 5))); do
        [ "$(health "$1")" = True ] && return 0
        sleep 0.2
    done
    echo "timed out after $2 s waiting for: $1" >&2
    echo "last health report: $(tail -n1 "$work/health.log")" >&2
    tail -n 20 "$work/agent.log" >&2
    exit 1
}
lan_count() { wc -l <"$work/lan.log"; }
file_size() { stat -c %s "$1" 2>/dev/null || echo 0; }

mkdir -p "$disk"
if ! mount -t tmpfs -o "size=$size,mode=0700" tmpfs "$disk"; then
    echo "cannot mount a tmpfs (needs root); the unit tests cover the faults with max_page_count" >&2
    exit 2
fi

bin="${FIELDBRIDGE_BIN:-}"
if [ -z "$bin" ]; then
    cargo build --release --locked >/dev/null
    bin=target/release/fieldbridge
fi

# 4 units x 50 counter registers, each read bumps the value: every poll is new data.
slave_port=$(free_port)
python3 - "$work/image.json" <<'EOF'
import json, sys
units = {str(u): {"holding": {"0": [0] * 50},
                  "counter": [{"kind": "holding", "address": a} for a in range(50)]}
         for u in range(1, 5)}
json.dump({"units": units}, open(sys.argv[1], "w"))
EOF
python3 tests/fixtures/modbus_slave.py --tcp "$slave_port" --image "@$work/image.json" >"$work/slave.log" 2>&1 &
pids+=($!)
wait_port "$slave_port"

up_port=$(free_port)
local_port=$(free_port)
cat >"$work/fieldbridge.toml" <<EOF
[agent]
prefix = "fb"
log_level = "info"
health_interval_secs = 1

[broker]
[[broker.listeners]]
bind = "127.0.0.1:$local_port"

[store]
path = "$disk/queue.db"
memory_buffer_rows = 20000

[upstream]
url = "mqtt://127.0.0.1:$up_port"
client_id = "fieldbridge-fault"
backoff_min_ms = 100
backoff_max_ms = 500
EOF
for unit in $(seq 1 4); do
    printf '\n[[bus]]\nname = "bus%s"\nkind = "tcp"\nhost = "127.0.0.1"\nport = %s\n' \
        "$unit" "$slave_port" >>"$work/fieldbridge.toml"
    printf '\n[[bus.device]]\nname = "dev%s"\nunit_id = %s\npoll_interval_ms = 10\nprofile = "fifty"\n' \
        "$unit" "$unit" >>"$work/fieldbridge.toml"
done
printf '\n[profile.fifty]\n' >>"$work/fieldbridge.toml"
for i in $(seq 0 49); do
    printf '[[profile.fifty.point]]\nname = "p%s"\nkind = "holding"\naddress = %s\ntype = "u16"\n' "$i" "$i" \
        >>"$work/fieldbridge.toml"
done

start_agent() {
    "$bin" run --config "$work/fieldbridge.toml" 2>>"$work/agent.log" &
    agent=$!
    pids+=("$agent")
    wait_port "$local_port"
    : >"$work/health.log"
    : >"$work/lan.log"
    mosquitto_sub -h 127.0.0.1 -p "$local_port" -t fb/health -v >>"$work/health.log" 2>/dev/null &
    pids+=($!)
    mosquitto_sub -h 127.0.0.1 -p "$local_port" -t 'fb/+/+' >>"$work/lan.log" 2>/dev/null &
    pids+=($!)
}
stop_agent() {
    kill -TERM "$agent"
    wait "$agent" 2>/dev/null || true
}

# The largest WAL seen, sampled every 0.2 s for the whole run.
( max=0; while sleep 0.2; do
      s=$(file_size "$disk/queue.db-wal"); [ "$s" -gt "$max" ] && max=$s && echo "$max" >"$work/wal.max"
  done ) &
pids+=($!)

echo "== 1. fill: store on a $size tmpfs, upstream down"
t0=$(date +%s)
start_agent
wait_health 'h["disk"]["state"] == "full" and h["queue"]["dropped"]["disk_full"] > 0' 600
echo "disk full after $(($(date +%s) - t0)) s: $(health 'h["disk"]')"
lan0=$(lan_count); health0=$(wc -l <"$work/health.log"); sleep 5
echo "while full, in 5 s: $(($(lan_count) - lan0)) readings on the LAN, $(($(wc -l <"$work/health.log") - health0)) health reports"
echo "file $(file_size "$disk/queue.db") bytes, WAL $(file_size "$disk/queue.db-wal") bytes, free $(df -B1 --output=avail "$disk" | tail -n1) bytes"

echo "== 2. restart on a full disk"
stop_agent
dd if=/dev/zero of="$disk/other-file" bs=64k 2>/dev/null || true
echo "free after filling with another file: $(df -B1 --output=avail "$disk" | tail -n1) bytes"
t1=$(date +%s%N)
start_agent
wait_health 'h["disk"]["state"] in ("full", "writable")' 30
echo "agent up and reporting $((($(date +%s%N) - t1) / 1000000)) ms after start: $(health 'h["disk"]')"
lan0=$(lan_count); sleep 5
echo "after the restart, in 5 s: $(($(lan_count) - lan0)) readings on the LAN"
grep -E "store full|exclusive|reserve|store opened" "$work/agent.log" | tail -n 4 | sed 's/^/  log: /'

echo "== 3. upstream back, disk still full"
cat >"$work/mosquitto.conf" <<EOF
listener $up_port 127.0.0.1
allow_anonymous true
max_queued_messages 0
EOF
[ "$(id -u)" -eq 0 ] && echo "user root" >>"$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
pids+=($!)
wait_port "$up_port"
mosquitto_sub -h 127.0.0.1 -p "$up_port" -t 'fb/+/+' -q 1 >"$work/upstream.log" 2>/dev/null &
pids+=($!)
depth0=$(health 'h["queue"]["depth"]'); file0=$(file_size "$disk/queue.db")
t2=$(date +%s)
# Live readings keep coming: "drained" is a queue down to what one second brings.
wait_health 'h["queue"]["depth"] < 5000 and h["upstream"]["state"] == "connected"' 600
echo "backlog of $depth0 rows drained in $(($(date +%s) - t2)) s: $(health 'h["queue"]["depth"]') left, $(health 'h["queue"]["delivered"]') delivered in total"
sleep 3
echo "file $file0 -> $(file_size "$disk/queue.db") bytes, WAL $(file_size "$disk/queue.db-wal") bytes; disk $(health 'h["disk"]')"

echo "== 4. space returns"
rm -f "$disk/other-file"
wait_health 'h["disk"]["state"] == "writable"' 60
echo "store writable again: $(health 'h["disk"]')"
sleep 2
stop_agent
sleep 1

echo "== figures (queue stats after the run; counters since the file was created)"
"$bin" queue stats --config "$work/fieldbridge.toml" >"$work/stats.json"
python3 - "$work/stats.json" "$work/upstream.log" "$work/wal.max" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
received = sum(1 for _ in open(sys.argv[2]))
wal = open(sys.argv[3]).read().strip() if len(sys.argv) > 3 else "?"
d = s["dropped"]
print(f"rows accepted (committed): {s['appended']}")
print(f"rows delivered (acked upstream, deleted): {s['delivered']}")
print("rows dropped by reason: " + ", ".join(f"{k}={v}" for k, v in d.items()))
print(f"rows left in the store: {s['depth']}")
print(f"messages the upstream subscriber received: {received}")
# Every committed row is delivered, left, or dropped after its commit (retention, or
# drop_oldest evicting stored rows on a full disk; disk_full also counts batches
# dropped from the memory buffer, which were never committed).
unexplained = s["appended"] - s["delivered"] - s["depth"] - d["max_rows"] - d["max_bytes"] - d["max_age"] - d["disk_full"]
print(f"committed rows neither delivered, left nor counted as dropped: {max(unexplained, 0)}")
print(f"largest WAL seen: {wal} bytes; file now {s['file_bytes']} bytes; commit failures {s['commit_failures']}")
EOF
