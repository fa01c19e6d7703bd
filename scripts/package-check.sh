#!/usr/bin/env bash
# Checks the Debian package as an operator meets it: what it installs, with which modes,
# and (where the machine allows) what `dpkg -i` does: the service user, its directories,
# the password-file flow and a first start of the shipped config.
#
# Usage: scripts/package-check.sh [--no-install] [PATH.deb]
#   Without PATH.deb, builds the amd64 package with `cargo deb` (installing cargo-deb
#   when it is missing). With one (e.g. an arm64 package from scripts/cross.sh), checks
#   that package; its binary is run only when its architecture is the machine's.
#   `dpkg -i` runs when the script runs as root, the architecture is native, dpkg is
#   there and no fieldbridge package is installed yet; the package is purged at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"

install=1
deb=""
for arg in "$@"; do
    case "$arg" in
        --no-install) install=0 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) deb=$arg ;;
    esac
done

failures=0
fail() { echo "FAIL: $*" >&2; failures=$((failures + 1)); }
ok() { echo "ok: $*"; }
# expect_mode PATH MODE [OWNER:GROUP]
expect_mode() {
    local path=$1 mode=$2 owner=${3:-} before=$failures
    [ -e "$path" ] || { fail "$path is missing"; return; }
    local got
    got=$(stat -c '%a' "$path")
    [ "$got" = "$mode" ] || fail "$path has mode $got, expected $mode"
    if [ -n "$owner" ]; then
        got=$(stat -c '%U:%G' "$path")
        [ "$got" = "$owner" ] || fail "$path belongs to $got, expected $owner"
    fi
    [ "$failures" -ne "$before" ] || ok "$path $mode $owner"
}

if [ -z "$deb" ]; then
    if ! command -v cargo-deb >/dev/null 2>&1; then
        echo "installing cargo-deb"
        cargo install cargo-deb --locked
    fi
    deb=$(cargo deb --locked | tail -n 1)
fi
[ -f "$deb" ] || { echo "no package at $deb" >&2; exit 1; }
echo "checking $deb"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
dpkg-deb -x "$deb" "$root"
dpkg-deb -e "$deb" "$work/control"
arch=$(dpkg-deb -f "$deb" Architecture)
native=0
[ "$arch" = "$(dpkg --print-architecture)" ] && native=1

