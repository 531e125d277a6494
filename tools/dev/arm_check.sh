#!/usr/bin/env bash
# ARM cross-check: builds edgemt for aarch64 (and, with --armv7, for armv7) with the Debian
# cross toolchains, runs the ARM binary under qemu-user and the native x86_64 release binary on
# the shipped recording, and compares them:
#   - predicted class identical for >= 99% of the replayed samples,
#   - every confidence within 1e-3,
#   - eval.teacher_accuracy, eval.source_accuracy, prequential_accuracy.teacher within 0.005.
# Prints PASS/FAIL per target and exits non-zero on any FAIL.
#
#   tools/dev/arm_check.sh            # aarch64 only
#   tools/dev/arm_check.sh --armv7    # aarch64, then armv7
#
# Environment: EDGEMT_ARM_TARGET_DIR (default /tmp/edgemt-arm-target) is the CARGO_TARGET_DIR
# of the ARM builds, so they never lock the main target/ directory; the x86 build uses cargo's
# normal target directory. EDGEMT_ARM_OUT (default /tmp/edgemt-arm-check) keeps the reports,
# predictions and logs. Cargo runs under `nice -n 10`. Needs root (or sudo) for apt-get, and
# python3 for the comparison. Linkers and runners come from .cargo/config.toml.
set -euo pipefail

cd "$(dirname "$0")/../.."
repo=$(pwd)

want_armv7=0
for arg in "$@"; do
    case "$arg" in
        --armv7) want_armv7=1 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "arm_check: unknown argument $arg (only --armv7)" >&2; exit 2 ;;
    esac
done

arm_target_dir=${EDGEMT_ARM_TARGET_DIR:-/tmp/edgemt-arm-target}
out=${EDGEMT_ARM_OUT:-/tmp/edgemt-arm-check}
mkdir -p "$out"

# Replay inputs, identical for every build.
replay_args=(replay --config config/edgemt.toml data/target_stream.jsonl
             --eval data/target_holdout.jsonl --seed 0)
MIN_SAME_CLASS=0.99
MAX_CONF_DIFF=1e-3
MAX_ACC_DIFF=0.005

log() { printf '\n== %s\n' "$*"; }

# ---------------------------------------------------------------- toolchains
sudo=""
[[ $(id -u) -ne 0 ]] && sudo="sudo"
apt_updated=0
ensure_pkgs() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    command -v apt-get >/dev/null || { echo "arm_check: need packages ${missing[*]} and there is no apt-get" >&2; exit 2; }
    log "installing ${missing[*]}"
    if [[ $apt_updated -eq 0 ]]; then
        $sudo apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

ensure_pkgs gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user file
[[ $want_armv7 -eq 1 ]] && ensure_pkgs gcc-arm-linux-gnueabihf libc6-dev-armhf-cross
command -v python3 >/dev/null || { echo "arm_check: python3 is needed for the comparison" >&2; exit 2; }

# Only adds the standard library for these targets to the current toolchain.
rustup target add aarch64-unknown-linux-gnu
[[ $want_armv7 -eq 1 ]] && rustup target add armv7-unknown-linux-gnueabihf

# The sources both builds come from; if another build or edit changes them mid-run, the
# comparison is not apples to apples and the summary says so.
src_fingerprint() {
    git -C "$repo" ls-files -co --exclude-standard -- src Cargo.toml Cargo.lock build.rs 2>/dev/null \
        | sort | xargs -r sha256sum | sha256sum | cut -c1-16
}
fp_before=$(src_fingerprint)

# ---------------------------------------------------------------- builds
declare -A build_secs
build_arm() {  # triple
    local triple=$1 start
    log "cargo build --release --target $triple --bin edgemt  (CARGO_TARGET_DIR=$arm_target_dir)"
    start=$(date +%s)
    CARGO_TARGET_DIR="$arm_target_dir" nice -n 10 cargo build --release --target "$triple" --bin edgemt
    build_secs[$triple]=$(( $(date +%s) - start ))
    echo "build wall time: ${build_secs[$triple]} s"
}

build_arm aarch64-unknown-linux-gnu
[[ $want_armv7 -eq 1 ]] && build_arm armv7-unknown-linux-gnueabihf

log "cargo build --release --bin edgemt  (x86_64, normal target dir)"
start=$(date +%s)
nice -n 10 cargo build --release --bin edgemt
build_secs[x86_64]=$(( $(date +%s) - start ))
echo "build wall time: ${build_secs[x86_64]} s"
x86_target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
x86_bin="$x86_target_dir/release/edgemt"

fp_after=$(src_fingerprint)

