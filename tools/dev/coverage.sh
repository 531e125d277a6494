#!/usr/bin/env bash
# Line and region coverage of src/ by the whole test suite, per file, with rustc's own
# instrumentation (-C instrument-coverage) and Debian's LLVM tools, which read rustc 1.95's
# profiles (LLVM 19 or newer). The daemon and CLI tests run the `edgemt` binary, so both the
# test binary and the binary are measured.
#
#   bash tools/dev/coverage.sh             # table on stdout, summary in target/coverage/summary.txt
#   bash tools/dev/coverage.sh --html DIR  # also an HTML report in DIR
#
# The instrumented build has its own target directory (a full build of tract, ~10 minutes on
# 2 cores, ~3 GB).
set -euo pipefail
cd "$(dirname "$0")/../.."

html=""
if [ "${1:-}" = "--html" ]; then html="${2:?--html needs a directory}"; fi

llvm=""
for v in 21 20 19; do
  if command -v "llvm-profdata-$v" >/dev/null 2>&1; then llvm=$v; break; fi
done
if [ -z "$llvm" ]; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  echo "coverage: installing llvm-19 (llvm-profdata, llvm-cov)" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq llvm-19 >/dev/null
  llvm=19
fi

bash tools/setup.sh
out=target/coverage
export CARGO_TARGET_DIR="$PWD/$out/build"
export RUSTFLAGS="-C instrument-coverage"
export CARGO_INCREMENTAL=0
export LLVM_PROFILE_FILE="$PWD/$out/profraw/%p-%8m.profraw"
rm -rf "$out/profraw"
mkdir -p "$out/profraw"

cargo test --locked --test integration --no-run
test_bin=$(cargo test --locked --test integration --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["kind"] == ["test"] and m.get("executable"):
        print(m["executable"])')
cargo test --locked --test integration

"llvm-profdata-$llvm" merge -sparse "$out"/profraw/*.profraw -o "$out/edgemt.profdata"
objects=(--object "$test_bin" --object "$CARGO_TARGET_DIR/debug/edgemt")
ignore='(/\.cargo/|/rustc/|/tests/)'
"llvm-cov-$llvm" report "${objects[@]}" --instr-profile "$out/edgemt.profdata" \
  --ignore-filename-regex "$ignore" | tee "$out/summary.txt"
if [ -n "$html" ]; then
  "llvm-cov-$llvm" show "${objects[@]}" --instr-profile "$out/edgemt.profdata" \
    --ignore-filename-regex "$ignore" --format html --output-dir "$html"
  echo "coverage: HTML report in $html" >&2
fi
