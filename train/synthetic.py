"""Deterministic synthetic parts with defects and masks, for tests and the demo.

A "part" is a textured, lit disc (think of a machined washer) on a darker background, with
small pose jitter. Defects are scratches, dark pits, bright spots and cracks drawn on the part;
their masks are the exact drawn pixels. The same (seed, index) always gives the same image.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np

DEFECT_TYPES = ("scratch", "pit", "spot", "crack")
DEFAULT_SIZE = 128


def _rng(seed: int, index: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, salt])


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    import cv2

    noise = rng.normal(0.0, 1.0, (size, size)).astype(np.float32)
    brushed = cv2.GaussianBlur(noise, (0, 0), sigmaX=size / 24, sigmaY=0.6)  # anisotropic: brushed metal
    brushed /= brushed.std() + 1e-6
    return brushed


def make_good(seed: int, index: int, size: int = DEFAULT_SIZE, color: bool = False) -> np.ndarray:
    """A defect-free part: uint8 HxW (or HxWx3 BGR when color)."""
    import cv2

    rng = _rng(seed, index, 0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx = size / 2 + rng.uniform(-0.03, 0.03) * size
    cy = size / 2 + rng.uniform(-0.03, 0.03) * size
    radius = size * (0.38 + rng.uniform(-0.01, 0.01))
    hole = size * 0.12
    dist = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    part = ((dist < radius) & (dist > hole)).astype(np.float32)
    part = cv2.GaussianBlur(part, (0, 0), 1.0)
    light = 0.85 + 0.15 * (xx / size) * rng.uniform(0.8, 1.2)  # soft lighting gradient
    tex = _texture(rng, size)
    image = 0.18 + part * (0.45 + 0.05 * tex) * light + rng.normal(0, 0.01, (size, size))
    gray = np.clip(image * 255.0, 0, 255).astype(np.uint8)
    if not color:
        return gray
    tint = np.array([1.0, 0.95, 0.85], dtype=np.float32)  # BGR: a warm metal
    return np.clip(gray[:, :, None].astype(np.float32) * tint, 0, 255).astype(np.uint8)


def add_defect(
    image: np.ndarray, seed: int, index: int, kind: Optional[str] = None
) -> Tuple[np.ndarray, np.ndarray, str]:
    """Draw one defect on the part; returns (image, mask uint8 0/255, kind)."""
    import cv2

    rng = _rng(seed, index, 1)
    kind = kind or DEFECT_TYPES[int(rng.integers(len(DEFECT_TYPES)))]
    size = image.shape[0]
    out = image.copy()
    mask = np.zeros(image.shape[:2], dtype=np.uint8)
    # a point on the ring of the part
    angle = rng.uniform(0, 2 * np.pi)
    r = size * rng.uniform(0.2, 0.32)
    px, py = int(size / 2 + r * np.cos(angle)), int(size / 2 + r * np.sin(angle))
    scale = size / DEFAULT_SIZE
    if kind == "scratch":
        length = size * rng.uniform(0.15, 0.3)
        theta = rng.uniform(0, np.pi)
        p2 = (int(px + length * np.cos(theta)), int(py + length * np.sin(theta)))
        thickness = max(1, int(round(2 * scale)))
        cv2.line(mask, (px, py), p2, 255, thickness)
        value = 235
    elif kind == "pit":
        radius = max(2, int(size * rng.uniform(0.03, 0.06)))
        cv2.circle(mask, (px, py), radius, 255, -1)
        value = 25
    elif kind == "spot":
        axes = (max(2, int(size * rng.uniform(0.03, 0.07))), max(2, int(size * rng.uniform(0.02, 0.05))))
        cv2.ellipse(mask, (px, py), axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
        value = 245
    elif kind == "crack":
        points = [(px, py)]
        for _ in range(int(rng.integers(4, 7))):
            last = points[-1]
            step = size * 0.04
            points.append((int(last[0] + rng.uniform(-step, step)), int(last[1] + rng.uniform(0, 1.5 * step))))
        cv2.polylines(mask, [np.array(points, dtype=np.int32)], False, 255, max(1, int(round(2 * scale))))
        value = 10
    else:
        raise ValueError(f"unknown defect kind {kind!r}; choose from {DEFECT_TYPES}")
    sel = mask > 0
    out[sel] = value
    return out, mask, kind


def make_defective(
    seed: int, index: int, size: int = DEFAULT_SIZE, color: bool = False, kind: Optional[str] = None
) -> Tuple[np.ndarray, np.ndarray, str]:
    """A part with one defect: (image, mask, kind)."""
    return add_defect(make_good(seed, index, size, color), seed, index, kind)


def write_synthetic_dataset(
    root: Union[str, Path],
    n_train: int = 60,
    n_test_good: int = 20,
    n_test_per_defect: int = 5,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    color: bool = False,
) -> Dict[str, int]:
    """Write an MVTec AD layout dataset; returns counts per split/type."""
    import cv2

    root = Path(root)
    counts: Dict[str, int] = {}
    (root / "train" / "good").mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        cv2.imwrite(str(root / "train" / "good" / f"{i:03d}.png"), make_good(seed, i, size, color))
    counts["train/good"] = n_train
    (root / "test" / "good").mkdir(parents=True, exist_ok=True)
    offset = 100_000  # test indices never collide with training indices
    for i in range(n_test_good):
        cv2.imwrite(str(root / "test" / "good" / f"{i:03d}.png"), make_good(seed, offset + i, size, color))
    counts["test/good"] = n_test_good
    for k, kind in enumerate(DEFECT_TYPES):
        (root / "test" / kind).mkdir(parents=True, exist_ok=True)
        (root / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
        for i in range(n_test_per_defect):
            index = 2 * offset + k * 10_000 + i
            image, mask, _ = make_defective(seed, index, size, color, kind)
            cv2.imwrite(str(root / "test" / kind / f"{i:03d}.png"), image)
            cv2.imwrite(str(root / "ground_truth" / kind / f"{i:03d}_mask.png"), mask)
        counts[f"test/{kind}"] = n_test_per_defect
    return counts
