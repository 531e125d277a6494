#!/usr/bin/env bash
# The test command (README and CI): formatting, lints, then the whole test suite, which
# starts and stops its own mosquitto brokers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked
