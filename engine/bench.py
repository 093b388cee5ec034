"""Latency and throughput of a backend on real preprocessed frames (synthetic, camera-sized).

Frames are made once, run through engine.preprocess (timed separately: on a Jetson the resize is
CPU work the agent pays per frame), and the backend is warmed up before anything is timed.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Dict, List, Sequence

import numpy as np

from .backend import Backend
from .errors import BackendError
from .preprocess import PreprocessSpec, preprocess_batch

FRAME_SCALE = 4  # synthetic frames are 4x the model input per side, like a camera frame
POOL_BATCHES = 8  # distinct batches cycled through, so no backend can cache one result
COLUMNS = (("backend", "backend", "{}"), ("batch", "batch", "{:d}"), ("p50 ms", "p50_ms", "{:.2f}"),
           ("p99 ms", "p99_ms", "{:.2f}"), ("mean ms", "mean_ms", "{:.2f}"), ("fps", "fps", "{:.1f}"),
           ("preproc ms", "preprocess_p50_ms", "{:.2f}"), ("peak RSS MB", "peak_rss_mb", "{:.0f}"))


def synthetic_frames(spec: PreprocessSpec, count: int, seed: int = 0) -> List[np.ndarray]:
    """uint8 frames in OpenCV's layout (HxW gray or HxWx3 BGR): smooth shading plus sensor-like noise."""
    rng = np.random.default_rng(seed)
    h, w = spec.height * FRAME_SCALE, spec.width * FRAME_SCALE
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = []
    for _ in range(count):
        shading = 90 + 60 * np.sin(xx / w * rng.uniform(2, 6)) * np.cos(yy / h * rng.uniform(2, 6))
        if spec.channels == 3:
            frame = shading[..., None] + rng.normal(0, 8, (h, w, 3))
        else:
            frame = shading + rng.normal(0, 8, (h, w))
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
    return frames


def peak_rss_mb() -> float:
    """Peak resident memory of this process (on a Jetson, GPU buffers live in the same DRAM)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def backend_label(backend: Backend) -> str:
    detail = getattr(backend, "provider", None) or getattr(backend, "precision", None)
    return f"{backend.name} ({detail})" if detail else backend.name


def bench(backend: Backend, n_warmup: int = 10, n_iter: int = 100, seed: int = 0) -> Dict[str, Any]:
    """p50/p99/mean latency per batch (ms), frames per second, preprocessing p50 and peak RSS."""
    if n_iter < 1 or n_warmup < 0:
        raise BackendError(f"iterations must be >= 1 and warm-up >= 0, got {n_iter} and {n_warmup}")
    spec = backend.bundle.preprocess
    frames = synthetic_frames(spec, POOL_BATCHES * backend.batch, seed)
    batches = []
    pre_ms = []
    for i in range(POOL_BATCHES):
        started = time.perf_counter()
        batches.append(preprocess_batch(frames[i * backend.batch:(i + 1) * backend.batch], spec))
        pre_ms.append((time.perf_counter() - started) * 1000.0)
    for i in range(n_warmup):
        backend.infer(batches[i % POOL_BATCHES])
    times = np.empty(n_iter, dtype=np.float64)
    for i in range(n_iter):
        started = time.perf_counter()
        backend.infer(batches[i % POOL_BATCHES])
        times[i] = (time.perf_counter() - started) * 1000.0
    mean = float(times.mean())
    return {
        "backend": backend_label(backend),
        "batch": int(backend.batch),
        "iterations": int(n_iter),
        "warmup": int(n_warmup),
        "p50_ms": float(np.percentile(times, 50)),
        "p99_ms": float(np.percentile(times, 99)),
        "mean_ms": mean,
        "fps": backend.batch * 1000.0 / mean if mean > 0 else float("inf"),
        "preprocess_p50_ms": float(np.percentile(pre_ms, 50)),
        "peak_rss_mb": peak_rss_mb(),
    }


def format_table(results: Sequence[Dict[str, Any]]) -> str:
    """Fixed-width table, one row per result."""
    rows = [[title for title, _, _ in COLUMNS]]
    for r in results:
        rows.append([fmt.format(r[key]) for _, key, fmt in COLUMNS])
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(widths[i]) for i, cell in enumerate(row) if i]
        lines.append("  ".join(cells))
    return "\n".join(lines)
