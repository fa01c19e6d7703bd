#!/usr/bin/env bash
# Release builds for every Raspberry Pi, proven under qemu-user, and their .deb packages.
#
#   ARMv6  (Pi Zero / Zero W / 1, and every 32-bit Pi)  arm-unknown-linux-musleabihf, static
#   ARMv7  (Pi 2 / 3 / 4 with a 32-bit OS)              armv7-unknown-linux-gnueabihf, glibc >= $GLIBC
#   AArch64 (Pi 3 / 4 / 5 with a 64-bit OS)             aarch64-unknown-linux-gnu,     glibc >= $GLIBC
#   x86_64 (the amd64 package, and the native peer for the qemu figures)  plain `cargo build`
#
# Zig (the `ziglang` Python package, driven by cargo-zigbuild) is the C compiler and linker
# for the three ARM builds: it links against the glibc version named in the target, so the
# floor is chosen here instead of inherited from the build machine. rustup has no standard
# library to download for the ARMv6 targets, so that one is built from source (`-Z
# build-std`, rust-src); it is linked statically against Zig's musl, compiled for ARMv6
# with VFPv2, so no library on the Pi can bring in an ARMv7 instruction.
#
# Steps, each of which fails the script:
#   1. install what is missing (Debian packages, ziglang + cargo-zigbuild, rustup targets
#      and rust-src, cargo-deb; pymodbus and paho from scripts/requirements-test.txt);
#   2. build the four release binaries, one at a time (`nice`);
#   3. ARMv6: static (no interpreter, no shared library), and every C and assembly object
#      linked in is built for ARMv6 (build attributes; NEON only where ring picks it at
#      run time); qemu's arm1176 (the Pi Zero's CPU) runs everything below, after a
#      control shows it kills a program with one ARMv7 instruction;
#   4. under qemu-user, each ARM binary (and the x86_64 one natively, as the peer):
#      `--version`, `check-config` on every config/*.toml, `demo` serving mosquitto_sub on
#      the host, and `run` polling the pymodbus slave (tests/fixtures/modbus_slave.py)
#      and delivering to a real upstream mosquitto, once over MQTT 3.1.1 and once over
#      TLS with MQTT 5 (rustls on ring: its assembly runs on the emulated CPU too);
#      RSS and start-up time of each are recorded;
#   5. `cargo deb` for armhf (the ARMv6 binary), arm64 and amd64, each inspected with
#      dpkg-deb -I/-c (architecture, depends, maintainer scripts, the binary inside) and
#      checked by scripts/package-check.sh when that exists; SHA256SUMS beside them;
#   6. the amd64 package installed with apt into a fresh Debian root (mmdebstrap), its
#      service user and config checked, then purged.
#
# Output: target/cross/packages/ (three .deb files and SHA256SUMS), target/cross/report.md
# (the figures), target/cross/logs/. The first run took 20 minutes on two cores shared
# with other builds; a re-run rebuilds only what changed (2 minutes with nothing to).
#
# Usage: scripts/cross.sh            (as root: apt-get, and the install check's chroot)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "scripts/cross.sh: run as root (apt-get, chroot)" >&2; exit 1; }
export PATH="$PATH:/usr/sbin:/sbin:$HOME/.cargo/bin"

GLIBC=2.28               # Raspberry Pi OS buster; bullseye has 2.31, bookworm 2.36
ZIGLANG_VERSION=0.17.1
CARGO_ZIGBUILD_VERSION=0.24.1
CARGO_DEB_VERSION=3.8.0
SUITE=bookworm           # the Debian release of the install check

out=target/cross
logs="$out/logs"
packages="$out/packages"
report="$out/report.md"
version=$(awk -F'"' '/^version *=/ {print $2; exit}' Cargo.toml)
mkdir -p "$logs" "$packages"
work="$(mktemp -d)"
pids=()
mounts=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for m in "${mounts[@]}"; do umount "$m" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
started=$(date +%s)

