"""One inference interface for every runtime, and the function that picks one.

A backend takes a preprocessed batch (N, C, H, W) float32 of exactly the bundle's input
shape and returns the anomaly maps (N, 1, H, W) and image scores (N,). The scoring is
inside the graph, so every backend scores identically.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import NamedTuple, Optional, Tuple, Union

import numpy as np

from .bundle import Bundle, load_bundle
from .errors import BackendError, DaadError

logger = logging.getLogger(__name__)

BACKEND_CHOICES = ("auto", "onnxruntime", "tensorrt")


class Inference(NamedTuple):
    anomaly_map: np.ndarray  # (N, 1, H, W) float32
    score: np.ndarray  # (N,) float32


class Backend(ABC):
    """A loaded model that scores preprocessed batches."""

    name: str = "backend"

    def __init__(self, bundle: Bundle, batch: int = 1) -> None:
        self.bundle = bundle
        self.batch = batch
        self.input_shape: Tuple[int, int, int, int] = bundle.input_shape(batch)

    def check_input(self, batch: np.ndarray) -> np.ndarray:
        """Refuse a batch of the wrong shape or dtype with a clear message (no silent casts)."""
        if not isinstance(batch, np.ndarray):
            raise BackendError(f"{self.name}: input must be a numpy array, got {type(batch).__name__}")
        if batch.dtype != np.float32:
            raise BackendError(f"{self.name}: input dtype must be float32 (from engine.preprocess), got {batch.dtype}")
        if tuple(batch.shape) != self.input_shape:
            raise BackendError(
                f"{self.name}: input shape must be {self.input_shape} for bundle {self.bundle.name}, "
                f"got {tuple(batch.shape)}; preprocess frames with the bundle's PreprocessSpec"
            )
        return np.ascontiguousarray(batch)

    @abstractmethod
    def infer(self, batch: np.ndarray) -> Inference:
        """Score one batch of exactly `self.input_shape`."""

    def close(self) -> None:
        """Release runtime resources (device buffers, sessions)."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_backend(
    bundle: Union[Bundle, str, Path],
    prefer: str = "auto",
    batch: int = 1,
    precision: str = "fp32",
    plan_cache: Optional[Union[str, Path]] = None,
    build_if_missing: bool = True,
) -> Backend:
    """TensorRT where it imports and a plan exists or can be built, else ONNX Runtime; logs which and why."""
    if prefer not in BACKEND_CHOICES:
        raise BackendError(f"backend must be one of {BACKEND_CHOICES}, got {prefer!r}")
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    if prefer in ("auto", "tensorrt"):
        try:
            from .tensorrt_backend import open_tensorrt_backend

            backend = open_tensorrt_backend(
                bundle, batch=batch, precision=precision, plan_cache=plan_cache, build_if_missing=build_if_missing
            )
            logger.info("backend: TensorRT (%s, batch %d) for %s", precision, batch, bundle.name)
            return backend
        except (ImportError, DaadError) as exc:
            if prefer == "tensorrt":
                if isinstance(exc, DaadError):
                    raise
                raise BackendError(f"TensorRT backend requested but unavailable: {exc}") from exc
            logger.info("backend: TensorRT not used (%s); falling back to ONNX Runtime", exc)
    from .onnxruntime_backend import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(bundle, batch=batch)
    logger.info("backend: ONNX Runtime (%s, batch %d) for %s", backend.provider, batch, bundle.name)
    return backend
