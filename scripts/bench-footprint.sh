#!/usr/bin/env bash
# Footprint of the agent (issue 14), real parts only.
#
# 1. The gateway load: five independent pymodbus slaves (tests/fixtures/modbus_slave.py),
#    each with 2 units × 50 holding registers, one TCP bus per slave, 10 devices × 50
#    points polled every second; the LAN broker with 100 idle subscribed connections
#    (examples/mqtt_load.rs `idle`: each subscribes to a topic of its own, which nothing
#    publishes to); `[http]` on; no upstream. Reports VmRSS (and its anonymous and file
#    parts), VmHWM, threads, and CPU (user + system) in % of one core over the window.
# 2. What an idle subscribed LAN connection costs: fieldbridge `run` with a broker-only
#    config beside Debian's mosquitto, a fresh process of each for every count (1,000
#    and 5,000 by default), the same generator; (RSS with the connections − RSS before)
#    / connections.
#
# Each binary of the run (BEFORE_BIN, then FIELDBRIDGE_BIN) is measured in the same run,
# against the same slaves, one after the other.
#
# Usage: scripts/bench-footprint.sh [SECONDS of the CPU window, default 30]
#        FIELDBRIDGE_BIN=path  an already built binary (skips the release build)
#        BEFORE_BIN=path       also measure an older build, same run
#        CONNS="1000 5000"     connection counts of part 2 ("" skips it)
#        MQTT_LOAD=path        an already built examples/mqtt_load
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
export PATH="$PATH:/usr/sbin:/sbin"
ulimit -n 16384 2>/dev/null || ulimit -n "$(ulimit -Hn)"

secs="${1:-30}"
CONNS=${CONNS-"1000 5000"}
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
[ -x "$MOSQUITTO" ] || { echo "mosquitto not found: apt-get install mosquitto" >&2; exit 1; }

bin="${FIELDBRIDGE_BIN:-}"
if [ -z "$bin" ]; then
    cargo build --release --locked >/dev/null
    bin=target/release/fieldbridge
fi
# The generator only opens idle connections: a debug build does. MQTT_LOAD: one
# already built.
LOAD=${MQTT_LOAD:-}
if [ -z "$LOAD" ]; then
    cargo build --locked --example mqtt_load 2>&1 | tail -1
    LOAD=target/debug/examples/mqtt_load
fi

builds=()
[ -n "${BEFORE_BIN:-}" ] && builds+=("before=$BEFORE_BIN")
builds+=("after=$bin")
for b in "${builds[@]}"; do
    echo "${b%%=*}: ${b#*=}, $(stat -c %s "${b#*=}") bytes"
done
echo "$(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"

status_kib() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }

# --- 1. the gateway load --------------------------------------------------------------
slave_ports=()
for slave in $(seq 0 4); do
    port=$(free_port)
    python3 - "$work/image$slave.json" "$slave" <<'EOF'
import json, sys
slave = int(sys.argv[2])
units = {str(u): {"holding": {"0": [slave * 1000 + u * 100 + i for i in range(50)]}} for u in (1, 2)}
json.dump({"units": units}, open(sys.argv[1], "w"))
EOF
    python3 tests/fixtures/modbus_slave.py --tcp "$port" --image "@$work/image$slave.json" \
        >"$work/slave$slave.log" 2>&1 &
    pids+=($!)
    slave_ports+=("$port")
done
for port in "${slave_ports[@]}"; do wait_port "$port"; done

local_port=$(free_port)
http_port=$(free_port)
{
    cat <<EOF
[agent]
prefix = "bench"
log_level = "warn"
health_interval_secs = 30

[broker]
allow_anonymous = true
[[broker.listeners]]
bind = "127.0.0.1:$local_port"

[http]
bind = "127.0.0.1:$http_port"
EOF
    for slave in $(seq 0 4); do
        printf '\n[[bus]]\nname = "bus%s"\nkind = "tcp"\nhost = "127.0.0.1"\nport = %s\n' \
            "$slave" "${slave_ports[$slave]}"
        for unit in 1 2; do
            printf '\n[[bus.device]]\nname = "dev%s_%s"\nunit_id = %s\npoll_interval_ms = 1000\nprofile = "fifty"\n' \
                "$slave" "$unit" "$unit"
        done
    done
    printf '\n[profile.fifty]\n'
    for i in $(seq 0 49); do
        printf '[[profile.fifty.point]]\nname = "p%s"\nkind = "holding"\naddress = %s\n' "$i" "$i"
    done
} >"$work/gateway.toml"

