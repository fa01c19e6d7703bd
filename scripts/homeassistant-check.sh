#!/usr/bin/env bash
# A real Home Assistant (installed from PyPI into a venv) reads fieldbridge's MQTT
# discovery: the agent polls a pymodbus slave and announces its points; Home Assistant
# is onboarded and its MQTT integration set up through its own REST API (the config
# flow a user clicks through), then the script lists the entities with their states,
# checks the values, switches the writable coil from Home Assistant (the slave's coil
# changes and the state follows) and stops the slave (the entities go unavailable).
# Not part of the default test suite.
#
# Usage: scripts/homeassistant-check.sh [lan|upstream]
#   lan       Home Assistant on the agent's LAN broker (default)
#   upstream  Home Assistant on a mosquitto upstream, [homeassistant] upstream = true,
#             no LAN broker
# Environment: FIELDBRIDGE_BIN (a built binary), HA_VENV (the venv, kept between runs;
#   default ~/.cache/fieldbridge/ha-venv), HA_PYTHON (a Python 3.13 to make it with).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
export PATH=$PATH:/usr/sbin
via=${1:-lan}
case "$via" in lan|upstream) ;; *) echo "usage: $0 [lan|upstream]" >&2; exit 2 ;; esac

# The Home Assistant release this was checked with; it needs Python 3.13.
HA_VERSION=2025.4.4
venv=${HA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/fieldbridge/ha-venv}
if [ ! -x "$venv/bin/hass" ] || [ "$("$venv/bin/hass" --version 2>/dev/null)" != "$HA_VERSION" ]; then
    python=${HA_PYTHON:-}
    if [ -z "$python" ]; then
        for candidate in "$HOME"/.pyenv/versions/3.13*/bin/python3.13 "$(command -v python3.13 || true)"; do
            [ -x "$candidate" ] && { python=$candidate; break; }
        done
    fi
    mkdir -p "$(dirname "$venv")"
    if [ -n "$python" ]; then
        "$python" -m venv "$venv"
    elif command -v uv >/dev/null 2>&1; then
        uv venv --python 3.13 "$venv"
    else
        echo "Home Assistant $HA_VERSION needs Python 3.13: set HA_PYTHON, or install pyenv's 3.13 or uv" >&2
        exit 1
    fi
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q "homeassistant==$HA_VERSION"
fi
python3 -c 'import pymodbus' 2>/dev/null || python3 -m pip install -q -r scripts/requirements-test.txt

BIN=${FIELDBRIDGE_BIN:-}
if [ -z "$BIN" ]; then
    cargo build --locked -q
    BIN=target/debug/fieldbridge
fi

slave_port=$(free_port)
echo '{"units": {"1": {"holding": {"0": [215, 1500]}, "coil": {"0": [1]}, "discrete": {"0": [0]}}}}' \
    > "$work/image.json"
python3 tests/fixtures/modbus_slave.py --tcp "$slave_port" --image "@$work/image.json" \
    > "$work/slave.out" 2>&1 &
slave_pid=$!
pids+=($slave_pid)
wait_port "$slave_port"

mqtt_port=$(free_port)
if [ "$via" = lan ]; then
    # As the README sets it up: Home Assistant logs in as a user of the password file,
    # and the ACL lets it read the agent's topics and write the command topics.
    "$BIN" passwd -b "$work/passwd" homeassistant ha-secret
    cat > "$work/acl" <<ACL
user homeassistant
topic read site/gw1/#
topic write site/gw1/+/+/set
topic readwrite homeassistant/#
ACL
    parts="[broker]
allow_anonymous = false
password_file = \"$work/passwd\"
acl_file = \"$work/acl\"
[[broker.listeners]]
bind = \"127.0.0.1:$mqtt_port\"
[homeassistant]"
    login='{"username": "homeassistant", "password": "ha-secret"}'
else
    printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$mqtt_port" > "$work/mosquitto.conf"
    mosquitto -c "$work/mosquitto.conf" > "$work/mosquitto.log" 2>&1 &
    pids+=($!)
    wait_port "$mqtt_port"
    parts="[store]
path = \"$work/queue.db\"
[upstream]
url = \"mqtt://127.0.0.1:$mqtt_port\"
client_id = \"fieldbridge-ha-check\"
[homeassistant]
upstream = true"
    login='{}'
fi
cat > "$work/fieldbridge.toml" <<TOML
[agent]
prefix = "site/gw1"
$parts
[[bus]]
name = "plant"
kind = "tcp"
host = "127.0.0.1"
port = $slave_port
[[bus.device]]
name = "meter"
manufacturer = "Eastron"
model = "SDM120"
poll_interval_ms = 1000
timeout_ms = 300
retries = 0
[[bus.device.point]]
name = "temperature"
unit = "°C"
kind = "holding"
address = 0
type = "i16"
scale = 0.1
[[bus.device.point]]
name = "power"
unit = "W"
kind = "holding"
address = 1
type = "u16"
[[bus.device.point]]
name = "pump"
kind = "coil"
address = 0
writable = true
[[bus.device.point]]
name = "alarm"
kind = "discrete"
address = 0
TOML
"$BIN" run --config "$work/fieldbridge.toml" > "$work/agent.log" 2>&1 &
pids+=($!)

