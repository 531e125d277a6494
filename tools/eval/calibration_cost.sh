#!/usr/bin/env bash
# What mounting calibration costs: CPU time (user + sys) of `edgemt replay` on a recording
# with the shipped config, with and without its [calibration] channels, interleaved RUNS
# times (default 10); prints the medians and their ratio (the budget is 1.5x).
#
#   tools/eval/calibration_cost.sh [RECORDING]    (default data/target_stream.jsonl)
set -euo pipefail
cd "$(dirname "$0")/../.."
REC=${1:-data/target_stream.jsonl}
RUNS=${RUNS:-10}
BIN=target/release/edgemt
[ -x "$BIN" ] || { echo "error: $BIN is missing (cargo build --release)" >&2; exit 1; }
TMP=$(mktemp -d /tmp/edgemt-calcost.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
model="$(pwd)/models/hapt_mlp.onnx"
sed "s|\"../models/hapt_mlp.onnx\"|\"$model\"|" config/edgemt.toml > "$TMP/with.toml"
grep -v '^polar\|^axial' "$TMP/with.toml" > "$TMP/without.toml"
python3 - "$BIN" "$REC" "$TMP" "$RUNS" <<'PY'
import resource, statistics as st, subprocess, sys
binary, rec, tmp, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def cpu(cfg):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([binary, "replay", "--config", cfg, rec], capture_output=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
without, with_ = [], []
for _ in range(runs):
    without.append(cpu(f"{tmp}/without.toml"))
    with_.append(cpu(f"{tmp}/with.toml"))
a, b = st.median(without), st.median(with_)
print(f"{rec}: median CPU without calibration {a:.3f} s, with {b:.3f} s, ratio {b/a:.2f} (budget 1.5)")
PY
