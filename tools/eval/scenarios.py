#!/usr/bin/env python3
"""Scenario matrix: replay every scenario of tools/eval/make_scenarios.py for several seeds, in
two label modes, and print one markdown table plus the acceptance verdicts.

    python3 tools/eval/scenarios.py --data /tmp/edgemt-scenarios [--bin target/release/edgemt]
        [--seeds 0-9] [--scenarios 'control-5%,drift-*'] [--modes random,requests]
        [--rates 1%,5%] [--label-delay 20] [--extra-config snippet.toml] [--calibration]
        [--json out.json] [--workdir DIR] [--no-reference]

(tools/eval/scenarios.sh creates the data first if it is missing.) Standard library only.

Label modes, at the same label count:
  random    the recording's own `label` fields: every k-th line (k = 100 for 1 %, 20 for 5 %,
            33 for 3 %; "partial" labels only three classes), as make_scenarios.py wrote them.
  swap      (control scenarios only) the label poisoning of issue 17: the recording's labels,
            and on every 5th line a label that swaps two similar classes (SITTING/STANDING
            for the activity models, 3/5 for digits) and is honest for the other classes.
            Its rule: served >= pretrained - 1 point and labels disputed in every seed.
  requests  the same recording with `--label-budget 1/k --label-delay D`: replay ignores the
            `label` fields, and edgemt asks for labels itself; each request is answered from
            that sample's `truth` D samples later, never more than 1/k of the samples seen so
            far. Not for "partial" streams (they model labels limited to some classes). A binary
            whose replay has no --label-budget (older than the flag) is detected from `replay
            --help` and its requests rows are skipped with a message.
`--scenarios` takes names, prefixes or globs (`drift-*`, `digits`), comma-separated;
`--rates` filters by the scenario's label rate (1%, 3%, 5%, partial); default: all.

Per scenario and seed it writes a config (model path absolute, then the scenario's own config
snippet from scenarios.json if any, then the --extra-config snippet; `[model] reference` is
the model's <name>.embeddings.json when it has one (tools/model/make_references.sh), unless
--no-reference; with --calibration,
models whose channel axis holds acc x,y,z then gyro x,y,z also get `[calibration] polar =
[[0, 1, 2]] axial = [[3, 4, 5]]`), runs `edgemt replay --config CFG STREAM --eval HOLDOUT
--seed S --report R.json [--label-budget B --label-delay D]` one at a time, and reads the
report's `eval` (and `requests` when present). The served model's accuracy is
`eval.served_accuracy`; binaries that do not report it yet fall back to
`eval.teacher_accuracy` (the table header says which). Pretrained = `eval.source_accuracy`
(the frozen model on the holdout).

Verdicts:
  (a) every control and natural scenario (no synthetic shift, no drift), in each label mode,
      every seed: served >= pretrained - 1 point;
  (b) every gradual-drift scenario (kind "drift") with requests: served captures >= 70 % of
      the teacher's gain on average (mean(served - pretrained) / mean(teacher - pretrained))
      and served - pretrained > 0 in the worst seed. (The same for random labels is printed
      for information.)

Exit status: 0 when every replay ran (whatever the verdicts; skipped requests rows are not
failures), 1 when a replay failed or its report was unusable, 2 on bad arguments/data.
"""
import argparse
import fnmatch
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
TOL = 1.0            # (a): served >= pretrained - TOL points
CAPTURE = 0.70       # (b): served captures at least this share of the teacher's mean gain
MIN_TEACHER_GAIN = 0.5   # points; below it there is no gain to capture and the share is not shown
EPS = 1e-9
MODES = ("random", "requests", "swap")
SWAP_EVERY = 5
SWAP_KINDS = ("control",)
DRIFT_KINDS = ("drift",)
CONTROL_KINDS = ("control", "natural")
# Columns from the report's `requests` object (src/replay.rs `RequestReport`).
REQUEST_KEYS = {"asked": ("made",),
                "answered": ("answered",),
                "discordant": ("discordant",)}


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


def parse_list(spec):
    return [s.strip() for s in spec.split(",") if s.strip()]


def toml_str(s):
    return json.dumps(s)   # a JSON string is a valid TOML basic string


def mean(v):
    return sum(v) / len(v) if v else float("nan")


