#!/usr/bin/env python3
"""Regenerate the small hand-built test models that exercise other weight layouts.

    tools/.venv/bin/python tools/model/make_test_models.py

Writes (deterministically, fixed seed, a few KB each):
  tests/data/models/gemm_alpha_beta.onnx            three Gemms, the last two with transB = 0
                                                    and alpha, beta != 1, then Softmax
  tests/data/models/gemm_alpha_beta.reference.json  onnxruntime's outputs on 8 inputs, in the
                                                    format of reference.json

    input [N, 16] -> Gemm(fc1 [12,16], transB=1) -> Relu
                  -> Gemm(fc2 [12,10], transB=0, alpha=0.5, beta=2) -> Relu
                  -> Gemm(out [10,5],  transB=0, alpha=2, beta=0.5, bias [1,5]) -> Softmax
"""
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

# tools/<purpose>/this.py: the repository is two folders up.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "data", "models")
SEED = 20240612


def gemm_alpha_beta(rng):
    def init(name, shape, scale):
        return numpy_helper.from_array(
            (rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [
        init("fc1.weight", (12, 16), 0.4), init("fc1.bias", (12,), 0.1),
        init("fc2.weight", (12, 10), 0.5), init("fc2.bias", (10,), 0.1),
        init("out.weight", (10, 5), 0.5), init("out.bias", (1, 5), 0.2),
    ]
    nodes = [
        helper.make_node("Gemm", ["input", "fc1.weight", "fc1.bias"], ["fc1_out"],
                         name="fc1", transB=1),
        helper.make_node("Relu", ["fc1_out"], ["h1"], name="relu1"),
        helper.make_node("Gemm", ["h1", "fc2.weight", "fc2.bias"], ["fc2_out"],
                         name="fc2", transB=0, alpha=0.5, beta=2.0),
        helper.make_node("Relu", ["fc2_out"], ["h2"], name="relu2"),
        helper.make_node("Gemm", ["h2", "out.weight", "out.bias"], ["scores"],
                         name="out", transB=0, alpha=2.0, beta=0.5),
        helper.make_node("Softmax", ["scores"], ["probs"], name="softmax", axis=1),
    ]
    graph = helper.make_graph(
        nodes, "gemm_alpha_beta",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 5])],
        inits)
    # The producer keeps the script's old path so the regenerated file stays byte-identical
    # to the committed one.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="edgemt tools/make_test_models.py")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def main():
    rng = np.random.default_rng(SEED)
    model = gemm_alpha_beta(rng)
    path = os.path.join(OUT, "gemm_alpha_beta.onnx")
    onnx.save(model, path)

    x = rng.standard_normal((8, 16)).astype(np.float32)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (probs,) = sess.run(["probs"], {"input": x})
    ref = {"models": [{
        "file": "tests/data/models/gemm_alpha_beta.onnx",
        "input_shape": [8, 16],
        "output_name": "probs",
        "inputs": x.tolist(),
        "outputs": probs.tolist(),
    }]}
    with open(os.path.join(OUT, "gemm_alpha_beta.reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
        f.write("\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes) and its reference outputs")


if __name__ == "__main__":
    main()
