#!/usr/bin/env bash
# Memory of the LAN broker under session abuse, with real parts: the release fieldbridge
# binary (LAN-only, persistence file on), a pymodbus slave with 10 units x 50 holding
# registers polled every second (500 readings/s), a live mosquitto_sub on the readings.
#
# Steps, with the agent's RSS after each:
#   1. idle, polling;
#   2. 50,000 distinct persistent sessions (clean session 0, one subscription each,
#      then DISCONNECT), by a raw-socket client (scripts/session_flood.py);
#   3. 2,000 more persistent sessions subscribed to the readings at QoS 1, offline,
#      while readings flow for SECONDS: their queues fill up to the broker-wide budget;
#   4. kill -9 and a restart: what the persistence file brings back.
# It prints the broker's counters ($SYS), and how many readings the live subscriber
# got during step 3 against how many were polled (the agent's readings still served).
#
# The budget this checks: RSS stays under BUDGET_MIB (default 64) at every step.
#
# Usage: scripts/broker-memory-abuse.sh [SECONDS, default 30]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
export PATH="$PATH:/usr/sbin:/sbin"

secs="${1:-30}"
budget_mib="${BUDGET_MIB:-64}"
sessions="${SESSIONS:-50000}"
subscribers="${SUBSCRIBERS:-2000}"
# PERSIST=0: no persistence file (the queues in memory only), for comparison.
persist="${PERSIST:-1}"
# BROKER_KEYS: extra [broker] lines, e.g. "max_queued_bytes_total = 8388608".
broker_keys="${BROKER_KEYS:-}"

worst=0
report() { # $1 = step name
    local rss
    rss=$(rss_kib "$agent")
    [ "$rss" -gt "$worst" ] && worst=$rss
    printf '%-58s RSS %6d KiB (%s MiB)\n' "$1" "$rss" "$(echo "scale=1; $rss / 1024" | bc)"
}
sys_value() { # $1 = $SYS topic
    mosquitto_sub -h 127.0.0.1 -p "$port" -t "$1" -C 1 -W 5 2>/dev/null || echo "?"
}

bin="${FIELDBRIDGE_BIN:-}"
if [ -z "$bin" ]; then
    cargo build --release --locked >/dev/null
    bin=target/release/fieldbridge
fi

slave_port=$(free_port)
python3 - "$work/image.json" <<'EOF'
import json, sys
units = {str(u): {"holding": {"0": [u * 100 + i for i in range(50)]}} for u in range(1, 11)}
json.dump({"units": units}, open(sys.argv[1], "w"))
EOF
python3 tests/fixtures/modbus_slave.py --tcp "$slave_port" --image "@$work/image.json" >"$work/slave.log" 2>&1 &
pids+=($!)
wait_port "$slave_port" 20

port=$(free_port)
cat >"$work/fieldbridge.toml" <<EOF
[agent]
prefix = "plant"
log_level = "info"
health_interval_secs = 30

[broker]
sys_interval_secs = 1
$broker_keys
[[broker.listeners]]
bind = "127.0.0.1:$port"

[[bus]]
name = "plc"
kind = "tcp"
host = "127.0.0.1"
port = $slave_port
EOF
[ "$persist" = 1 ] && sed -i "s|^\[broker\]|[broker]\npersistence_path = \"$work/broker.db\"|" "$work/fieldbridge.toml"
for unit in $(seq 1 10); do
    printf '\n[[bus.device]]\nname = "dev%s"\nunit_id = %s\npoll_interval_ms = 1000\nprofile = "fifty"\n' \
        "$unit" "$unit" >>"$work/fieldbridge.toml"
done
printf '\n[profile.fifty]\n' >>"$work/fieldbridge.toml"
for i in $(seq 0 49); do
    printf '[[profile.fifty.point]]\nname = "p%s"\nkind = "holding"\naddress = %s\n' "$i" "$i" \
        >>"$work/fieldbridge.toml"
done
"$bin" check-config --config "$work/fieldbridge.toml" >/dev/null

start_agent() {
    "$bin" run --config "$work/fieldbridge.toml" 2>>"$work/agent.log" &
    agent=$!
    pids+=("$agent")
    wait_port "$port" 20
}

echo "binary $bin; budget ${budget_mib} MiB RSS; broker defaults: max_sessions 5000, max_queued_bytes_total 8 MiB"
start_agent
sleep 3
report "1. idle, 10 devices x 50 points polled at 1 s"

start=$(date +%s.%N)
python3 scripts/session_flood.py --port "$port" --sessions "$sessions" --prefix abuse \
    --filter 'abuse/{i}'
echo "   ($sessions sessions in $(echo "$(date +%s.%N) - $start" | bc | cut -c1-5) s)"
sleep 2
report "2. after $sessions persistent sessions"

python3 scripts/session_flood.py --port "$port" --sessions "$subscribers" --prefix offline \
    --filter 'plant/#' --qos 1
mosquitto_sub -h 127.0.0.1 -p "$port" -t 'plant/+/+' -q 1 >"$work/live.txt" 2>/dev/null &
live=$!
pids+=("$live")
sleep "$secs"
kill "$live"
report "3. $subscribers offline subscribers, readings for ${secs} s"
got=$(wc -l <"$work/live.txt")
echo "   live subscriber: $got readings in ${secs} s (polled: ~$((500 * secs)))"
for t in clients/total messages/queued/bytes messages/dropped messages/dropped/budget clients/evicted; do
    echo "   \$SYS/broker/$t = $(sys_value "\$SYS/broker/$t")"
done
[ "$persist" = 1 ] && echo "   persistence file: $(du -k "$work"/broker.db* | awk '{s += $1} END {print s}') KiB"

kill -9 "$agent"
wait "$agent" 2>/dev/null || true
start_agent
sleep 3
report "4. after kill -9 and a restart"
grep "restored broker state" "$work/agent.log" | tail -1 | sed 's/^/   /'
echo "   \$SYS/broker/clients/total = $(sys_value '$SYS/broker/clients/total')"
echo "   log lines about evicted sessions: $(grep -c 'too many offline sessions' "$work/agent.log" || true)"

echo "worst RSS $worst KiB ($(echo "scale=1; $worst / 1024" | bc) MiB), budget $budget_mib MiB"
if [ "$worst" -gt $((budget_mib * 1024)) ]; then
    echo "OVER BUDGET" >&2
    exit 1
fi