def fmt(v, spec=".3f", none="—"):
    return none if v is None else format(v, spec)


def pts(v):
    """Points with a sign, one decimal, no "-0.0"."""
    return format(round(v, 1) + 0.0, "+.1f")


def select_scenarios(scen, terms):
    """Scenarios matching any term (exact name, base name, prefix or glob); unknown terms listed."""
    if not terms:
        return scen, []
    hits, unknown = set(), []
    for t in terms:
        m = {s["name"] for s in scen
             if fnmatch.fnmatchcase(s["name"], t) or s["name"].startswith(t) or s.get("base") == t}
        if not m:
            unknown.append(t)
        hits |= m
    return [s for s in scen if s["name"] in hits], unknown


def supports_requests(binary):
    """True when `edgemt replay --help` lists --label-budget."""
    try:
        p = subprocess.run([binary, "replay", "--help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--label-budget" in p.stdout


def request_stats(rep):
    """{asked, answered, discordant} from the report's `requests` object (numbers only), or None."""
    obj = rep.get("requests")
    if not isinstance(obj, dict):
        return None
    out = {}
    for col, keys in REQUEST_KEYS.items():
        for k in keys:
            v = obj.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[col] = v
                break
    out["raw"] = obj
    return out


def budget_of(s):
    """The label budget matching the scenario's random-label count: 1/k."""
    k = s.get("label_every")
    return None if not k else float("%.6g" % (1.0 / k))


def swap_pair(model):
    """Two similar classes of the scenario's model: the pair a targeted poisoner would swap."""
    return (3, 5) if "digits" in model else (3, 4)


def swapped_stream(src, dst, pair):
    """The recording with every SWAP_EVERY-th line labeled: the pair's classes swapped, the
    others honest (from `truth`); the other lines keep their labels."""
    a, b = pair
    with open(src) as f, open(dst, "w") as out:
        for i, line in enumerate(f):
            if i % SWAP_EVERY == 0 and line.strip():
                d = json.loads(line)
                t = d["truth"]
                d["label"] = b if t == a else a if t == b else t
                line = json.dumps(d) + "\n"
            out.write(line)


def summarize(runs):
    pre = [r["source"] for r in runs]
    gain = [100.0 * (r["served"] - r["source"]) for r in runs]
    tgain = [100.0 * (r["teacher"] - r["source"]) for r in runs]
    worst = min(runs, key=lambda r: r["served"] - r["source"])
    out = dict(served_mean=mean([r["served"] for r in runs]), served_worst=min(r["served"] for r in runs),
               teacher_mean=mean([r["teacher"] for r in runs]), teacher_worst=min(r["teacher"] for r in runs),
               pretrained_mean=mean(pre),
               gain_mean=mean(gain), gain_worst=min(gain), worst_seed=worst["seed"],
               teacher_gain_mean=mean(tgain),
               captured=(mean(gain) / mean(tgain)) if mean(tgain) >= MIN_TEACHER_GAIN else None,
               gate_adapted=sum(1 for r in runs if isinstance(r.get("gate"), dict)
                                and r["gate"].get("serving") not in (None, "pretrained")),
               gate_reported=sum(1 for r in runs if isinstance(r.get("gate"), dict)))
    req = [r["requests"] for r in runs if r.get("requests")]
    if req:
        out["requests"] = {c: mean([q[c] for q in req if c in q]) if any(c in q for q in req) else None
                           for c in REQUEST_KEYS}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/tmp/edgemt-scenarios",
                    help="folder with scenarios.json (tools/eval/make_scenarios.py OUTDIR)")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "edgemt"),
                    help="edgemt binary (default: target/release/edgemt in this repo)")
    ap.add_argument("--repo", default=ROOT, help="repo root the manifest's model paths are relative to")
    ap.add_argument("--seeds", type=parse_seeds, default=list(range(10)), help="e.g. 0-9 or 0,3,5 (default 0-9)")
    ap.add_argument("--scenarios", default="",
                    help="comma-separated names, prefixes or globs, e.g. 'control-5%%,drift-*' (default: all)")
    ap.add_argument("--modes", type=parse_list, default=list(MODES),
                    help="label modes, comma-separated: random, requests (default: both)")
    ap.add_argument("--rates", type=parse_list, default=[],
                    help="label rates, comma-separated, e.g. 1%%,5%% (default: every rate in the data)")
    ap.add_argument("--label-delay", type=int, default=20,
                    help="requests mode: samples between a request and its answer (default 20)")
    ap.add_argument("--extra-config", help="TOML snippet appended to every config")
    ap.add_argument("--no-reference", action="store_true",
                    help="leave out [model] reference even where the model has <name>.embeddings.json")
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
    scen, unknown = select_scenarios(scen, parse_list(args.scenarios))
    if unknown:
        print(f"error: no scenario matches {unknown}; known: {sorted(s['name'] for s in manifest['scenarios'])}",
              file=sys.stderr)
        return 2
    bad_modes = [m for m in args.modes if m not in MODES]
    if bad_modes or not args.modes:
        print(f"error: unknown mode(s) {bad_modes}; known: {', '.join(MODES)}", file=sys.stderr)
        return 2
    if args.rates:
        known_rates = {s["label_rate"] for s in manifest["scenarios"]}
        bad = [r for r in args.rates if r not in known_rates]
        if bad:
            print(f"error: unknown rate(s) {bad}; known: {sorted(known_rates)}", file=sys.stderr)
            return 2
        scen = [s for s in scen if s["label_rate"] in args.rates]
    if not scen:
        print("error: the selection leaves no scenario", file=sys.stderr)
        return 2
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
    requests_note = None
    if "requests" in args.modes and not supports_requests(binary):
        requests_note = (f"requests rows skipped: {binary} has no `replay --label-budget` (an older "
                         f"binary); rebuild edgemt with it to run them")
        print(requests_note, file=sys.stderr)

    own_workdir = args.workdir is None
    workdir = tempfile.mkdtemp(prefix="edgemt-scen-") if own_workdir else os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)

    # (scenario, mode) pairs to run, and those that cannot be
    plan, skipped = [], []
    for s in scen:
        for mode in args.modes:
            if mode == "requests" and requests_note:
                skipped.append(dict(scenario=s["name"], mode=mode, why="binary without --label-budget"))
            elif mode == "swap" and s["kind"] not in SWAP_KINDS:
                continue
            elif mode == "requests" and not (s.get("requests_ok", True) and budget_of(s)):
                skipped.append(dict(scenario=s["name"], mode=mode,
                                    why="labels limited to some classes: no request equivalent"))
            else:
                plan.append((s, mode))

    results = []          # one per (scenario, mode)
    failures = []
    fallback_used = False
    served_seen = False
    t_start = time.time()
    n_runs = len(plan) * len(args.seeds)
    k = 0
    for s, mode in plan:
        sdir = os.path.join(workdir, s["name"].replace("%", "pct"))
        os.makedirs(sdir, exist_ok=True)
        cfg = os.path.join(sdir, "edgemt.toml")
        model = os.path.join(os.path.abspath(args.repo), s["model"])
        calibrated = bool(args.calibration and s.get("calibration_channels"))
        with open(cfg, "w") as f:
            f.write("# generated by tools/eval/scenarios.py for scenario %s\n[model]\npath = %s\n"
                    % (s["name"], toml_str(model)))
            reference = model[:-len(".onnx")] + ".embeddings.json"
            if not args.no_reference and os.path.exists(reference):
                f.write("reference = %s\n" % toml_str(reference))
            if s.get("config"):
                f.write("\n# the scenario's own (scenarios.json)\n" + s["config"])
            if extra:
                f.write("\n" + extra)
            if calibrated:
                f.write("\n" + CAL_SNIPPET)
        stream = os.path.join(args.data, s["stream"])
        if mode == "swap":
            swapped = os.path.join(sdir, "stream-swapped.jsonl")
            swapped_stream(stream, swapped, swap_pair(s["model"]))
            stream = swapped
        holdout = os.path.join(args.data, s["holdout"])
        budget = budget_of(s) if mode == "requests" else None
        runs = []
        for seed in args.seeds:
            if mode == "requests" and requests_note:
                break
            k += 1
            rep = os.path.join(sdir, f"report-{mode}-seed{seed}.json")
            if os.path.exists(rep):
                os.remove(rep)
            cmd = [binary, "replay", "--config", cfg, stream, "--eval", holdout,
                   "--seed", str(seed), "--report", rep]
            if mode == "requests":
                cmd += ["--label-budget", f"{budget:g}", "--label-delay", str(args.label_delay)]
            t0 = time.time()
            try:
                p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   timeout=args.timeout)
                rc, err = p.returncode, p.stderr
            except subprocess.TimeoutExpired:
                rc, err = -1, f"timed out after {args.timeout} s"
            dt = time.time() - t0
            if mode == "requests" and rc == 2 and "--label-budget" in err and "unexpected argument" in err:
                # clap refused the flag: an older binary after all
                requests_note = (f"requests rows skipped: {binary} refused --label-budget "
                                 f"({err.strip().splitlines()[0]})")
                print(requests_note, file=sys.stderr)
                skipped.append(dict(scenario=s["name"], mode=mode, why="binary refused --label-budget"))
                k -= 1
                break
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
                failures.append(dict(scenario=s["name"], mode=mode, seed=seed, rc=rc, error=tail, cmd=cmd))
                print(f"[{k}/{n_runs}] {s['name']} {mode} seed {seed}: FAILED (rc {rc})\n{tail}", file=sys.stderr)
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
                       requests=request_stats(report), trust=report.get("trust"),
                       seconds=round(dt, 2))
            runs.append(run)
            print(f"[{k}/{n_runs}] {s['name']} {mode} seed {seed}: served {served:.4f} teacher "
                  f"{ev['teacher_accuracy']:.4f} pretrained {ev['source_accuracy']:.4f} "
                  f"({pts(run['gain_points'])} pts, {report.get('labeled')} labels, "
                  f"{report.get('rollbacks')} rollbacks) {dt:.1f}s", file=sys.stderr, flush=True)
        if mode == "requests" and requests_note and not runs:
            continue

        pre_man = s.get("pretrained_holdout_accuracy")
        pre = runs[0]["source"] if runs else pre_man
        res = dict(name=s["name"], base=s.get("base", s["name"]), kind=s["kind"], mode=mode,
                   model=s["model"], label_rate=s["label_rate"], label_budget=budget,
                   label_delay=args.label_delay if mode == "requests" else None,
                   rotation=s.get("rotation"), drift=s.get("drift"), in_candidate_set=s.get("in_candidate_set"),
                   control=s.get("control"), calibration=calibrated,
                   pretrained=pre, pretrained_onnxruntime=pre_man,
                   clean=s.get("clean_holdout_accuracy", s.get("unrotated_holdout_accuracy")),
                   seconds=round(sum(r["seconds"] for r in runs), 1), runs=runs)
        if runs:
            res.update(summarize(runs))
            if pre_man is not None and abs(pre - pre_man) > 0.0015:
                res["warning"] = (f"binary's source_accuracy {pre:.4f} differs from onnxruntime's "
                                  f"{pre_man:.4f}: input layout mismatch?")
                print(f"warning: {s['name']}: {res['warning']}", file=sys.stderr)
            if res["clean"] is not None and res["clean"] - pre > 1e-6:
                res["gap_recovered"] = (res["served_mean"] - pre) / (res["clean"] - pre)
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
    with_req = any("requests" in r for r in results)
    print(f"\nScenario matrix: {len({r['name'] for r in results})} scenarios, modes {','.join(args.modes)}, "
          f"seeds {seeds_txt}, binary {binary}"
          + (", --calibration" if args.calibration else "")
          + (", no embedding references" if args.no_reference else "")
          + (f", label delay {args.label_delay}" if "requests" in args.modes else "")
          + (f", extra config {args.extra_config}" if args.extra_config else "")
          + f" ({time.time() - t_start:.0f} s)\n")
    hdr = (f"| scenario | kind | labels | mode | pretrained | teacher mean | teacher worst | {served_hdr} mean | "
           f"{served_hdr} worst | served − pretrained worst (pts, seed) | teacher gain mean (pts) | "
           f"captured | gate serves adapted |")
    if with_req:
        hdr += " requests asked / answered / discordant (mean) |"
    print(hdr)
    print("|" + "---|" * hdr.count(" |"))
    for r in results:
        n = len(r["runs"])
        lead = f"| {r['base']} | {r['kind']} | {r['label_rate']} | {r['mode']} | {fmt(r['pretrained'])} |"
        if not n:
            print(lead + " failed |" + " |" * (hdr.count(" |") - 6))
            continue
        seeds_note = "" if n == len(args.seeds) else f" ({n}/{len(args.seeds)} seeds)"
        cap = "—" if r["captured"] is None else f"{100 * r['captured']:.0f} %"
        line = (lead + f" {r['teacher_mean']:.3f} | {r['teacher_worst']:.3f} | {r['served_mean']:.3f} | "
                f"{r['served_worst']:.3f} | {pts(r['gain_worst'])} (s{r['worst_seed']}){seeds_note} | "
                f"{pts(r['teacher_gain_mean'])} | {cap} | "
                + (f"{r['gate_adapted']}/{n} |" if r["gate_reported"] else "— |"))
        if with_req:
            q = r.get("requests")
            line += (" " + " / ".join(fmt(q.get(c), ".1f") for c in REQUEST_KEYS) + " |") if q else " — |"
        print(line)
    print("\n(mean and worst over the seeds, accuracies on the scenario's holdout; pretrained = the frozen "
          "model; captured = mean(served − pretrained) / mean(teacher − pretrained), shown when the teacher "
          f"gains at least {MIN_TEACHER_GAIN} point on average; gate serves adapted = seeds whose report's "
          "gate.serving is not \"pretrained\" at the end; labels: random = the recording's every k-th "
          "label, requests = --label-budget 1/k, the same count)")
    for sk in skipped:
        if sk["why"] != "binary without --label-budget" and sk["why"] != "binary refused --label-budget":
            print(f"(not run: {sk['scenario']} {sk['mode']}: {sk['why']})")
    if requests_note:
        print(f"\n{requests_note}.")

    # ---- verdicts ----
    verdicts = []
    print()
    for mode in args.modes:
        rows = [r for r in results if r["mode"] == mode and r["kind"] in CONTROL_KINDS]
        cn = [(r, run) for r in rows for run in r["runs"]]
        missing = [r["name"] for r in rows if len(r["runs"]) < len(args.seeds)]
        rule = (f"(a) {mode}: every control and natural scenario, every seed: served >= pretrained − "
                f"{TOL:g} point")
        if not cn:
            why = requests_note if (mode == "requests" and requests_note) else "no such scenario selected"
            print(f"{rule}: NOT EVALUATED ({why})")
            verdicts.append(dict(rule=rule, passed=None, runs=0))
            continue
        # the acceptance rule on the served model; the same rule on the adapted teacher is
        # printed for information only (it shows what the serving gate protects against)
        for what, key, info in (("served", "served", False), ("teacher", "teacher", True)):
            gain = lambda run_: 100.0 * (run_[key] - run_["source"])  # noqa: E731
            r, run = min(cn, key=lambda p: gain(p[1]))
            below = sum(1 for _, run_ in cn if gain(run_) < -TOL - EPS)
            ok = below == 0 and (info or not missing)
            worst = (f"worst: {r['name']} seed {run['seed']}, {what} {run[key]:.3f} vs pretrained "
                     f"{run['source']:.3f} ({pts(gain(run))} pts); {below}/{len(cn)} runs below")
            if missing and not info:
                worst += f"; runs missing for {', '.join(missing)}"
            text = rule if not info else rule.replace("served >=", "teacher >=")
            if not info:
                verdicts.append(dict(rule=rule, passed=ok, runs=len(cn), runs_below=below, missing=missing,
                                     worst=dict(scenario=r["name"], seed=run["seed"], gain_points=gain(run))))
            print(f"{'(info, not an acceptance rule) ' if info else ''}{text}: "
                  f"{'PASS' if ok else 'FAIL'} ({worst})")
    if "swap" in args.modes:
        rows = [r for r in results if r["mode"] == "swap"]
        cn = [(r, run) for r in rows for run in r["runs"]]
        rule = (f"(c) swap: every control scenario, every seed: served >= pretrained − {TOL:g} point "
                f"and the labels disputed")
        if cn:
            below = [(r["name"], run["seed"]) for r, run in cn
                     if 100.0 * (run["served"] - run["source"]) < -TOL - EPS]
            quiet = [(r["name"], run["seed"]) for r, run in cn
                     if not (run.get("trust") or {}).get("disputes")]
            ok = not below and not quiet
            r, run = min(cn, key=lambda p: p[1]["served"] - p[1]["source"])
            print(f"{rule}: {'PASS' if ok else 'FAIL'} (worst: {r['name']} seed {run['seed']}, served "
                  f"{run['served']:.3f} vs pretrained {run['source']:.3f}, teacher {run['teacher']:.3f}; "
                  f"{len(below)}/{len(cn)} runs below, {len(quiet)}/{len(cn)} never disputed"
                  + (f": {quiet}" if quiet else "") + ")")
            verdicts.append(dict(rule=rule, passed=ok, runs=len(cn), below=below, never_disputed=quiet))
        else:
            print(f"{rule}: NOT EVALUATED (no control scenario selected)")
    honest = [(r, run) for r in results if r["mode"] != "swap" for run in r["runs"]]
    if honest and any(run.get("trust") is not None for _, run in honest):
        disputed = [(r["name"], r["mode"], run["seed"]) for r, run in honest
                    if (run.get("trust") or {}).get("disputes")]
        rule = "(d) honest labels (random, requests): never disputed"
        print(f"{rule}: {'PASS' if not disputed else 'FAIL'} ({len(disputed)}/{len(honest)} runs disputed"
              + (f": {disputed}" if disputed else "") + ")")
        verdicts.append(dict(rule=rule, passed=not disputed, runs=len(honest), disputed=disputed))
    for mode in [m for m in args.modes if m != "swap"]:
        info = mode != "requests"
        rows = [r for r in results if r["mode"] == mode and r["kind"] in DRIFT_KINDS]
        rule = (f"(b) {mode}: every gradual-drift scenario: served captures >= {100 * CAPTURE:.0f} % of the "
                f"teacher's mean gain and served − pretrained > 0 in the worst seed")
        prefix = "(info, not an acceptance rule) " if info else ""
        if not rows:
            why = requests_note if (mode == "requests" and requests_note) else "no drift scenario selected"
            print(f"{prefix}{rule}: NOT EVALUATED ({why})")
            if not info:
                verdicts.append(dict(rule=rule, passed=None, rows=0))
            continue
        bad = []
        for r in rows:
            if not r["runs"] or len(r["runs"]) < len(args.seeds):
                bad.append(f"{r['name']}: runs missing")
            elif r["captured"] is None or r["captured"] < CAPTURE - EPS or r["gain_worst"] <= EPS:
                cap = "—" if r["captured"] is None else f"{100 * r['captured']:.0f} %"
                bad.append(f"{r['name']}: captured {cap} of {pts(r['teacher_gain_mean'])} pts, worst "
                           f"{pts(r['gain_worst'])}")
        ok = not bad
        print(f"{prefix}{rule}: {'PASS' if ok else 'FAIL'} ({len(rows) - len(bad)}/{len(rows)} rows pass"
              + (f"; failing: {'; '.join(bad)}" if bad else "") + ")")
        if not info:
            verdicts.append(dict(rule=rule, passed=ok, rows=len(rows), failing=bad))
    if failures:
        print(f"\n{len(failures)} replay(s) FAILED: "
              + ", ".join(f"{f['scenario']} {f['mode']} seed {f['seed']}" for f in failures))
    secs = {m: sum(r["seconds"] for r in results if r["mode"] == m) for m in args.modes}
    print("\nreplay time: " + ", ".join(f"{m} {v:.0f} s" for m, v in secs.items())
          + f"; wall {time.time() - t_start:.0f} s", file=sys.stderr)

    if args.json:
        out = dict(binary=binary, seeds=args.seeds, modes=args.modes, rates=args.rates or None,
                   label_delay=args.label_delay, data=os.path.abspath(args.data),
                   manifest_version=manifest.get("version"), calibration=args.calibration,
                   references=not args.no_reference,
                   extra_config=args.extra_config, extra_config_text=extra or None,
                   served_fallback_to_teacher=fallback_used, tolerance_points=TOL, capture=CAPTURE,
                   requests_note=requests_note, skipped=skipped,
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
