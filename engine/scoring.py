"""Frame -> score -> verdict: the one preprocessing function, the backend, then pure functions.

The one place a frame is scored, for the agent and for calibration (capture, check, defects), so the
service scores a frame exactly as calibration scored the frames its thresholds came from. The backend
is injected (ONNX Runtime, TensorRT, or anything with `infer`).
"""
from __future__ import annotations

import logging
from typing import Any, List, NamedTuple, Optional

import numpy as np

from .backend import Backend
from .errors import BackendError, DaadError
from .preprocess import PreprocessSpec, preprocess

from .regions import Verdict, find_regions, verdict

logger = logging.getLogger(__name__)

# A gray camera often reaches OpenCV as BGR with equal channels (V4L2, video files); JPEG/MJPEG
# rounding makes them differ by a little. Such frames are gray, not a colour/gray mismatch.
GRAY_TOLERANCE = 4
CHANNEL_SAMPLE_STEP = 8  # every 8th row and column: enough to tell colour from gray, cheap per frame


class ScoredFrame(NamedTuple):
    score: float
    anomaly_map: np.ndarray  # (H, W) at the model's input resolution


def score_frame(image: np.ndarray, spec: PreprocessSpec, backend: Backend) -> ScoredFrame:
    """preprocess (bundle spec) + backend.infer for one frame (batch 1)."""
    batch = preprocess(image, spec)[None]  # (1, C, H, W)
    out = backend.infer(batch)
    return ScoredFrame(score=float(out.score[0]), anomaly_map=out.anomaly_map[0, 0])


class FrameScorer:
    """score_frame with the backend and spec bound (the agent scores every frame through one)."""

    def __init__(self, backend: Backend, spec: PreprocessSpec) -> None:
        self.backend = backend
        self.spec = spec

    def score(self, image: np.ndarray) -> ScoredFrame:
        return score_frame(image, self.spec, self.backend)


BLANK_LEVEL = 128  # mid-gray: a frame every preprocessing maps to finite, ordinary values


def blank_frame(spec: PreprocessSpec) -> np.ndarray:
    """A uniform frame in the camera's layout (HxW gray or HxWx3 BGR, uint8) at the model's input size."""
    shape = (spec.height, spec.width) if spec.channels == 1 else (spec.height, spec.width, 3)
    return np.full(shape, BLANK_LEVEL, dtype=np.uint8)


def self_test(scorer: FrameScorer, where: str) -> ScoredFrame:
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


def judge(scored: ScoredFrame, thresholds: Any, frame_size: Any) -> Verdict:
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


def frame_channels(image: np.ndarray) -> int:
    """1 for HxW or HxWx1, else the last axis (3 BGR, 4 BGRA)."""
    return 1 if image.ndim == 2 or image.shape[2] == 1 else int(image.shape[2])


def _gray_content(image: np.ndarray) -> bool:
    sample = image[::CHANNEL_SAMPLE_STEP, ::CHANNEL_SAMPLE_STEP, :3].astype(np.int32)
    spread = sample.max(axis=2) - sample.min(axis=2)
    return int(spread.max(initial=0)) <= GRAY_TOLERANCE


def channel_mismatch(image: np.ndarray, model_channels: int) -> Optional[str]:
    """None when the frame's channels suit the model; else a short name of the mismatch.

    Preprocessing converts either way (gray -> 3 equal channels, BGR -> gray), so the frame is still
    scored, but not as the model was trained: its scores may shift against the thresholds."""
    channels = frame_channels(image)
    if model_channels == 3 and channels == 1:
        return "gray frames into a colour model"
    if model_channels == 1 and channels >= 3 and not _gray_content(image):
        return "colour frames into a gray model"
    return None
