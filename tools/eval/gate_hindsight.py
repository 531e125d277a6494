#!/usr/bin/env python3
"""How much evidence the labels of a run hold for the serving gate, in hindsight.

    python3 tools/eval/gate_hindsight.py --workdir W --data DIR [--bin target/release/edgemt]
        [--seeds 0-9] [--label-delay 20] SCENARIO ...

W is the --workdir of a tools/eval/scenarios.py run (its per-scenario configs are reused), DIR
its --data. Each scenario (e.g. drift-gain-5%) is replayed with label requests at its own
rate (as scenarios.py's requests mode does) into a fresh checkpoint directory; the gate's
discordant outcomes are read from the final checkpoint (tensor `gate.outcomes`: 1 = only the
teacher right, 0 = only the pretrained model right), and the largest wealth any single bet
could have reached on them is printed: the best start (after any prefix of outcomes) and the
best constant stake, chosen knowing the outcomes. No valid test at level alpha can serve the
teacher on a run where even that stays below 1/alpha (20 at the default 0.05): a mixture of
bets never beats its best member, and any bet chosen in advance does no better than the best
in hindsight. (The outcomes are those of this run; a different gate would have asked for
other labels, since requests look at the served model.) Standard library only.
"""
import argparse
import glob
import json
import math
import os
import struct
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scenarios import parse_seeds  # noqa: E402  (the matrix's own seed syntax: 0-9, 0,3,5)


def gate_outcomes(ckdir):
    """The gate window of the newest checkpoint in `ckdir` (safetensors: u64 header length,
    JSON header, then the data)."""
    manifests = sorted(glob.glob(os.path.join(ckdir, "ckpt-*.json")))
    data = open(manifests[-1][:-len(".json")] + ".safetensors", "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    a, b = header["gate.outcomes"]["data_offsets"]
    raw = data[8 + n + a:8 + n + b]
    return [v == 1.0 for v in struct.unpack("<%df" % ((b - a) // 4), raw)]


def hindsight_best(outcomes):
    """(wealth, start, stake, wins, losses) of the best single bet in hindsight."""
    best = (1.0, None, 0.0, 0, 0)
    for start in range(len(outcomes)):
        rest = outcomes[start:]
        w = sum(rest)
        l = len(rest) - w
        stake = max(0.0, min(0.95, (w - l) / len(rest)))
        if stake == 0.0:
            continue
        wealth = math.exp(w * math.log1p(stake) + l * math.log1p(-stake))
        if wealth > best[0]:
            best = (wealth, start, stake, w, l)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "edgemt"))
    ap.add_argument("--seeds", type=parse_seeds, default=list(range(10)))
    ap.add_argument("--label-delay", type=int, default=20)
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("scenarios", nargs="+")
    args = ap.parse_args()
    manifest = json.load(open(os.path.join(args.data, "scenarios.json")))["scenarios"]
    by_name = {s["name"]: s for s in manifest}
    print("| scenario | seeds the gate cannot serve in hindsight (best < %g) | best wealth min / median "
          "| outcomes of the worst seed |" % (1 / args.alpha))
    print("|---|---|---|---|")
    for name in args.scenarios:
        s = by_name[name]
        cfg = os.path.join(args.workdir, name.replace("%", "pct"), "edgemt.toml")
        budget = "%.6g" % (1.0 / s["label_every"])
        rows = []
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                ck = os.path.join(tmp, "ck")
                subprocess.run([args.bin, "replay", "--config", cfg, os.path.join(args.data, s["stream"]),
                                "--label-budget", budget, "--label-delay", str(args.label_delay),
                                "--seed", str(seed), "--checkpoint", ck, "--report", os.path.join(tmp, "r.json")],
                               check=True, capture_output=True)
                o = gate_outcomes(ck)
            rows.append((hindsight_best(o)[0], seed, "".join("W" if x else "l" for x in o)))
        rows.sort()
        below = sum(1 for r in rows if r[0] < 1 / args.alpha)
        print(f"| {name} | {below}/{len(rows)} | {rows[0][0]:.1f} / {rows[len(rows) // 2][0]:.1f} "
              f"| seed {rows[0][1]}: {rows[0][2] or '(none)'} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
