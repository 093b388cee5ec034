"""Frame -> score -> verdict: the one preprocessing function, the backend, then pure functions.

The backend is injected (ONNX Runtime, TensorRT, or anything with `infer`), so a frame is scored
here exactly as calibration scored the frames its thresholds came from.
"""
from __future__ import annotations

import logging
from typing import Any, List, NamedTuple

import numpy as np

from engine.backend import Backend
from engine.errors import BackendError, DaadError
from engine.preprocess import PreprocessSpec, preprocess

from .regions import Verdict, find_regions, verdict

logger = logging.getLogger(__name__)


class Scored(NamedTuple):
    score: float
    anomaly_map: np.ndarray  # (H, W) at the model's input resolution


class Scorer:
    """preprocess (bundle spec) + backend.infer for one frame at a time (batch 1)."""

    def __init__(self, backend: Backend, spec: PreprocessSpec) -> None:
        self.backend = backend
        self.spec = spec

    def score(self, image: np.ndarray) -> Scored:
        batch = preprocess(image, self.spec)[None]  # (1, C, H, W)
        out = self.backend.infer(batch)
        return Scored(score=float(out.score[0]), anomaly_map=out.anomaly_map[0, 0])


BLANK_LEVEL = 128  # mid-gray: a frame every preprocessing maps to finite, ordinary values


def blank_frame(spec: PreprocessSpec) -> np.ndarray:
    """A uniform frame in the camera's layout (HxW gray or HxWx3 BGR, uint8) at the model's input size."""
    shape = (spec.height, spec.width) if spec.channels == 1 else (spec.height, spec.width, 3)
    return np.full(shape, BLANK_LEVEL, dtype=np.uint8)


def self_test(scorer: Scorer, where: str) -> Scored:
    """Score one blank frame through the real backend before any camera frame: a graph the runtime cannot run
    (or that returns NaN) is refused here, in one line, instead of failing on the first frame."""
    try:
        scored = scorer.score(blank_frame(scorer.spec))
    except DaadError:
        raise
    except Exception as exc:  # the runtimes raise their own untyped errors (e.g. onnxruntime's InvalidArgument)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise BackendError(f"{where}: scoring a blank frame failed ({first[:300]}); re-export the bundle with "
                           "`daad-train export`") from None
    if not np.isfinite(scored.score) or scored.anomaly_map.ndim != 2 or not np.isfinite(scored.anomaly_map).all():
        raise BackendError(f"{where}: a blank frame scored {scored.score!r} with a map of shape "
                           f"{tuple(scored.anomaly_map.shape)} (expected a finite score and a 2-D finite map); "
                           "re-export the bundle with `daad-train export`")
    return scored


def judge(scored: Scored, thresholds: Any, frame_size: Any) -> Verdict:
    """The verdict for one scored frame, with its regions (frame coordinates) when it is defective;
    good frames skip the component search (most frames are good). frame_size is (w, h)."""
    result = verdict(scored.score, [], thresholds)
    if not result.defective:
        return result
    regions: List[Any] = find_regions(
        scored.anomaly_map, thresholds.pixel_threshold, thresholds.min_defect_area, frame_size
    )
    return result._replace(regions=regions)


def frame_size_of(image: np.ndarray) -> tuple:
    """(width, height) of an OpenCV image."""
    return (int(image.shape[1]), int(image.shape[0]))