# ── Files and modes as packed (dpkg-deb -x keeps the modes, not the owners) ───────────
expect_mode "$root/usr/bin/fieldbridge" 755
expect_mode "$root/etc/fieldbridge/fieldbridge.toml" 640
unit=$(find "$root" -name fieldbridge.service -path '*systemd/system*' || true)
unit=$(head -n 1 <<<"$unit")
[ -n "$unit" ] || fail "no systemd unit in the package"
for example in config/*.toml; do
    name=$(basename "$example")
    [ "$name" = fieldbridge.toml ] && continue
    expect_mode "$root/usr/share/doc/fieldbridge/examples/$name" 644
done
expect_mode "$root/usr/share/doc/fieldbridge/README.md" 644
grep -qx /etc/fieldbridge/fieldbridge.toml "$work/control/conffiles" \
    || fail "/etc/fieldbridge/fieldbridge.toml is not a conffile"

# ── The live config: the minimal safe one, not the reference ─────────────────────────
live=$root/etc/fieldbridge/fieldbridge.toml
cmp -s "$live" config/fieldbridge.toml || fail "the live config is not config/fieldbridge.toml"
for section in '^\[\[bus\]\]' '^\[upstream\]' '^\[store\]'; do
    ! grep -q "$section" "$live" || fail "the live config has an active $section section"
done
grep -q '/usr/share/doc/fieldbridge/examples/fieldbridge.example.toml' "$live" \
    || fail "the live config does not point at the reference"
binary=""
if [ "$native" = 1 ]; then
    binary=$root/usr/bin/fieldbridge
elif [ -x target/release/fieldbridge ]; then
    binary=target/release/fieldbridge  # the same config rules, built for this machine
fi
if [ -n "$binary" ]; then
    out=$("$binary" check-config --config "$live") || fail "check-config refused the live config: $out"
    grep -q '^upstream: none' <<<"$out" || fail "the live config has an upstream: $out"
    ! grep -q 'requests per poll' <<<"$out" || fail "the live config polls devices: $out"
    grep -q '^local broker: yes' <<<"$out" || fail "the live config has no local broker: $out"
    ok "live config: broker on loopback, no buses, no upstream"
else
    echo "skipped: check-config of the live config (no binary for this machine)"
fi

# ── The unit ─────────────────────────────────────────────────────────────────────────
if [ -n "$unit" ]; then
    for name in ttyS ttyUSB ttyACM ttyAMA ttySC ttyXRUSB; do
        grep -qx "DeviceAllow=char-$name rw" "$unit" || fail "the unit does not allow char-$name"
    done
    grep -qx 'UMask=0027' "$unit" || fail "the unit does not set UMask=0027"
    if command -v systemd-analyze >/dev/null 2>&1 && [ -n "$binary" ]; then
        sed "s#/usr/bin/fieldbridge#$(realpath "$binary")#" "$unit" >"$work/fieldbridge.service"
        complaints=$(SYSTEMD_LOG_LEVEL=warning systemd-analyze verify "$work/fieldbridge.service" 2>&1 \
            | grep fieldbridge || true)
        [ -z "$complaints" ] || fail "systemd-analyze verify: $complaints"
    fi
    ok "unit"
fi

# ── Maintainer scripts ───────────────────────────────────────────────────────────────
postinst=$work/control/postinst
mkdir_line=$({ grep -n 'mkdir -p /var/lib/fieldbridge' "$postinst" || true; } | head -n 1 | cut -d: -f1)
adduser_line=$({ grep -n 'adduser --system' "$postinst" || true; } | head -n 1 | cut -d: -f1)
if [ -z "$mkdir_line" ] || [ -z "$adduser_line" ] || [ "$mkdir_line" -ge "$adduser_line" ]; then
    fail "postinst does not create /var/lib/fieldbridge before the user"
fi
grep -q 'deb-systemd-helper' "$postinst" || fail "postinst does not enable the unit"
for script in "$postinst" "$work/control/postrm"; do
    sh -n "$script" || fail "$(basename "$script") has a syntax error"
done

# ── dpkg -i, where the machine allows ────────────────────────────────────────────────
if [ "$install" = 0 ]; then
    echo "skipped: dpkg -i (--no-install)"
elif [ "$(id -u)" -ne 0 ] || [ "$native" = 0 ] || ! command -v dpkg >/dev/null 2>&1; then
    echo "skipped: dpkg -i (needs root, dpkg and a $arch machine)"
elif dpkg-query -W -f '${Status}' fieldbridge 2>/dev/null | grep -q installed; then
    echo "skipped: dpkg -i (fieldbridge is already installed here; not touching it)"
else
    purge() { dpkg --purge fieldbridge >/dev/null 2>&1 || true; }
    trap 'purge; rm -rf "$work"' EXIT
    install_log=$work/dpkg-install.log
    dpkg -i "$deb" >"$install_log" 2>&1 || { cat "$install_log"; fail "dpkg -i failed"; }
    if grep -Eiq "warning|can't be accessed|error" "$install_log"; then
        fail "dpkg -i printed warnings: $(cat "$install_log")"
    fi
    getent passwd fieldbridge | grep -q ':/var/lib/fieldbridge:/usr/sbin/nologin$' \
        || fail "no fieldbridge system user with home /var/lib/fieldbridge"
    if getent group dialout >/dev/null; then
        id -nG fieldbridge | grep -qw dialout || fail "fieldbridge is not in dialout"
    fi
    expect_mode /var/lib/fieldbridge 750 fieldbridge:fieldbridge
    expect_mode /etc/fieldbridge 750 root:fieldbridge
    expect_mode /etc/fieldbridge/fieldbridge.toml 640 root:fieldbridge
    [ -L /etc/systemd/system/multi-user.target.wants/fieldbridge.service ] \
        || fail "the unit is not enabled"

    # The README's password-file flow, without a manual chown.
    printf 'secret\n' | fieldbridge passwd /etc/fieldbridge/passwd alice >/dev/null 2>&1 \
        || fail "fieldbridge passwd (stdin) failed"
    expect_mode /etc/fieldbridge/passwd 640 root:fieldbridge
    fieldbridge passwd -b /etc/fieldbridge/passwd bob other >/dev/null 2>&1 \
        || fail "fieldbridge passwd -b failed"
    expect_mode /etc/fieldbridge/passwd 640 root:fieldbridge
    checked=/etc/fieldbridge/package-check.toml
    sed '0,/^# password_file = /s|^# password_file = .*|password_file = "/etc/fieldbridge/passwd"|' \
        /etc/fieldbridge/fieldbridge.toml >"$checked"
    chgrp fieldbridge "$checked" && chmod 0640 "$checked"
    out=$(fieldbridge check-config --as-user fieldbridge --config "$checked" 2>&1) \
        || fail "check-config --as-user fieldbridge: $out"
    chmod 0600 /etc/fieldbridge/passwd
    if out=$(fieldbridge check-config --as-user fieldbridge --config "$checked" 2>&1); then
        fail "check-config --as-user fieldbridge passed with an unreadable password file"
    else
        grep -q '/etc/fieldbridge/passwd' <<<"$out" || fail "check-config did not name the file: $out"
    fi
    chmod 0640 /etc/fieldbridge/passwd
    if out=$(setpriv --reuid nobody --regid nogroup --clear-groups \
            fieldbridge check-config --config "$checked" 2>&1); then
        fail "check-config as nobody read a config of root and fieldbridge"
    else
        grep -q 'fieldbridge group' <<<"$out" || fail "check-config as nobody: $out"
        ok "check-config as a non-member: $(head -n 1 <<<"$out")"
    fi
    rm -f "$checked"

    # A first start of the shipped config, as the service user: it comes up, says
    # nothing alarming and stops cleanly. Port 1883 may be taken (mosquitto), so the
    # listener moves to a free port; nothing else changes.
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    sed "s|127.0.0.1:1883|127.0.0.1:$port|" /etc/fieldbridge/fieldbridge.toml >"$work/run.toml"
    chmod 0644 "$work/run.toml" && chmod 0755 "$work"
    setpriv --reuid fieldbridge --regid fieldbridge --init-groups \
        fieldbridge run --config "$work/run.toml" >"$work/run.log" 2>&1 &
    agent=$!
    # Signal handlers are in once it says it runs (a SIGTERM before would kill it).
    for _ in $(seq 1 150); do
        grep -q 'fieldbridge running' "$work/run.log" && break
        kill -0 "$agent" 2>/dev/null || break
        sleep 0.1
    done
    grep -q 'fieldbridge running' "$work/run.log" || fail "the shipped config did not start: $(cat "$work/run.log")"
    if command -v mosquitto_sub >/dev/null 2>&1; then
        status=$(mosquitto_sub -p "$port" -t 'fieldbridge/+/status' -C 1 -W 15 2>&1 || true)
        [ "$status" = online ] || fail "no retained online status from the shipped config: $status"
    fi
    kill -TERM "$agent"
    wait "$agent" || fail "the agent did not exit 0 on SIGTERM: $(cat "$work/run.log")"
    if grep -Eq ' (WARN|ERROR) ' "$work/run.log"; then
        fail "the shipped config logs warnings: $(cat "$work/run.log")"
    fi
    [ "$failures" -ne 0 ] || ok "dpkg -i: user, directories, modes, password file, first start"

    rm -f /etc/fieldbridge/passwd
    dpkg --purge fieldbridge >/dev/null
    ! getent passwd fieldbridge >/dev/null || fail "purge left the fieldbridge user"
    [ ! -e /var/lib/fieldbridge ] || fail "purge left /var/lib/fieldbridge"
    trap 'rm -rf "$work"' EXIT
fi

if [ "$failures" -ne 0 ]; then
    echo "$failures check(s) failed for $deb" >&2
    exit 1
fi
echo "all checks passed for $deb"
