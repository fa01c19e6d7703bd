#!/usr/bin/env bash
# Side-by-side benchmark of fieldbridge's broker and Debian's mosquitto on loopback.
#
# Both brokers run at once with equivalent limits (20 messages in flight per client,
# queues large enough that nothing is dropped, no persistence, no $SYS). mosquitto keeps
# its default Nagle setting: with set_tcp_nodelay it writes one segment per packet and
# is about half as fast at QoS 0; fieldbridge batches its writes itself.
# the same load generator (examples/mqtt_load.rs) runs against each in turn, the order
# alternating per round. Reports the median of ROUNDS rounds: delivered messages per
# second and p50/p99 latency with publishers going flat out, p50/p99 latency at a fixed
# rate, and RSS idle and with 1000 idle subscribed connections.
#
# Usage: scripts/bench-broker.sh            (ROUNDS=3 by default)
#        ROUNDS=5 scripts/bench-broker.sh
#        WORKER_THREADS=2 scripts/bench-broker.sh   (fieldbridge's runtime threads, as
#        agent.worker_threads; default 1, the agent's default)
#        PROFILE=bench scripts/bench-broker.sh  (quicker build without LTO, for iterating)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ROUNDS=${ROUNDS:-3}
IDLE_CONNS=${IDLE_CONNS:-1000}
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
[ -x "$MOSQUITTO" ] || { echo "mosquitto not found: apt-get install mosquitto" >&2; exit 1; }
ulimit -n 8192 2>/dev/null || ulimit -n "$(ulimit -Hn)"

PROFILE=${PROFILE:-release}
# Both the release and the bench profile put their binaries in target/release.
cargo build --profile "$PROFILE" --example broker --example mqtt_load 2>&1 | tail -1
LOAD=target/release/examples/mqtt_load
BROKER=target/release/examples/broker


port_m=$(free_port)
port_f=$(free_port)
cat > "$work/mosquitto.conf" <<EOF
listener $port_m 127.0.0.1
allow_anonymous true
persistence false
max_inflight_messages 20
max_queued_messages 1000000
max_queued_bytes 0
max_connections -1
sys_interval 0
log_dest none
EOF
cat > "$work/fieldbridge.toml" <<EOF
allow_anonymous = true
max_inflight_messages = 20
max_queued_messages = 1000000
max_queued_bytes = 1073741824
max_connections = 10000
sys_interval_secs = 0
[[listeners]]
bind = "127.0.0.1:$port_f"
EOF
"$MOSQUITTO" -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
pid_m=$!
pids+=("$pid_m")
WORKER_THREADS=${WORKER_THREADS:-1} "$BROKER" --config "$work/fieldbridge.toml" >"$work/fieldbridge.log" 2>&1 &
pid_f=$!
pids+=("$pid_f")
wait_port "$port_m"
wait_port "$port_f"
echo "mosquitto $("$MOSQUITTO" -h 2>&1 | head -1 | awk '{print $3}') on :$port_m (pid $pid_m), fieldbridge on :$port_f (pid $pid_f, ${WORKER_THREADS:-1} runtime threads), $(nproc) cores, $ROUNDS rounds"

# --- memory: idle, then with IDLE_CONNS idle subscribed connections --------------------
declare -A rss_idle rss_conns
measure_idle() {
    local name=$1 port=$2 pid=$3
    sleep 0.5
    rss_idle[$name]=$(rss_kib "$pid")
    local out="$work/idle-$name"
    "$LOAD" idle --port "$port" --conns "$IDLE_CONNS" --hold 15 >"$out" &
    local gen=$!
    for _ in $(seq 300); do grep -q ready "$out" 2>/dev/null && break; sleep 0.05; done
    grep -q ready "$out" || { echo "idle connections to $name did not come up" >&2; exit 1; }
    sleep 1
    rss_conns[$name]=$(rss_kib "$pid")
    kill "$gen" 2>/dev/null || true
    wait "$gen" 2>/dev/null || true
}
measure_idle mosquitto "$port_m" "$pid_m"
measure_idle fieldbridge "$port_f" "$pid_f"

