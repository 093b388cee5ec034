"""FP16 parity on a CPU: does the bundle's graph, with float16 tensors, judge images as the float32 graph does?

FP16 TensorRT plans are built on the Jetson. Here the float16 graph is emulated with onnx's own tools: every
float initializer and constant is rounded to float16, and every float tensor the graph computes (the input
included) goes through a Cast to float16 and back, so each value is stored as TensorRT's FP16 layers store it
(overflow above 65504 included) while each operator computes in float32, as TensorRT's FP16 kernels
accumulate. It runs on ONNX Runtime's CPU provider beside the float32 graph, on any machine.

Why not onnxconverter-common's convert_float_to_float16 on ONNX Runtime: ONNX Runtime's CPU provider runs most
float16 operators by casting to float32 and drops the casts between consecutive ones, so intermediate values
are never rounded (measured: x*300*300/300 in a converted graph gives 300 where float16 gives inf), which
hides exactly the drift this check is for. Needs the onnx package (`train` extra). TensorRT's own FP16
kernels are measured on the device (`pytest -m tensorrt`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np

from .bundle import Bundle
from .errors import DaadError, ImageError
from .preprocess import IMAGE_SUFFIXES, list_images, preprocess, read_image

logger = logging.getLogger(__name__)

# |map16 - map32| and |score16 - score32| allowed, as a fraction of max(1, max |map32|): float16 rounds each
# operation by at most 2^-11 (0.05 %); 1 % leaves room for the rounding of a few dozen operations in a row
# (the product-like test graph measures 0.12 %) and still catches a graph whose values leave float16's range
# (above 65504 they become inf) or whose nearest-neighbour choice flips on quantised distances.
MAP_TOLERANCE = 1e-2


@dataclass(frozen=True)
class ImageParity:
    image: str
    score32: float
    score16: float
    max_map_diff: float
    flagged32: Optional[bool]  # score > threshold, when a threshold was given
    flagged16: Optional[bool]


@dataclass(frozen=True)
class ParityReport:
    rows: Tuple[ImageParity, ...]
    scale: float  # max(1, max |map32|) over the images
    tolerance: float
    threshold: Optional[float]

    @property
    def worst_map_diff(self) -> float:
        return max(r.max_map_diff for r in self.rows)

    @property
    def worst_score_diff(self) -> float:
        return max(abs(r.score16 - r.score32) for r in self.rows)

    @property
    def verdicts_differ(self) -> List[str]:
        return [r.image for r in self.rows if r.flagged32 != r.flagged16]

    @property
    def ok(self) -> bool:
        allowed = self.tolerance * self.scale
        return not self.verdicts_differ and max(self.worst_map_diff, self.worst_score_diff) <= allowed

    def lines(self) -> List[str]:
        out = []
        for r in self.rows:
            verdict = "" if r.flagged32 is None else (
                f"  fp32 {'flagged' if r.flagged32 else 'good'} / fp16 {'flagged' if r.flagged16 else 'good'}")
            out.append(f"  {r.image}: score fp32 {r.score32:.6g} fp16 {r.score16:.6g}, max |map diff| "
                       f"{r.max_map_diff:.3g}{verdict}")
        allowed = self.tolerance * self.scale
        summary = (f"fp16 parity on {len(self.rows)} image(s): max |map diff| {self.worst_map_diff:.3g}, max |score "
                   f"diff| {self.worst_score_diff:.3g}, allowed {allowed:.3g} ({self.tolerance:g} x max(1, max |map|) "
                   f"= {self.tolerance:g} x {self.scale:.4g})")
        if self.threshold is None:
            summary += "; no --threshold: verdicts not compared"
        else:
            summary += f"; verdicts at threshold {self.threshold:g}: {len(self.rows) - len(self.verdicts_differ)} " \
                       f"of {len(self.rows)} the same"
        return out + [summary]


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise DaadError("fp16 parity needs the onnx package, which is not installed here: pip install 'onnx>=1.14' "
                        "(or daad-inspect with the `train` extra)") from exc
    return onnx


def _round16(array: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # beyond float16's range is inf, as in an FP16 engine
        return array.astype(np.float16).astype(np.float32)


def float16_emulation(onnx_path: Union[str, Path]) -> bytes:
    """The graph with float16 storage emulated (see the module's docstring); serialized."""
    onnx = _import_onnx()
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(_round16(numpy_helper.to_array(init)), init.name))
    initializers = {t.name for t in graph.initializer}

    def round_trip(name: str) -> List[Any]:  # `name`__fp32 -> float16 -> float32 `name`
        return [helper.make_node("Cast", [f"{name}__fp32"], [f"{name}__fp16"], to=TensorProto.FLOAT16,
                                 name=f"{name}__to_fp16"),
                helper.make_node("Cast", [f"{name}__fp16"], [name], to=TensorProto.FLOAT, name=f"{name}__to_fp32")]

    nodes: List[Any] = []
    for vi in graph.input:  # the input too, renamed `name`__fp32: an FP16 engine converts it at its first layer
        if vi.name not in initializers and vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            nodes.extend(round_trip(vi.name))
            vi.name = f"{vi.name}__fp32"
    for node in list(graph.node):
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                    attr.t.CopyFrom(numpy_helper.from_array(_round16(numpy_helper.to_array(attr.t)), attr.t.name))
            nodes.append(node)
            continue
        floats = [o for o in node.output if o and types.get(o) == TensorProto.FLOAT]
        node.output[:] = [f"{o}__fp32" if o in floats else o for o in node.output]
        nodes.append(node)
        for out in floats:
            nodes.extend(round_trip(out))
    del graph.node[:]
    graph.node.extend(nodes)
    return model.SerializeToString()