step() { printf '\n== %s (%s s)\n' "$*" "$(($(date +%s) - started))"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
# wait_port PORT PID: until PORT accepts a connection; fails if PID exits first.
wait_port() {
    for _ in $(seq 1 1500); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.02
    done
    return 1
}
# wait_line FILE REGEX: until a line of FILE matches (60 s).
wait_line() {
    for _ in $(seq 1 600); do
        grep -qE "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    fail "no line matching '$2' in $1"
}
mib() { awk -v b="$1" 'BEGIN {printf "%.2f MiB", b / 1048576}'; }

# ─── 1. tools ─────────────────────────────────────────────────────────────────────────
step "install what is missing"
apt_packages=(qemu-user-static libc6-armhf-cross libc6-arm64-cross mosquitto mosquitto-clients
    mmdebstrap openssl binutils time)
missing=()
for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if [ "$(python3 -m ziglang version 2>/dev/null)" != "$ZIGLANG_VERSION" ] ||
    ! cargo-zigbuild --version 2>/dev/null | grep -q " $CARGO_ZIGBUILD_VERSION"; then
    python3 -m pip install -q "ziglang==$ZIGLANG_VERSION" "cargo-zigbuild==$CARGO_ZIGBUILD_VERSION"
fi
python3 -c 'import pymodbus, paho.mqtt' 2>/dev/null ||
    python3 -m pip install -q -r scripts/requirements-test.txt
rustup target add aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf >/dev/null
rustup component add rust-src >/dev/null
cargo deb --version 2>/dev/null | grep -q "$CARGO_DEB_VERSION" ||
    nice -n 10 cargo install -q --locked cargo-deb --version "$CARGO_DEB_VERSION"
echo "zig $(python3 -m ziglang version), $(cargo-zigbuild --version), $(cargo deb --version)," \
    "$(qemu-arm-static --version | head -1), $(rustc --version)"

# ─── 2. build ─────────────────────────────────────────────────────────────────────────
names=(v6 v7 a64 x64)
declare -A triple=(
    [v6]=arm-unknown-linux-musleabihf [v7]=armv7-unknown-linux-gnueabihf
    [a64]=aarch64-unknown-linux-gnu [x64]=x86_64-unknown-linux-gnu)
declare -A label=([v6]="ARMv6 (static musl)" [v7]="ARMv7 (glibc)" [a64]="AArch64 (glibc)"
    [x64]="x86_64 (native)")
declare -A bin=(
    [v6]=target/cross/armv6/arm-unknown-linux-musleabihf/release/fieldbridge
    [v7]=target/armv7-unknown-linux-gnueabihf/release/fieldbridge
    [a64]=target/aarch64-unknown-linux-gnu/release/fieldbridge
    [x64]=target/release/fieldbridge)
# How each binary is run here: the CPU of the smallest Pi of its kind.
declare -A runner=([v6]="qemu-arm-static -cpu arm1176"
    [v7]="qemu-arm-static -cpu cortex-a7 -L /usr/arm-linux-gnueabihf"
    [a64]="qemu-aarch64-static -cpu cortex-a53 -L /usr/aarch64-linux-gnu" [x64]="")
declare -A cpu=([v6]=arm1176 [v7]=cortex-a7 [a64]=cortex-a53 [x64]=host)
declare -A build_secs build_cpu

build() { # NAME COMMAND...
    local name=$1 times
    shift
    step "build ${label[$name]}: $*"
    times="$work/time-$name"
    /usr/bin/time -f '%e %U %S' -o "$times" nice -n 10 "$@" >"$logs/build-$name.log" 2>&1 ||
        { tail -30 "$logs/build-$name.log"; fail "build $name"; }
    build_secs[$name]=$(awk '{printf "%d", $1}' "$times")
    build_cpu[$name]=$(awk '{printf "%d", $2 + $3}' "$times")
    echo "${bin[$name]}: $(stat -c %s "${bin[$name]}") bytes; ${build_secs[$name]} s, ${build_cpu[$name]} CPU s"
}
# link-self-contained=no: rustc would pass the crt1.o of the prebuilt musl target, which
# does not exist for a standard library built from source; Zig supplies its own. Its own
# target directory: -Z build-std and RUSTC_BOOTSTRAP change the host units (proc macros,
# build scripts) too, and sharing target/ would rebuild them for every other target.
CARGO_TARGET_DIR=target/cross/armv6 \
    CARGO_TARGET_ARM_UNKNOWN_LINUX_MUSLEABIHF_RUSTFLAGS="-C link-self-contained=no" \
    RUSTC_BOOTSTRAP=1 build v6 cargo zigbuild --locked --release \
    -Z build-std=std,panic_unwind --target arm-unknown-linux-musleabihf
build v7 cargo zigbuild --locked --release --target "armv7-unknown-linux-gnueabihf.$GLIBC"
build a64 cargo zigbuild --locked --release --target "aarch64-unknown-linux-gnu.$GLIBC"
build x64 cargo build --locked --release

# ─── 3. what each binary needs from the Pi ────────────────────────────────────────────
step "ELF checks"
declare -A floor
for name in "${names[@]}"; do
    b=${bin[$name]}
    if readelf -lW "$b" | grep -q 'Requesting program interpreter'; then
        floor[$name]=$(readelf -VW "$b" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
        needed=$(readelf -dW "$b" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')
        echo "$name: dynamic, glibc >= ${floor[$name]}, needs $needed"
    else
        readelf -dW "$b" | grep -q NEEDED && fail "$name: shared libraries without an interpreter"
        floor[$name]=static
        echo "$name: static, no shared library"
    fi
done
for name in v7 a64; do
    [ "$(printf '%s\n' "${floor[$name]}" "$GLIBC" | sort -V | tail -1)" = "$GLIBC" ] ||
        fail "$name needs glibc ${floor[$name]}, above the $GLIBC it was built for"
done

# The ARMv6 binary. The linker keeps the build attributes of one input only, so the
# binary's own `readelf -A` proves nothing: every C and assembly input is checked instead
# (Zig's musl, compiler-rt and libunwind, as a one-line link with the same wrapper lists
# them; the archives the build scripts made: SQLite, ring). Rust code is compiled by
# rustc for the target's own features (+v6, +vfp2, -d32). NEON or VFPv3 is allowed only
# where the code is chosen at run time: ring's assembly, which reads the CPU's HWCAP
# (a Pi Zero reports no NEON), and libunwind's save/restore of d16-d31, used only for
# frames that use those registers, which VFPv2 code has not.
neon_ok='ring-[^/]*/out/.*(armv4|armv7)(-mont)?-linux32\.o|ring-[^/]*/out/.*(x25519-asm-arm|poly1305_arm_asm)\.o|[/(]UnwindRegisters(Save|Restore)\.o'
wrapper=$(ls -t "$HOME"/.cache/cargo-zigbuild/*/wrappers/*/zigcc-arm-unknown-linux-musleabihf-*.sh | head -1)
printf 'int main(void) { return 0; }\n' >"$work/empty.c"
zig_inputs=$(ZIG_VERBOSE_LINK=1 "$wrapper" -static "$work/empty.c" -lunwind -o "$work/empty" 2>&1 |
    tr ' ' '\n' | grep -E '^/.*\.(a|o)$' | grep -v '/empty\.o$' | sort -u)
build_inputs=$(find target/cross/armv6/arm-unknown-linux-musleabihf/release/build -path '*/out/*' -name '*.o')
: >"$work/attrs"
for f in $zig_inputs $build_inputs; do
    # readelf names archive members "File: a.a(m.o)"; a plain object gets its path here.
    { echo "File: $f"; readelf -A "$f"; } >>"$work/attrs" || fail "readelf -A $f"
done
checked=$(awk -v ok="$neon_ok" '
    /^File: / {f = $2; next}
    /Tag_CPU_arch:/ {n++; if ($2 !~ /^v(4|4T|5T|5TE|5TEJ|6|6K|6KZ)$/) {print "FAIL: " f " is " $0 > "/dev/stderr"; bad = 1}}
    /Tag_THUMB_ISA_use: Thumb-2/ {print "FAIL: " f " uses Thumb-2" > "/dev/stderr"; bad = 1}
    /Tag_Advanced_SIMD_arch:|Tag_FP_arch: VFPv[34]/ {
        if (f !~ ok) {print "FAIL: " f ": " $0 " outside run-time dispatch" > "/dev/stderr"; bad = 1}}
    END {print n; exit bad}' "$work/attrs") || fail "an ARMv6 input has ARMv7 code"
echo "v6: $checked C/assembly objects checked (Zig's musl, compiler-rt, libunwind; SQLite; ring): all ARMv6 or older, no Thumb-2, NEON only behind ring's run-time dispatch"
[ "${floor[v6]}" = static ] || fail "ARMv6 binary is not static"

# Controls: qemu's arm1176 must reject an ARMv7 instruction, or passing under it proves
# nothing. A static program of three instructions, once with one ARMv7 `movw` in front:
# that one must die on arm1176 and exit 0 on cortex-a7, the other exit 0 on arm1176.
cat >"$work/probe.c" <<'EOF'
void _start(void) {
    __asm__ volatile(
#ifdef ARMV7_INSN
        ".arch armv7-a\n movw r0, #0x1234\n"
#endif
        "mov r0, #0\n mov r7, #1\n svc #0\n"); /* exit(0) */
}
EOF
for kind in v6 v7; do
    flag=()
    [ "$kind" = v7 ] && flag=(-DARMV7_INSN)
    python3 -m ziglang cc -target arm-linux-musleabihf -mcpu=arm1176jzf_s -nostdlib -static \
        -ffreestanding -O2 "${flag[@]}" "$work/probe.c" -o "$work/probe-$kind"
done
probe() { (ulimit -c 0; cd "$work" && qemu-arm-static -cpu "$1" "$2") >/dev/null 2>&1 && echo 0 || echo $?; }
[ "$(probe arm1176 "$work/probe-v7")" = 132 ] || fail "control: a movw did not die on arm1176"
[ "$(probe cortex-a7 "$work/probe-v7")" = 0 ] || fail "control: a movw did not run on cortex-a7"
[ "$(probe arm1176 "$work/probe-v6")" = 0 ] || fail "control: ARMv6 code did not run on arm1176"
# Why the ARMv6 build is static: Debian's armhf dynamic loader is ARMv7 itself.
[ "$(probe arm1176 /usr/arm-linux-gnueabihf/lib/ld-linux-armhf.so.3)" = 132 ] ||
    fail "control: Debian's armhf ld.so ran on arm1176"
echo "controls: on arm1176 one ARMv7 movw dies with SIGILL (on cortex-a7 it runs), ARMv6 code runs;" \
    "Debian's armhf ld.so dies there too, so only a static build can be checked on arm1176"

# ─── 4. run them ──────────────────────────────────────────────────────────────────────
step "upstream mosquitto (plain and TLS) and the pymodbus slave"
openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=fieldbridge-cross-ca -keyout "$work/ca.key" -out "$work/ca.pem" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign 2>/dev/null
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=127.0.0.1 \
    -keyout "$work/server.key" -out "$work/server.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature\n' \
    >"$work/server.ext"
openssl x509 -req -in "$work/server.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" \
    -CAcreateserial -days 2 -extfile "$work/server.ext" -out "$work/server.pem" 2>/dev/null
# check-config opens every file a config names: the examples' files under
# /etc/fieldbridge get stand-ins here (the password file is written by each build's
# own `passwd`, below).
mkdir -p "$work/etc"
cp "$work/ca.pem" "$work/etc/ca.pem"
openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=gw42 -keyout "$work/etc/client.key" -out "$work/etc/client.pem" 2>/dev/null
printf 'user ha\ntopic read #\n' >"$work/etc/acl"
up_port=$(free_port)
tls_port=$(free_port)
cat >"$work/mosquitto.conf" <<EOF
log_type error
log_type warning
log_type notice
log_type subscribe
allow_anonymous true
listener $up_port 127.0.0.1
listener $tls_port 127.0.0.1
cafile $work/ca.pem
certfile $work/server.pem
keyfile $work/server.key
EOF
echo "user root" >>"$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" >"$logs/mosquitto.log" 2>&1 &
pids+=($!)
wait_port "$up_port" $! && wait_port "$tls_port" $! || fail "mosquitto did not start (see $logs/mosquitto.log)"

slave_port=$(free_port)
# Holding 0 counts the requests that read it (every poll is a new value); 1-2 hold 42.73 as f32.
python3 tests/fixtures/modbus_slave.py --tcp "$slave_port" --image \
    '{"units": {"1": {"holding": {"1": [16938, 59769]}, "counter": [{"kind": "holding", "address": 0}]}}}' \
    >"$logs/slave.log" 2>&1 &
pids+=($!)
wait_line "$logs/slave.log" '^ready'

declare -A version_ms demo_ms demo_rss run_ms run_rss tls_rss configs_ok

# agent_config NAME RUN LOCAL_PORT URL EXTRA: a config polling the slave every 200 ms.
agent_config() {
    cat <<EOF
[agent]
prefix = "cross/$1-$2"
log_level = "info"

[broker]
[[broker.listeners]]
bind = "127.0.0.1:$3"

[store]
path = "$work/queue-$1-$2.db"

[upstream]
url = "$4"
client_id = "fieldbridge-cross-$1-$2"
$5

[[bus]]
name = "plc"
kind = "tcp"
host = "127.0.0.1"
port = $slave_port

[[bus.device]]
name = "press"
unit_id = 1
poll_interval_ms = 200

[[bus.device.point]]
name = "polls"
kind = "holding"
address = 0
type = "u16"

[[bus.device.point]]
name = "pressure"
unit = "bar"
kind = "holding"
address = 1
type = "f32"
EOF
}

# agent_run NAME RUN URL EXTRA: run the agent on the slave until the upstream subscriber
# has readings; sets last_ms (spawn to local listener) and last_rss (KiB, with readings).
agent_run() {
    local name=$1 run=$2 local_port sub agent t0 topic="cross/$1-$2/press/+" with
    read -ra with <<<"${runner[$name]}"
    local_port=$(free_port)
    agent_config "$name" "$run" "$local_port" "$3" "$4" >"$work/$name-$run.toml"
    mosquitto_sub -h 127.0.0.1 -p "$up_port" -q 1 -t "$topic" -v -C 12 -W 120 \
        >"$work/$name-$run.sub" 2>&1 &
    sub=$!
    pids+=("$sub")
    wait_line "$logs/mosquitto.log" " ${topic//+/\\+}"
    t0=$(now_ms)
    "${with[@]}" "${bin[$name]}" run --config "$work/$name-$run.toml" \
        >"$logs/$name-$run.log" 2>&1 &
    agent=$!
    pids+=("$agent")
    wait_port "$local_port" "$agent" || { tail "$logs/$name-$run.log"; fail "$name $run: no local listener"; }
    last_ms=$(($(now_ms) - t0))
    wait "$sub" || { tail "$logs/$name-$run.log"; fail "$name $run: upstream got no readings"; }
    last_rss=$(rss_kib "$agent")
    kill -TERM "$agent"
    wait "$agent" || fail "$name $run: exit $? after SIGTERM (see $logs/$name-$run.log)"
    local readings
    readings=$(grep -c ' {"value":' "$work/$name-$run.sub" || true)
    grep -q '/press/pressure {"value":42.7' "$work/$name-$run.sub" ||
        fail "$name $run: no pressure reading upstream: $(head -3 "$work/$name-$run.sub")"
    [ "$(grep -o '/press/polls {"value":[0-9]*' "$work/$name-$run.sub" | sort -u | wc -l)" -ge 5 ] ||
        fail "$name $run: fewer than 5 distinct poll counts upstream"
    echo "$name $run: listening after $last_ms ms; $readings readings upstream, RSS $last_rss KiB, e.g. $(grep -m1 '/press/pressure' "$work/$name-$run.sub")"
}

# demo_run NAME RUNNER KEY: `demo` serving mosquitto_sub on the host; records
# demo_ms[KEY] (spawn to listening) and demo_rss[KEY] (KiB, after the readings).
demo_run() {
    local name=$1 key=$3 port agent t0 values with on=""
    read -ra with <<<"$2"
    [ "$key" = "$name" ] || on=" ($2)"
    port=$(free_port)
    t0=$(now_ms)
    "${with[@]}" "${bin[$name]}" demo --port "$port" >"$logs/$key-demo.log" 2>&1 &
    agent=$!
    pids+=("$agent")
    wait_port "$port" "$agent" || { cat "$logs/$key-demo.log"; fail "$key demo: nothing listens on $port"; }
    demo_ms[$key]=$(($(now_ms) - t0))
    grep -q "local MQTT broker on 127.0.0.1:$port" "$logs/$key-demo.log" || fail "$key demo: not on port $port"
    mosquitto_sub -h 127.0.0.1 -p "$port" -t 'fieldbridge/demo/#' -v -C 10 -W 60 >"$work/$key-demo.sub" ||
        fail "$key demo: mosquitto_sub got $(wc -l <"$work/$key-demo.sub") messages"
    demo_rss[$key]=$(rss_kib "$agent")
    kill -TERM "$agent"
    wait "$agent" || fail "$key demo: exit $? after SIGTERM"
    values=$(grep -c '{"value":' "$work/$key-demo.sub" || true)
    [ "$values" -ge 5 ] || fail "$key demo: $values readings in $(cat "$work/$key-demo.sub")"
    echo "demo$on: listening after ${demo_ms[$key]} ms; LAN subscriber got $values readings," \
        "e.g. $(grep -m1 'temperature' "$work/$key-demo.sub" || head -1 "$work/$key-demo.sub"); RSS ${demo_rss[$key]} KiB"
}

for name in "${names[@]}"; do
    read -ra with <<<"${runner[$name]}"
    step "run ${label[$name]} on ${cpu[$name]}${runner[$name]:+: ${runner[$name]}}"
    b=${bin[$name]}

    best=""
    for _ in 1 2 3; do
        t0=$(now_ms)
        v=$("${with[@]}" "$b" --version)
        t=$(($(now_ms) - t0))
        [ -z "$best" ] || [ "$t" -lt "$best" ] && best=$t
    done
    [ "$v" = "fieldbridge $version" ] || fail "$name --version printed '$v'"
    version_ms[$name]=$best
    echo "--version: $v (${best} ms, best of 3)"

    "${with[@]}" "$b" passwd -b "$work/etc/passwd" ha secret >"$logs/$name-passwd.log" 2>&1 ||
        { cat "$logs/$name-passwd.log"; fail "$name passwd -b"; }
    n=0
    for config in config/*.toml; do
        copy="$work/check-$name-$(basename "$config")"
        sed "s#/etc/fieldbridge/#$work/etc/#g" "$config" >"$copy"
        "${with[@]}" "$b" check-config --config "$copy" >"$logs/$name-check-$(basename "$config").log" 2>&1 ||
            { cat "$logs/$name-check-$(basename "$config").log"; fail "$name check-config $config"; }
        n=$((n + 1))
    done
    configs_ok[$name]=$n
    echo "check-config: $n of $(ls config/*.toml | wc -l) examples pass"

    demo_run "$name" "${runner[$name]}" "$name"
    if [ "$name" = v6 ]; then
        # The one armhf package on the newer Pis with a 32-bit OS: Pi 2 (Cortex-A7) and
        # an ARMv8 core in AArch32 (qemu's "max"), as Pi 3/4/5.
        for c in cortex-a7 max; do demo_run v6 "qemu-arm-static -cpu $c" "v6-$c"; done
    fi

    agent_run "$name" mqtt "mqtt://127.0.0.1:$up_port" 'protocol = "3.1.1"'
    run_ms[$name]=$last_ms
    run_rss[$name]=$last_rss
    agent_run "$name" tls "mqtts://127.0.0.1:$tls_port" "protocol = \"5\"
[upstream.tls]
ca_file = \"$work/ca.pem\""
    tls_rss[$name]=$last_rss
done

# ─── 5. packages ──────────────────────────────────────────────────────────────────────
step "packages"
rm -f "$packages"/*.deb "$packages/SHA256SUMS"
declare -A deb_arch=([v6]=armhf [a64]=arm64 [x64]=amd64)
declare -A deb_file
for name in v6 a64 x64; do
    args=(--no-build --no-strip --locked --output "$packages")
    [ "$name" = x64 ] || args+=(--target "${triple[$name]}")
    # arm64: the variant states the glibc the binary was linked against.
    [ "$name" = a64 ] && args+=(--variant arm64)
    dir=target
    [ "$name" = v6 ] && dir=target/cross/armv6
    CARGO_TARGET_DIR=$dir cargo deb "${args[@]}" >"$logs/deb-$name.log" 2>&1 ||
        { cat "$logs/deb-$name.log"; fail "cargo deb $name"; }
    deb_file[$name]=$(ls "$packages"/fieldbridge_*_"${deb_arch[$name]}".deb)
done

inspect() { # NAME
    local name=$1 deb=${deb_file[$1]} arch depends x
    x="$work/deb-$name"
    echo "--- $(basename "$deb") ($(stat -c %s "$deb") bytes)"
    dpkg-deb -I "$deb" | tee "$logs/deb-$name-info.txt" | sed 's/^/    /'
    dpkg-deb -c "$deb" | tee "$logs/deb-$name-contents.txt" | awk '{print "    " $1, $2, $6}'
    arch=$(dpkg-deb -f "$deb" Architecture)
    [ "$arch" = "${deb_arch[$name]}" ] || fail "$deb: Architecture $arch"
    depends=$(dpkg-deb -f "$deb" Depends)
    echo "$depends" | grep -q adduser || fail "$deb: no adduser in Depends: $depends"
    if [ "${floor[$name]}" = static ]; then
        echo "$depends" | grep -q libc6 && fail "$deb: a static binary depends on libc6: $depends"
    else
        local wanted
        wanted=$(echo "$depends" | sed -n 's/.*libc6 (>= \([0-9.]*\)).*/\1/p')
        [ -n "$wanted" ] || fail "$deb: no libc6 version in Depends: $depends"
        [ "$(printf '%s\n' "${floor[$name]}" "$wanted" | sort -V | tail -1)" = "$wanted" ] ||
            fail "$deb: Depends libc6 (>= $wanted) but the binary needs ${floor[$name]}"
    fi
    mkdir -p "$x"
    dpkg-deb -e "$deb" "$x/DEBIAN"
    for script in postinst postrm; do
        [ -x "$x/DEBIAN/$script" ] || fail "$deb: no executable $script"
        grep -q '#DEBHELPER#' "$x/DEBIAN/$script" && fail "$deb: $script still has #DEBHELPER#"
        sh -n "$x/DEBIAN/$script" || fail "$deb: $script is not valid sh"
    done
    grep -qx /etc/fieldbridge/fieldbridge.toml "$x/DEBIAN/conffiles" || fail "$deb: config is no conffile"
    grep -q 'systemd/system/fieldbridge.service$' "$logs/deb-$name-contents.txt" || fail "$deb: no unit"
    grep -qE '^-rwxr-xr-x .* \./usr/bin/fieldbridge$' "$logs/deb-$name-contents.txt" || fail "$deb: no usr/bin/fieldbridge 755"
    [ "$(dpkg-deb --fsys-tarfile "$deb" | tar -xOf - ./usr/bin/fieldbridge | sha256sum | cut -d' ' -f1)" = \
        "$(sha256sum <"${bin[$name]}" | cut -d' ' -f1)" ] || fail "$deb: usr/bin/fieldbridge is not ${bin[$name]}"
    if [ -f scripts/package-check.sh ]; then
        bash scripts/package-check.sh "$deb" || fail "scripts/package-check.sh $deb"
    fi
    echo "ok: Architecture $arch, Depends $depends, maintainer scripts $(ls "$x/DEBIAN" | tr '\n' ' ')"
}
for name in v6 a64 x64; do inspect "$name"; done
(cd "$packages" && sha256sum -- *.deb >SHA256SUMS && sha256sum --quiet -c SHA256SUMS)
cat "$packages/SHA256SUMS"

# ─── 6. install the amd64 package on a fresh Debian ───────────────────────────────────
step "install the amd64 package into a fresh $SUITE root"
rootfs_tar="$out/rootfs-$SUITE-amd64.tar"
# The root comes from the mirror in this machine's apt sources; it is kept for re-runs.
[ -s "$rootfs_tar" ] || nice -n 10 mmdebstrap --quiet --variant=apt "$SUITE" "$rootfs_tar"
root="$work/root"
mkdir -p "$root"
tar -xf "$rootfs_tar" -C "$root"
cp /etc/resolv.conf "$root/etc/resolv.conf"
cp "${deb_file[x64]}" "$root/tmp/"
mount -t proc proc "$root/proc" && mounts+=("$root/proc")
in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive "$@"; }
in_root apt-get update -qq >"$logs/install.log" 2>&1
in_root apt-get install -y "/tmp/$(basename "${deb_file[x64]}")" >>"$logs/install.log" 2>&1 ||
    { tail -20 "$logs/install.log"; fail "apt-get install of the amd64 package"; }
grep -E '^(Setting up|Unpacking) ' "$logs/install.log" | sed 's/^/    /'
[ "$(in_root fieldbridge --version)" = "fieldbridge $version" ] || fail "installed --version"
in_root getent passwd fieldbridge >/dev/null || fail "no fieldbridge user"
in_root id -nG fieldbridge | grep -qw dialout || fail "fieldbridge is not in dialout"
[ "$(in_root stat -c '%U:%G %a' /etc/fieldbridge/fieldbridge.toml)" = "root:fieldbridge 640" ] ||
    fail "config owner/mode: $(in_root stat -c '%U:%G %a' /etc/fieldbridge/fieldbridge.toml)"
[ -L "$root/etc/systemd/system/multi-user.target.wants/fieldbridge.service" ] || fail "unit not enabled"
in_root setpriv --reuid fieldbridge --regid fieldbridge --init-groups \
    fieldbridge check-config --config /etc/fieldbridge/fieldbridge.toml >"$logs/install-check-config.log" 2>&1 ||
    { cat "$logs/install-check-config.log"; fail "check-config of the installed config as the service user"; }
echo "installed: $(in_root fieldbridge --version), user $(in_root id fieldbridge)," \
    "config $(in_root stat -c '%U:%G %a' /etc/fieldbridge/fieldbridge.toml), unit enabled," \
    "check-config as the service user passes"
in_root apt-get purge -y fieldbridge >>"$logs/install.log" 2>&1 || fail "apt-get purge"
in_root getent passwd fieldbridge >/dev/null && fail "the user survived the purge"
[ -e "$root/usr/bin/fieldbridge" ] && fail "the binary survived the purge"
[ -e "$root/etc/fieldbridge" ] && fail "/etc/fieldbridge survived the purge"
echo "purged: binary, config and user gone"

# ─── report ───────────────────────────────────────────────────────────────────────────
step "report"
{
    echo "# Cross builds of fieldbridge $version ($(date -u +%Y-%m-%d), $(rustc --version | cut -d' ' -f1-2), zig $ZIGLANG_VERSION, $(qemu-arm-static --version | head -1 | cut -d' ' -f1-3))"
    echo
    echo "| build | target | size | glibc floor | qemu CPU | build s (CPU s) | --version ms | demo: listening ms | demo RSS KiB | run: listening ms | run RSS KiB | TLS run RSS KiB |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
    for name in "${names[@]}"; do
        s=$(stat -c %s "${bin[$name]}")
        echo "| ${label[$name]} | \`${triple[$name]}\` | $s B ($(mib "$s")) | ${floor[$name]} | ${cpu[$name]} | ${build_secs[$name]} (${build_cpu[$name]}) | ${version_ms[$name]} | ${demo_ms[$name]} | ${demo_rss[$name]} | ${run_ms[$name]} | ${run_rss[$name]} | ${tls_rss[$name]} |"
    done
    echo
    echo "The ARMv6 binary's demo on newer 32-bit cores: Cortex-A7 listening after ${demo_ms[v6-cortex-a7]} ms, RSS ${demo_rss[v6-cortex-a7]} KiB; ARMv8 AArch32 (max) ${demo_ms[v6-max]} ms, RSS ${demo_rss[v6-max]} KiB."
    echo
    echo "Each: check-config passed on ${configs_ok[v6]} example configs; demo readings reached mosquitto_sub;"
    echo "the pymodbus slave's readings reached the upstream mosquitto over MQTT 3.1.1 and over TLS + MQTT 5."
    echo
    echo "Packages (target/cross/packages/SHA256SUMS):"
    echo
    for name in v6 a64 x64; do
        echo "- \`$(basename "${deb_file[$name]}")\`: $(stat -c %s "${deb_file[$name]}") B, Depends: $(dpkg-deb -f "${deb_file[$name]}" Depends)"
    done
    echo
    echo "Whole script: $(($(date +%s) - started)) s on $(nproc) cores."
} >"$report"
cat "$report"
