"""Static check that a bundle's graphs will parse in TensorRT on every JetPack we target.

No GPU and no TensorRT needed: opset and IR version, static shapes everywhere (after ONNX shape
inference), every operator in TensorRT's published support table (engine.trt_support), no dtype
TensorRT cannot hold, and the operator limits the product's graph meets: TopK (K <= 3840, K an
initializer, sorted), no INT32 into TopK/ArgMax/ArgMin/MatMul (8.5), Resize modes 8.5 knows.
Needs the `onnx` package (a `train` extra); without it, says so.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple, Union

from . import trt_support
from .bundle import Bundle
from .errors import BundleError, DaadError, require_module

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    """One reason a graph will not build in TensorRT; `node` and `op_type` are empty for graph-level ones."""

    node: str
    op_type: str
    why: str
    file: str = ""

    def __str__(self) -> str:
        where = f"node {self.node!r} ({self.op_type})" if self.op_type else (self.node or "graph")
        prefix = f"{self.file}: " if self.file else ""
        return f"{prefix}{where}: {self.why}"


def _import_onnx() -> Any:
    return require_module("onnx", DaadError, "`daad-engine check` needs the onnx package, which is not installed "
                          "here: pip install 'onnx>=1.14' (or install daad-inspect with the `train` extra)")


def _walk_nodes(graph: Any) -> Iterator[Any]:
    """Every node, including those in If/Loop/Scan subgraphs."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _walk_nodes(attr.g)
            for sub in attr.graphs:
                yield from _walk_nodes(sub)


def _node_label(node: Any, index: int) -> str:
    return node.name or f"#{index} (unnamed)"


def _shape_of(value_info: Any) -> Optional[List[Union[int, str]]]:
    """Dims as ints, or dim_param / '?' for dynamic ones; None when the rank is unknown."""
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims: List[Union[int, str]] = []
    for d in tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or "?")
    return dims


def _is_static(dims: Optional[List[Union[int, str]]]) -> bool:
    return dims is not None and all(isinstance(d, int) for d in dims)


