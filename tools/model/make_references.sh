#!/usr/bin/env bash
# Embedding references (`[model] reference`, README "Who may label") for the models this repo
# ships and tests with, made by `edgemt reference` from the inputs each was trained on
# (tools/model/reference_inputs.py). Written next to each model as <name>.embeddings.json.
#
#   bash tools/model/make_references.sh [--bin target/release/edgemt] [--python PY]
#
# Needs the Python environment of tools/requirements.txt (the HAPT and digits data).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=target/release/edgemt
PY=${EDGEMT_PYTHON:-python3}
while [ $# -gt 0 ]; do
    case "$1" in
        --bin) BIN=$2; shift 2 ;;
        --python) PY=$2; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
[ -x "$BIN" ] || cargo build --release --locked
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"$PY" tools/model/reference_inputs.py "$TMP"
# model, its training inputs
while read -r model inputs; do
    printf '[model]\npath = "%s"\n' "$PWD/$model" > "$TMP/config.toml"
    "$BIN" reference --config "$TMP/config.toml" "$TMP/$inputs" -o "${model%.onnx}.embeddings.json"
done <<'LIST'
models/hapt_mlp.onnx hapt_train.jsonl
tests/data/models/skl_mlp_softmax.onnx hapt_train.jsonl
tests/data/models/cnn_gemm_softmax.onnx hapt_train_cf.jsonl
tests/data/models/digits_cnn.onnx digits_train.jsonl
LIST
