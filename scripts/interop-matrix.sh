#!/usr/bin/env bash
# The uplink's delivery tests (tests/uplink_interop.rs) against every broker that can be
# installed here, each started by this script on a free loopback port, then a matrix:
# broker x test -> pass / FAIL / not run (why). Last, a two-node RabbitMQ cluster with
# the uplink given both nodes: the node in use is stopped under load, and the run
# counts readings accepted, delivered, duplicated and lost.
#
#   scripts/interop-matrix.sh [broker ...]   # default: all of them
#
# Brokers: mosquitto (Debian), fieldbridge (its own broker), rabbitmq (Debian's
# rabbitmq-server with its MQTT plugin), aedes (npm), amqtt (PyPI), rumqttd (cargo
# install). What is missing is installed into $INTEROP_CACHE (default
# ~/.cache/fieldbridge-interop) when the registry is reachable, else reported as
# "not run". Every broker listens on 127.0.0.1 only; each test is bounded in time.
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin"
cache="${INTEROP_CACHE:-$HOME/.cache/fieldbridge-interop}"
mkdir -p "$cache"

# --- starting and stopping one broker: NAME DIR PORT ------------------------------
# Each start writes DIR/pid; `restart` (what the restart test runs) stops and starts
# the same broker on the same port and state directory.

start_mosquitto() {
    cat >"$2/mosquitto.conf" <<EOF
user root
listener $3 127.0.0.1
allow_anonymous true
persistence true
persistence_location $2/
max_queued_messages 0
log_dest file $2/broker.log
EOF
    setsid mosquitto -c "$2/mosquitto.conf" >/dev/null 2>&1 &
    echo $! >"$2/pid"
}

start_fieldbridge() {
    cat >"$2/fieldbridge.toml" <<EOF
[agent]
prefix = "interop/broker"
[broker]
persistence_path = "$2/broker.db"
[[broker.listeners]]
bind = "127.0.0.1:$3"
EOF
    setsid target/debug/fieldbridge run --config "$2/fieldbridge.toml" >"$2/broker.log" 2>&1 &
    echo $! >"$2/pid"
}

start_aedes() {
    # aedes 1.x is an ES module: createBroker() (in-memory persistence by default).
    cat >"$2/aedes.mjs" <<EOF
import net from 'node:net'
import { Aedes } from '$cache/aedes/node_modules/aedes/aedes.js'
const aedes = await Aedes.createBroker()
net.createServer(aedes.handle).listen($3, '127.0.0.1')
EOF
    setsid node "$2/aedes.mjs" >"$2/broker.log" 2>&1 &
    echo $! >"$2/pid"
}

start_amqtt() {
    cat >"$2/amqtt.yaml" <<EOF
listeners:
  default:
    type: tcp
    bind: 127.0.0.1:$3
plugins:
  amqtt.plugins.authentication.AnonymousAuthPlugin:
    allow_anonymous: true
EOF
    setsid "$cache/venv/bin/amqtt" -c "$2/amqtt.yaml" >"$2/broker.log" 2>&1 &
    echo $! >"$2/pid"
}

start_rumqttd() {
    cat >"$2/rumqttd.toml" <<EOF
id = 0
[router]
id = 0
max_connections = 100
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10
[v4.1]
name = "v4-1"
listen = "127.0.0.1:$3"
next_connection_delay_ms = 1
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = 20480
max_inflight_count = 100
dynamic_filters = true
EOF
    setsid "$cache/rumqttd/bin/rumqttd" -c "$2/rumqttd.toml" >"$2/broker.log" 2>&1 &
    echo $! >"$2/pid"
}

# RabbitMQ node NAME (fbi1, fbi2) with its MQTT listener on PORT; the AMQP and
# distribution ports are derived from it.
start_rabbitmq_node() {
    local node="$1" dir="$2" port="$3"
    mkdir -p "$dir"
    cat >"$dir/rabbitmq.conf" <<EOF
listeners.tcp.default = 127.0.0.1:$((port + 1))
mqtt.listeners.tcp.default = 127.0.0.1:$port
mqtt.allow_anonymous = true
loopback_users = none
management.tcp.port = $((port + 3))
EOF
    echo '[rabbitmq_mqtt].' >"$dir/enabled_plugins"
    # Debian's wrapper runs the node as the rabbitmq user: it needs its own directory.
    chmod 755 "$(dirname "$dir")"
    chown -R rabbitmq:rabbitmq "$dir" 2>/dev/null || true
    RABBITMQ_NODENAME="$node@localhost" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT=$((port + 1)) RABBITMQ_DIST_PORT=$((port + 2)) \
        RABBITMQ_CONFIG_FILE="$dir/rabbitmq" RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
        RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/log" \
        setsid rabbitmq-server >"$dir/broker.log" 2>&1 &
    echo $! >"$dir/pid"
    echo "$node" >"$dir/node"
}

