#!/usr/bin/env python3
"""Scenario matrix: replay every scenario of tools/eval/make_scenarios.py for several seeds and
print one markdown table plus the acceptance verdicts.

    python3 tools/eval/scenarios.py --data /tmp/edgemt-scenarios [--bin target/release/edgemt]
        [--seeds 0-9] [--scenarios control-5%,rot90x-5%] [--extra-config snippet.toml]
        [--calibration] [--json out.json] [--workdir DIR]

(tools/eval/scenarios.sh creates the data first if it is missing.) Standard library only.

Per scenario and seed it writes a config (model path absolute, everything else default,
then the --extra-config snippet; with --calibration, models whose channel axis holds
acc x,y,z then gyro x,y,z also get `[calibration] polar = [[0, 1, 2]] axial = [[3, 4, 5]]`),
runs `edgemt replay --config CFG STREAM --eval HOLDOUT --seed S --report R.json` one at a
time, and reads the report's `eval`. The served model's accuracy is `eval.served_accuracy`;
binaries that do not report it yet fall back to `eval.teacher_accuracy` (the table header
says which). Pretrained = `eval.source_accuracy` (the frozen model on the holdout).

Exit status: 0 when every replay ran (whatever the verdicts), 1 when a replay failed or
its report was unusable, 2 on bad arguments/data.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

# tools/<purpose>/this.py: the repository is two folders up.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CAL_SNIPPET = "[calibration]\npolar = [[0, 1, 2]]\naxial = [[3, 4, 5]]\n"
TOL = 1.0            # acceptance: served >= pretrained - TOL points
EPS = 1e-9


def parse_seeds(spec):
    seeds = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            seeds.extend(range(int(a), int(b) + 1))
        else:
            seeds.append(int(part))
    if not seeds:
        raise argparse.ArgumentTypeError("no seeds in %r" % spec)
    return seeds


def toml_str(s):
    return json.dumps(s)   # a JSON string is a valid TOML basic string


def mean(v):
    return sum(v) / len(v) if v else float("nan")


def fmt(v, spec=".3f", none="—"):
    return none if v is None else format(v, spec)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/tmp/edgemt-scenarios",
                    help="folder with scenarios.json (tools/eval/make_scenarios.py OUTDIR)")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "edgemt"),
                    help="edgemt binary (default: target/release/edgemt in this repo)")
    ap.add_argument("--repo", default=ROOT, help="repo root the manifest's model paths are relative to")
    ap.add_argument("--seeds", type=parse_seeds, default=list(range(10)), help="e.g. 0-9 or 0,3,5 (default 0-9)")
    ap.add_argument("--scenarios", default="", help="comma-separated scenario names (default: all)")
    ap.add_argument("--extra-config", help="TOML snippet appended to every config")
    ap.add_argument("--calibration", action="store_true",
                    help="add [calibration] polar/axial for models with acc xyz + gyro xyz channels")
    ap.add_argument("--json", help="write the raw numbers here")
    ap.add_argument("--workdir", help="configs and reports (default: a temp dir, removed afterwards)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per replay")
    args = ap.parse_args()

    man_path = os.path.join(args.data, "scenarios.json")
    try:
        with open(man_path) as f:
            manifest = json.load(f)
    except OSError as e:
        print(f"error: {e}; create it with tools/eval/make_scenarios.py {args.data}", file=sys.stderr)
        return 2
    scen = manifest["scenarios"]
    if args.scenarios:
        want = [s.strip() for s in args.scenarios.split(",") if s.strip()]
        names = {s["name"] for s in scen}
        unknown = [w for w in want if w not in names]
        if unknown:
            print(f"error: unknown scenario(s) {unknown}; known: {sorted(names)}", file=sys.stderr)
            return 2
        scen = [s for s in scen if s["name"] in want]
    binary = os.path.abspath(args.bin)
    if not os.access(binary, os.X_OK):
        print(f"error: no executable edgemt at {binary} (--bin)", file=sys.stderr)
        return 2
    extra = ""
    if args.extra_config:
        with open(args.extra_config) as f:
            extra = f.read()
        if not extra.endswith("\n"):
            extra += "\n"

    own_workdir = args.workdir is None
    workdir = tempfile.mkdtemp(prefix="edgemt-scen-") if own_workdir else os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)

    results = []          # one per scenario
    failures = []
    fallback_used = False
    served_seen = False
    t_start = time.time()
    n_runs = len(scen) * len(args.seeds)
    k = 0
    for s in scen:
        sdir = os.path.join(workdir, s["name"].replace("%", "pct"))
        os.makedirs(sdir, exist_ok=True)
        cfg = os.path.join(sdir, "edgemt.toml")
        model = os.path.join(os.path.abspath(args.repo), s["model"])
        calibrated = bool(args.calibration and s.get("calibration_channels"))
        with open(cfg, "w") as f:
            f.write("# generated by tools/eval/scenarios.py for scenario %s\n[model]\npath = %s\n"
                    % (s["name"], toml_str(model)))
            if extra:
                f.write("\n" + extra)
            if calibrated:
                f.write("\n" + CAL_SNIPPET)
        stream = os.path.join(args.data, s["stream"])
        holdout = os.path.join(args.data, s["holdout"])
        runs = []
        for seed in args.seeds:
            k += 1
            rep = os.path.join(sdir, f"report-seed{seed}.json")
            if os.path.exists(rep):
                os.remove(rep)
            cmd = [binary, "replay", "--config", cfg, stream, "--eval", holdout,
                   "--seed", str(seed), "--report", rep]
            t0 = time.time()
            try:
                p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   timeout=args.timeout)
                rc, err = p.returncode, p.stderr
            except subprocess.TimeoutExpired:
                rc, err = -1, f"timed out after {args.timeout} s"
            dt = time.time() - t0
            ev = None
            if rc == 0:
                try:
                    with open(rep) as f:
                        report = json.load(f)
                    ev = report["eval"]
                    for key in ("teacher_accuracy", "student_accuracy", "source_accuracy"):
                        float(ev[key])
                except (OSError, ValueError, KeyError, TypeError) as e:
                    rc, err = -2, f"unusable report {rep}: {e!r}"
            if rc != 0:
                tail = "\n".join(err.strip().splitlines()[-5:])
                failures.append(dict(scenario=s["name"], seed=seed, rc=rc, error=tail, cmd=cmd))
                print(f"[{k}/{n_runs}] {s['name']} seed {seed}: FAILED (rc {rc})\n{tail}", file=sys.stderr)
                continue
            if ev.get("served_accuracy") is not None:
                served, served_seen = float(ev["served_accuracy"]), True
            else:
                served, fallback_used = float(ev["teacher_accuracy"]), True
            run = dict(seed=seed, served=served, served_reported=ev.get("served_accuracy") is not None,
                       teacher=ev["teacher_accuracy"], student=ev["student_accuracy"],
                       source=ev["source_accuracy"], eval_samples=ev.get("samples"),
                       gain_points=100.0 * (served - ev["source_accuracy"]),
                       prequential=report.get("prequential_accuracy"), labeled=report.get("labeled"),
                       rollbacks=report.get("rollbacks"), train_steps=report.get("train_steps"),
                       pseudo_labels=report.get("pseudo_labels"), gate=report.get("gate"),
                       seconds=round(dt, 2))
            runs.append(run)
            print(f"[{k}/{n_runs}] {s['name']} seed {seed}: served {served:.4f} "
                  f"pretrained {ev['source_accuracy']:.4f} ({run['gain_points']:+.1f} pts, "
                  f"{report.get('rollbacks')} rollbacks) {dt:.1f}s", file=sys.stderr, flush=True)

        pre_man = s.get("pretrained_holdout_accuracy")
        pre = runs[0]["source"] if runs else pre_man
        res = dict(name=s["name"], kind=s["kind"], model=s["model"], label_rate=s["label_rate"],
                   rotation=s.get("rotation"), in_candidate_set=s.get("in_candidate_set"),
                   control=s.get("control"), calibration=calibrated,
                   pretrained=pre, pretrained_onnxruntime=pre_man,
                   unrotated=s.get("unrotated_holdout_accuracy"), runs=runs)
        if runs:
            gains = [r["gain_points"] for r in runs]
            worst = min(runs, key=lambda r: r["gain_points"])
            res.update(served_mean=mean([r["served"] for r in runs]),
                       teacher_mean=mean([r["teacher"] for r in runs]),
                       gain_mean=mean(gains), gain_worst=worst["gain_points"], worst_seed=worst["seed"],
                       teacher_gain_mean=100.0 * mean([r["teacher"] - r["source"] for r in runs]),
                       gate_adapted=sum(1 for r in runs if isinstance(r.get("gate"), dict)
                                        and r["gate"].get("serving") not in (None, "pretrained")),
                       gate_reported=sum(1 for r in runs if isinstance(r.get("gate"), dict)))
            if pre_man is not None and abs(pre - pre_man) > 0.0015:
                res["warning"] = (f"binary's source_accuracy {pre:.4f} differs from onnxruntime's "
                                  f"{pre_man:.4f}: input layout mismatch?")
                print(f"warning: {s['name']}: {res['warning']}", file=sys.stderr)
            if s["kind"] == "shifted" and res["unrotated"] is not None and res["unrotated"] - pre > 1e-6:
                res["gap_recovered"] = (res["served_mean"] - pre) / (res["unrotated"] - pre)
        results.append(res)

    # ---- table ----
    if fallback_used and served_seen:
        served_hdr = "served (teacher where served_accuracy is absent)"
    elif fallback_used:
        served_hdr = "served (= teacher: no served_accuracy in the reports)"
    else:
        served_hdr = "served"
    seeds_txt = (f"{args.seeds[0]}–{args.seeds[-1]}" if args.seeds == list(range(args.seeds[0], args.seeds[-1] + 1))
                 else ",".join(map(str, args.seeds)))
    print(f"\nScenario matrix: {len(results)} scenarios, seeds {seeds_txt}, binary {binary}"
          + (", --calibration" if args.calibration else "")
          + (f", extra config {args.extra_config}" if args.extra_config else "")
          + f" ({time.time() - t_start:.0f} s)\n")
    print(f"| scenario | kind | labels | pretrained | {served_hdr} mean | gain mean (pts) | "
          f"gain worst (pts, seed) | gap recovered | teacher gain mean (pts) | gate serves adapted |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        n = len(r["runs"])
        if not n:
            print(f"| {r['name']} | {r['kind']} | {r['label_rate']} | {fmt(r['pretrained'])} | failed | | | | | |")
            continue
        gap = "—"
        if r["kind"] == "shifted" and r.get("in_candidate_set") and "gap_recovered" in r:
            gap = f"{100 * r['gap_recovered'] + 0.0:.0f} % (of {100 * (r['unrotated'] - r['pretrained']):.1f} pts)"
            gap = gap.replace("-0 %", "0 %")
        seeds_note = "" if n == len(args.seeds) else f" ({n}/{len(args.seeds)} seeds)"
        print(f"| {r['name']}{seeds_note} | {r['kind']} | {r['label_rate']} | {r['pretrained']:.3f} | "
              f"{r['served_mean']:.3f} | {r['gain_mean']:+.1f} | {r['gain_worst']:+.1f} (s{r['worst_seed']}) | {gap} | "
              f"{r['teacher_gain_mean']:+.1f} | "
              + (f"{r['gate_adapted']}/{n} |" if r["gate_reported"] else "— |"))
    print("\n(gain = served − pretrained on the scenario's holdout, in points; gap recovered = mean gain / "
          "(pretrained on the unrotated holdout − pretrained), in-set rotations only; teacher gain = the "
          "adapted teacher's, whatever the gate serves; gate serves adapted = seeds whose report's "
          "gate.serving is not \"pretrained\" at the end)")

    # ---- verdicts ----
    verdicts = []
    cn = [(r, run) for r in results if r["kind"] in ("control", "natural") for run in r["runs"]]
    missing = [r["name"] for r in results if r["kind"] in ("control", "natural") and len(r["runs"]) < len(args.seeds)]
    if cn:
        print()
        # the acceptance rule on the served model; the same rule on the adapted teacher is
        # printed for information only (it shows what the serving gate protects against)
        for what, key, info in (("served", "served", False), ("teacher", "teacher", True)):
            gain = lambda run_: 100.0 * (run_[key] - run_["source"])  # noqa: E731
            r, run = min(cn, key=lambda p: gain(p[1]))
            below = sum(1 for _, run_ in cn if gain(run_) < -TOL - EPS)
            ok = below == 0 and (info or not missing)
            rule = f"every control and natural scenario, every seed: {what} >= pretrained − {TOL:g} point"
            worst = (f"worst: {r['name']} seed {run['seed']}, {what} {run[key]:.3f} vs pretrained "
                     f"{run['source']:.3f} ({gain(run):+.1f} pts); {below}/{len(cn)} runs below")
            if missing and not info:
                worst += f"; runs missing for {', '.join(missing)}"
            if not info:
                verdicts.append(dict(rule=rule, passed=ok, runs=len(cn), runs_below=below, missing=missing,
                                     worst=dict(scenario=r["name"], seed=run["seed"], gain_points=gain(run))))
            print(f"{'(info, not an acceptance rule) ' if info else ''}{rule}: "
                  f"{'PASS' if ok else 'FAIL'} ({worst})")
    if failures:
        print(f"\n{len(failures)} replay(s) FAILED: "
              + ", ".join(f"{f['scenario']} seed {f['seed']}" for f in failures))

    if args.json:
        out = dict(binary=binary, seeds=args.seeds, data=os.path.abspath(args.data),
                   manifest_version=manifest.get("version"), calibration=args.calibration,
                   extra_config=args.extra_config, extra_config_text=extra or None,
                   served_fallback_to_teacher=fallback_used, tolerance_points=TOL,
                   scenarios=results, verdicts=verdicts, failures=failures)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if own_workdir and not failures:
        shutil.rmtree(workdir, ignore_errors=True)
    elif failures:
        print(f"configs and reports kept in {workdir}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
