#!/usr/bin/env bash
# The test command (README and CI): formatting, then the whole test suite, which starts and
# stops its own mosquitto brokers. Lints are tools/dev/lint.sh (they add ~5 minutes of checking
# tract on 2 cores, so CI leaves them to developers).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
cargo fmt --all -- --check
# The benches are compiled too (dev profile, so no second optimized build of tract), so an
# API change cannot leave them broken until someone runs `cargo bench`.
cargo build --locked --benches
cargo test --locked
