#!/usr/bin/env bash
# Lints every target with warnings as errors, as every commit should pass: the same two
# checks tools/test.sh (and so CI) runs first, without the test suite after them.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
