#!/usr/bin/env bash
# Scenario matrix: create the scenario data if missing, then replay every scenario.
#
#   tools/eval/scenarios.sh [tools/eval/scenarios.py options]   e.g. --seeds 0-2 --json /tmp/scen.json
#
# Data folder: $EDGEMT_SCENARIOS (default /tmp/edgemt-scenarios); it is (re)generated with
# tools/eval/make_scenarios.py when scenarios.json is missing (needs tools/.venv, see
# tools/requirements.txt). Binary: --bin PATH (default target/release/edgemt).
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA="${EDGEMT_SCENARIOS:-/tmp/edgemt-scenarios}"
PY=tools/.venv/bin/python
[ -x "$PY" ] || PY=python3
if [ ! -f "$DATA/scenarios.json" ]; then
    echo "creating scenario data in $DATA" >&2
    "$PY" tools/eval/make_scenarios.py "$DATA" >&2
fi
exec "$PY" tools/eval/scenarios.py --data "$DATA" "$@"
