#!/usr/bin/env bash
# The status page in a real browser (Debian's headless chromium) against a running
# agent: a pymodbus slave serves a meter (one register counts its reads, so every poll
# has a new value), a second device never answers, mosquitto is the upstream broker.
# The script waits until /api/status has values, loads the page twice with
# `--dump-dom` (after its script ran, `--virtual-time-budget`), checks that every
# device is shown and that the meter's value changed between the two loads, and takes
# a screenshot. Not part of the default test suite.
# Usage: scripts/status-page-check.sh [SCREENSHOT.png]   (FIELDBRIDGE_BIN to use a built binary)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
export PATH=$PATH:/usr/sbin
shot=${1:-docs/status-page.png}

if ! command -v chromium >/dev/null 2>&1 || ! command -v mosquitto >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        chromium mosquitto >/dev/null
fi
python3 -c 'import pymodbus' 2>/dev/null || python3 -m pip install -q -r scripts/requirements-test.txt

BIN=${FIELDBRIDGE_BIN:-}
if [ -z "$BIN" ]; then
    cargo build --locked -q
    BIN=target/debug/fieldbridge
fi

slave_port=$(free_port)
cat > "$work/image.json" <<'JSON'
{"units": {"1": {"holding": {"0": [2304, 1500]}, "coil": {"0": [1]},
                 "counter": [{"kind": "holding", "address": 2}]}}}
JSON
python3 tests/fixtures/modbus_slave.py --tcp "$slave_port" --image "@$work/image.json" \
    > "$work/slave.out" 2>&1 &
pids+=($!)
wait_port "$slave_port"

mqtt_port=$(free_port)
printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$mqtt_port" > "$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" > "$work/mosquitto.log" 2>&1 &
pids+=($!)
wait_port "$mqtt_port"

lan_port=$(free_port)
http_port=$(free_port)
cat > "$work/fieldbridge.toml" <<TOML
[agent]
prefix = "site/gw1"
[broker]
[[broker.listeners]]
bind = "127.0.0.1:$lan_port"
[store]
path = "$work/queue.db"
[upstream]
url = "mqtt://127.0.0.1:$mqtt_port"
client_id = "fieldbridge-status-page"
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
poll_interval_ms = 500
[[bus.device.point]]
name = "voltage"
unit = "V"
kind = "holding"
address = 0
type = "u16"
scale = 0.1
[[bus.device.point]]
name = "power"
unit = "W"
kind = "holding"
address = 1
type = "u16"
[[bus.device.point]]
name = "polls"
kind = "holding"
address = 2
type = "u16"
[[bus.device.point]]
name = "pump"
kind = "coil"
address = 0
[[bus.device]]
name = "boiler"
unit_id = 7
poll_interval_ms = 1000
timeout_ms = 200
retries = 0
[[bus.device.point]]
name = "temperature"
unit = "°C"
kind = "input"
address = 0
type = "i16"
scale = 0.1
TOML
"$BIN" run --config "$work/fieldbridge.toml" > "$work/agent.log" 2>&1 &
pids+=($!)
wait_port "$http_port"
url="http://127.0.0.1:$http_port/"

# Values first (the JSON), then the browser.
for _ in $(seq 100); do
    if curl -fsS "${url}api/status" 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)
devs = {d["name"]: d for b in s["buses"] for d in b["devices"]}
polls = [p for p in devs["meter"]["points"] if p["name"] == "polls"][0]
sys.exit(0 if len(polls["trend"]) >= 5 and devs["boiler"]["state"] != "starting" else 1)
'; then break; fi
    sleep 0.2
done

browser() {
    chromium --headless --no-sandbox --disable-gpu --hide-scrollbars \
        --virtual-time-budget=4000 "$@" "$url" 2>>"$work/chromium.log"
}
browser --dump-dom > "$work/first.html"
sleep 1.5
browser --dump-dom > "$work/second.html"
browser --window-size=1200,380 --screenshot="$work/shot.png" >/dev/null
mkdir -p "$(dirname "$shot")"
cp "$work/shot.png" "$shot"

ok=0
for device in meter boiler; do
    if grep -q "data-device=\"$device\"" "$work/first.html"; then
        echo "device $device shown"
    else
        echo "device $device missing from the page"; ok=1
    fi
done
value() { python3 -c '
import re, sys
m = re.search(r"data-point=\"meter/polls\"[^>]*>([^<]*)<", open(sys.argv[1]).read())
print(m.group(1) if m else "")' "$1"; }
first=$(value "$work/first.html")
second=$(value "$work/second.html")
echo "meter/polls: first load ${first:-<none>}, second load ${second:-<none>}"
if [ -z "$first" ] || [ -z "$second" ] || [ "$first" = "$second" ]; then
    echo "the value did not change between two loads"; ok=1
fi
grep -q "<polyline" "$work/second.html" && echo "trend drawn" || { echo "no trend drawn"; ok=1; }
grep -q "<h3>Clock</h3>" "$work/second.html" && echo "clock state shown" || { echo "no clock card"; ok=1; }
echo "screenshot: $shot ($(stat -c %s "$shot") bytes)"
if [ "$ok" -eq 0 ]; then
    echo "status-page-check: OK"
else
    echo "status-page-check: FAILED"
    tail -20 "$work/agent.log" "$work/chromium.log"
    exit 1
fi
