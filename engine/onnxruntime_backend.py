"""ONNX Runtime backend: the default everywhere TensorRT is absent (CPU, or CUDA where present)."""
from __future__ import annotations

import logging
from typing import List, Optional

import numpy as np

from .backend import Backend, Inference
from .bundle import Bundle
from .errors import BackendError

logger = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(
        self, bundle: Bundle, batch: int = 1, providers: Optional[List[str]] = None, threads: int = 0
    ) -> None:
        super().__init__(bundle, batch)
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - onnxruntime is a core dependency
            raise BackendError("onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)") from exc
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in (CUDA_PROVIDER, CPU_PROVIDER) if p in available]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        path = bundle.onnx_path(batch)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad graphs
            raise BackendError(f"{path}: ONNX Runtime cannot load the graph ({exc}); re-export the bundle") from exc
        self.provider = self.session.get_providers()[0]
        self._outputs = [bundle.map_output, bundle.score_output]

    def infer(self, batch: np.ndarray) -> Inference:
        batch = self.check_input(batch)
        anomaly_map, score = self.session.run(self._outputs, {self.bundle.input_name: batch})
        return Inference(anomaly_map=anomaly_map, score=score.reshape(-1))

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]
