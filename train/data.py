"""Datasets: MVTec AD layout (train/good, test/<type>, ground_truth/<type>/*_mask.png) and plain
folders of good images. Every image goes through engine.preprocess, the one shared function.

Layout problems raise DatasetError naming the path; nothing here needs torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from engine.errors import DatasetError, ImageError
from engine.preprocess import PreprocessSpec, images_in, list_images, preprocess, read_image

GOOD = "good"
COLOUR_SAMPLE = 16  # images read (spread over the set) to tell colour data from gray
COLOUR_TOLERANCE = 2.0  # mean channel difference, in 8-bit grey levels, that JPEG noise on a gray part stays under


@dataclass(frozen=True)
class Sample:
    image: Path
    label: int  # 0 good, 1 defective
    defect_type: str  # "good" or the test/<type> folder name
    mask: Optional[Path] = None  # None for good images (all-zero mask)


def is_mvtec_layout(root: Path) -> bool:
    return (root / "train" / GOOD).is_dir()


def train_samples(root: Path) -> List[Sample]:
    """Good training images: `root/train/good` (MVTec) or, failing that, images directly in `root`."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root}: dataset directory not found")
    if is_mvtec_layout(root):
        return [Sample(p, 0, GOOD) for p in images_in(root / "train" / GOOD, DatasetError, "train/good")]
    images = list_images(root) if root.is_dir() else []
    if not images:
        raise DatasetError(
            f"{root}: not an MVTec AD layout (no train/good folder) and no images directly inside; "
            "expected root/train/good/*.png (+ test/<type>/, ground_truth/<type>/) or a folder of good images"
        )
    return [Sample(p, 0, GOOD) for p in images]


def eval_samples(root: Path) -> List[Sample]:
    """Labelled test images with masks: `root/test/<type>/*` and `root/ground_truth/<type>/<stem>_mask.png`."""
    root = Path(root)
    test_dir = root / "test"
    if not test_dir.is_dir():
        raise DatasetError(f"{test_dir}: test folder not found; evaluation needs the MVTec layout test/<type>/")
    types = sorted(d.name for d in test_dir.iterdir() if d.is_dir())
    if GOOD not in types:
        raise DatasetError(f"{test_dir / GOOD}: missing; evaluation needs good test images to measure false alarms")
    samples: List[Sample] = []
    for defect_type in types:
        for image in images_in(test_dir / defect_type, DatasetError, f"test/{defect_type}"):
            if defect_type == GOOD:
                samples.append(Sample(image, 0, GOOD))
                continue
            mask = root / "ground_truth" / defect_type / f"{image.stem}_mask.png"
            if not mask.is_file():
                raise DatasetError(f"{mask}: ground-truth mask missing for {image}; expected ground_truth/<type>/<stem>_mask.png")
            samples.append(Sample(image, 1, defect_type, mask))
    if not any(s.label for s in samples):
        raise DatasetError(f"{test_dir}: no defect folders beside test/good; evaluation needs at least one defect type")
    return samples


def channel_difference(image: np.ndarray) -> float:
    """Mean |B-G| and |G-R| of a decoded image in 8-bit grey levels (0 for a 1-channel image)."""
    if image.ndim == 2 or image.shape[2] < 3:
        return 0.0
    bgr = image[:, :, :3].astype(np.float32) / (257.0 if image.dtype == np.uint16 else 1.0)
    return float((np.abs(bgr[:, :, 0] - bgr[:, :, 1]).mean() + np.abs(bgr[:, :, 1] - bgr[:, :, 2]).mean()) / 2)


def has_colour(samples: Sequence[Sample], limit: int = COLOUR_SAMPLE) -> bool:
    """Whether the images carry colour: one of `limit` images spread over the set has channels that differ
    (a gray part saved as RGB, or as JPEG with chroma noise, does not count)."""
    picked = samples[::max(1, len(samples) // limit)][:limit]
    for sample in picked:
        try:
            image = read_image(sample.image)
        except ImageError as exc:
            raise DatasetError(str(exc)) from exc
        if channel_difference(image) > COLOUR_TOLERANCE:
            return True
    return False


def load_images(samples: Sequence[Sample], spec: PreprocessSpec) -> np.ndarray:
    """Preprocess every sample's image -> (N, C, H, W) float32; DatasetError names a bad file."""
    out = np.empty((len(samples),) + spec.input_shape, dtype=np.float32)
    for i, sample in enumerate(samples):
        try:
            out[i] = preprocess(read_image(sample.image), spec)
        except ImageError as exc:
            raise DatasetError(str(exc)) from exc
    return out


def load_mask(sample: Sample, spec: PreprocessSpec) -> np.ndarray:
    """Mask at the model resolution, boolean (H, W); checks the mask matches its image's size."""
    import cv2

    if sample.mask is None:
        return np.zeros((spec.height, spec.width), dtype=bool)
    try:
        mask = read_image(sample.mask)
        image = read_image(sample.image)
    except ImageError as exc:
        raise DatasetError(str(exc)) from exc
    if mask.ndim == 3:
        mask = mask[:, :, 0]
    if mask.shape[:2] != image.shape[:2]:
        raise DatasetError(
            f"{sample.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {sample.image.name} is "
            f"{image.shape[1]}x{image.shape[0]}; masks must have the image's size"
        )
    # nearest keeps the mask binary; same stretch as engine.preprocess
    resized = cv2.resize(mask, (spec.width, spec.height), interpolation=cv2.INTER_NEAREST)
    return resized > 0


def split_holdout(samples: Sequence[Sample], fraction: float, seed: int) -> Tuple[List[Sample], List[Sample]]:
    """Deterministic (train, held-back) split of good images for validation/calibration."""
    if fraction <= 0:
        return list(samples), []
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(samples))
    n_hold = max(1, int(round(fraction * len(samples))))
    hold = sorted(order[:n_hold].tolist())
    keep = sorted(order[n_hold:].tolist())
    return [samples[i] for i in keep], [samples[i] for i in hold]


SPLIT_PARTS = ("all", "val", "test")


def split_eval(samples: Sequence[Sample], part: str, seed: int = 0) -> List[int]:
    """Indices of a fixed half of the labelled test set, per defect type (the honest protocol):
    settings are chosen on `val` and reported once on `test`; `all` is everything."""
    if part not in SPLIT_PARTS:
        raise DatasetError(f"split: got {part!r}, expected one of {SPLIT_PARTS}")
    if part == "all":
        return list(range(len(samples)))
    chosen: List[int] = []
    for defect_type in sorted({s.defect_type for s in samples}):
        idx = [i for i, s in enumerate(samples) if s.defect_type == defect_type]
        order = np.random.default_rng([seed, len(idx)]).permutation(len(idx))
        half = len(idx) // 2
        picked = order[:half] if part == "val" else order[half:]
        chosen.extend(idx[j] for j in sorted(picked.tolist()))
    return sorted(chosen)
