#!/usr/bin/env bash
# Hostile first packets against the built-in broker and Debian's mosquitto, side by side
# in one run (issue 11, part 4). Each scenario runs against a freshly started broker of
# each kind; scripts/hostile_first_packets.py generates the load and reads the broker's
# RSS from /proc:
#
# - 200 connections each announcing a 1 MB PUBLISH as their first packet and sending
#   all of it but the last byte as fast as the broker takes it, then waiting;
# - the same with a 1 MB CONNECT;
# - 200 connections each sending 60,000 bytes of a 60,001-byte CONNECT and waiting;
# - time from a bad first byte (0x30) to the broker closing the connection;
# - 1100 idle connections that never send CONNECT (more than the default
#   max_connections of 1024), then how long a real client takes to get in.
#
# Usage: scripts/bench-hostile.sh
#        PROFILE=bench scripts/bench-hostile.sh           (quicker build without LTO)
#        BEFORE_BIN=/path/to/old/fieldbridge scripts/bench-hostile.sh
#                                  (adds an older build as a third column, same run)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
[ -x "$MOSQUITTO" ] || { echo "mosquitto not found: apt-get install mosquitto" >&2; exit 1; }
ulimit -n 8192 2>/dev/null || ulimit -n "$(ulimit -Hn)"

PROFILE=${PROFILE:-release}
if [ -z "${FIELDBRIDGE_BIN:-}" ]; then
    # Both the release and the bench profile put their binaries in target/release.
    cargo build --profile "$PROFILE" --bin fieldbridge 2>&1 | tail -1
    FIELDBRIDGE_BIN=target/release/fieldbridge
fi

pid=

start() { # kind port -> sets pid
    case "$1" in
        mosquitto)
            printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest none\n' "$2" \
                > "$work/mosquitto.conf"
            "$MOSQUITTO" -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
            ;;
        *)
            local bin=$FIELDBRIDGE_BIN
            [ "$1" = before ] && bin=$BEFORE_BIN
            printf '[broker]\nallow_anonymous = true\nsys_interval_secs = 0\n[[broker.listeners]]\nbind = "127.0.0.1:%s"\n' "$2" \
                > "$work/fieldbridge.toml"
            RUST_LOG=warn "$bin" run --config "$work/fieldbridge.toml" >"$work/$1.log" 2>&1 &
            ;;
    esac
    pid=$!
    pids+=("$pid")
    wait_port "$2"
    sleep 0.3
}
stop() { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; pid=; }

kinds=(mosquitto fieldbridge)
[ -n "${BEFORE_BIN:-}" ] && kinds=(mosquitto before fieldbridge)
declare -A out
for scenario in publish_first connect_oversize connect_trickle close_time idle_flood; do
    for kind in "${kinds[@]}"; do
        port=$(free_port)
        start "$kind" "$port"
        out[$scenario/$kind]=$(python3 scripts/hostile_first_packets.py "$scenario" --port "$port" --pid "$pid")
        stop
        echo "$kind: ${out[$scenario/$kind]}" >&2
    done
done

field() { sed -n "s/.*\b$2=\([^ ]*\).*/\1/p" <<<"${out[$1]}"; }
mib() { awk -v k="$1" 'BEGIN {printf "%.1f MiB", k/1024}'; }
echo
header="| scenario |"; rule="|---|"
for kind in "${kinds[@]}"; do header+=" $kind |"; rule+="---:|"; done
echo "$header"; echo "$rule"
for scenario in publish_first connect_oversize connect_trickle; do
    label=$(case $scenario in
        publish_first) echo "200 × 1 MB PUBLISH as first packet (all but its last byte sent)" ;;
        connect_oversize) echo "200 × 1 MB CONNECT (all but its last byte sent)" ;;
        connect_trickle) echo "200 × 60,000 bytes of a 60,001-byte CONNECT" ;;
    esac)
    row="| $label: RSS before → during, peak (connections closed) |"
    for kind in "${kinds[@]}"; do
        f=$scenario/$kind
        row+=" $(mib "$(field "$f" rss_before_kib)") → $(mib "$(field "$f" rss_kib)"), $(mib "$(field "$f" peak_kib)") ($(field "$f" closed)) |"
    done
    echo "$row"
done
row="| bad first byte (0x30) to close: p50 / p99 / max (samples) |"
for kind in "${kinds[@]}"; do
    f=close_time/$kind
    row+=" $(field "$f" p50_us) / $(field "$f" p99_us) / $(field "$f" max_us) µs ($(field "$f" n)) |"
done
echo "$row"
row="| 1100 idle connections, then a real client gets in after |"
for kind in "${kinds[@]}"; do
    row+=" $(field "idle_flood/$kind" client_in_ms) ms |"
done
echo "$row"
