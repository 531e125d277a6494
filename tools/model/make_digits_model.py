#!/usr/bin/env python3
"""Train the 8x8 digits CNN test model (a non-IMU model of another architecture) and write it.

    python tools/model/make_digits_model.py

Writes (deterministically: fixed seeds, single-threaded BLAS):
  tests/data/models/digits_cnn.onnx    Conv 3x3 -> Relu -> Conv 3x3 /2 -> Relu -> Flatten
                                       -> Gemm (transB=1) -> Relu -> Gemm (transB=0) -> logits
  tests/data/models/digits_cnn.json    its accuracies (quoted in digits_cnn.md)

Data: scikit-learn's bundled `load_digits` (1,797 8x8 images of handwritten digits, 16 grey
levels, 10 classes; a copy of the UCI "Optical Recognition of Handwritten Digits" test set),
so nothing is downloaded. Pixels are scaled to [0, 1]; the model takes [N, 1, 8, 8].

Split (stratified, SPLIT_SEED): half of each class trains the model, a quarter is the STREAM
pool and a quarter the HOLDOUT pool; tools/eval/make_scenarios.py draws the digits scenarios
from the two pools only, so no stream or holdout image was trained on and stream and holdout
share no image. Training, streams and holdouts all see the same "handheld" jitter (`jitter`:
a shift of up to one pixel each way, a gain of 1 +- 5 %, noise of 0.02), so the jitter alone is
no shift. The "camera that ages" (`camera`) is a corruption of growing strength s in [0, 1]:
contrast lost toward grey, a rising black level, blur and sensor noise; at s = 1 (AGED) the
model loses some 20 points (see digits_cnn.md).

The network is trained here in numpy (im2col convolutions, Adam, cross-entropy) and exported
with the `onnx` helper API; onnxruntime reproduces the numpy forward pass within 1e-5
(checked on every run).
"""
import json
import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")   # modest CPU use and bit-reproducible BLAS sums

import numpy as np

# tools/<purpose>/this.py: the repository is two folders up.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL_PATH = "tests/data/models/digits_cnn.onnx"
SPLIT_SEED = 20240613
TRAIN_SEED = 20240614
EVAL_SEED = 20240615      # the jitter drawn for the accuracies quoted in the model note
CLASS_NAMES = [str(d) for d in range(10)]
SIDE = 8

