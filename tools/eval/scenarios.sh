#!/usr/bin/env bash
# Scenario matrix: create the scenario data if missing (or older than the generator), then
# replay every scenario.
#
#   tools/eval/scenarios.sh [tools/eval/scenarios.py options]
#       e.g. --seeds 0-2 --modes random --rates 1%,5% --scenarios 'drift-*' --json /tmp/scen.json
#
# Data folder: $EDGEMT_SCENARIOS (default /tmp/edgemt-scenarios); it is (re)generated with
# tools/eval/make_scenarios.py when its scenarios.json is missing or of another version (needs
# the packages of tools/requirements.txt: $EDGEMT_PYTHON, default tools/.venv/bin/python).
# Binary: --bin PATH (default target/release/edgemt).
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA="${EDGEMT_SCENARIOS:-/tmp/edgemt-scenarios}"
PY="${EDGEMT_PYTHON:-tools/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
want=$(sed -n 's/^VERSION = \([0-9]*\)$/\1/p' tools/eval/make_scenarios.py)
have=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1])).get("version"))' \
    "$DATA/scenarios.json" 2>/dev/null || true)
if [ "$have" != "$want" ]; then
    echo "creating scenario data (version $want) in $DATA" >&2
    "$PY" tools/eval/make_scenarios.py "$DATA" >&2
fi
exec "$PY" tools/eval/scenarios.py --data "$DATA" "$@"
