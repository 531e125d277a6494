#!/usr/bin/env python3
"""Compares two `tools/eval/scenarios.sh --json` runs run by run (same scenario, mode, seed):
how many runs the served model changed in, by how much per row, and the worst served −
pretrained of each. For "what did this knob or this build change" claims, e.g.

  bash tools/eval/scenarios.sh --calibration --seeds 0-9 --modes random,requests,swap \\
      --rates 1%,5% --json before.json
  bash tools/eval/scenarios.sh ... --extra-config knob.toml --json after.json
  python3 tools/eval/compare.py before.json after.json

Exit status 0; 2 on bad arguments.
"""
import collections
import json
import sys


def runs(path):
    with open(path) as f:
        j = json.load(f)
    return {(r["name"], r["mode"], run["seed"]): run for r in j["scenarios"] for run in r["runs"]}


def main(argv):
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    before, after = runs(argv[1]), runs(argv[2])
    keys = [k for k in before if k in after]
    changed = [(k, 100 * (after[k]["served"] - before[k]["served"])) for k in keys
               if abs(after[k]["served"] - before[k]["served"]) > 1e-9]
    print(f"{len(keys)} runs compared; served changed in {len(changed)}")
    rows = collections.defaultdict(list)
    for (name, mode, seed), d in changed:
        rows[(name, mode)].append((seed, d))
    for (name, mode), v in sorted(rows.items()):
        each = ", ".join(f"seed {s} {d:+.1f}" for s, d in v)
        print(f"  {name} {mode}: {each}")
    if keys:
        print(f"mean served change over all runs {sum(d for _, d in changed) / len(keys):+.3f} points")
    for label, runs_ in (("before", before), ("after", after)):
        gap = [100 * (runs_[k]["served"] - runs_[k]["source"]) for k in keys]
        if gap:
            print(f"{label}: worst served − pretrained {min(gap):+.1f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
