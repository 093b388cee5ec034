"""Export a checkpoint as a model bundle: model.onnx (scoring inside the graph, static shapes,
opset 17 so TensorRT 8.5/8.6 and 10.x all parse it) and bundle.yaml (engine.bundle.write_bundle).

Exporter choice: torch's default dynamo exporter emits opset 18 and its down-conversion to 17
fails for this graph (measured with torch 2.13), so we use the TorchScript exporter
(`dynamo=False`), which writes clean opset-17 Reshape/Transpose/MatMul/Softmax graphs. The export
test pins that this still works on the installed torch.
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from engine.bundle import (BUNDLE_YAML, FEATURES_FILE, INPUT_NAME, MAP_OUTPUT, SCORE_OUTPUT, Bundle, load_bundle,
                           write_bundle, write_bundle_yaml)
from engine.errors import DaadError
from engine.preprocess import preprocess_batch, read_image

from .checkpoint import load_model
from .config import to_dict
from .memory_model import BlockMemoryModel
from .preprocessing import preprocess_spec
from .views import Scorer, ViewEnsemble

logger = logging.getLogger(__name__)

OPSET = 17
# inputs that carry shapes or amounts, per op: computed ones are folded into initializers after export
SHAPE_INPUTS = {"Pad": (1,), "Reshape": (1,), "Expand": (1,), "Tile": (1,), "ConstantOfShape": (0,),
                "Resize": (1, 2, 3), "Slice": (1, 2, 3, 4)}
PARITY_TOLERANCE = 1e-4  # fp32: ONNX Runtime vs PyTorch eval mode, max absolute difference


class ExportError(DaadError):
    """The model could not be exported or the exported graph disagrees with PyTorch."""


def export_onnx(model: Scorer, path: Path, batch: int = 1) -> Path:
    model = with_plain_weights(model.eval().cpu())
    h, w = model.cfg.image_size
    dummy = torch.zeros(batch, model.cfg.in_channels, h, w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice, see module doc
        torch.onnx.export(
            model, (dummy,), str(path), input_names=[INPUT_NAME], output_names=[MAP_OUTPUT, SCORE_OUTPUT],
            opset_version=OPSET, dynamic_axes=None, do_constant_folding=True, dynamo=False,
        )
    fold_constant_pads(path)
    return path


class MemoryQueries(torch.nn.Module):
    """image (1, C, H, W) -> the query vectors each memory of a BlockMemoryModel searches: (Q, D) rows of its
    `divide`d, projected features, in the memory's own layout, so that daad-calibrate teach can append them to the
    memory's items without torch (bundle.yaml `features`)."""

    def __init__(self, model: BlockMemoryModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        raw, raw_coarse = self.model.features(x)
        out = [self.model.block_memory.blocks(self.model.project(raw))]
        if self.model.coarse_memory is not None and raw_coarse is not None:
            out.append(self.model.coarse_memory.blocks(self.model.project_coarse(raw_coarse)))
        return tuple(out)


def features_outputs(model: BlockMemoryModel) -> Dict[str, str]:
    """Memory initializer prefix -> the features graph's output with its queries (bundle.yaml features.outputs)."""
    outputs = {"block_memory": "block_queries"}
    if model.coarse_memory is not None:
        outputs["coarse_memory"] = "coarse_queries"
    return outputs


def export_features(model: BlockMemoryModel, path: Path) -> Dict[str, str]:
    """Write the features graph (batch 1, opset 17) beside model.onnx; returns its outputs by memory."""
    model = model.eval().cpu()
    outputs = features_outputs(model)
    h, w = model.cfg.image_size
    dummy = torch.zeros(1, model.cfg.in_channels, h, w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(MemoryQueries(model), (dummy,), str(path), input_names=[INPUT_NAME],
                          output_names=list(outputs.values()), opset_version=OPSET, dynamic_axes=None,
                          do_constant_folding=True, dynamo=False)
    fold_constant_pads(path)
    import onnx

    onnx.save(onnx.shape_inference.infer_shapes(onnx.load(str(path))), str(path))  # static (Q, D) outputs, stated
    return outputs


def with_plain_weights(model: Scorer) -> Scorer:
    """The model with a spectrally normalised discriminator replaced by its plain twin (the same numbers).

    A shallow copy: the memories (hundreds of MB) are shared, only the module table is the copy's own, and
    the caller's model is left as it was."""
    if isinstance(model, ViewEnsemble):
        return model.with_plain_weights()
    disc = model.discriminator
    if disc is None or not disc.spectral_norm:
        return model
    plain = copy.copy(model)
    plain._modules = dict(model._modules)
    plain.discriminator = disc.eval().with_plain_weights()
    return plain


def fold_constant_pads(path: Path) -> None:
    """Replace every computed shape-like input (Pad's pads, Reshape's shape, ...) by its value.

    The TorchScript exporter writes F.pad's amounts as a chain of Constant/ConstantOfShape/Slice/Cast
    nodes that its constant folding leaves alone; ONNX shape inference then cannot size the Pad's output,
    and every shape computed after it (the backbone's TF-style SAME padding, then the memories' Reshapes)
    is unknown to TensorRT's checks. The graph's input shape is fixed, so these are constants: ONNX
    Runtime evaluates them once here.
    """
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    known = {i.name for i in graph.initializer}
    names = sorted({n.input[i] for n in graph.node for i in SHAPE_INPUTS.get(n.op_type, ())
                    if i < len(n.input) and n.input[i] and n.input[i] not in known})
    if not names:
        return
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend([onnx.helper.make_empty_tensor_value_info(n) for n in names])
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: np.zeros([d.dim_value for d in i.type.tensor_type.shape.dim], np.float32)
             for i in graph.input}
    values = dict(zip(names, session.run(names, feeds)))
    producers = [n for n in graph.node if set(n.output) & set(values)]
    for node in producers:
        graph.node.remove(node)
    graph.initializer.extend([numpy_helper.from_array(v, name) for name, v in values.items()])
    _drop_dead_nodes(graph)
    onnx.save(model, str(path))


def _drop_dead_nodes(graph: Any) -> None:
    """Remove nodes none of whose outputs is used (the folded chains), then unused initializers."""
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not set(n.output) & used]
        if not dead:
            unused = [i for i in graph.initializer if i.name not in used]  # ONNX Runtime warns about each at load
            for init in unused:
                graph.initializer.remove(init)
            return
        for node in dead:
            graph.node.remove(node)