# --- throughput and latency -----------------------------------------------------------
count_for() { # scenario qos -> messages per publisher
    case "$1/$2" in
        fanin/0) echo 50000 ;; fanin/1) echo 25000 ;; fanin/2) echo 10000 ;;
        fanout/0) echo 20000 ;; fanout/1) echo 10000 ;; fanout/2) echo 5000 ;;
    esac
}
PACED_RATE=${PACED_RATE:-1000}
declare -A results paced
run_one() { # name port scenario qos
    local line
    line=$("$LOAD" "$3" --port "$2" --qos "$4" --count "$(count_for "$3" "$4")" --timeout 60)
    results[$1/$3/$4]+="$line"$'\n'
    # The same at a fixed, modest rate: latency of the broker itself, not of its queues.
    line=$("$LOAD" "$3" --port "$2" --qos "$4" --rate "$PACED_RATE" --count $((PACED_RATE * 2)) --timeout 60)
    paced[$1/$3/$4]+="$line"$'\n'
}
for round in $(seq "$ROUNDS"); do
    for scenario in fanin fanout; do
        for qos in 0 1 2; do
            if (( round % 2 )); then
                run_one mosquitto "$port_m" "$scenario" "$qos"
                run_one fieldbridge "$port_f" "$scenario" "$qos"
            else
                run_one fieldbridge "$port_f" "$scenario" "$qos"
                run_one mosquitto "$port_m" "$scenario" "$qos"
            fi
        done
    done
    echo "round $round done" >&2
done

median() { # field name of key=value lines on stdin -> median value
    sed -n "s/.*\b$1=\([0-9.]*\).*/\1/p" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}
stat() { printf '%s' "${results[$1]}" | median "$2"; }
pstat() { printf '%s' "${paced[$1]}" | median "$2"; }

echo
echo "| scenario | QoS | mosquitto msg/s | fieldbridge msg/s | ratio | mosquitto p50 / p99 µs | fieldbridge p50 / p99 µs | delivered (fb) |"
echo "|---|---|---:|---:|---:|---:|---:|---:|"
for scenario in fanin fanout; do
    label=$([ "$scenario" = fanin ] && echo "fan-in 4→1" || echo "fan-out 1→10")
    for qos in 0 1 2; do
        m=mosquitto/$scenario/$qos f=fieldbridge/$scenario/$qos
        rm_=$(stat "$m" rate) rf=$(stat "$f" rate)
        ratio=$(awk -v a="$rf" -v b="$rm_" 'BEGIN {printf "%.2f×", a/b}')
        got=$(stat "$f" received) want=$(stat "$f" expected)
        echo "| $label | $qos | $rm_ | $rf | $ratio | $(stat "$m" p50_us) / $(stat "$m" p99_us) | $(stat "$f" p50_us) / $(stat "$f" p99_us) | $got/$want |"
    done
done
echo
echo "Latency at a fixed rate ($PACED_RATE msg/s per publisher, 2 s):"
echo
echo "| scenario | QoS | mosquitto p50 / p99 µs | fieldbridge p50 / p99 µs |"
echo "|---|---|---:|---:|"
for scenario in fanin fanout; do
    label=$([ "$scenario" = fanin ] && echo "fan-in 4→1" || echo "fan-out 1→10")
    for qos in 0 1 2; do
        m=mosquitto/$scenario/$qos f=fieldbridge/$scenario/$qos
        echo "| $label | $qos | $(pstat "$m" p50_us) / $(pstat "$m" p99_us) | $(pstat "$f" p50_us) / $(pstat "$f" p99_us) |"
    done
done
echo
echo "| memory | mosquitto | fieldbridge |"
echo "|---|---:|---:|"
echo "| RSS idle | ${rss_idle[mosquitto]} KiB | ${rss_idle[fieldbridge]} KiB |"
echo "| RSS with $IDLE_CONNS idle subscribed connections | ${rss_conns[mosquitto]} KiB | ${rss_conns[fieldbridge]} KiB |"
per() { awk -v a="${rss_conns[$1]}" -v b="${rss_idle[$1]}" -v n="$IDLE_CONNS" 'BEGIN {printf "%.2f KiB", (a-b)/n}'; }
echo "| per idle connection | $(per mosquitto) | $(per fieldbridge) |"
