# Helpers the benchmark and fault scripts source (`. scripts/lib.sh`): a scratch
# directory with the processes to stop at exit, free loopback ports, waiting for a
# listener, the pymodbus slave, an upstream mosquitto config, a process's RSS and CPU
# time.

# A scratch directory in $work; every pid appended to $pids is killed at exit, and
# the directory removed.
work="$(mktemp -d)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_port PORT [SECONDS]: waits (10 s by default) for something to listen on
# 127.0.0.1:PORT; exits the script if nothing does.
wait_port() {
    for _ in $(seq $((${2:-10} * 20))); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listens on port $1" >&2
    exit 1
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# User plus system CPU time of a process, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# start_slave IMAGE: the independent Modbus TCP slave (tests/fixtures/modbus_slave.py)
# serving the JSON register image in file IMAGE, on a free port it sets as $slave_port.
start_slave() {
    slave_port=$(free_port)
    python3 tests/fixtures/modbus_slave.py --tcp "$slave_port" --image "@$1" >"$work/slave.log" 2>&1 &
    pids+=($!)
    wait_port "$slave_port"
}

# upstream_conf PORT FILE: a plain loopback mosquitto (anonymous, queues unbounded).
upstream_conf() {
    printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n' "$1" >"$2"
    if [ "$(id -u)" -eq 0 ]; then echo "user root" >>"$2"; fi
}
