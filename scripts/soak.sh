#!/usr/bin/env bash
# The long version of the end-to-end no-loss test: an independent Modbus slave with a
# counter register, the fieldbridge binary killed with SIGKILL over and over, the
# upstream mosquitto restarted over and over, and at the end a check that every counter
# value the agent accepted reached the upstream subscriber (QoS 1: no gap; QoS 2: no
# gap and no duplicate).
#
# Usage: scripts/soak.sh [SECONDS] [POLL_MS]
#   SECONDS  how long each of the two runs (QoS 1, QoS 2) goes on; default 600
#   POLL_MS  poll interval of the counter; default 100 (the register is 16 bits, so
#            keep SECONDS * 1000 / POLL_MS below 65535)
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-600}"
poll_ms="${2:-100}"
if (( secs * 1000 / poll_ms >= 65000 )); then
    echo "the 16-bit counter would wrap: raise POLL_MS or lower SECONDS" >&2
    exit 2
fi
export PATH="$PATH:/usr/sbin:/sbin"
export FIELDBRIDGE_SOAK_SECS="$secs" FIELDBRIDGE_SOAK_POLL_MS="$poll_ms"
echo "soak: ${secs}s per QoS level, polling every ${poll_ms} ms"
cargo test --locked --test agent_e2e no_loss_under_kill_9 -- --nocapture --test-threads=1
