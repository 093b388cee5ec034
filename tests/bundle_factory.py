"""A small, real ONNX bundle built without torch, for fast tests of engine/agent/calibration.

The graph is a template model: anomaly map = 3x3-smoothed |x - mean good image|, score = max of
the map. It runs on real ONNX Runtime and finds the synthetic defects of train.synthetic, so the
tests around it exercise real inference without paying for training.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engine.bundle import Bundle, MAP_OUTPUT, SCORE_OUTPUT, INPUT_NAME, write_bundle
from engine.preprocess import PreprocessSpec, preprocess_batch
from train.synthetic import make_good

OPSET = 17


def template_graph(template: np.ndarray, batch: int) -> onnx.ModelProto:
    c, h, w = template.shape
    inp = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [batch, c, h, w])
    out_map = helper.make_tensor_value_info(MAP_OUTPUT, TensorProto.FLOAT, [batch, 1, h, w])
    out_score = helper.make_tensor_value_info(SCORE_OUTPUT, TensorProto.FLOAT, [batch])
    nodes = [
        helper.make_node("Sub", [INPUT_NAME, "template"], ["diff"]),
        helper.make_node("Abs", ["diff"], ["absdiff"]),
        helper.make_node("ReduceMean", ["absdiff"], ["chanmean"], axes=[1], keepdims=1),
        helper.make_node("AveragePool", ["chanmean"], [MAP_OUTPUT], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         count_include_pad=0),
        helper.make_node("ReduceMax", [MAP_OUTPUT], ["score_keep"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Identity", ["score_keep"], [SCORE_OUTPUT]),
    ]
    graph = helper.make_graph(nodes, "template", [inp], [out_map, out_score],
                              initializer=[numpy_helper.from_array(template[None].astype(np.float32), "template")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="daad-tests")
    model.ir_version = 8  # readable by onnxruntime >= 1.10 and TensorRT 8.5's parser
    onnx.checker.check_model(model)
    return model


def make_template_bundle(root: Path, size: int = 64, seed: int = 0, n_template: int = 16,
                         batches: tuple = (1,), color: bool = False) -> Bundle:
    spec = PreprocessSpec(height=size, width=size, channel_order="rgb" if color else "gray",
                          mean=(0.5,) * (3 if color else 1), std=(0.5,) * (3 if color else 1))
    goods = [make_good(seed, i, 128, color=color) for i in range(n_template)]
    template = preprocess_batch(goods, spec).mean(axis=0)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for b in batches:
        name = "model.onnx" if b == 1 else f"model_b{b}.onnx"
        onnx.save(template_graph(template, b), str(root / name))
        files[b] = name
    return write_bundle(root, name="template-test", preprocess=spec, graph_files=files, opset=OPSET,
                        model_config={"kind": "template"},
                        score_stats={"n": n_template},
                        training_data={"source": "train.synthetic", "seed": seed, "n": n_template})
