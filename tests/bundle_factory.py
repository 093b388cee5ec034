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


# --- a small graph shaped like the product's: a memory search, then pooling and a top-k score ------------
PRODUCT_FEATURES = 8  # channels of the patch features (the product: hundreds)
PRODUCT_MEMORY = 256  # memory items (the product: tens of thousands)
PRODUCT_PATCH = 4  # input pixels per feature cell
PRODUCT_TOPK = 10  # image score: mean of the map's top-K pixels


def product_graph(batch: int, size: int = 32, seed: int = 0, topk: int = PRODUCT_TOPK, resize_mode: str = "linear",
                  index_type: int = TensorProto.INT64) -> onnx.ModelProto:
    """image (N,1,S,S) -> patch features (Conv) -> similarity MatMul against a constant memory -> ArgMax and
    ArgMin -> Gather of the nearest items -> squared distance per cell -> MaxPool -> Resize to S x S = the
    anomaly map; score = mean of the map's top-K (TopK with K an initializer, sorted). The operators of the
    product's graph (the memory search, pooling, TopK) at a size tests can run in milliseconds."""
    rng = np.random.default_rng(seed)
    f, m, p = PRODUCT_FEATURES, PRODUCT_MEMORY, PRODUCT_PATCH
    cells = (size // p) ** 2
    kernel = rng.normal(0.0, 0.5, (f, 1, p, p)).astype(np.float32)
    memory = rng.normal(0.0, 1.0, (m, f)).astype(np.float32)
    inits = [
        numpy_helper.from_array(kernel, "patch_kernel"),
        numpy_helper.from_array(memory, "memory"),  # (M, F): Gather rows
        numpy_helper.from_array(memory.T.copy(), "memory_t"),  # (F, M): the similarity MatMul
        numpy_helper.from_array((memory ** 2).sum(axis=1).astype(np.float32), "memory_sq"),
        numpy_helper.from_array(np.array([batch, f, cells], dtype=np.int64), "flat_shape"),
        numpy_helper.from_array(np.array([batch, 1, size // p, size // p], dtype=np.int64), "cell_shape"),
        numpy_helper.from_array(np.array([batch, size * size], dtype=np.int64), "map_flat"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "axes_2"),
        numpy_helper.from_array(np.array([topk], dtype=np.int64), "k"),
        numpy_helper.from_array(np.array([2.0], dtype=np.float32), "two"),
        numpy_helper.from_array(np.array([1.0, 1.0, float(p), float(p)], dtype=np.float32), "scales"),
    ]
    nodes = [
        helper.make_node("Conv", [INPUT_NAME, "patch_kernel"], ["feat"], strides=[p, p], name="patch_features"),
        helper.make_node("Reshape", ["feat", "flat_shape"], ["feat_flat"], name="flatten"),
        helper.make_node("Transpose", ["feat_flat"], ["query"], perm=[0, 2, 1], name="queries"),  # (N, cells, F)
        helper.make_node("MatMul", ["query", "memory_t"], ["sim"], name="similarity"),  # (N, cells, M)
        helper.make_node("Mul", ["sim", "two"], ["sim2"], name="sim_x2"),
        helper.make_node("Sub", ["memory_sq", "sim2"], ["dist_part"], name="dist_part"),  # |m|^2 - 2 q.m
        helper.make_node("ArgMin", ["dist_part"], ["nearest_idx"], axis=2, keepdims=0, name="nearest_by_distance"),
        helper.make_node("ArgMax", ["sim"], ["similar_idx"], axis=2, keepdims=0, name="most_similar"),
        helper.make_node("Gather", ["memory", "nearest_idx"], ["nearest"], axis=0, name="gather_nearest"),
        helper.make_node("Gather", ["memory", "similar_idx"], ["similar"], axis=0, name="gather_similar"),
        helper.make_node("Sub", ["query", "nearest"], ["d1"], name="residual_nearest"),
        helper.make_node("Sub", ["query", "similar"], ["d2"], name="residual_similar"),
        helper.make_node("Mul", ["d1", "d1"], ["d1sq"], name="sq1"),
        helper.make_node("Mul", ["d2", "d2"], ["d2sq"], name="sq2"),
        helper.make_node("Add", ["d1sq", "d2sq"], ["dsq"], name="sum_residuals"),
        helper.make_node("ReduceSum", ["dsq", "axes_2"], ["cell_dist"], keepdims=0, name="cell_distance"),
        helper.make_node("Reshape", ["cell_dist", "cell_shape"], ["cell_map"], name="to_cells"),
        helper.make_node("MaxPool", ["cell_map"], ["pooled"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="closing"),
        helper.make_node("Resize", ["pooled", "", "scales"], [MAP_OUTPUT], mode=resize_mode, name="upsample"),
        helper.make_node("Reshape", [MAP_OUTPUT, "map_flat"], ["map_flat_values"], name="map_flatten"),
        helper.make_node("TopK", ["map_flat_values", "k"], ["top_values", "top_idx"], axis=-1, largest=1, sorted=1,
                         name="top_pixels"),
        helper.make_node("ReduceMean", ["top_values"], [SCORE_OUTPUT], axes=[1], keepdims=0, name="image_score"),
    ]
    if index_type != TensorProto.INT64:  # a graph that feeds an int index tensor into ArgMax (TensorRT 8.5 refuses)
        at = [n.name for n in nodes].index("similarity") + 1  # after the MatMul that makes `sim`
        nodes[at:at] = [helper.make_node("Cast", ["sim"], ["sim_int"], to=index_type, name="sim_to_int"),
                        helper.make_node("ArgMax", ["sim_int"], ["int_idx"], axis=2, keepdims=0, name="int_argmax")]
    inp = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [batch, 1, size, size])
    out_map = helper.make_tensor_value_info(MAP_OUTPUT, TensorProto.FLOAT, [batch, 1, size, size])
    out_score = helper.make_tensor_value_info(SCORE_OUTPUT, TensorProto.FLOAT, [batch])
    graph = helper.make_graph(nodes, "product-like", [inp], [out_map, out_score], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="daad-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def make_product_bundle(root: Path, size: int = 32, batches: tuple = (1,), seed: int = 0, **graph_args: object) -> Bundle:
    spec = PreprocessSpec(height=size, width=size, channel_order="gray", mean=(0.5,), std=(0.5,))
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for b in batches:
        name = "model.onnx" if b == 1 else f"model_b{b}.onnx"
        onnx.save(product_graph(b, size, seed, **graph_args), str(root / name))  # type: ignore[arg-type]
        files[b] = name
    return write_bundle(root, name="product-like-test", preprocess=spec, graph_files=files, opset=OPSET,
                        model_config={"kind": "product-like", "memory": PRODUCT_MEMORY})
