"""engine.check: the static TensorRT-compatibility check of ONNX graphs (no GPU)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List

import onnx
import pytest
from onnx import TensorProto, helper

from engine import trt_support
from engine.bundle import Bundle
from engine.check import check_bundle, check_graph
from engine.errors import BundleError, DaadError


def save(tmp_path: Path, nodes: List[onnx.NodeProto], inputs: list, outputs: list, opset: int = 17,
         name: str = "g.onnx", initializers: list = ()) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def f32(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_template_bundle_passes(template_bundle: Bundle) -> None:
    assert check_graph(template_bundle.onnx_path(1)) == []
    assert check_bundle(template_bundle) == []


@pytest.mark.parametrize("op_type", ["Unique", "StringNormalizer", "Det"])
def test_op_outside_the_list_is_named(tmp_path: Path, op_type: str) -> None:
    path = save(tmp_path, [helper.make_node(op_type, ["x"], ["y"], name="odd_node")],
                [f32("x", [4])], [f32("y", [4])])
    problems = check_graph(path)
    ops = [p for p in problems if p.op_type == op_type]
    assert len(ops) == 1 and ops[0].node == "odd_node"
    assert "not in TensorRT's ONNX operator support list" in str(ops[0])
    assert str(path) in str(ops[0]) and f"node 'odd_node' ({op_type})" in str(ops[0])


def test_op_of_tensorrt_10_only_is_named(tmp_path: Path) -> None:
    path = save(tmp_path, [helper.make_node("LayerNormalization", ["x", "s"], ["y"], name="ln")],
                [f32("x", [1, 4]), f32("s", [4])], [f32("y", [1, 4])])
    [problem] = [p for p in check_graph(path) if p.op_type == "LayerNormalization"]
    assert "TensorRT 10.x only, not by 8.5/8.6" in problem.why


def test_custom_domain_op_is_named(tmp_path: Path) -> None:
    node = helper.make_node("FusedGelu", ["x"], ["y"], name="ms", domain="com.microsoft")
    graph = helper.make_graph([node], "g", [f32("x", [2])], [f32("y", [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    [problem] = check_graph(tmp_path / "m.onnx")
    assert (problem.node, problem.op_type) == ("ms", "FusedGelu") and "custom domain 'com.microsoft'" in problem.why


def test_dynamic_dimension_is_named(tmp_path: Path) -> None:
    path = save(tmp_path, [helper.make_node("Relu", ["x"], ["y"], name="relu")],
                [f32("x", ["N", 1, 8, 8])], [f32("y", ["N", 1, 8, 8])])
    problems = check_graph(path)
    text = "\n".join(map(str, problems))
    assert "input 'x': shape ['N', 1, 8, 8] is not static" in text
    assert "node 'relu' (Relu): graph output 'y' has shape ['N', 1, 8, 8], not static" in text
    assert len(problems) == 2  # downstream tensors are not listed one by one


def test_dynamic_intermediate_shape_is_named(tmp_path: Path) -> None:
    # a Reshape whose target shape is a graph input: static input, unknown intermediate shape
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"], name="reshape"),
             helper.make_node("Relu", ["r"], ["y"], name="relu")]
    path = save(tmp_path, nodes, [f32("x", [1, 64]), helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
                [f32("y", [8, 8])])
    problems = check_graph(path)
    assert any(p.node == "reshape" and "after shape inference, not static" in p.why for p in problems)


def test_opset_18_is_named(tmp_path: Path) -> None:
    path = save(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], [f32("x", [2])], [f32("y", [2])], opset=18)
    [problem] = check_graph(path)
    assert "opset 18 > 17" in problem.why and "opset_version=17" in problem.why


def test_new_ir_version_is_named(tmp_path: Path) -> None:
    path = save(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], [f32("x", [2])], [f32("y", [2])])
    model = onnx.load(str(path))
    model.ir_version = 10
    onnx.save(model, str(path))
    [problem] = check_graph(path)
    assert problem.node == "ir_version" and "IR version 10 > 8" in problem.why


def test_double_tensor_is_named(tmp_path: Path) -> None:
    nodes = [helper.make_node("Cast", ["x"], ["xd"], name="to_double", to=TensorProto.DOUBLE),
             helper.make_node("Cast", ["xd"], ["y"], name="to_float", to=TensorProto.FLOAT)]
    path = save(tmp_path, nodes, [f32("x", [2])], [f32("y", [2])])
    problems = check_graph(path)
    assert [(p.node, p.op_type) for p in problems] == [("to_double", "Cast")]
    assert "dtype DOUBLE" in problems[0].why


@pytest.mark.parametrize("dtype", [TensorProto.DOUBLE, TensorProto.UINT64, TensorProto.COMPLEX64])
def test_unsupported_initializer_dtype_names_its_consumer(tmp_path: Path, dtype: int) -> None:
    init = helper.make_tensor("w", dtype, [2], [1, 2])
    nodes = [helper.make_node("Add", ["x", "w"], ["y"], name="add_w")]
    x = helper.make_tensor_value_info("x", dtype, [2])
    y = helper.make_tensor_value_info("y", dtype, [2])
    path = save(tmp_path, nodes, [x], [y], initializers=[init])
    problems = check_graph(path)
    assert any(p.node == "add_w" and trt_support.dtype_name(dtype) in p.why for p in problems)
    assert any(p.node == "input 'x'" for p in problems)


def test_string_tensor_is_named(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.STRING, [2])
    y = helper.make_tensor_value_info("y", TensorProto.STRING, [2])
    path = save(tmp_path, [helper.make_node("StringNormalizer", ["x"], ["y"], name="norm")], [x], [y])
    problems = check_graph(path)
    whys = [p.why for p in problems if p.node == "norm"]
    assert any("support list" in w for w in whys) and any("dtype STRING" in w for w in whys)


def test_subgraph_nodes_are_checked(tmp_path: Path) -> None:
    then_graph = helper.make_graph([helper.make_node("Unique", ["x"], ["t"], name="inner_unique")], "then", [],
                                   [f32("t", [2])])
    else_graph = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="inner_id")], "else", [],
                                   [f32("e", [2])])
    node = helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_graph, else_branch=else_graph)
    path = save(tmp_path, [node], [helper.make_tensor_value_info("c", TensorProto.BOOL, []), f32("x", [2])],
                [f32("y", [2])])
    assert any(p.node == "inner_unique" and p.op_type == "Unique" for p in check_graph(path))


def test_truncated_file_is_a_bundle_error(template_bundle: Bundle, tmp_path: Path) -> None:
    data = template_bundle.onnx_path(1).read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(BundleError, match="cut.onnx: not a readable ONNX model"):
        check_graph(tmp_path / "cut.onnx")


def test_missing_onnx_package_is_said_clearly(monkeypatch: pytest.MonkeyPatch, template_bundle: Bundle) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(DaadError, match=r"needs the onnx package.*pip install 'onnx>=1.14'"):
        check_graph(template_bundle.onnx_path(1))


def test_support_table_is_the_intersection() -> None:
    assert "Unique" not in trt_support.SUPPORTED_OPS and "StringNormalizer" not in trt_support.SUPPORTED_OPS
    assert {"Conv", "Sub", "Abs", "ReduceMean", "AveragePool", "ReduceMax", "Identity", "Resize"} <= trt_support.SUPPORTED_OPS
    assert not trt_support.TRT_10_ONLY_OPS & trt_support.SUPPORTED_OPS
    assert trt_support.op_support("", "LayerNormalization") == "10-only"


# -- the operator limits the product's graph meets (TopK, ArgMax/ArgMin, MatMul, Resize) -------------------
def _product(tmp_path: Path, **graph_args: object) -> Path:
    from tests.bundle_factory import product_graph

    path = tmp_path / "product.onnx"
    onnx.save(product_graph(1, **graph_args), str(path))  # type: ignore[arg-type]
    return path


def test_product_like_graph_passes(tmp_path: Path) -> None:
    from tests.bundle_factory import make_product_bundle

    bundle = make_product_bundle(tmp_path / "p", batches=(1, 2))
    assert check_bundle(bundle) == []
    ops = {n.op_type for n in onnx.load(str(bundle.onnx_path())).graph.node}
    assert {"MatMul", "ArgMax", "ArgMin", "Gather", "TopK", "MaxPool", "Resize"} <= ops


@pytest.mark.parametrize("graph_args, node, fragment", [
    # the top 1 % of a 640x640 map: K = 4096 > 3840 (8.5, 8.6 and 10.x refuse it at build time)
    ({"topk": 4096}, "top_pixels", "K = 4096 > 3840"),
    ({"topk": 3840}, None, None),  # the limit itself is fine
    ({"resize_mode": "cubic"}, "upsample", "mode 'cubic'"),
    ({"index_type": TensorProto.INT32}, "int_argmax", "input 'sim_int' is INT32, which TensorRT 8.5 refuses for ArgMax"),
], ids=["topk-too-large", "topk-at-limit", "resize-cubic", "int32-into-argmax"])
def test_operator_limits_on_the_product_graph(tmp_path: Path, graph_args: dict, node: str, fragment: str) -> None:
    problems = check_graph(_product(tmp_path, **graph_args))
    if node is None:
        assert problems == []
    else:
        [problem] = problems
        assert problem.node == node and fragment in problem.why, problem


def _one_op(tmp_path: Path, node: onnx.NodeProto, inputs: list, outputs: list, initializers: list = ()) -> List[str]:
    return [str(p) for p in check_graph(save(tmp_path, [node], inputs, outputs, initializers=list(initializers)))]


def test_topk_k_must_be_an_initializer(tmp_path: Path) -> None:
    k_input = helper.make_tensor_value_info("k", TensorProto.INT64, [1])
    node = helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk", axis=-1)
    problems = _one_op(tmp_path, node, [f32("x", [1, 64]), k_input],
                       [helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, 4]),
                        helper.make_tensor_value_info("i", TensorProto.INT64, [1, 4])])
    assert any("K ('k') is computed in the graph" in p and "initializer" in p for p in problems), problems


def test_topk_from_a_constant_node_is_fine_and_unsorted_is_not(tmp_path: Path) -> None:
    nodes = [helper.make_node("Constant", [], ["k"], value=helper.make_tensor("kv", TensorProto.INT64, [1], [4])),
             helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk", axis=-1, sorted=0)]
    path = save(tmp_path, nodes, [f32("x", [1, 64])],
                [f32("v", [1, 4]), helper.make_tensor_value_info("i", TensorProto.INT64, [1, 4])])
    [problem] = check_graph(path)
    assert problem.node == "topk" and "sorted=0" in problem.why and "10.x" in problem.why


def test_int32_into_matmul_is_named(tmp_path: Path) -> None:
    int32 = [helper.make_tensor_value_info(n, TensorProto.INT32, [2, 2]) for n in ("a", "b", "y")]
    problems = _one_op(tmp_path, helper.make_node("MatMul", ["a", "b"], ["y"], name="mm"), int32[:2], int32[2:])
    assert sum("which TensorRT 8.5 refuses for MatMul" in p for p in problems) == 2, problems


@pytest.mark.parametrize("attrs, fragment", [
    ({"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize"}, "coordinate_transformation_mode"),
    ({"mode": "nearest", "nearest_mode": "floor"}, None),
    ({"mode": "nearest", "coordinate_transformation_mode": "asymmetric"}, None),
])
def test_resize_modes(tmp_path: Path, attrs: dict, fragment: str) -> None:
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1.0, 1.0, 2.0, 2.0])
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], name="up", **attrs)
    problems = _one_op(tmp_path, node, [f32("x", [1, 1, 4, 4])], [f32("y", [1, 1, 8, 8])], [scales])
    if fragment is None:
        assert problems == []
    else:
        assert len(problems) == 1 and fragment in problems[0] and "node 'up' (Resize)" in problems[0]
