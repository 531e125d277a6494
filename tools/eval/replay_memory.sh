#!/usr/bin/env bash
# Replay streams its recording: peak memory must not grow with the recording's length.
# Builds a recording N times the shipped target stream (default 100, in a temp dir), replays
# the 1x and the Nx recording with the release binary and compares their peak RSS (VmHWM
# from the replay report). Fails if the Nx peak is more than 1.3x the 1x peak.
#
#   tools/eval/replay_memory.sh [N]
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-100}
BIN=target/release/edgemt
[ -x "$BIN" ] || { echo "error: $BIN is missing (cargo build --release)" >&2; exit 1; }
TMP=$(mktemp -d /tmp/edgemt-mem.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
for _ in $(seq "$N"); do cat data/target_stream.jsonl; done > "$TMP/long.jsonl"
"$BIN" replay --config config/edgemt.toml data/target_stream.jsonl --report "$TMP/1.json" >/dev/null 2>&1
"$BIN" replay --config config/edgemt.toml "$TMP/long.jsonl" --report "$TMP/n.json" >/dev/null 2>&1
python3 - "$TMP" "$N" "$(stat -c %s "$TMP/long.jsonl")" <<'PY'
import json, sys
tmp, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
one, many = (json.load(open(f"{tmp}/{k}.json")) for k in ("1", "n"))
a, b = one["peak_rss_bytes"] / 2**20, many["peak_rss_bytes"] / 2**20
print(f"1x: {one['samples']} samples, peak RSS {a:.1f} MiB")
print(f"{n}x: {many['samples']} samples ({size/2**20:.0f} MiB of JSON), peak RSS {b:.1f} MiB")
print(f"ratio {b/a:.2f} (limit 1.30)")
sys.exit(0 if b <= 1.3 * a else 1)
PY