ha_port=$(free_port)
mkdir -p "$work/ha"
cat > "$work/ha/configuration.yaml" <<YAML
homeassistant:
  name: fieldbridge check
  unit_system: metric
  time_zone: UTC
  latitude: 0
  longitude: 0
  elevation: 0
  country: DE
  currency: EUR
http:
  server_host: 127.0.0.1
  server_port: $ha_port
onboarding:
config:
logger:
  default: warning
YAML
"$venv/bin/hass" -c "$work/ha" > "$work/ha.log" 2>&1 &
pids+=($!)
wait_port "$ha_port" 300
echo "Home Assistant $("$venv/bin/hass" --version) on port $ha_port, MQTT via $via (port $mqtt_port)"

ok=0
"$venv/bin/python" - "http://127.0.0.1:$ha_port" "$mqtt_port" "$slave_pid" "$login" <<'PY' || ok=1
import json, os, signal, sys, time, urllib.error, urllib.parse, urllib.request

base, mqtt_port, slave_pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
login = json.loads(sys.argv[4])
token = None

def call(method, path, body=None, form=False):
    headers, data = {}, None
    if body is not None:
        if form:
            data = urllib.parse.urlencode(body).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        else:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
    if token:
        headers["Authorization"] = "Bearer " + token
    request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read() or b"null")

def wait(what, check, timeout=120):
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = check()
        except (urllib.error.URLError, ConnectionError):
            found = None
        if found:
            return found
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(1)

# Onboarding: the first user, and a token from its authorization code.
wait("the onboarding API", lambda: call("GET", "/api/onboarding"))
client = base + "/"
code = call("POST", "/api/onboarding/users", {"client_id": client, "name": "check",
            "username": "check", "password": "check-pass-123", "language": "en"})["auth_code"]
token = call("POST", "/auth/token", {"grant_type": "authorization_code", "code": code,
             "client_id": client}, form=True)["access_token"]

# The MQTT integration, through its config flow.
flow = call("POST", "/api/config/config_entries/flow", {"handler": "mqtt"})
done = call("POST", "/api/config/config_entries/flow/" + flow["flow_id"],
            {"broker": "127.0.0.1", "port": mqtt_port, **login})
if done.get("type") != "create_entry":
    sys.exit(f"the MQTT config flow did not finish: {done}")

expected = {
    "sensor.meter_temperature": ("21.5", "°C", "temperature"),
    "sensor.meter_power": ("1500", "W", "power"),
    "switch.meter_pump": ("on", None, None),
    "binary_sensor.meter_alarm": ("off", None, None),
    "binary_sensor.fieldbridge_site_gw1_gateway_status": ("on", None, "connectivity"),
}

def states():
    return {s["entity_id"]: s for s in call("GET", "/api/states")}

def all_as_expected():
    now = states()
    if all(now.get(e, {}).get("state") == want[0] for e, want in expected.items()):
        return now

now = wait("every entity with its value", all_as_expected)
print("entities Home Assistant made from the discovery messages:")
for entity in sorted(e for e in now if e.startswith(("sensor.meter", "switch.meter",
                     "binary_sensor.meter", "binary_sensor.fieldbridge"))):
    a = now[entity]["attributes"]
    print(f"  {entity:52} {now[entity]['state']:>8} {a.get('unit_of_measurement', ''):3}"
          f" {a.get('device_class', '')}")
for entity, (_, unit, device_class) in expected.items():
    a = now[entity]["attributes"]
    if unit and a.get("unit_of_measurement") != unit:
        sys.exit(f"{entity}: unit {a.get('unit_of_measurement')!r}, expected {unit!r}")
    if device_class and a.get("device_class") != device_class:
        sys.exit(f"{entity}: device class {a.get('device_class')!r}, expected {device_class!r}")

# A command from Home Assistant: the coil is written and read back.
call("POST", "/api/services/switch/turn_off", {"entity_id": "switch.meter_pump"})
wait("the pump off after switching it in Home Assistant",
     lambda: states()["switch.meter_pump"]["state"] == "off")
print("switch.meter_pump turned off from Home Assistant: the device reports off")

# The device stops answering: its entities go unavailable, the gateway stays on.
os.kill(slave_pid, signal.SIGTERM)
def unavailable():
    now = states()
    return all(now[e]["state"] == "unavailable" for e in expected if ".meter_" in e) \
        and now["binary_sensor.fieldbridge_site_gw1_gateway_status"]["state"] == "on"
wait("the meter's entities unavailable", unavailable)
print("slave stopped: every meter entity unavailable, the gateway still connected")
PY
if [ "$ok" -eq 0 ]; then
    echo "homeassistant-check ($via): OK"
else
    echo "homeassistant-check ($via): FAILED"
    tail -40 "$work/agent.log"
    grep -E "ERROR|mqtt" "$work/ha.log" | tail -20
    exit 1
fi
