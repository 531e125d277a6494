#!/usr/bin/env python3
"""Write the scenario matrix for tools/eval/scenarios.py: recordings + scenarios.json.

    tools/.venv/bin/python tools/eval/make_scenarios.py OUTDIR

Deterministic (fixed seeds, single-threaded BLAS). Reuses the HAPT loader, windowing,
rotation and JSONL writer of tools/model/make_hapt_model.py, so the windows are cut exactly as
for the shipped model (25 Hz, 64 steps, hop 32 for streams, hop 64 for holdouts, values
rounded to 3 decimals) and the ONNX models are NOT retrained here.

Users: 1-21 trained all three models (models/hapt_mlp.onnx and both fixtures in
tests/data/models/, see make_hapt_model.py), so only users 22-30 appear here.
  control  users 22-25, no shift        stream = first sessions  (exp 44, 46, 48, 50)
                                         holdout = second sessions (exp 45, 47, 49, 51)
  natural  users 26-30, no shift        stream = exp 52, 54, 56, 58, 60
                                         holdout = exp 53, 55, 57, 59, 61
  shifted  users 26-30 + a mounting change (the same transform on stream and holdout)
  drift    users 26-30 + a corruption growing over the stream, holdout at its end state
And, not HAPT, the digits CNN's control and drift (below).

Mounting changes: acc' = R acc for every time step; gyro' = det(R) R gyro (the gyroscope
measures an axial vector, so a mirror flips it once more; for proper rotations det = 1).
In the candidate set (signed axis permutations): rot90x, rot180z, mirror-y. Outside it:
rot30x, rot45z.

Labels: on every k-th stream line (lines k, 2k, ... 1-based): k = 20 (5 %), 33 (3 %),
100 (1 %); every base scenario at 5 % and 1 %, control and cross-user also at 3 % and partial. "partial": ~3 % of the lines labelled, but only lines whose truth is one of
classes 0, 3, 5 (WALKING, SITTING, LAYING), spread evenly over those lines.

Model inputs (one JSONL `x` = one sample, flattened row-major):
  hapt  models/hapt_mlp.onnx                    [64, 6] time-major, raw units (norm in graph)
  skl   tests/data/models/skl_mlp_softmax.onnx  [384] = the [64, 6] window flattened, raw
        units (the sklearn MLP was fit on un-normalised windows); same bytes as hapt, so
        skl scenarios share the hapt files
  cnn   tests/data/models/cnn_gemm_softmax.onnx [6, 64] channel-first, raw units: x is
        written transposed
  digits tests/data/models/digits_cnn.onnx      [1, 8, 8] images in [0, 1] (not HAPT: below);
        its scenarios carry the config snippet `[augment] max_shift = 1` (MODELS, why there)
The pretrained accuracy of each model on each holdout is computed with onnxruntime and
printed; a model near chance (1/6, 1/10) on its control means its input is wrong.

Gradual drift, "a sensor that ages" (kind "drift", users 26-30 as natural): a corruption
whose strength s grows linearly over the stream, s = i / (N - 1) on line i (0-based), so the
first line is untouched and the last fully corrupted; the holdout is at the end state (s = 1).
x' = x * (1 + s (g - 1)) + s b + s n * N(0, 1) per channel (g, b, n below, acc in g, gyro in
rad/s; the noise drawn per value with DRIFT_SEED, so every rate's file carries the same
stream). drift-gain: per-axis gains; drift-bias: offsets on all six axes; drift-noise:
growing white noise; drift-mix: milder gain + offset + noise together. Severities were picked
so the pretrained model loses 15-23 points on the end-state holdout (not down to chance).

Aging, "a sensor that aged and stays so" (kind "drift", users 26-30): the same four
corruptions, over a longer stream: AGING_PASSES passes over the natural stream's windows
(the person repeats their day), the strength growing linearly over the first pass, s = i /
(P - 1) on line i < P (P lines a pass), and 1 on every later line; holdout at s = 1 as above.
aging-gain, aging-bias, aging-noise, aging-mix. The drift-* streams end the moment the
sensor is fully aged, so the teacher's end-state gain has no stream left to show in; these
ask whether it reaches the user once the aged sensor is what the device lives with.
Digits, "a camera that ages": tools/model/make_digits_model.py's split of scikit-learn's
bundled load_digits (its stream and holdout pools: images the CNN never saw, disjoint). The
stream is DIGITS_STREAM lines drawn from the stream pool (every image about equally often),
each with the handheld jitter (shift of up to a pixel, gain, noise); the holdout is every
holdout-pool image once, jittered. digits-control: no drift. digits-drift: the camera's
AGED corruption (contrast toward grey, black level, blur, noise) growing linearly over the
stream as above; holdout at the end state.

Every scenario name ends in its label rate (control-5%, drift-gain-1%); `base` is the name
without it, `label_every` the k of the rate; all rates of one base share the same x; `config`
is a TOML snippet tools/eval/scenarios.py appends to the scenario's config (or null). Streams
carry `truth` on every line, so tools/eval/scenarios.py can also replay them with label
requests (`--label-budget`), except the "partial" ones (`requests_ok` false).
"""
import json
import os
import sys

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np

