#!/usr/bin/env python3
"""Reference simulation (numpy + onnxruntime) of edgemt's online head-only adaptation.

    python tools/simulate_adaptation.py [--domain target|control|both] [--json out.json]

The backbone of models/hapt_mlp.onnx stays frozen: features are its "embedding"
output. Only the linear head (head.weight [6,64], head.bias [6]) is adapted.
Student and EMA teacher both start as the pretrained head. The stream is replayed
prequentially (each sample is first predicted by the teacher, then learned from).

Per incoming sample (one optimisation step per sample after warm-up):
  L = L_sup + lam(t) * L_pseudo + alpha(t) * L_cons
  L_sup    : class-balanced mean cross-entropy of the student on the labelled buffer
             (every labelled sample seen so far, most recent LAB_BUF kept)
  L_pseudo : CE of the student against the teacher's argmax on the clean windows of
             the recent unlabelled batch where teacher softmax confidence >= TAU;
             summed over accepted samples / unlabelled batch size
  L_cons   : mean squared difference between student softmaxes of two augmented
             views (jitter + per-channel scaling + small time shift) of the batch,
             backbone re-run on the augmented raw windows
  Adam(lr), EMA teacher <- m*teacher + (1-m)*student every K steps,
  lam and alpha ramped linearly from 0 over the first RAMP samples.
"""
import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HP = dict(lr=1e-3, lam=1.0, alpha=1.0, tau=0.9, m=0.99, k=1, batch=32, lab_buf=64,
          ramp=300, jitter=0.02, scale=0.1, shift=3, seed=7, betas=(0.9, 0.999))


def load_jsonl(path):
    xs, ys, labs = [], [], []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            xs.append(r["x"])
            ys.append(r["truth"])
            labs.append(r.get("label", -1))
    return (np.asarray(xs, np.float32).reshape(-1, 64, 6), np.asarray(ys), np.asarray(labs))


def softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


class Backbone:
    def __init__(self, path):
        import onnx
        import onnxruntime as ort
        from onnx import numpy_helper
        m = onnx.load(path)
        init = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
        self.W0 = init["head.weight"].astype(np.float64)   # [6, 64] (Gemm transB=1)
        self.b0 = init["head.bias"].astype(np.float64)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        self.sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    def embed(self, x):
        return self.sess.run(["embedding"], {"input": np.ascontiguousarray(x, np.float32)})[0].astype(np.float64)


def augment(x, rng, hp):
    n = len(x)
    out = x * (1.0 + hp["scale"] * rng.standard_normal((n, 1, 6)))
    out = out + hp["jitter"] * rng.standard_normal(out.shape)
    res = np.empty_like(out)
    for i in range(n):
        s = int(rng.integers(-hp["shift"], hp["shift"] + 1))
        res[i] = np.roll(out[i], s, axis=0)
    return res.astype(np.float32)