declare -A gateway
for b in "${builds[@]}"; do
    name=${b%%=*} path=${b#*=}
    "$path" run --config "$work/gateway.toml" 2>"$work/agent-$name.log" &
    agent=$!
    pids+=("$agent")
    wait_port "$local_port"
    wait_port "$http_port"
    "$LOAD" idle --port "$local_port" --conns 100 --hold $((secs + 60)) >"$work/idle-$name" &
    gen=$!
    pids+=("$gen")
    for _ in $(seq 200); do grep -q ready "$work/idle-$name" 2>/dev/null && break; sleep 0.05; done
    grep -q ready "$work/idle-$name" || { echo "idle subscribers did not come up" >&2; exit 1; }
    # The readings flow: one poll cycle of every device reaches a LAN subscriber.
    got=$(timeout 10 mosquitto_sub -h 127.0.0.1 -p "$local_port" -t 'bench/+/+' -C 500 | wc -l)
    [ "$got" -eq 500 ] || { echo "$name: only $got readings in 10 s" >&2; exit 1; }
    curl -sf "http://127.0.0.1:$http_port/metrics" >/dev/null || { echo "$name: no /metrics" >&2; exit 1; }
    sleep 5
    t0=$(cpu_ticks "$agent")
    sleep "$secs"
    t1=$(cpu_ticks "$agent")
    cpu=$(echo "scale=2; ($t1 - $t0) * 100 / $(getconf CLK_TCK) / $secs" | bc)
    # Where the resident pages are: the binary, the shared libraries, the heap, the rest.
    where=$(awk -v bin="$(readlink -f "$path")" '
        /^[0-9a-f]+-[0-9a-f]+ / { name = $6 }
        /^Rss:/ {
            if (name == bin) b += $2; else if (name ~ /^\//) l += $2;
            else if (name == "[heap]") h += $2; else o += $2
        }
        END { printf "%d | %d | %d | %d", b, l, h, o }' "/proc/$agent/smaps")
    gateway[$name]="| $name | $where | $(status_kib "$agent" VmRSS) | $(status_kib "$agent" RssAnon) | $(status_kib "$agent" RssFile) | $(status_kib "$agent" VmHWM) | $(awk '$1 == "Threads:" {print $2}' "/proc/$agent/status") | $cpu % |"
    echo "gateway $name: ${gateway[$name]}" >&2
    kill "$gen" 2>/dev/null || true
    wait "$gen" 2>/dev/null || true
    kill -TERM "$agent"
    wait "$agent" 2>/dev/null || true
done

# --- 2. idle subscribed connections ----------------------------------------------------
cat >"$work/mosquitto.conf" <<EOF
listener PORT 127.0.0.1
allow_anonymous true
persistence false
max_connections -1
sys_interval 0
log_dest none
EOF
[ "$(id -u)" -eq 0 ] && echo "user root" >>"$work/mosquitto.conf"

declare -A idle_rss conn_rss
kinds=(mosquitto)
for b in "${builds[@]}"; do kinds+=("${b%%=*}"); done
for n in $CONNS; do
    for kind in "${kinds[@]}"; do
        port=$(free_port)
        case $kind in
            mosquitto)
                sed "s/PORT/$port/" "$work/mosquitto.conf" >"$work/m.conf"
                "$MOSQUITTO" -c "$work/m.conf" >"$work/mosquitto.log" 2>&1 &
                ;;
            *)
                path=
                for b in "${builds[@]}"; do [ "${b%%=*}" = "$kind" ] && path=${b#*=}; done
                printf '[agent]\nlog_level = "warn"\n[broker]\nallow_anonymous = true\nsys_interval_secs = 0\nmax_connections = 10000\n[[broker.listeners]]\nbind = "127.0.0.1:%s"\n' \
                    "$port" >"$work/broker.toml"
                "$path" run --config "$work/broker.toml" >"$work/broker-$kind.log" 2>&1 &
                ;;
        esac
        pid=$!
        pids+=("$pid")
        wait_port "$port"
        sleep 1
        idle_rss[$kind/$n]=$(rss_kib "$pid")
        "$LOAD" idle --port "$port" --conns "$n" --hold 60 >"$work/conns" &
        gen=$!
        for _ in $(seq 1200); do grep -q ready "$work/conns" 2>/dev/null && break; sleep 0.05; done
        grep -q ready "$work/conns" || { echo "$n connections to $kind did not come up" >&2; exit 1; }
        sleep 2
        conn_rss[$kind/$n]=$(rss_kib "$pid")
        kill "$gen" 2>/dev/null || true
        wait "$gen" 2>/dev/null || true
        kill -TERM "$pid"
        wait "$pid" 2>/dev/null || true
        echo "$kind, $n connections: ${idle_rss[$kind/$n]} -> ${conn_rss[$kind/$n]} KiB" >&2
    done
done

echo
echo "Gateway load (10 devices × 50 points at 1 s from 5 slaves, 100 idle LAN subscribers, [http], no upstream), KiB:"
echo
echo "| build | binary | libraries | heap | other | VmRSS | RssAnon | RssFile | VmHWM | threads | CPU (${secs} s) |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for b in "${builds[@]}"; do echo "${gateway[${b%%=*}]}"; done
echo
echo "Idle subscribed connections (RSS before → with them, KiB; per connection):"
echo
header="| connections |"
rule="|---|"
for kind in "${kinds[@]}"; do header+=" $kind |"; rule+="---:|"; done
echo "$header"
echo "$rule"
for n in $CONNS; do
    row="| $n |"
    for kind in "${kinds[@]}"; do
        row+=$(awk -v a="${conn_rss[$kind/$n]}" -v b="${idle_rss[$kind/$n]}" -v n="$n" \
            'BEGIN {printf " %d → %d (%.2f KiB) |", b, a, (a - b) / n}')
    done
    echo "$row"
done