# The generator of the shipped data lives in tools/model/.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model"))
import make_hapt_model as hm  # noqa: E402  (loader, windows, rotation, writer)
import make_digits_model as dm  # noqa: E402  (digits split, jitter, the ageing camera)

ROOT = hm.ROOT
VERSION = 3
SHUFFLE_SEED = 20240612

CONTROL = dict(users=[22, 23, 24, 25], stream=[44, 46, 48, 50], holdout=[45, 47, 49, 51])
CROSS = dict(users=[26, 27, 28, 29, 30], stream=[52, 54, 56, 58, 60], holdout=[53, 55, 57, 59, 61])

RATES = {"5%": 20, "3%": 33, "1%": 100}
PARTIAL_CLASSES = [0, 3, 5]
PARTIAL_EVERY = 33
DRIFT_SEED = 20240616
DIGITS_SEED = 20240617
DIGITS_STREAM = 4000
AGING_PASSES = 3

MODELS = {
    "hapt": dict(path="models/hapt_mlp.onnx", input_shape=[64, 6], layout="time-major [64, 6]",
                 output="logits", calibration_channels=True, prefix=""),
    "skl": dict(path="tests/data/models/skl_mlp_softmax.onnx", input_shape=[384],
                layout="flat [384] (the time-major [64, 6] window flattened; one channel for edgemt)",
                output="probabilities", calibration_channels=False, prefix="skl-"),
    "cnn": dict(path="tests/data/models/cnn_gemm_softmax.onnx", input_shape=[6, 64],
                layout="channel-first [6, 64] (x written transposed)",
                output="probs", calibration_channels=True, prefix="cnn-"),
    "digits": dict(path=dm.MODEL_PATH, input_shape=[1, dm.SIDE, dm.SIDE],
                   layout="image [1, 8, 8], pixels in [0, 1], row-major", output="logits",
                   calibration_channels=False, prefix="digits-",
                   # edgemt sees a [1, 8, 8] sample as one channel of 64 steps, so its default
                   # time shift of up to 4 steps moves strokes half the image across (and into
                   # the next row); 1 step is a one-pixel shift, the jitter the images carry.
                   # With 4 the teacher lost 6 points on digits-control-5% (seeds 0-1), with 1 3.
                   config="[augment]\nmax_shift = 1\n"),
}


def rx(deg):
    return hm.rot_matrix("x", deg)


def rz(deg):
    return hm.rot_matrix("z", deg)