def run(bb, stream, holdout, hp, verbose=True):
    x, y, lab = stream
    xh, yh, _ = holdout
    rng = np.random.default_rng(hp["seed"])
    E = bb.embed(x)
    Eh = bb.embed(xh)
    W, b = bb.W0.copy(), bb.b0.copy()
    TW, Tb = W.copy(), b.copy()
    mW, vW, mb, vb = (np.zeros_like(W), np.zeros_like(W), np.zeros_like(b), np.zeros_like(b))
    b1, b2 = hp["betas"]
    step = 0
    lab_idx = []
    preq_pre = preq_teacher = 0
    stats = dict(pseudo_accepted=0, pseudo_correct=0)
    for t in range(len(y)):
        # prequential: predict before learning
        preq_pre += int((E[t] @ bb.W0.T + bb.b0).argmax() == y[t])
        preq_teacher += int((E[t] @ TW.T + Tb).argmax() == y[t])
        if lab[t] >= 0:
            lab_idx.append(t)
            lab_idx = lab_idx[-hp["lab_buf"]:]
        ramp = min(1.0, (t + 1) / hp["ramp"])
        lam, alpha = hp["lam"] * ramp, hp["alpha"] * ramp
        ub = np.arange(max(0, t + 1 - hp["batch"]), t + 1)
        ub = ub[lab[ub] < 0]
        gW = np.zeros_like(W)
        gb = np.zeros_like(b)
        # supervised, class balanced
        if lab_idx:
            li = np.asarray(lab_idx)
            yl = lab[li]
            cls, cnt = np.unique(yl, return_counts=True)
            wc = {c: 1.0 / (len(cls) * n) for c, n in zip(cls, cnt)}
            w = np.array([wc[c] for c in yl])
            p = softmax(E[li] @ W.T + b)
            p[np.arange(len(li)), yl] -= 1.0
            dz = p * w[:, None]
            gW += dz.T @ E[li]
            gb += dz.sum(0)
        if len(ub) and (lam > 0 or alpha > 0):
            B = len(ub)
            # pseudo labels from the EMA teacher on clean windows
            pt = softmax(E[ub] @ TW.T + Tb)
            acc = pt.max(1) >= hp["tau"]
            if acc.any():
                ai = ub[acc]
                yp = pt[acc].argmax(1)
                stats["pseudo_accepted"] += int(acc.sum())
                stats["pseudo_correct"] += int((yp == y[ai]).sum())
                p = softmax(E[ai] @ W.T + b)
                p[np.arange(len(ai)), yp] -= 1.0
                dz = lam * p / B
                gW += dz.T @ E[ai]
                gb += dz.sum(0)
            if alpha > 0:
                h1 = bb.embed(augment(x[ub], rng, hp))
                h2 = bb.embed(augment(x[ub], rng, hp))
                p1 = softmax(h1 @ W.T + b)
                p2 = softmax(h2 @ W.T + b)
                g = 2.0 * (p1 - p2) / (B * p1.shape[1])          # dL/dp1 = -dL/dp2
                dz1 = p1 * (g - (g * p1).sum(1, keepdims=True))
                dz2 = p2 * (-g - (-g * p2).sum(1, keepdims=True))
                gW += alpha * (dz1.T @ h1 + dz2.T @ h2)
                gb += alpha * (dz1.sum(0) + dz2.sum(0))
        if not lab_idx and not len(ub):
            continue
        step += 1
        mW = b1 * mW + (1 - b1) * gW
        vW = b2 * vW + (1 - b2) * gW ** 2
        mb = b1 * mb + (1 - b1) * gb
        vb = b2 * vb + (1 - b2) * gb ** 2
        c1, c2 = 1 - b1 ** step, 1 - b2 ** step
        W -= hp["lr"] * (mW / c1) / (np.sqrt(vW / c2) + 1e-8)
        b -= hp["lr"] * (mb / c1) / (np.sqrt(vb / c2) + 1e-8)
        if step % hp["k"] == 0:
            TW = hp["m"] * TW + (1 - hp["m"]) * W
            Tb = hp["m"] * Tb + (1 - hp["m"]) * b
    acc = lambda Wm, bm, Em, ym: float(((Em @ Wm.T + bm).argmax(1) == ym).mean())
    from sklearn.linear_model import LogisticRegression
    ub_lr = LogisticRegression(C=1.0, max_iter=5000).fit(E, y)
    lab_only = lab >= 0
    lr5 = LogisticRegression(C=1.0, max_iter=5000).fit(E[lab_only], lab[lab_only])
    res = dict(n_stream=int(len(y)), n_labelled=int(lab_only.sum()), n_holdout=int(len(yh)),
               pretrained_holdout=acc(bb.W0, bb.b0, Eh, yh),
               teacher_holdout=acc(TW, Tb, Eh, yh),
               student_holdout=acc(W, b, Eh, yh),
               pretrained_stream=acc(bb.W0, bb.b0, E, y),
               prequential_pretrained=preq_pre / len(y),
               prequential_teacher=preq_teacher / len(y),
               logreg_all_stream_labels_holdout=float(ub_lr.score(Eh, yh)),
               logreg_labelled_only_holdout=float(lr5.score(Eh, yh)),
               pseudo_accepted=stats["pseudo_accepted"],
               pseudo_precision=stats["pseudo_correct"] / max(1, stats["pseudo_accepted"]))
    res["teacher_gain_points"] = 100 * (res["teacher_holdout"] - res["pretrained_holdout"])
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--domain", default="both", choices=["target", "control", "both"])
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "hapt_mlp.onnx"))
    ap.add_argument("--json", default=None)
    for k, v in HP.items():
        if not isinstance(v, tuple):
            ap.add_argument("--" + k, type=type(v), default=v)
    a = ap.parse_args()
    hp = dict(HP)
    for k in HP:
        if not isinstance(HP[k], tuple):
            hp[k] = getattr(a, k)
    bb = Backbone(a.model)
    out = {"hyperparameters": {k: v for k, v in hp.items()}}
    doms = ["target", "control"] if a.domain == "both" else [a.domain]
    for d in doms:
        s = load_jsonl(os.path.join(ROOT, "data", f"{d}_stream.jsonl"))
        h = load_jsonl(os.path.join(ROOT, "data", f"{d}_holdout.jsonl"))
        r = run(bb, s, h, hp)
        out[d] = r
        print(f"[{d}] stream n={r['n_stream']} (labelled {r['n_labelled']}), holdout n={r['n_holdout']}")
        print(f"  holdout acc: pretrained {r['pretrained_holdout']:.4f}  adapted teacher {r['teacher_holdout']:.4f} "
              f"({r['teacher_gain_points']:+.1f} pts)  student {r['student_holdout']:.4f}")
        print(f"  prequential stream acc: pretrained {r['prequential_pretrained']:.4f}  teacher {r['prequential_teacher']:.4f}")
        print(f"  pseudo labels accepted {r['pseudo_accepted']} precision {r['pseudo_precision']:.3f}")
        print(f"  upper bound logreg on all stream labels: {r['logreg_all_stream_labels_holdout']:.4f}; "
              f"logreg on the labelled 5% only: {r['logreg_labelled_only_holdout']:.4f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