def check_graph(onnx_path: Union[str, Path]) -> List[Problem]:
    """Everything in one ONNX file that TensorRT 8.5/8.6/10.x would refuse; [] when it is fine."""
    onnx = _import_onnx()
    path = Path(onnx_path)
    if not path.is_file():
        raise BundleError(f"{path}: ONNX file not found")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises DecodeError and friends for truncated files
        raise BundleError(f"{path}: not a readable ONNX model ({exc.__class__.__name__}); copy or re-export it") from exc

    problems: List[Problem] = []
    file = str(path)

    def add(node: str, op_type: str, why: str) -> None:
        problems.append(Problem(node=node, op_type=op_type, why=why, file=file))

    for opset in model.opset_import:
        if opset.domain not in trt_support.DEFAULT_DOMAINS:
            continue
        if opset.version > trt_support.MAX_OPSET:
            add("opset_import", "", f"opset {opset.version} > {trt_support.MAX_OPSET}: TensorRT 8.5/8.6 (JetPack 5, 6.0) "
                f"parse up to opset {trt_support.MAX_OPSET}; re-export with opset_version={trt_support.MAX_OPSET}")
        elif opset.version < trt_support.MIN_OPSET:
            add("opset_import", "", f"opset {opset.version} < {trt_support.MIN_OPSET}: TensorRT 10.x (JetPack 6.1+) "
                f"parses opsets {trt_support.MIN_OPSET}-20; re-export with opset_version={trt_support.MAX_OPSET}")
    if model.ir_version > trt_support.MAX_IR_VERSION:
        add("ir_version", "", f"IR version {model.ir_version} > {trt_support.MAX_IR_VERSION}: TensorRT 8.5's parser "
            f"(onnx 1.12) reads IR <= {trt_support.MAX_IR_VERSION}; set model.ir_version = {trt_support.MAX_IR_VERSION} at export")

    graph = model.graph
    producers: Dict[str, Tuple[str, str]] = {}
    consumers: Dict[str, List[Tuple[str, str]]] = {}
    for i, node in enumerate(_walk_nodes(graph)):
        label = (_node_label(node, i), node.op_type)
        for out in node.output:
            producers[out] = label
        for inp in node.input:
            consumers.setdefault(inp, []).append(label)

    # Operators
    for i, node in enumerate(_walk_nodes(graph)):
        support = trt_support.op_support(node.domain, node.op_type)
        if support == "custom-domain":
            add(_node_label(node, i), node.op_type, f"operator of custom domain {node.domain!r}: TensorRT's ONNX parser "
                "reads only standard ONNX operators; export without custom ops")
        elif support == "10-only":
            add(_node_label(node, i), node.op_type, f"{node.op_type} is supported by TensorRT 10.x only, not by 8.5/8.6 "
                "(JetPack 5, 6.0); rewrite it with basic operators at export")
        elif support == "unsupported":
            add(_node_label(node, i), node.op_type, f"{node.op_type} is not in TensorRT's ONNX operator support list "
                "(8.5 or 10.x); remove it from the exported graph")

    # Dtypes: attributes that create tensors (Cast's `to`, Constant's value) and every typed tensor.
    seen_dtype: Set[Tuple[str, int]] = set()

    def bad_dtype(tensor: str, dtype: int, node: Tuple[str, str], what: str) -> None:
        if dtype in trt_support.SUPPORTED_DTYPES or dtype == 0 or (node[0], dtype) in seen_dtype:
            return
        seen_dtype.add((node[0], dtype))
        add(node[0], node[1], f"{what} {tensor!r} has dtype {trt_support.dtype_name(dtype)}, which TensorRT "
            "does not compute as ONNX Runtime does; export in float32 (float16/int32/int64/bool are fine)")

    for i, node in enumerate(_walk_nodes(graph)):
        label = (_node_label(node, i), node.op_type)
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to":
                bad_dtype(node.output[0] if node.output else "", attr.i, label, "output")
            if attr.HasField("t"):
                bad_dtype(attr.t.name or (node.output[0] if node.output else ""), attr.t.data_type, label, "constant")
    for init in graph.initializer:
        for consumer in consumers.get(init.name, [("initializer " + init.name, "")]):
            bad_dtype(init.name, init.data_type, consumer, "initializer")

    # Shapes (and dtypes of every typed tensor) after shape inference.
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:  # inference errors are onnx's own exception types
        add("graph", "", f"ONNX shape inference failed ({exc}); the graph is inconsistent, re-export it")
        inferred = model
    ig = inferred.graph
    initializer_names = {t.name for t in ig.initializer}
    dynamic_inputs = False
    for vi in ig.input:
        if vi.name in initializer_names:
            continue
        dims = _shape_of(vi)
        bad_dtype(vi.name, vi.type.tensor_type.elem_type, (f"input {vi.name!r}", ""), "graph input")
        if not _is_static(dims):
            dynamic_inputs = True
            add(f"input {vi.name!r}", "", f"shape {dims if dims is not None else 'unknown'} is not static; export with a "
                "fixed input shape (no dynamic_axes)")
    for vi in ig.output:
        dims = _shape_of(vi)
        producer = producers.get(vi.name, (f"output {vi.name!r}", ""))
        bad_dtype(vi.name, vi.type.tensor_type.elem_type, producer, "graph output")
        if not _is_static(dims):
            add(producer[0], producer[1], f"graph output {vi.name!r} has shape "
                f"{dims if dims is not None else 'unknown'}, not static; export with a fixed input shape")
    for vi in ig.value_info:
        producer = producers.get(vi.name, (vi.name, ""))
        bad_dtype(vi.name, vi.type.tensor_type.elem_type, producer, "output")
        if dynamic_inputs:
            continue  # every tensor downstream of a dynamic input is dynamic: the input is the one problem
        dims = _shape_of(vi)
        if not _is_static(dims):
            add(producer[0], producer[1], f"output {vi.name!r} has shape {dims if dims is not None else 'unknown'} "
                "after shape inference, not static; make the shape computation constant at export")
    dtypes = {vi.name: vi.type.tensor_type.elem_type for vi in list(ig.input) + list(ig.value_info) + list(ig.output)}
    dtypes.update({t.name: t.data_type for t in ig.initializer})
    problems.extend(Problem(node, op, why, file) for node, op, why in _operator_limits(onnx, model.graph, dtypes))
    return problems


def _constants(onnx: Any, graph: Any) -> Dict[str, Any]:
    """Tensors TensorRT's parser holds as weights: initializers and Constant nodes' values (numpy arrays)."""
    values = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    values[node.output[0]] = attr.t
    return {name: onnx.numpy_helper.to_array(t) for name, t in values.items()}


def _attr(node: Any, name: str, default: Any) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            value = attr.s.decode() if attr.type == attr.STRING else attr.i
            return value
    return default


