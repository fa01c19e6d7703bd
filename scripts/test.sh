#!/usr/bin/env bash
# Installs what the test suite needs (Debian packages, Python packages), then runs it.
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v mosquitto_sub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
command -v socat >/dev/null 2>&1 || need_apt+=(socat)
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
if [ ${#need_apt[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "installing Debian packages: ${need_apt[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! python3 -c 'import pymodbus, paho.mqtt, serial, prometheus_client, jinja2, google.protobuf' >/dev/null 2>&1; then
    echo "installing Python packages: pymodbus paho-mqtt pyserial prometheus-client jinja2 protobuf"
    python3 -m pip install -q -r scripts/requirements-test.txt
fi
# pysparkplug (the independent Sparkplug host of tests/sparkplug.rs) pins paho-mqtt < 2,
# which would replace the paho-mqtt 2 the other tests use; the test host uses only its
# payload classes (protobuf) and brings its own paho client, so it goes in without deps.
if ! python3 -c 'import pysparkplug' >/dev/null 2>&1; then
    echo "installing Python packages: pysparkplug (without its paho-mqtt pin)"
    python3 -m pip install -q --no-deps -r scripts/requirements-test-nodeps.txt
fi

# mosquitto lives in /usr/sbin, which is not on every user's PATH.
export PATH="$PATH:/usr/sbin:/sbin"
cargo test --locked "$@"
