#!/usr/bin/env bash
# The main job: build edgemt in release mode and replay the shipped shifted recording through
# the shipped model, scoring the adapted teacher against the pretrained model on the holdout.
# It needs only the Rust toolchain: no broker, no Python (tools/setup.sh installs those for
# the tests, tools/test.sh runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin edgemt
./target/release/edgemt replay --config config/edgemt.toml data/target_stream.jsonl \
  --eval data/target_holdout.jsonl --report report.json "$@"
