#!/usr/bin/env bash
# Side-by-side run of edgemt's replay (release binary) and the Python reference loop
# (tools/eval/reference_loop.py: onnxruntime + numpy) on the same recording.
#
#   tools/eval/compare_python.sh [RECORDING [HOLDOUT]]     (default: data/target_stream.jsonl,
#                                                      data/target_holdout.jsonl)
#   RUNS=5 (seeds 0..RUNS-1)   OUT=dir for the reports (default: a fresh temp dir)
#
# Builds nothing: it needs target/release/edgemt (cargo build --release) and tools/.venv
# (numpy, onnxruntime, onnx). Runs are interleaved per seed: edgemt, Python with onnxruntime
# pinned to 1 thread (edgemt's tract backbone is single-threaded), Python with onnxruntime's
# default threads. numpy's BLAS is pinned to 1 thread for the pinned Python runs
# (OPENBLAS_NUM_THREADS=1, OMP_NUM_THREADS=1) and left alone for the default-threads runs.
# OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE are removed from the Python runs' environment when
# set (they slow current numpy); edgemt's environment is not touched.
set -euo pipefail
cd "$(dirname "$0")/../.."

REC=${1:-data/target_stream.jsonl}
HOLD=${2:-data/target_holdout.jsonl}
RUNS=${RUNS:-5}
BIN=target/release/edgemt
PY=tools/.venv/bin/python
CONFIG=config/edgemt.toml
MODEL=models/hapt_mlp.onnx

[ -x "$BIN" ] || { echo "error: $BIN is missing (build it with: cargo build --release)" >&2; exit 1; }
[ -x "$PY" ] || { echo "error: $PY is missing (python3 -m venv tools/.venv && tools/.venv/bin/pip install -r tools/requirements.txt)" >&2; exit 1; }
if [ -n "$(find src Cargo.toml Cargo.lock -newer "$BIN" -print -quit 2>/dev/null)" ]; then
  echo "warning: $BIN is older than src/ or Cargo.*; numbers are for the old build" >&2
fi

OUT=${OUT:-$(mktemp -d /tmp/edgemt-compare.XXXXXX)}
mkdir -p "$OUT"

# Environment of the Python runs.
py_env=(env)
for v in OPENBLAS_CORETYPE OPENBLAS_L2_SIZE; do
  if [ -n "${!v+x}" ]; then
    echo "note: unsetting $v=${!v} for the Python runs" >&2
    py_env+=(-u "$v")
  fi
done
py_pinned=("${py_env[@]}" OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1)
py_default=("${py_env[@]}" -u OPENBLAS_NUM_THREADS -u OMP_NUM_THREADS -u MKL_NUM_THREADS)

now() { date +%s.%N; }

# run NAME SEED CMD... : runs CMD, records whole-process wall time in $OUT/NAME-SEED.wall
run() {
  local name=$1 seed=$2; shift 2
  local t0 t1
  t0=$(now)
  "$@" >"$OUT/$name-$seed.log" 2>&1 || { echo "error: $name seed $seed failed; see $OUT/$name-$seed.log" >&2; cat "$OUT/$name-$seed.log" >&2; exit 1; }
  t1=$(now)
  echo "$t0 $t1" | awk '{printf "%.4f\n", $2 - $1}' >"$OUT/$name-$seed.wall"
}

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
echo "comparing on $REC (holdout $HOLD), $RUNS runs each, seeds 0..$((RUNS - 1)); reports in $OUT" >&2
for ((seed = 0; seed < RUNS; seed++)); do
  run edgemt "$seed" "$BIN" replay --config "$CONFIG" "$REC" --eval "$HOLD" \
    --seed "$seed" --report "$OUT/edgemt-$seed.json"
  run py1 "$seed" "${py_pinned[@]}" "$PY" tools/eval/reference_loop.py --model "$MODEL" --config "$CONFIG" "$REC" \
    --eval "$HOLD" --seed "$seed" --threads 1 --report "$OUT/py1-$seed.json"
  run pydef "$seed" "${py_default[@]}" "$PY" tools/eval/reference_loop.py --model "$MODEL" --config "$CONFIG" "$REC" \
    --eval "$HOLD" --seed "$seed" --threads 0 --report "$OUT/pydef-$seed.json"
  echo "  seed $seed done" >&2
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

# What numpy and onnxruntime are, as the pinned Python runs see them.
blas=$("${py_pinned[@]}" "$PY" - <<'EOF'
import numpy, onnxruntime
try:
    from threadpoolctl import threadpool_info
    import numpy.linalg  # noqa: F401  (loads the BLAS)
    libs = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    blas = "; ".join(f"{i['internal_api']} {i.get('version')} ({i.get('architecture')}, "
                     f"{i['num_threads']} thread{'s' if i['num_threads'] != 1 else ''})"
                     for i in libs) or "none found by threadpoolctl"
except ImportError:
    cfg = numpy.show_config(mode="dicts")["Build Dependencies"]["blas"]
    blas = f"{cfg.get('name')} {cfg.get('version')} (numpy.show_config; threadpoolctl not installed)"
print(f"numpy {numpy.__version__} BLAS: {blas}; onnxruntime {onnxruntime.__version__}")
EOF
)

"$PY" - "$OUT" "$RUNS" "$blas" "$load_before" "$load_after" "$(nproc)" "$("$BIN" --version 2>/dev/null || echo edgemt)" <<'EOF'
import json, statistics as st, sys
out, runs, blas, load0, load1, cores, version = sys.argv[1:]
runs = int(runs)
impls = [("edgemt", "edgemt release (tract, 1 thread)"),
         ("py1", "python ORT 1 thread, BLAS 1"),
         ("pydef", "python ORT default threads")]
data = {}
for key, _ in impls:
    rows = []
    for s in range(runs):
        r = json.load(open(f"{out}/{key}-{s}.json"))
        wall = float(open(f"{out}/{key}-{s}.wall").read())
        e = r["eval"]
        rows.append(dict(thr=r["throughput_samples_per_s"], rss=r["peak_rss_bytes"] / 2**20,
                         wall=wall, gain=100 * (e["teacher_accuracy"] - e["source_accuracy"]),
                         sgain=100 * (e["student_accuracy"] - e["source_accuracy"]),
                         preq=100 * r["prequential_accuracy"]["teacher"],
                         steps=r["train_steps"], ema=r["ema_updates"],
                         rollbacks=r.get("rollbacks", 0)))
    data[key] = rows
med = lambda key, f: st.median(r[f] for r in data[key])
mean = lambda key, f: st.mean(r[f] for r in data[key])
sd = lambda key, f: st.stdev(r[f] for r in data[key]) if runs > 1 else 0.0
base = med("edgemt", "thr")
print(f"{version}; {blas}")
print(f"{cores} cores; load average before {load0}, after {load1}"
      + ("  (machine busy: timings are noisy)" if float(load0.split()[0]) > 0.5 * int(cores)
         or float(load1.split()[0]) > 0.5 * int(cores) else ""))
print(f"{runs} runs each (seeds 0..{runs - 1}), interleaved; medians unless noted. "
      "Python RSS includes the interpreter, numpy and onnxruntime.")
print()
hdr = (f"{'implementation':<34}{'samples/s':>10}{'edgemt/x':>10}{'peak RSS MiB':>14}"
       f"{'wall s':>8}{'holdout gain pts (mean±sd)':>28}{'student gain':>14}{'preq teacher %':>16}")
print(hdr)
print("-" * len(hdr))
for key, name in impls:
    thr = med(key, "thr")
    print(f"{name:<34}{thr:>10.0f}{base / thr:>10.2f}{med(key, 'rss'):>14.1f}"
          f"{med(key, 'wall'):>8.2f}{mean(key, 'gain'):>+20.1f} ± {sd(key, 'gain'):<5.1f}"
          f"{mean(key, 'sgain'):>+14.1f}{mean(key, 'preq'):>16.1f}")
print()
print("holdout gain (teacher - pretrained, points) per seed:")
for key, name in impls:
    print(f"  {name:<34}" + "  ".join(f"{r['gain']:+5.1f}" for r in data[key]))
print("train steps / EMA updates / guard rollbacks per seed: " + "; ".join(
    f"{key} " + " ".join(f"{r['steps']}/{r['ema']}/{r['rollbacks']}" for r in data[key])
    for key, _ in impls))
print(f"wall-time ratio python(1 thread)/edgemt: {med('py1', 'wall') / med('edgemt', 'wall'):.2f}")
EOF