# ---------------------------------------------------------------- runs
run_replay() {  # name, command...
    local name=$1; shift
    local start
    start=$(date +%s%N)
    if ! "$@" "${replay_args[@]}" --report "$out/$name.report.json" \
            --predictions "$out/$name.predictions.jsonl" >"$out/$name.stdout" 2>"$out/$name.stderr"; then
        echo "arm_check: $name replay failed; last lines of $out/$name.stderr:" >&2
        tail -n 20 "$out/$name.stderr" >&2
        return 1
    fi
    local ms=$(( ($(date +%s%N) - start) / 1000000 ))
    printf '%s replay wall time: %d.%03d s\n' "$name" $((ms / 1000)) $((ms % 1000))
}

log "replaying data/target_stream.jsonl (x86_64 native)"
run_replay x86_64 "$x86_bin"

results=()
overall=0
check_target() {  # triple qemu sysroot
    local triple=$1 qemu=$2 sysroot=$3
    local bin="$arm_target_dir/$triple/release/edgemt"
    log "$triple binary"
    file "$bin"
    echo "size: $(stat -c %s "$bin") bytes ($(du -h "$bin" | cut -f1))"
    log "replaying data/target_stream.jsonl ($triple under $qemu)"
    if ! run_replay "$triple" "$qemu" -L "$sysroot" "$bin"; then
        results+=("$triple: FAIL (replay under $qemu failed)"); overall=1; return
    fi
    log "comparing $triple with x86_64"
    local verdict
    if verdict=$(python3 - "$out/x86_64" "$out/$triple" "$MIN_SAME_CLASS" "$MAX_CONF_DIFF" "$MAX_ACC_DIFF" <<'PY'
import json, sys
ref, arm, min_same, max_conf, max_acc = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:])

def preds(prefix):
    with open(prefix + ".predictions.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]

def accs(prefix):
    with open(prefix + ".report.json") as f:
        r = json.load(f)
    return {
        "eval.teacher_accuracy": r["eval"]["teacher_accuracy"],
        "eval.source_accuracy": r["eval"]["source_accuracy"],
        "prequential_accuracy.teacher": r["prequential_accuracy"]["teacher"],
    }

a, b = preds(ref), preds(arm)
ok = True
if len(a) != len(b) or len(a) == 0:
    print(f"prediction count differs or is zero: x86_64 {len(a)}, arm {len(b)}")
    sys.exit(1)
same = sum(x["class"] == y["class"] for x, y in zip(a, b))
share = same / len(a)
diffs = [abs(x["confidence"] - y["confidence"]) for x, y in zip(a, b)]
worst = max(range(len(diffs)), key=diffs.__getitem__)
order_ok = all(x["sample"] == y["sample"] for x, y in zip(a, b))
print(f"identical predicted class: {same}/{len(a)} = {share:.4%}  (need >= {min_same:.0%})")
print(f"max |confidence difference|: {diffs[worst]:.3g} at sample {worst}  (need <= {max_conf:g}); "
      f"mean {sum(diffs) / len(diffs):.3g}")
ok &= share >= min_same and diffs[worst] <= max_conf and order_ok
if not order_ok:
    print("sample indices differ between the two prediction files")
ra, rb = accs(ref), accs(arm)
for k in ra:
    d = abs(ra[k] - rb[k])
    good = d <= max_acc
    ok &= good
    print(f"{k:30s} x86_64 {ra[k]:.4f}  arm {rb[k]:.4f}  |diff| {d:.4f}  {'ok' if good else 'TOO FAR'}")
sys.exit(0 if ok else 1)
PY
    ); then
        echo "$verdict"
        results+=("$triple: PASS ($(echo "$verdict" | head -n 1))")
    else
        echo "$verdict"
        results+=("$triple: FAIL ($(echo "$verdict" | head -n 1))"); overall=1
    fi
}

check_target aarch64-unknown-linux-gnu qemu-aarch64 /usr/aarch64-linux-gnu
[[ $want_armv7 -eq 1 ]] && check_target armv7-unknown-linux-gnueabihf qemu-arm /usr/arm-linux-gnueabihf

# ---------------------------------------------------------------- summary
log "SUMMARY"
for t in "${!build_secs[@]}"; do echo "build wall time $t: ${build_secs[$t]} s"; done
if [[ "$fp_before" != "$fp_after" ]]; then
    echo "WARNING: src/ or Cargo.* changed while building; the builds may come from different sources."
    overall=1
fi
for r in "${results[@]}"; do echo "$r"; done
echo "outputs in $out"
if [[ $overall -eq 0 ]]; then echo "arm_check: PASS"; else echo "arm_check: FAIL"; fi
exit $overall
