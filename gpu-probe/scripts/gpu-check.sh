#!/usr/bin/env bash
# Real-GPU check for gpu-probe: read the real driver, then fill most of GPU 0's memory and
# keep it busy, and show free memory falling, utilisation rising and the verdict changing.
#
# Usage (from the repository root, on a machine with an NVIDIA GPU and driver):
#   gpu-probe/scripts/gpu-check.sh
# It builds the release binaries with cargo, or uses prebuilt ones from $GPU_PROBE_BIN_DIR.
# It only reads the GPU and allocates/copies memory on it; it changes no GPU setting.
# GPU_PROBE_ARGS adds agent flags (e.g. `--simulate` to rehearse the script without a GPU).
set -euo pipefail
cd "$(dirname "$0")/../.."

BIN=${GPU_PROBE_BIN_DIR:-}
if [ -z "$BIN" ]; then
  cargo build --release -q -p gpu-probe
  BIN=target/release
fi
PORT=${GPU_PROBE_PORT:-19400}
URL="http://127.0.0.1:$PORT"

echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname)"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used,utilization.gpu,temperature.gpu --format=csv || true
fi

echo
echo "== one reading: gpu-probe --once"
"$BIN/gpu-probe" --once ${GPU_PROBE_ARGS:-}

agent_pid=""; load_pid=""
cleanup() {
  [ -n "$load_pid" ] && kill "$load_pid" 2>/dev/null || true
  [ -n "$agent_pid" ] && kill "$agent_pid" 2>/dev/null || true
}
trap cleanup EXIT

"$BIN/gpu-probe" --listen "127.0.0.1:$PORT" --interval-ms 1000 ${GPU_PROBE_ARGS:-} 2>/tmp/gpu-probe-agent.log &
agent_pid=$!
fetch() {
  if command -v curl >/dev/null 2>&1; then curl -sf "$1"
  else python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1]).read().decode())' "$1"
  fi
}
for _ in $(seq 1 100); do
  fetch "$URL/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done

SUMMARY_PY=$(cat <<'PY'
import json, sys
label = sys.argv[1]
r = json.load(sys.stdin)
d = r["devices"][0]
gib = 1 << 30
live = d["liveness"]
print(f'{label:<10} gpu0 free {d["memory_free_bytes"] / gib:6.1f}/{d["memory_total_bytes"] / gib:.1f} GiB'
      f'  util {d["utilization_gpu_pct"]}%  mem-util {d["utilization_memory_pct"]}%'
      f'  {d["temperature_c"]} C  {d["power_w"]} W'
      f'  liveness {live["state"]} {live["round_trip_ms"] or 0:.2f} ms'
      f'  read {r["read_ms"]:.1f} ms  throttle {d["throttle_reasons"]}'
      f'  -> {d["verdict"]} {d["reasons"]}')
PY
)
summary() {
  fetch "$URL/v1/gpus" | python3 -c "$SUMMARY_PY" "$1"
}

echo
echo "== agent on $URL, polling every second"
summary idle
sleep 1
summary idle

echo
echo "== gpu-load: fill 97 % of GPU 0 memory, keep it busy for 20 s"
"$BIN/gpu-load" --device 0 --fill-pct 97 --seconds 20 &
load_pid=$!
for i in $(seq 1 12); do
  sleep 2
  kill -0 "$load_pid" 2>/dev/null || break
  summary "load+${i}x2s"
done
wait "$load_pid" || true
load_pid=""
sleep 2
summary after

echo
echo "== /metrics (device 0)"
fetch "$URL/metrics" | grep -E 'gpu="0"' | grep -vE '^#' | head -40
echo
echo "== /healthz"
fetch "$URL/healthz"; echo