start_rabbitmq() { start_rabbitmq_node fbi1 "$2" "$3"; }

stop_broker() { # DIR
    local dir="$1"
    if [ -f "$dir/node" ]; then
        rabbitmqctl -n "$(cat "$dir/node")@localhost" stop >/dev/null 2>&1 || true
    fi
    if [ -f "$dir/pid" ]; then
        local pid; pid="$(cat "$dir/pid")"
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL -- "-$pid" 2>/dev/null || true
        rm -f "$dir/pid"
    fi
}

wait_port() { # PORT SECONDS
    for _ in $(seq $(($2 * 10))); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

wait_gone() { # PORT
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null || return 0
        sleep 0.1
    done
}

start_timeout() { case "$1" in rabbitmq*) echo 120 ;; *) echo 15 ;; esac; }

if [ "${1:-}" = "--restart" ]; then # --restart NAME DIR PORT
    stop_broker "$3"
    wait_gone "$4"
    "start_$2" "$2" "$3" "$4"
    wait_port "$4" "$(start_timeout "$2")"
    exit $?
fi
if [ "${1:-}" = "--stop-node" ]; then # --stop-node URL DIR1 PORT1 DIR2 PORT2
    port="${2##*:}"
    if [ "$port" = "$4" ]; then stop_broker "$3"; else stop_broker "$5"; fi
    exit 0
fi

# --- installing what is missing ----------------------------------------------------

have() { # NAME: prints why not, returns 1, when the broker cannot run here
    case "$1" in
        mosquitto) command -v mosquitto >/dev/null || { echo "mosquitto missing (apt-get install mosquitto)"; return 1; } ;;
        fieldbridge) [ -x target/debug/fieldbridge ] || cargo build --quiet || { echo "build failed"; return 1; } ;;
        rabbitmq)
            command -v rabbitmq-server >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q rabbitmq-server >/dev/null 2>&1 \
                || { echo "rabbitmq-server missing (apt-get install rabbitmq-server)"; return 1; }
            # The Debian package starts a node of its own where it can; ours run beside it.
            ;;
        aedes)
            [ -d "$cache/aedes/node_modules/aedes" ] || (mkdir -p "$cache/aedes" && cd "$cache/aedes" && npm install --silent aedes >/dev/null 2>&1) \
                || { echo "npm install aedes failed"; return 1; } ;;
        amqtt)
            [ -x "$cache/venv/bin/amqtt" ] || { python3 -m venv "$cache/venv" && "$cache/venv/bin/pip" install -q amqtt; } >/dev/null 2>&1 \
                || { echo "pip install amqtt failed"; return 1; } ;;
        rumqttd)
            [ -x "$cache/rumqttd/bin/rumqttd" ] || nice cargo install --quiet rumqttd --root "$cache/rumqttd" >"$cache/rumqttd-install.log" 2>&1 \
                || { echo "cargo install rumqttd failed (see $cache/rumqttd-install.log)"; return 1; } ;;
    esac
}

# --- the matrix ----------------------------------------------------------------------

tests=(interop_qos1_and_qos2 interop_broker_restart interop_agent_restart_without_disconnect
       interop_will_and_birth interop_persistent_session_resume)
