#!/usr/bin/env bash
# A real Prometheus server (Debian's `prometheus` package) scrapes a running agent's
# /metrics: the agent polls a pymodbus slave and runs its LAN broker; the script waits
# until Prometheus reports the target up with no scrape error, then queries a few
# series through Prometheus's own HTTP API. Not part of the default test suite.
# Usage: scripts/prometheus-scrape.sh   (FIELDBRIDGE_BIN to use a built binary)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

if ! command -v prometheus >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
python3 -c 'import pymodbus' 2>/dev/null || python3 -m pip install -q -r scripts/requirements-test.txt

BIN=${FIELDBRIDGE_BIN:-}
if [ -z "$BIN" ]; then
    cargo build --locked -q
    BIN=target/debug/fieldbridge
fi

slave_port=$(free_port)
echo '{"units": {"1": {"holding": {"0": [230, 1500]}}}}' > "$work/image.json"
python3 tests/fixtures/modbus_slave.py --tcp "$slave_port" --image "@$work/image.json" \
    --log "$work/requests.log" > "$work/slave.out" 2>&1 &
pids+=($!)
wait_port "$slave_port"

lan_port=$(free_port)
http_port=$(free_port)
cat > "$work/fieldbridge.toml" <<TOML
[agent]
prefix = "site/gw"
[broker]
[[broker.listeners]]
bind = "127.0.0.1:$lan_port"
[http]
bind = "127.0.0.1:$http_port"
[[bus]]
name = "plant"
kind = "tcp"
host = "127.0.0.1"
port = $slave_port
[[bus.device]]
name = "meter"
unit_id = 1
poll_interval_ms = 200
[[bus.device.point]]
name = "voltage"
unit = "V"
kind = "holding"
address = 0
type = "u16"
TOML
"$BIN" run --config "$work/fieldbridge.toml" > "$work/agent.log" 2>&1 &
pids+=($!)
wait_port "$http_port"

prom_port=$(free_port)
cat > "$work/prometheus.yml" <<YML
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: fieldbridge
    static_configs:
      - targets: ["127.0.0.1:$http_port"]
YML
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
    --web.listen-address="127.0.0.1:$prom_port" > "$work/prometheus.log" 2>&1 &
pids+=($!)
wait_port "$prom_port"

api="http://127.0.0.1:$prom_port/api/v1"
query() { curl -fsS --get "$api/query" --data-urlencode "query=$1"; }
for _ in $(seq 60); do
    targets=$(curl -fsS "$api/targets" || true)
    health=$(python3 -c 'import json,sys; t=json.loads(sys.argv[1])["data"]["activeTargets"]; print(t[0]["health"] if t else "none", "|", t[0]["lastError"] if t else "")' "$targets" 2>/dev/null || echo "none |")
    case "$health" in
        "up |"*) [ "$(query 'count(fieldbridge_bus_request_duration_seconds_bucket)' | python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else 0)')" != 0 ] && break ;;
    esac
    sleep 0.5
done
echo "target: $health"
case "$health" in
    "up |"*) ;;
    *) echo "Prometheus never scraped the agent cleanly"; tail -20 "$work/prometheus.log"; exit 1 ;;
esac
if [ "${health#up | }" != "" ]; then echo "scrape error: ${health#up | }"; exit 1; fi

check() {
    local expr=$1
    local value
    value=$(query "$expr" | python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "")')
    echo "$expr = ${value:-<no series>}"
    [ -n "$value" ]
}
ok=0
check 'up{job="fieldbridge"}' || ok=1
check 'fieldbridge_bus_requests_total{bus="plant"}' || ok=1
check 'fieldbridge_device_state{device="meter",state="online"}' || ok=1
check 'histogram_quantile(0.9, rate(fieldbridge_bus_request_duration_seconds_bucket[5s]))' || ok=1
check 'fieldbridge_lan_clients' || ok=1
check 'process_resident_memory_bytes' || ok=1
count=$(query 'count({job="fieldbridge"})' | python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else 0)')
echo "series scraped: $count"
[ "$ok" -eq 0 ] && echo "prometheus-scrape: OK" || { echo "prometheus-scrape: FAILED"; exit 1; }