def parity(model: Scorer, bundle: Bundle, images: np.ndarray) -> Dict[str, float]:
    """Max |ONNX Runtime - PyTorch| over maps and scores on the given preprocessed images, and the largest
    |PyTorch| value (the scale the tolerance is relative to)."""
    from engine.onnxruntime_backend import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(bundle, batch=1)
    max_map, max_score, scale = 0.0, 0.0, 0.0
    with torch.no_grad():
        for img in images:
            x = img[None].astype(np.float32)
            ref = model(torch.from_numpy(x))
            got = backend.infer(x)
            max_map = max(max_map, float(np.abs(got.anomaly_map - ref.anomaly_map.numpy()).max()))
            max_score = max(max_score, float(np.abs(got.score - ref.score.numpy()).max()))
            scale = max(scale, float(ref.anomaly_map.abs().max()), float(ref.score.abs().max()))
    backend.close()
    return {"max_abs_map": max_map, "max_abs_score": max_score, "max_abs_reference": scale, "n_images": int(len(images))}


def parity_ok(result: Dict[str, float]) -> bool:
    """float32 rounding is relative: maps in the thousands may differ by more than 1e-4 and still agree."""
    allowed = PARITY_TOLERANCE * max(1.0, result["max_abs_reference"])
    return max(result["max_abs_map"], result["max_abs_score"]) <= allowed


def publish(staging: Path, out: Path) -> None:
    """Move a finished bundle from `staging` into `out`: graphs first, bundle.yaml last (it names and hashes
    them), so `out` is at every moment either the old bundle or the new one; graphs of the old one that
    the new one does not name are removed."""
    out.mkdir(parents=True, exist_ok=True)
    new_files = {f.name for f in staging.iterdir()}
    for f in sorted(staging.iterdir(), key=lambda f: f.name == BUNDLE_YAML):
        os.replace(f, out / f.name)
    for stale in [*out.glob("model*.onnx"), *out.glob(FEATURES_FILE)]:
        if stale.name not in new_files:
            stale.unlink()


def export_bundle(checkpoint: Union[str, Path], out: Union[str, Path], batches: Sequence[int] = (1,),
                  parity_images: Optional[Iterable[Union[str, Path]]] = None,
                  metrics: Optional[Dict[str, Any]] = None) -> Bundle:
    """Write the bundle directory and check ONNX Runtime parity on `parity_images`. The bundle is built
    beside `out` and moved there only once it passes: a failed export leaves `out` as it was."""
    model, state = load_model(checkpoint)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        bundle = write_staged_bundle(model, state, staging, batches, metrics)
        paths = list(parity_images or [])
        if paths:
            images = preprocess_batch([read_image(p) for p in paths], preprocess_spec(model.cfg))
            result = parity(model, bundle, images)
            if not parity_ok(result):
                raise ExportError(f"{out / bundle.onnx_path().name}: ONNX Runtime differs from PyTorch by {result} "
                                  f"(> {PARITY_TOLERANCE} x max(1, max_abs_reference)); nothing was written")
            logger.info("parity ONNX Runtime vs PyTorch: %s", result)
            meta = dict(bundle.metadata)
            meta["parity"] = result
            write_bundle_yaml(staging, meta)
        publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return load_bundle(out)


def write_staged_bundle(model: Scorer, state: Dict[str, Any], root: Path, batches: Sequence[int],
                        metrics: Optional[Dict[str, Any]]) -> Bundle:
    if 1 not in batches:
        batches = (1,) + tuple(batches)
    files: Dict[int, str] = {}
    for b in sorted(set(batches)):
        name = "model.onnx" if b == 1 else f"model_b{b}.onnx"
        export_onnx(model, root / name, b)
        files[b] = name
    outputs = None
    if isinstance(model, BlockMemoryModel):  # a memory that daad-calibrate teach can add to on site
        outputs = export_features(model, root / FEATURES_FILE)
    data = dict(state.get("training_data") or {})
    for key in ("held_back", "score_stats_images"):
        data.pop(key, None)  # keep the bundle small; the checkpoint has the lists
    return write_bundle(
        root, name=model.name, preprocess=preprocess_spec(model.cfg), graph_files=files, opset=OPSET,
        model_config=bundle_model_config(model), score_stats=dict(state.get("score_stats") or {}), metrics=metrics or {},
        training_data=data, features_outputs=outputs,
    )


def bundle_model_config(model: Scorer) -> Dict[str, Any]:
    """The config a bundle describes its model by: the fit's, or for an ensemble every view's."""
    if isinstance(model, ViewEnsemble):
        return {"views": [to_dict(cfg) for cfg in model.view_configs]}
    return to_dict(model.cfg)
