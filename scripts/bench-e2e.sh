#!/usr/bin/env bash
# End-to-end benchmark with real parts: a pymodbus slave with 10 units × 50 holding
# registers (tests/fixtures/modbus_slave.py), the release fieldbridge binary, an
# upstream mosquitto, mosquitto_sub upstream and on the local broker.
#
# Reports:
#   - RSS of the agent idle (local broker + upstream, no bus);
#   - RSS and CPU% with 10 devices × 50 points polled every second;
#   - the same with 100 LAN subscribers (mosquitto_sub '#') on the local broker;
#   - points/s from the slave to the upstream subscriber, each device on its own bus (its own TCP connection) polled as
#     fast as the slave answers.
#
# Usage: scripts/bench-e2e.sh [SECONDS per measurement, default 30]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
export PATH="$PATH:/usr/sbin:/sbin"

secs="${1:-30}"


# FIELDBRIDGE_BIN: an already built binary (skips the release build).
bin="${FIELDBRIDGE_BIN:-}"
if [ -z "$bin" ]; then
    cargo build --release --locked >/dev/null
    bin=target/release/fieldbridge
fi
echo "binary $bin: $(stat -c %s "$bin") bytes ($(numfmt --to=iec-i --suffix=B "$(stat -c %s "$bin")"))"

slave_port=$(free_port)
python3 - "$work/image.json" <<'EOF'
import json, sys
units = {str(u): {"holding": {"0": [u * 100 + i for i in range(50)]}} for u in range(1, 11)}
json.dump({"units": units}, open(sys.argv[1], "w"))
EOF
python3 tests/fixtures/modbus_slave.py --tcp "$slave_port" --image "@$work/image.json" >"$work/slave.log" 2>&1 &
pids+=($!)
wait_port "$slave_port"

up_port=$(free_port)
cat >"$work/mosquitto.conf" <<EOF
listener $up_port 127.0.0.1
allow_anonymous true
max_queued_messages 0
EOF
[ "$(id -u)" -eq 0 ] && echo "user root" >>"$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
pids+=($!)
wait_port "$up_port"

local_port=$(free_port)
write_config() { # $1 = poll interval in ms, or "none" for no bus
    cat >"$work/fieldbridge.toml" <<EOF
[agent]
prefix = "bench"
log_level = "warn"
health_interval_secs = 30

[broker]
[[broker.listeners]]
bind = "127.0.0.1:$local_port"

[store]
path = "$work/queue.db"

[upstream]
url = "mqtt://127.0.0.1:$up_port"
client_id = "fieldbridge-bench"
EOF
    [ "$1" = none ] && return
    for unit in $(seq 1 10); do
        # $2: "one-bus" (one TCP connection, requests in turn) or "bus-per-device"
        # (ten connections, requests in parallel).
        if [ "$unit" = 1 ] || [ "$2" = bus-per-device ]; then
            printf '\n[[bus]]\nname = "bus%s"\nkind = "tcp"\nhost = "127.0.0.1"\nport = %s\n' \
                "$unit" "$slave_port" >>"$work/fieldbridge.toml"
        fi
        printf '\n[[bus.device]]\nname = "dev%s"\nunit_id = %s\npoll_interval_ms = %s\nprofile = "fifty"\n' \
            "$unit" "$unit" "$1" >>"$work/fieldbridge.toml"
    done
    printf '\n[profile.fifty]\n' >>"$work/fieldbridge.toml"
    for i in $(seq 0 49); do
        printf '[[profile.fifty.point]]\nname = "p%s"\nkind = "holding"\naddress = %s\n' "$i" "$i" \
            >>"$work/fieldbridge.toml"
    done
}

start_agent() {
    rm -f "$work"/queue.db*
    "$bin" run --config "$work/fieldbridge.toml" 2>>"$work/agent.log" &
    agent=$!
    pids+=("$agent")
    wait_port "$local_port"
}
stop_agent() {
    kill -TERM "$agent"
    wait "$agent" 2>/dev/null || true
}
# CPU% of one core over $secs seconds.
measure_cpu() {
    local t0 t1
    t0=$(cpu_ticks "$agent")
    sleep "$secs"
    t1=$(cpu_ticks "$agent")
    echo "scale=2; ($t1 - $t0) * 100 / $(getconf CLK_TCK) / $secs" | bc
}

write_config none
start_agent
sleep 3
echo "idle (local broker + upstream, no bus): RSS $(rss_kib "$agent") KiB"
stop_agent

write_config 1000 one-bus
start_agent
sleep 5
cpu=$(measure_cpu)
echo "10 devices x 50 points at 1 s: RSS $(rss_kib "$agent") KiB, CPU ${cpu}% of one core"

subs=()
for _ in $(seq 1 100); do
    mosquitto_sub -h 127.0.0.1 -p "$local_port" -t 'bench/#' >/dev/null 2>&1 &
    subs+=($!)
done
sleep 5
cpu=$(measure_cpu)
echo "same with 100 LAN subscribers on '#': RSS $(rss_kib "$agent") KiB, CPU ${cpu}% of one core"
kill "${subs[@]}" 2>/dev/null || true
stop_agent

write_config 10 bus-per-device
start_agent
sleep 3
timeout "$secs" mosquitto_sub -h 127.0.0.1 -p "$up_port" -t 'bench/+/+' -q 1 >"$work/received" &
counter=$!
slave_t0=$(cpu_ticks "${pids[0]}")
cpu=$(measure_cpu)
slave_t1=$(cpu_ticks "${pids[0]}")
wait "$counter" || true
count=$(wc -l <"$work/received")
slave_cpu=$(echo "scale=1; ($slave_t1 - $slave_t0) * 100 / $(getconf CLK_TCK) / $secs" | bc)
echo "throughput slave -> upstream subscriber (10 buses, one device each, polled as fast as the slave answers): $((count / secs)) points/s; agent CPU ${cpu}%, RSS $(rss_kib "$agent") KiB; pymodbus slave CPU ${slave_cpu}%"
stop_agent
