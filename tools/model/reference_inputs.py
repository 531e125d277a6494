#!/usr/bin/env python3
"""Recordings of the inputs the shipped models were trained on, for `edgemt reference`.

    python tools/model/reference_inputs.py OUTDIR

Writes (JSON Lines, `{"x": [...]}` per line, as edgemt reads them):
  OUTDIR/hapt_train.jsonl      UCI HAPT training users' windows (make_hapt_model.py's split
                               and windowing, quantised as the model saw them), time-major
                               [64, 6]: for models/hapt_mlp.onnx and skl_mlp_softmax.onnx
                               (the same 384 numbers, flat)
  OUTDIR/hapt_train_cf.jsonl   the same windows channel-first [6, 64]: for cnn_gemm_softmax.onnx
  OUTDIR/digits_train.jsonl    the digits CNN's training images [1, 8, 8] (make_digits_model.py's
                               split), with the handheld jitter every image of it gets

tools/model/make_references.sh runs this, then `edgemt reference` per model. Deterministic.
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_digits_model as D  # noqa: E402
import make_hapt_model as H  # noqa: E402


def write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({"x": [round(float(v), 4) for v in r.ravel()]}) + "\n")
    print(f"{path}: {len(rows)} samples")


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    W = H.make_windows(H.load_hapt(), H.HOP)
    x = H.quantize(W["x"][np.isin(W["user"], H.TRAIN_USERS)])
    write(os.path.join(out, "hapt_train.jsonl"), x)
    write(os.path.join(out, "hapt_train_cf.jsonl"), x.transpose(0, 2, 1))
    dx, dy = D.load()
    tr, _, _ = D.split(dy)
    # The digits model trained on, and its streams carry, the "handheld" jitter.
    write(os.path.join(out, "digits_train.jsonl"), D.jitter(dx[tr], np.random.default_rng(0)))


if __name__ == "__main__":
    main()