# architecture
C1, C2, HIDDEN = 8, 16, 32            # conv1 channels, conv2 channels (stride 2), fc1 width
FLAT = C2 * (SIDE // 2) ** 2           # 16 x 4 x 4 = 256
EPOCHS, BATCH, LR, WEIGHT_DECAY = 60, 32, 3e-3, 1e-4

# "Handheld" variation every image gets (training, streams, holdouts).
JITTER = dict(max_shift=1, gain=0.05, noise=0.02)
# The aged camera at full strength (s = 1); make_scenarios.py grows it from 0 over a stream.
AGED = dict(contrast=0.15, black=0.05, blur=0.08, noise=0.05)


# ---- data ---------------------------------------------------------------------------
def load():
    """(x [1797, 1, 8, 8] float32 in [0, 1], y [1797] int64)."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.images.astype(np.float64) / 16.0).astype(np.float32)[:, None]
    return x, d.target.astype(np.int64)


def split(y):
    """Stratified index split: (train, stream pool, holdout pool), each sorted."""
    rng = np.random.default_rng(SPLIT_SEED)
    parts = ([], [], [])
    for c in range(10):
        idx = rng.permutation(np.where(y == c)[0])
        n_tr = len(idx) // 2
        n_st = (len(idx) - n_tr) // 2
        parts[0].extend(idx[:n_tr])
        parts[1].extend(idx[n_tr:n_tr + n_st])
        parts[2].extend(idx[n_tr + n_st:])
    return tuple(np.sort(np.asarray(p, np.int64)) for p in parts)


def shift(img, dy, dx):
    """Shift one [1, 8, 8] image by (dy, dx) pixels, zero (background) filled."""
    out = np.zeros_like(img)
    ys, yd = (slice(0, SIDE - dy), slice(dy, SIDE)) if dy >= 0 else (slice(-dy, SIDE), slice(0, SIDE + dy))
    xs, xd = (slice(0, SIDE - dx), slice(dx, SIDE)) if dx >= 0 else (slice(-dx, SIDE), slice(0, SIDE + dx))
    out[:, yd, xd] = img[:, ys, xs]
    return out


def jitter(x, rng, max_shift=JITTER["max_shift"], gain=JITTER["gain"], noise=JITTER["noise"]):
    """The handheld variation: a random shift, gain and noise per image; clipped to [0, 1]."""
    out = np.empty_like(x)
    for i in range(len(x)):
        dy, dx = rng.integers(-max_shift, max_shift + 1, size=2)
        out[i] = shift(x[i], int(dy), int(dx))
    g = 1.0 + gain * rng.standard_normal((len(x), 1, 1, 1))
    out = out * g + noise * rng.standard_normal(out.shape)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def blur(x, a):
    """Separable 3-tap blur [a, 1 - 2a, a] per image (a [N] in [0, 1/3]), zero padded."""
    a = np.asarray(a, np.float64).reshape(-1, 1, 1, 1)
    p = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (0, 0)))
    x = a * p[:, :, :-2] + (1 - 2 * a) * p[:, :, 1:-1] + a * p[:, :, 2:]
    p = np.pad(x, ((0, 0), (0, 0), (0, 0), (1, 1)))
    return a * p[..., :-2] + (1 - 2 * a) * p[..., 1:-1] + a * p[..., 2:]


def camera(x, s, rng, contrast=0.0, black=0.0, blur_a=0.0, noise=0.0):
    """An ageing camera at strength s ([N] or a scalar in [0, 1]) on x [N, 1, 8, 8]:
    blur with taps s*blur_a, then contrast lost toward mid-grey (x' = 0.5 + (x - 0.5)(1 -
    s*contrast)), a black level rising by s*black, Gaussian noise of sd s*noise; clipped to
    [0, 1] like a sensor's range. s = 0 is the identity (no random numbers are drawn then
    either, so a control stays bit-identical)."""
    s = np.broadcast_to(np.asarray(s, np.float64), (len(x),)).reshape(-1, 1, 1, 1)
    if not s.any():
        return x.copy()
    y = blur(x, s.reshape(-1) * blur_a) if blur_a else x.astype(np.float64)
    y = 0.5 + (y - 0.5) * (1.0 - s * contrast) + s * black
    if noise:
        y = y + s * noise * rng.standard_normal(y.shape)
    return np.clip(y, 0.0, 1.0).astype(np.float32)


def aged(x, s, rng, sev=None):
    sev = dict(AGED if sev is None else sev)
    return camera(x, s, rng, contrast=sev.get("contrast", 0.0), black=sev.get("black", 0.0),
                  blur_a=sev.get("blur", 0.0), noise=sev.get("noise", 0.0))


# ---- the network in numpy -------------------------------------------------------------
def im2col(x, k, stride, pad):
    """x [N, C, H, W] -> patches [N, OH, OW, C*k*k] (C major, then ky, kx: ONNX's weight order)."""
    n, c, h, w = x.shape
    p = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh = (h + 2 * pad - k) // stride + 1
    ow = (w + 2 * pad - k) // stride + 1
    cols = np.empty((n, oh, ow, c, k, k), x.dtype)
    for ky in range(k):
        for kx in range(k):
            cols[..., ky, kx] = p[:, :, ky:ky + stride * oh:stride, kx:kx + stride * ow:stride].transpose(0, 2, 3, 1)
    return cols.reshape(n, oh, ow, c * k * k)


def col2im(dcols, shape, k, stride, pad):
    n, c, h, w = shape
    oh, ow = dcols.shape[1:3]
    d = dcols.reshape(n, oh, ow, c, k, k)
    dp = np.zeros((n, c, h + 2 * pad, w + 2 * pad), dcols.dtype)
    for ky in range(k):
        for kx in range(k):
            dp[:, :, ky:ky + stride * oh:stride, kx:kx + stride * ow:stride] += d[..., ky, kx].transpose(0, 3, 1, 2)
    return dp[:, :, pad:pad + h, pad:pad + w]


def init_params(rng):
    def he(shape, fan_in):
        return rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
    return {
        "conv1.weight": he((C1, 1, 3, 3), 9), "conv1.bias": np.zeros(C1),
        "conv2.weight": he((C2, C1, 3, 3), C1 * 9), "conv2.bias": np.zeros(C2),
        "fc1.weight": he((HIDDEN, FLAT), FLAT), "fc1.bias": np.zeros(HIDDEN),
        # the head is stored [in, out]: exported as a Gemm with transB = 0
        "fc2.weight": he((HIDDEN, 10), HIDDEN) * 0.5, "fc2.bias": np.zeros(10),
    }


def forward(P, x, keep=False):
    """Logits [N, 10]; with keep, also the intermediates for backward."""
    c1 = im2col(x, 3, 1, 1)                                      # [N, 8, 8, 9]
    z1 = c1 @ P["conv1.weight"].reshape(C1, -1).T + P["conv1.bias"]
    a1 = np.maximum(z1, 0).transpose(0, 3, 1, 2)                 # [N, C1, 8, 8]
    c2 = im2col(a1, 3, 2, 1)                                     # [N, 4, 4, C1*9]
    z2 = c2 @ P["conv2.weight"].reshape(C2, -1).T + P["conv2.bias"]
    a2 = np.maximum(z2, 0).transpose(0, 3, 1, 2)                 # [N, C2, 4, 4]
    f = a2.reshape(len(x), -1)                                   # ONNX Flatten order (C, H, W)
    z3 = f @ P["fc1.weight"].T + P["fc1.bias"]
    h = np.maximum(z3, 0)
    logits = h @ P["fc2.weight"] + P["fc2.bias"]
    if keep:
        return logits, dict(x=x, c1=c1, z1=z1, a1=a1, c2=c2, z2=z2, f=f, z3=z3, h=h)
    return logits


def backward(P, cache, dlogits):
    g = {}
    n = len(dlogits)
    g["fc2.weight"] = cache["h"].T @ dlogits
    g["fc2.bias"] = dlogits.sum(0)
    dz3 = (dlogits @ P["fc2.weight"].T) * (cache["z3"] > 0)
    g["fc1.weight"] = dz3.T @ cache["f"]
    g["fc1.bias"] = dz3.sum(0)
    df = dz3 @ P["fc1.weight"]
    dz2 = df.reshape(n, C2, SIDE // 2, SIDE // 2).transpose(0, 2, 3, 1) * (cache["z2"] > 0)
    g["conv2.weight"] = (dz2.reshape(-1, C2).T @ cache["c2"].reshape(-1, C1 * 9)).reshape(C2, C1, 3, 3)
    g["conv2.bias"] = dz2.sum((0, 1, 2))
    dc2 = dz2 @ P["conv2.weight"].reshape(C2, -1)
    da1 = col2im(dc2, cache["a1"].shape, 3, 2, 1)
    dz1 = da1.transpose(0, 2, 3, 1) * (cache["z1"] > 0)
    g["conv1.weight"] = (dz1.reshape(-1, C1).T @ cache["c1"].reshape(-1, 9)).reshape(C1, 1, 3, 3)
    g["conv1.bias"] = dz1.sum((0, 1, 2))
    return g


def softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def train(x, y):
    """Adam on cross-entropy, a fresh jitter of the training images every epoch."""
    rng = np.random.default_rng(TRAIN_SEED)
    P = init_params(rng)
    m = {k: np.zeros_like(v) for k, v in P.items()}
    v = {k: np.zeros_like(v) for k, v in P.items()}
    t = 0
    onehot = np.eye(10)[y]
    for epoch in range(EPOCHS):
        xe = jitter(x, rng).astype(np.float64)
        order = rng.permutation(len(x))
        lr = LR * 0.5 * (1 + np.cos(np.pi * epoch / EPOCHS))   # cosine decay
        for b in range(0, len(x), BATCH):
            idx = order[b:b + BATCH]
            logits, cache = forward(P, xe[idx], keep=True)
            grads = backward(P, cache, (softmax(logits) - onehot[idx]) / len(idx))
            t += 1
            for k in P:
                gk = grads[k] + (WEIGHT_DECAY * P[k] if k.endswith("weight") else 0.0)
                m[k] = 0.9 * m[k] + 0.1 * gk
                v[k] = 0.999 * v[k] + 0.001 * gk * gk
                P[k] -= lr * (m[k] / (1 - 0.9 ** t)) / (np.sqrt(v[k] / (1 - 0.999 ** t)) + 1e-8)
    return P


# ---- ONNX ----------------------------------------------------------------------------
def build_onnx(P):
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    f32 = lambda a: np.ascontiguousarray(np.asarray(a, np.float32))  # noqa: E731
    inits = [numpy_helper.from_array(f32(v), k) for k, v in P.items()]
    nodes = [
        helper.make_node("Conv", ["image", "conv1.weight", "conv1.bias"], ["conv1_out"], name="conv1",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("Relu", ["conv1_out"], ["relu1_out"], name="relu1"),
        helper.make_node("Conv", ["relu1_out", "conv2.weight", "conv2.bias"], ["conv2_out"], name="conv2",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["conv2_out"], ["relu2_out"], name="relu2"),
        helper.make_node("Flatten", ["relu2_out"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc1.weight", "fc1.bias"], ["fc1_out"], name="fc1", transB=1),
        helper.make_node("Relu", ["fc1_out"], ["embedding"], name="relu3"),
        helper.make_node("Gemm", ["embedding", "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=0),
    ]
    inp = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, SIDE, SIDE])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])
    g = helper.make_graph(nodes, "digits_cnn", [inp], [out], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)],
                          producer_name="edgemt-tools", producer_version="1")
    m.ir_version = 8
    m.doc_string = ("8x8 handwritten digits (scikit-learn load_digits), pixels in [0, 1], "
                    "input [N, 1, 8, 8]; logits for 0-9")
    helper.set_model_props(m, {"edgemt.class_names": json.dumps(CLASS_NAMES)})
    onnx.checker.check_model(m, full_check=True)
    return m


def ort_session(path):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def ort_accuracy(sess, x, y):
    out = sess.run(["logits"], {"image": np.ascontiguousarray(x, np.float32)})[0]
    return round(float((out.argmax(1) == y).mean()), 4)


def main():
    import onnx
    x, y = load()
    tr, st, ho = split(y)
    assert not (set(tr) & set(st)) and not (set(tr) & set(ho)) and not (set(st) & set(ho))
    P = train(x[tr], y[tr])
    model = build_onnx(P)
    path = os.path.join(ROOT, MODEL_PATH)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    onnx.save(model, path)
    sess = ort_session(path)

    rng = np.random.default_rng(EVAL_SEED)
    xh = jitter(x[ho], rng)
    diff = float(np.abs(sess.run(["logits"], {"image": xh})[0]
                        - forward({k: v.astype(np.float32) for k, v in P.items()}, xh)).max())
    assert diff < 1e-4, diff
    metrics = {
        "model": MODEL_PATH, "bytes": os.path.getsize(path),
        "parameters": int(sum(v.size for v in P.values())),
        "split": {"train": int(len(tr)), "stream_pool": int(len(st)), "holdout_pool": int(len(ho))},
        "onnxruntime_vs_numpy_max_abs_diff": diff,
        "accuracy": {
            "train_clean": ort_accuracy(sess, x[tr], y[tr]),
            "holdout_clean": ort_accuracy(sess, x[ho], y[ho]),
            "holdout_jittered": ort_accuracy(sess, xh, y[ho]),
            "stream_pool_jittered": ort_accuracy(sess, jitter(x[st], rng), y[st]),
            "holdout_aged": ort_accuracy(sess, aged(xh, 1.0, rng), y[ho]),
        },
        "aged": AGED, "jitter": JITTER,
    }
    with open(os.path.join(ROOT, "tests", "data", "models", "digits_cnn.json"), "w") as f:
        json.dump(metrics, f, indent=1)
        f.write("\n")
    print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
