#!/usr/bin/env bash
# The test command (README and CI): formatting and clippy (the same two checks as
# tools/dev/lint.sh), then the whole test suite, which starts and stops its own mosquitto brokers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
# The benches are compiled too (dev profile, so no second optimized build of tract), so an
# API change cannot leave them broken until someone runs `cargo bench`.
cargo build --locked --benches
cargo test --locked
