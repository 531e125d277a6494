#!/usr/bin/env bash
# Replays a recording once per seed with the release binary and prints each seed's holdout
# accuracies and the teacher's gain over the pretrained model, then the mean, min and max.
#
#   tools/eval/seeds.sh [RECORDING HOLDOUT [CONFIG]]   (default: the shipped target pair)
#   SEEDS="0 1 2 ..." (default 0..9)   EXTRA="--flag ..." passed to replay
#
# Needs target/release/edgemt (cargo build --release) and python3 (for the JSON).
set -euo pipefail
cd "$(dirname "$0")/../.."
REC=${1:-data/target_stream.jsonl}
HOLD=${2:-data/target_holdout.jsonl}
CONFIG=${3:-config/edgemt.toml}
SEEDS=${SEEDS:-0 1 2 3 4 5 6 7 8 9}
BIN=target/release/edgemt
[ -x "$BIN" ] || { echo "error: $BIN is missing (cargo build --release)" >&2; exit 1; }
OUT=$(mktemp -d /tmp/edgemt-seeds.XXXXXX)
for s in $SEEDS; do
  # shellcheck disable=SC2086
  "$BIN" replay --config "$CONFIG" "$REC" --eval "$HOLD" --seed "$s" --report "$OUT/$s.json" ${EXTRA:-} >/dev/null 2>&1
done
# shellcheck disable=SC2086  # SEEDS is a list of words on purpose
python3 - "$OUT" $SEEDS <<'PY'
import json, sys, statistics as st
out, seeds = sys.argv[1], sys.argv[2:]
gains = []
tgains = []
print("seed  pretrained  served  serving     teacher  student  served gain  teacher gain  samples/s  peak_rss_MiB")
for s in seeds:
    r = json.load(open(f"{out}/{s}.json"))
    e = r["eval"]
    served = e.get("served_accuracy", e["teacher_accuracy"])
    g = 100 * (served - e["source_accuracy"])
    tg = 100 * (e["teacher_accuracy"] - e["source_accuracy"])
    gains.append(g)
    tgains.append(tg)
    serving = r.get("gate", {}).get("serving", "-")
    print(f"{s:>4}  {e['source_accuracy']:.4f}      {served:.4f}  {serving:<10}  {e['teacher_accuracy']:.4f}   {e['student_accuracy']:.4f}   {g:+6.1f}       {tg:+6.1f}        {r['throughput_samples_per_s']:7.0f}    {r['peak_rss_bytes']/2**20:.1f}")
print(f"served gain: mean {st.mean(gains):+.1f}, min {min(gains):+.1f}, max {max(gains):+.1f} points over {len(gains)} seeds")
print(f"teacher gain: mean {st.mean(tgains):+.1f}, min {min(tgains):+.1f}, max {max(tgains):+.1f} points")
PY
