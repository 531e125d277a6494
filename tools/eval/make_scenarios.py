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

Mounting changes: acc' = R acc for every time step; gyro' = det(R) R gyro (the gyroscope
measures an axial vector, so a mirror flips it once more; for proper rotations det = 1).
In the candidate set (signed axis permutations): rot90x, rot180z, mirror-y. Outside it:
rot30x, rot45z.

Labels: on every k-th stream line (lines k, 2k, ... 1-based): k = 20 (5 %), 33 (3 %),
100 (1 %). "partial": ~3 % of the lines labelled, but only lines whose truth is one of
classes 0, 3, 5 (WALKING, SITTING, LAYING), spread evenly over those lines.

Model inputs (one JSONL `x` = one sample, flattened row-major):
  hapt  models/hapt_mlp.onnx                    [64, 6] time-major, raw units (norm in graph)
  skl   tests/data/models/skl_mlp_softmax.onnx  [384] = the [64, 6] window flattened, raw
        units (the sklearn MLP was fit on un-normalised windows); same bytes as hapt, so
        skl scenarios share the hapt files
  cnn   tests/data/models/cnn_gemm_softmax.onnx [6, 64] channel-first, raw units: x is
        written transposed
The pretrained accuracy of each model on each holdout is computed with onnxruntime and
printed; a model near chance (1/6) on its control means its input is wrong.
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

ROOT = hm.ROOT
VERSION = 1
SHUFFLE_SEED = 20240612

CONTROL = dict(users=[22, 23, 24, 25], stream=[44, 46, 48, 50], holdout=[45, 47, 49, 51])
CROSS = dict(users=[26, 27, 28, 29, 30], stream=[52, 54, 56, 58, 60], holdout=[53, 55, 57, 59, 61])

RATES = {"5%": 20, "3%": 33, "1%": 100}
PARTIAL_CLASSES = [0, 3, 5]
PARTIAL_EVERY = 33

MODELS = {
    "hapt": dict(path="models/hapt_mlp.onnx", input_shape=[64, 6], layout="time-major [64, 6]",
                 output="logits", calibration_channels=True, prefix=""),
    "skl": dict(path="tests/data/models/skl_mlp_softmax.onnx", input_shape=[384],
                layout="flat [384] (the time-major [64, 6] window flattened; one channel for edgemt)",
                output="probabilities", calibration_channels=False, prefix="skl-"),
    "cnn": dict(path="tests/data/models/cnn_gemm_softmax.onnx", input_shape=[6, 64],
                layout="channel-first [6, 64] (x written transposed)",
                output="probs", calibration_channels=True, prefix="cnn-"),
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

    # base recordings: (x [N,64,6] quantised, y, ts) per domain and shift
    base = {}

    def rec(dom_name, shift):
        key = (dom_name, shift)
        if key not in base:
            dom = CONTROL if dom_name == "control" else CROSS
            R = None if shift is None else SHIFTS[shift][0]
            out = {}
            for part, WW in (("stream", W), ("holdout", Wh)):
                idx = hm.select(WW, dom[part])
                x, y, ts = hm.recording(WW, idx, None)
                if R is not None:   # transform the raw windows, then round (as make_hapt_model.py)
                    x = hm.quantize(transform(WW["x"][idx], R))
                out[part] = (x, y, ts)
            base[key] = out
        return base[key]

    scenarios = []

    def add(name, kind, model, dom_name, shift, rate, order="natural", control=None):
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
        dom = CONTROL if dom_name == "control" else CROSS
        R, desc, in_set = (None, "none", None) if shift is None else SHIFTS[shift]
        entry = {
            "name": name, "kind": kind, "model": spec["path"],
            "model_input": spec["input_shape"], "input_layout": spec["layout"],
            "calibration_channels": spec["calibration_channels"],
            "stream": stream, "holdout": holdout,
            "label_rate": rate,
            "labelled": int(lab.sum()), "stream_samples": int(len(ys)),
            "label_fraction": round(float(lab.mean()), 4),
            "labelled_classes": sorted({int(c) for c in ys[lab]}),
            "holdout_samples": int(len(yh)),
            "order": order,
            "users": dom["users"], "stream_experiments": dom["stream"], "holdout_experiments": dom["holdout"],
            "rotation": desc,
            "R": None if R is None else [[round(float(v), 6) + 0.0 for v in row] for row in R],
            "gyro_sign": None if R is None else int(round(np.linalg.det(R))),
            "in_candidate_set": in_set,
            "pretrained_holdout_accuracy": acc(model, xh, yh),
            "pretrained_stream_accuracy": acc(model, xs, ys),
            "unrotated_holdout_accuracy": None,
            "control": control,
        }
        if shift is not None:
            entry["unrotated_holdout_accuracy"] = acc(model, *rec(dom_name, None)["holdout"][:2])
        scenarios.append(entry)
        print(f"{name:24s} {kind:8s} stream {len(ys):4d} ({int(lab.sum()):3d} lab) holdout {len(yh):3d}  "
              f"pretrained holdout {entry['pretrained_holdout_accuracy']:.4f} stream {entry['pretrained_stream_accuracy']:.4f}"
              + (f"  unrotated {entry['unrotated_holdout_accuracy']:.4f}" if shift else ""), flush=True)

    for rate in ("5%", "3%", "1%"):
        add(f"control-{rate}", "control", "hapt", "control", None, rate)
    add("control-partial", "control", "hapt", "control", None, "partial")
    for rate in ("5%", "3%", "1%"):
        add(f"cross-user-{rate}", "natural", "hapt", "cross", None, rate, control=f"control-{rate}")
    add("cross-user-partial", "natural", "hapt", "cross", None, "partial", control="control-partial")
    add("cross-user-shuffled-5%", "natural", "hapt", "cross", None, "5%", order="shuffled", control="control-5%")
    for shift in ("rot90x", "rot180z", "mirror-y"):
        for rate in ("5%", "1%"):
            add(f"{shift}-{rate}", "shifted", "hapt", "cross", shift, rate, control=f"control-{rate}")
    for shift in ("rot30x", "rot45z"):
        add(f"{shift}-5%", "shifted", "hapt", "cross", shift, "5%", control="control-5%")
    for model in ("skl", "cnn"):
        p = MODELS[model]["prefix"]
        add(f"{p}control-5%", "control", model, "control", None, "5%")
        add(f"{p}cross-user-5%", "natural", model, "cross", None, "5%", control=f"{p}control-5%")
        add(f"{p}rot90x-5%", "shifted", model, "cross", "rot90x", "5%", control=f"{p}control-5%")

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
