#!/usr/bin/env bash
# The test command (README and CI): formatting and clippy (the same two checks as
# tools/dev/lint.sh), then the whole test suite, which starts and stops its own mosquitto brokers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
# The daemon is the cargo feature `daemon`: without it no async or MQTT crate may be linked,
# and the core commands must still work. Costs ~35 s on 2 busy cores: tract and nearly every
# other dependency are shared with the default build; only edgemt, tracing-subscriber and
# two small regex crates (other features) compile a second time; then a ~2 s replay. The
# default build below puts the full binary back in target/debug/edgemt.
core_deps=$(cargo tree --locked --no-default-features -e normal)
if grep -E 'rumqttc|tokio|prometheus|sd-notify' <<<"$core_deps"; then
    echo "a build without the daemon still depends on the crates above" >&2
    exit 1
fi
cargo build --locked --no-default-features --bin edgemt
target/debug/edgemt replay --config config/edgemt.toml data/control_stream.jsonl >/dev/null
# The benches are compiled too (dev profile, so no second optimized build of tract), so an
# API change cannot leave them broken until someone runs `cargo bench`.
cargo build --locked --benches
cargo test --locked