short=(qos1+2 restart agent-drop will/birth session)
brokers=("$@")
[ ${#brokers[@]} -gt 0 ] || brokers=(mosquitto fieldbridge rabbitmq aedes amqtt rumqttd)

work="$(mktemp -d)"
declare -A result
cleanup() {
    for dir in "$work"/*/; do [ -d "$dir" ] && stop_broker "$dir"; done
    rm -rf "$work"
}
trap cleanup EXIT

cargo build --quiet || exit 1
cargo test --no-run --quiet --test uplink_interop >/dev/null 2>&1 || cargo test --no-run --test uplink_interop || exit 1

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

for broker in "${brokers[@]}"; do
    if ! why="$(have "$broker")"; then
        for t in "${short[@]}"; do result[$broker,$t]="not run: $why"; done
        continue
    fi
    dir="$work/$broker"; mkdir -p "$dir"
    port="$(free_port)"
    "start_$broker" "$broker" "$dir" "$port"
    if ! wait_port "$port" "$(start_timeout "$broker")"; then
        for t in "${short[@]}"; do result[$broker,$t]="not run: did not start (log: $(tail -n 2 "$dir/broker.log" 2>/dev/null | tr '\n' ' '))"; done
        stop_broker "$dir"
        continue
    fi
    for i in "${!tests[@]}"; do
        log="$dir/${short[$i]//\//-}.log"
        INTEROP_PORT="$port" INTEROP_RESTART="bash $PWD/scripts/interop-matrix.sh --restart $broker $dir $port" \
            timeout 180 cargo test --quiet --test uplink_interop -- --ignored --exact "${tests[$i]}" --test-threads 1 --nocapture >"$log" 2>&1
        if grep -q "test result: ok. 1 passed" "$log"; then
            result[$broker,${short[$i]}]="pass"
        else
            reason="$(grep -m1 -E "panicked at|assertion|left:|not " "$log" | cut -c1-90)"
            result[$broker,${short[$i]}]="FAIL ${reason:+($reason)}"
        fi
        grep "^INTEROP " "$log" | sed "s/^/  [$broker] /" >>"$work/figures"
        wait_port "$port" 30 || { "start_$broker" "$broker" "$dir" "$port"; wait_port "$port" 60; }
    done
    stop_broker "$dir"
done

printf '\n%-12s' "broker"; for t in "${short[@]}"; do printf ' | %-10s' "$t"; done; echo
for broker in "${brokers[@]}"; do
    printf '%-12s' "$broker"
    for t in "${short[@]}"; do printf ' | %-10s' "$(echo "${result[$broker,$t]}" | cut -c1-10)"; done
    echo
done
echo
echo "details:"
for broker in "${brokers[@]}"; do
    for t in "${short[@]}"; do
        r="${result[$broker,$t]}"
        [ "$r" = "pass" ] || echo "  $broker $t: $r"
    done
done
[ -f "$work/figures" ] && { echo "figures:"; cat "$work/figures"; }

# --- two-node RabbitMQ cluster, the node in use stopped under load -------------------
case " ${brokers[*]} " in *" rabbitmq "*) ;; *) exit 0 ;; esac
have rabbitmq >/dev/null || { echo "cluster: not run: rabbitmq-server missing"; exit 0; }
echo
echo "cluster (RabbitMQ, two nodes, the uplink given both):"
d1="$work/fbi1"; d2="$work/fbi2"
p1="$(free_port)"; p2="$(free_port)"
start_rabbitmq_node fbi1 "$d1" "$p1"; start_rabbitmq_node fbi2 "$d2" "$p2"
if wait_port "$p1" 120 && wait_port "$p2" 120; then
    rabbitmqctl -n fbi2@localhost stop_app >/dev/null &&
        rabbitmqctl -n fbi2@localhost join_cluster fbi1@localhost >/dev/null &&
        rabbitmqctl -n fbi2@localhost start_app >/dev/null &&
        wait_port "$p2" 120
    log="$work/cluster.log"
    INTEROP_PORT="$p1" INTEROP_SUB_PORT="$p2" \
        INTEROP_SERVERS="mqtt://127.0.0.1:$p1,mqtt://127.0.0.1:$p2" \
        INTEROP_STOP="bash $PWD/scripts/interop-matrix.sh --stop-node \"\$1\" $d1 $p1 $d2 $p2" \
        timeout 300 cargo test --quiet --test uplink_interop -- --ignored --exact interop_cluster_failover_under_load --test-threads 1 --nocapture >"$log" 2>&1
    grep "^INTEROP " "$log" | sed 's/^/  /'
    if grep -q "test result: ok. 1 passed" "$log"; then echo "  pass"; else echo "  FAIL: $(grep -m1 -E 'panicked at|assertion' "$log")"; fi
else
    echo "  not run: the nodes did not start (logs in $d1, $d2)"
fi