def expand_images(paths: Sequence[Union[str, Path]]) -> List[Path]:
    """Image files, and the images directly inside any folder given."""
    out: List[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = list_images(p)
            if not found:
                raise ImageError(f"{p}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            out.extend(found)
        else:
            out.append(p)
    return out


def fp16_parity(bundle: Bundle, images: Sequence[Union[str, Path]], threshold: Optional[float] = None,
                tolerance: float = MAP_TOLERANCE) -> ParityReport:
    """Score each image with the float32 and the float16 graph (batch 1) on ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    paths = expand_images(images)
    if not paths:
        raise ImageError("fp16 parity needs at least one image")
    onnx_path = bundle.onnx_path(1)
    providers = ["CPUExecutionProvider"]  # the same kernels for both precisions, on any machine
    keep_casts = ort.SessionOptions()
    keep_casts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no cast pair is folded away
    try:
        s32 = ort.InferenceSession(str(onnx_path), providers=providers)
        s16 = ort.InferenceSession(float16_emulation(onnx_path), sess_options=keep_casts, providers=providers)
    except DaadError:
        raise
    except Exception as exc:  # onnxruntime's and the converter's own error types
        raise DaadError(f"{onnx_path}: the float16 graph cannot be made or loaded ({exc.__class__.__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); FP16 parity cannot be checked") from exc
    outputs = [bundle.map_output, bundle.score_output]
    rows: List[ImageParity] = []
    scale = 1.0
    for path in paths:
        x = preprocess(read_image(path), bundle.preprocess)[None]
        map32, score32 = s32.run(outputs, {bundle.input_name: x})
        map16, score16 = s16.run(outputs, {f"{bundle.input_name}__fp32": x})
        map16, score16 = map16.astype(np.float32), score16.astype(np.float32)
        s32v, s16v = float(score32.reshape(-1)[0]), float(score16.reshape(-1)[0])
        scale = max(scale, float(np.abs(map32).max()))
        diff = float(np.abs(map16 - map32).max()) if np.isfinite(map16).all() else float("inf")
        flags = (None, None) if threshold is None else (s32v > threshold, s16v > threshold)
        rows.append(ImageParity(str(path), s32v, s16v if np.isfinite(s16v) else float("inf"), diff, *flags))
    return ParityReport(tuple(rows), scale, tolerance, threshold)