def _operator_limits(onnx: Any, graph: Any, dtypes: Dict[str, int]) -> Iterator[Tuple[str, str, str]]:
    """(node, op_type, why) for each per-operator restriction of TensorRT 8.5/8.6/10.x that a node breaks."""
    constants = _constants(onnx, graph)
    for i, node in enumerate(_walk_nodes(graph)):
        label, op = _node_label(node, i), node.op_type
        if op in trt_support.NO_INT32_INPUT_OPS:
            data_inputs = node.input[:2] if op == "MatMul" else node.input[:1]
            for name in data_inputs:
                if dtypes.get(name) == trt_support.INT32:
                    yield label, op, (f"input {name!r} is INT32, which TensorRT 8.5 refuses for {op} (FP32/FP16 only); "
                                      "keep it in float at export (no cast to int before it)")
        if op == "TopK":
            k_name = node.input[1] if len(node.input) > 1 else ""
            if k_name not in constants:
                yield label, op, (f"K ({k_name!r}) is computed in the graph, but TensorRT 8.5 needs K as an initializer; "
                                  "export K as a constant (a Python int, not a tensor expression)")
            else:
                k = int(constants[k_name].reshape(-1)[0])
                if k > trt_support.TOPK_MAX_K:
                    yield label, op, (f"K = {k} > {trt_support.TOPK_MAX_K}, the largest TopK TensorRT builds (8.5, 8.6, "
                                      f"10.x); take the top K <= {trt_support.TOPK_MAX_K} (e.g. a fixed count, not a "
                                      "fraction of a large map) or pool the map first")
            if _attr(node, "sorted", 1) != 1:
                yield label, op, "sorted=0: TensorRT 10.x builds TopK with sorted=1 only; export with sorted=True"
        if op == "Resize":
            mode = _attr(node, "mode", "nearest")
            coord = _attr(node, "coordinate_transformation_mode", "half_pixel")
            nearest = _attr(node, "nearest_mode", "round_prefer_floor")
            if mode not in trt_support.RESIZE_MODES:
                yield label, op, (f"mode {mode!r}: TensorRT 8.5 resizes with {sorted(trt_support.RESIZE_MODES)} only; "
                                  "export with bilinear or nearest interpolation")
            if coord not in trt_support.RESIZE_COORDINATE_MODES:
                yield label, op, (f"coordinate_transformation_mode {coord!r} is not one TensorRT 8.5 supports "
                                  f"({sorted(trt_support.RESIZE_COORDINATE_MODES)}); export without it")
            if mode == "nearest" and nearest not in trt_support.RESIZE_NEAREST_MODES:
                yield label, op, (f"nearest_mode {nearest!r} is not one TensorRT 8.5 supports "
                                  f"({sorted(trt_support.RESIZE_NEAREST_MODES)})")


def check_bundle(bundle: Bundle) -> List[Problem]:
    """check_graph on every graph of the bundle, plus its inputs/outputs against bundle.yaml."""
    onnx = _import_onnx()
    problems: List[Problem] = []
    for g in bundle.graphs:
        path = bundle.root / g.file
        problems.extend(check_graph(path))
        model = onnx.load(str(path), load_external_data=False)
        initializer_names = {t.name for t in model.graph.initializer}
        inputs = {vi.name: _shape_of(vi) for vi in model.graph.input if vi.name not in initializer_names}
        outputs = {vi.name: _shape_of(vi) for vi in model.graph.output}
        expected_in = list(bundle.input_shape(g.batch))
        if bundle.input_name not in inputs:
            problems.append(Problem(f"input {bundle.input_name!r}", "", f"bundle.yaml names input {bundle.input_name!r} "
                                    f"but the graph's inputs are {sorted(inputs)}; re-export the bundle", str(path)))
        elif inputs[bundle.input_name] != expected_in:
            problems.append(Problem(f"input {bundle.input_name!r}", "", f"shape {inputs[bundle.input_name]} does not match "
                                    f"bundle.yaml (batch {g.batch}, preprocess) {expected_in}; re-export the bundle", str(path)))
        for field_name, name in (("anomaly_map", bundle.map_output), ("score", bundle.score_output)):
            if name not in outputs:
                problems.append(Problem(f"output {name!r}", "", f"bundle.yaml outputs.{field_name} is {name!r} but the "
                                        f"graph's outputs are {sorted(outputs)}; re-export the bundle", str(path)))
    return problems