# name -> (R, description, in candidate set of signed axis permutations)
SHIFTS = {
    "rot90x": (np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], float),
               "90 deg about x: (x,y,z) -> (x,-z,y) for acc and gyro (the shipped target shift)", True),
    "rot180z": (np.diag([-1.0, -1.0, 1.0]),
                "180 deg about z: (x,y,z) -> (-x,-y,z) for acc and gyro", True),
    "mirror-y": (np.diag([1.0, -1.0, 1.0]),
                 "mirror y (phone on the other side of the body): acc (x,y,z) -> (x,-y,z); "
                 "gyro is axial, gyro' = det(R) R gyro: (x,y,z) -> (-x,y,-z)", True),
    "rot30x": (rx(30.0), "30 deg about x (proper rotation, acc and gyro), outside the candidate set", False),
    "rot45z": (rz(45.0), "45 deg about z (proper rotation, acc and gyro), outside the candidate set", False),
}


# name -> (gain g, offset b, noise sd n) per channel acc x,y,z, gyro x,y,z at full strength, description
DRIFTS = {
    "drift-gain": ([0.75, 0.8, 0.7, 0.8, 0.8, 0.8], [0.0] * 6, [0.0] * 6,
                   "gain drifting from 1 to acc x0.75/x0.8/x0.7 (x, y, z) and gyro x0.8"),
    "drift-bias": ([1.0] * 6, [0.1, 0.15, -0.15, 0.05, -0.05, 0.05], [0.0] * 6,
                   "offset growing to acc +0.1/+0.15/-0.15 g and gyro +0.05/-0.05/+0.05 rad/s"),
    "drift-noise": ([1.0] * 6, [0.0] * 6, [0.2, 0.2, 0.2, 0.4, 0.4, 0.4],
                    "white noise growing to sd 0.2 g (acc) and 0.4 rad/s (gyro)"),
    "drift-mix": ([0.85, 0.9, 0.85, 0.9, 0.9, 0.9], [0.05, 0.08, -0.08, 0.03, 0.0, -0.03],
                  [0.1, 0.1, 0.1, 0.25, 0.25, 0.25],
                  "gain to acc x0.85/x0.9/x0.85, gyro x0.9, plus offset to acc +0.05/+0.08/-0.08 g, "
                  "gyro +0.03/0/-0.03 rad/s, plus noise to sd 0.1 g / 0.25 rad/s"),
}


def drift(x, s, name, seed):
    """The drift `name` at strength s ([N] in [0, 1]) on raw windows x [N, 64, 6]."""
    g, b, n, _ = DRIFTS[name]
    s = np.asarray(s, np.float64).reshape(-1, 1, 1)
    out = x.astype(np.float64) * (1.0 + s * (np.asarray(g) - 1.0)) + s * np.asarray(b)
    if any(n):
        out += s * np.asarray(n) * np.random.default_rng(seed).standard_normal(out.shape)
    return out


def ramp(n):
    """Drift strength of each of n stream lines: 0 on the first, 1 on the last."""
    return np.linspace(0.0, 1.0, n) if n > 1 else np.ones(n)


def transform(x, R):
    """acc' = R acc, gyro' = det(R) R gyro on every time step of x [N, 64, 6]."""
    out = hm.rotate(x, R)
    if np.linalg.det(R) < 0:
        out[..., 3:6] = -out[..., 3:6]
    return out


def every_k(n, k):
    return (np.arange(n) % k) == k - 1


def partial_labels(y, classes, every):
    """~n/every labels, only on lines whose truth is in classes, spread evenly over them."""
    elig = np.where(np.isin(y, classes))[0]
    n_lab = len(y) // every
    step = len(elig) / n_lab
    pick = elig[np.floor((np.arange(n_lab) + 1) * step).astype(int) - 1]
    lab = np.zeros(len(y), bool)
    lab[pick] = True
    return lab


class Writer:
    def __init__(self, outdir):
        self.outdir = outdir
        self.done = {}
        os.makedirs(os.path.join(outdir, "data"), exist_ok=True)

    def write(self, fname, x, y, ts, lab):
        """x [N, 64, 6] already quantised. Returns the manifest-relative path."""
        rel = os.path.join("data", fname)
        if rel not in self.done:
            hm.write_jsonl(os.path.join(self.outdir, rel), x, y, ts, lab)
            self.done[rel] = len(y)
        return rel


