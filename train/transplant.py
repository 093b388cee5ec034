"""Real defects on good parts: a check of what an image score detects, with the background held equal.

On magnetic_tile a defective crop differs from a good one far away from its defect too (README,
"What the image score sees"), so a score can tell the two folders apart without seeing the defect,
and such a score would miss a small defect on an otherwise normal part. Here every defect of an
evaluation set is cut out along its mask (feathered, its grey levels matched to the host) and pasted
onto a good image of the same set; those good images are the negatives. Image AUROC on this set comes
from the defect alone. Pure functions of preprocessed arrays; nothing here needs torch.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

FEATHER_SIGMA = 2.0  # px at model resolution: a hard cut-out edge would be a defect of its own
DILATE_PX = 2  # px: masks are drawn tight; keep the defect's own rim
GAIN_EPS = 1e-6


def transplant(host: np.ndarray, donor: np.ndarray, mask: np.ndarray, feather_sigma: float = FEATHER_SIGMA,
               dilate_px: int = DILATE_PX) -> np.ndarray:
    """Paste `donor`'s masked region onto `host`.

    host, donor: (C, H, W) float images in the model's normalised space; mask: (H, W) bool.
    The donor is gain-matched to the host per channel (mean and std over the whole image), so the
    pasted region carries the defect's structure rather than another photo's exposure.
    """
    import cv2

    if host.shape != donor.shape or mask.shape != host.shape[1:]:
        raise ValueError(f"transplant: host {host.shape}, donor {donor.shape} and mask {mask.shape} must agree")
    m = mask.astype(np.uint8)
    if dilate_px > 0:
        m = cv2.dilate(m, np.ones((2 * dilate_px + 1,) * 2, np.uint8))
    alpha = m.astype(np.float32)
    if feather_sigma > 0:
        alpha = cv2.GaussianBlur(alpha, (0, 0), feather_sigma)
    alpha = np.maximum(alpha, mask.astype(np.float32))[None]  # the defect itself stays whole
    d_mean, d_std = donor.mean(axis=(1, 2), keepdims=True), donor.std(axis=(1, 2), keepdims=True)
    h_mean, h_std = host.mean(axis=(1, 2), keepdims=True), host.std(axis=(1, 2), keepdims=True)
    matched = (donor - d_mean) * (h_std / np.maximum(d_std, GAIN_EPS)) + h_mean
    return (host * (1.0 - alpha) + matched * alpha).astype(host.dtype)


def transplant_set(images: np.ndarray, masks: np.ndarray, labels: np.ndarray, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Every defective image replaced by its defect pasted onto one of the set's good images.

    images (N, C, H, W), masks (N, H, W), labels (N,) with 0 = good. Hosts are assigned by a seeded
    permutation of the good images, cycled, so each good image hosts about as many defects as any other.
    Returns (new images, host index per image: itself for a good image). Masks and labels are unchanged.
    """
    good = np.flatnonzero(labels == 0)
    defective = np.flatnonzero(labels == 1)
    if good.size == 0:
        raise ValueError("transplant: the set has no good images to paste defects onto")
    order = np.random.default_rng(seed).permutation(good)
    hosts = np.arange(len(images))
    out = images.copy()
    for k, i in enumerate(defective):
        hosts[i] = order[k % order.size]
        out[i] = transplant(images[hosts[i]], images[i], masks[i])
    return out, hosts