def main():
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        sys.exit(2)
    outdir = os.path.abspath(sys.argv[1])
    os.makedirs(outdir, exist_ok=True)
    wr = Writer(outdir)

    exps = hm.load_hapt()
    W = hm.make_windows(exps, hm.HOP)
    Wh = hm.make_windows(exps, hm.HOLDOUT_HOP)
    for dom in (CONTROL, CROSS):
        for key in ("stream", "holdout"):
            users = sorted({int(u) for u in (W if key == "stream" else Wh)["user"][
                np.isin((W if key == "stream" else Wh)["exp"], dom[key])]})
            assert users == dom["users"], (dom, key, users)
            assert not set(users) & set(hm.TRAIN_USERS)

    sessions = {m: hm.ort_session(os.path.join(ROOT, spec["path"])) for m, spec in MODELS.items()}

    def model_x(model, x):
        if model == "cnn":
            return np.ascontiguousarray(x.transpose(0, 2, 1))
        if model == "skl":
            return np.ascontiguousarray(x.reshape(len(x), -1))
        return x

    def acc(model, x, y):
        sess = sessions[model]
        out = sess.run([MODELS[model]["output"]], {sess.get_inputs()[0].name: model_x(model, x)})[0]
        return round(float((out.argmax(1) == y).mean()), 4)

    # base recordings: (x quantised, y, ts) per domain and shift; x [N, 64, 6] for HAPT,
    # [N, 1, 8, 8] for digits
    base = {}

    def rec(dom_name, shift):
        key = (dom_name, shift)
        if key in base:
            return base[key]
        if dom_name == "digits":
            base[key] = digits_recordings(shift)
            return base[key]
        dom = CONTROL if dom_name == "control" else CROSS
        out = {}
        for part, WW in (("stream", W), ("holdout", Wh)):
            idx = hm.select(WW, dom[part])
            x, y, ts = hm.recording(WW, idx, None)
            # transform the raw windows, then round (as make_hapt_model.py)
            if shift in SHIFTS:
                x = hm.quantize(transform(WW["x"][idx], SHIFTS[shift][0]))
            elif shift in DRIFTS:
                s = ramp(len(idx)) if part == "stream" else np.ones(len(idx))
                seed = DRIFT_SEED + 2 * sorted(DRIFTS).index(shift) + (part == "holdout")
                x = hm.quantize(drift(WW["x"][idx], s, shift, seed))
            elif shift and shift.startswith("aging-"):
                kind = "drift-" + shift[len("aging-"):]
                seed = DRIFT_SEED + 100 + 2 * sorted(DRIFTS).index(kind) + (part == "holdout")
                if part == "stream":
                    p = len(idx)
                    idx = np.tile(idx, AGING_PASSES)
                    s = np.minimum(np.arange(len(idx)) / max(p - 1, 1), 1.0)
                    y = np.tile(y, AGING_PASSES)
                    ts = np.arange(len(idx)) * (hm.HOP / hm.FS)
                else:
                    s = np.ones(len(idx))
                x = hm.quantize(drift(WW["x"][idx], s, kind, seed))
            out[part] = (x, y, ts)
        base[key] = out
        return out

    def digits_recordings(shift):
        """The digits stream and holdout, jittered; with shift "aged" the camera ages over
        the stream and the holdout is at the end state. Control and drift share the draws."""
        x, y = dm.load()
        _, pool, held = dm.split(y)
        rng = np.random.default_rng(DIGITS_SEED)
        reps = -(-DIGITS_STREAM // len(pool))
        pick = np.concatenate([rng.permutation(pool) for _ in range(reps)])[:DIGITS_STREAM]
        xs, ys = dm.jitter(x[pick], rng), y[pick]
        xh, yh = dm.jitter(x[held], rng), y[held]
        if shift == "aged":
            xs = dm.aged(xs, ramp(len(ys)), np.random.default_rng(DIGITS_SEED + 1))
            xh = dm.aged(xh, 1.0, np.random.default_rng(DIGITS_SEED + 2))
        q = hm.quantize
        return {"stream": (q(xs), ys, np.arange(len(ys), dtype=float)),
                "holdout": (q(xh), yh, np.arange(len(yh), dtype=float))}

    scenarios = []

    def add(base_name, kind, model, dom_name, shift, rate, order="natural", control=None):
        name = f"{base_name}-{rate}"
        spec = MODELS[model]
        r = rec(dom_name, shift)
        xs, ys, tss = r["stream"]
        xh, yh, tsh = r["holdout"]
        sfx = "" if model != "cnn" else "-cf"       # channel-first copies for the CNN
        tag = f"{dom_name}-{shift or 'none'}"
        if order == "shuffled":
            perm = np.random.default_rng(SHUFFLE_SEED).permutation(len(ys))
            xs, ys = xs[perm], ys[perm]
            tss = np.arange(len(ys)) * (hm.HOP / hm.FS)
            tag += "-shuffled"
        if rate == "partial":
            lab = partial_labels(ys, PARTIAL_CLASSES, PARTIAL_EVERY)
            rtag = "partial"
        else:
            lab = every_k(len(ys), RATES[rate])
            rtag = rate.rstrip("%") + "pct"
        stream = wr.write(f"stream-{tag}-{rtag}{sfx}.jsonl", model_x(model, xs) if model == "cnn" else xs,
                          ys, tss, lab)
        holdout = wr.write(f"holdout-{dom_name}-{shift or 'none'}{sfx}.jsonl",
                           model_x(model, xh) if model == "cnn" else xh, yh, tsh, None)
        dom = {"control": CONTROL, "cross": CROSS}.get(dom_name)
        R, desc, in_set = (None, "none", None) if shift not in SHIFTS else SHIFTS[shift]
        if shift in DRIFTS:
            g, b, n, ddesc = DRIFTS[shift]
            drift_info = dict(description=ddesc, gain=g, offset=b, noise_sd=n,
                              strength="linear, 0 on the first stream line to 1 on the last; holdout at 1")
        elif shift and shift.startswith("aging-"):
            g, b, n, ddesc = DRIFTS["drift-" + shift[len("aging-"):]]
            drift_info = dict(description=ddesc, gain=g, offset=b, noise_sd=n,
                              strength=f"linear over the first of {AGING_PASSES} passes over the "
                                       "stream's windows, then 1; holdout at 1")
        elif shift == "aged":
            a = dm.AGED
            drift_info = dict(description=(
                f"a camera that ages: blur (3-tap, side taps {a['blur']}), contrast lost toward grey "
                f"(x' = 0.5 + (x - 0.5)(1 - {a['contrast']})), black level +{a['black']}, noise sd "
                f"{a['noise']}; clipped to [0, 1]; all scaled by the strength"),
                              full_strength=a,
                              strength="linear, 0 on the first stream line to 1 on the last; holdout at 1")
        else:
            drift_info = None
        entry = {
            "name": name, "base": base_name, "kind": kind, "model": spec["path"],
            "model_input": spec["input_shape"], "input_layout": spec["layout"],
            "calibration_channels": spec["calibration_channels"],
            "config": spec.get("config"),
            "stream": stream, "holdout": holdout,
            "label_rate": rate, "label_every": None if rate == "partial" else RATES[rate],
            "requests_ok": rate != "partial",
            "labelled": int(lab.sum()), "stream_samples": int(len(ys)),
            "label_fraction": round(float(lab.mean()), 4),
            "labelled_classes": sorted({int(c) for c in ys[lab]}),
            "holdout_samples": int(len(yh)),
            "order": order,
            "users": dom["users"] if dom else None,
            "stream_experiments": dom["stream"] if dom else None,
            "holdout_experiments": dom["holdout"] if dom else None,
            "rotation": desc,
            "R": None if R is None else [[round(float(v), 6) + 0.0 for v in row] for row in R],
            "gyro_sign": None if R is None else int(round(np.linalg.det(R))),
            "in_candidate_set": in_set,
            "drift": drift_info,
            "pretrained_holdout_accuracy": acc(model, xh, yh),
            "pretrained_stream_accuracy": acc(model, xs, ys),
            "unrotated_holdout_accuracy": None,
            "clean_holdout_accuracy": None,
            "control": control,
        }
        if shift is not None:
            clean = acc(model, *rec(dom_name, None)["holdout"][:2])
            entry["clean_holdout_accuracy"] = clean
            if shift in SHIFTS:
                entry["unrotated_holdout_accuracy"] = clean
        scenarios.append(entry)
        clean = entry["clean_holdout_accuracy"]
        print(f"{name:24s} {kind:8s} stream {len(ys):4d} ({int(lab.sum()):3d} lab) holdout {len(yh):3d}  "
              f"pretrained holdout {entry['pretrained_holdout_accuracy']:.4f} stream {entry['pretrained_stream_accuracy']:.4f}"
              + (f"  {'unrotated' if shift in SHIFTS else 'undrifted'} {clean:.4f} "
                 f"({100 * (entry['pretrained_holdout_accuracy'] - clean):+.1f} pts)" if shift else ""), flush=True)

    for rate in ("5%", "3%", "1%"):
        add("control", "control", "hapt", "control", None, rate)
    add("control", "control", "hapt", "control", None, "partial")
    for rate in ("5%", "3%", "1%"):
        add("cross-user", "natural", "hapt", "cross", None, rate, control=f"control-{rate}")
    add("cross-user", "natural", "hapt", "cross", None, "partial", control="control-partial")
    for rate in ("5%", "1%"):
        add("cross-user-shuffled", "natural", "hapt", "cross", None, rate, order="shuffled", control=f"control-{rate}")
    for shift in ("rot90x", "rot180z", "mirror-y", "rot30x", "rot45z"):
        for rate in ("5%", "1%"):
            add(shift, "shifted", "hapt", "cross", shift, rate, control=f"control-{rate}")
    for model in ("skl", "cnn"):
        p = MODELS[model]["prefix"]
        for rate in ("5%", "1%"):
            add(f"{p}control", "control", model, "control", None, rate)
            add(f"{p}cross-user", "natural", model, "cross", None, rate, control=f"{p}control-{rate}")
            add(f"{p}rot90x", "shifted", model, "cross", "rot90x", rate, control=f"{p}control-{rate}")
    for name in DRIFTS:
        for rate in ("5%", "1%"):
            add(name, "drift", "hapt", "cross", name, rate, control=f"cross-user-{rate}")
    for name in DRIFTS:
        aging = "aging-" + name[len("drift-"):]
        for rate in ("5%", "1%"):
            add(aging, "drift", "hapt", "cross", aging, rate, control=f"cross-user-{rate}")
    for rate in ("5%", "1%"):
        add("digits-control", "control", "digits", "digits", None, rate)
        add("digits-drift", "drift", "digits", "digits", "aged", rate, control=f"digits-control-{rate}")

    manifest = {
        "version": VERSION,
        "generator": "tools/eval/make_scenarios.py",
        "class_names": hm.CLASS_NAMES,
        "train_users": hm.TRAIN_USERS,
        "models": {m: {k: v for k, v in s.items() if k != "prefix"} for m, s in MODELS.items()},
        "scenarios": scenarios,
    }
    with open(os.path.join(outdir, "scenarios.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    size = sum(os.path.getsize(os.path.join(outdir, p)) for p in wr.done)
    print(f"{len(scenarios)} scenarios, {len(wr.done)} files, {size / 1e6:.1f} MB -> {outdir}/scenarios.json")


if __name__ == "__main__":
    main()
