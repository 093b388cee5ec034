"""Plots a person looks at after evaluation: ROC curves, score histograms, heat-map overlays."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

OVERLAY_ALPHA = 0.45
OVERLAY_COLUMNS = 4


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers or in CI
    import matplotlib.pyplot as plt

    return plt


def plot_roc(curves: Dict[str, Tuple[np.ndarray, np.ndarray, float]], path: Path, title: str) -> Path:
    """curves: name -> (fpr, tpr, auc)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} (AUROC {auc:.3f})", lw=2 if name == "all" else 1)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="chance")
    ax.set(xlabel="false-positive rate (good parts flagged)", ylabel="true-positive rate (defects caught)", title=title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_histogram(good: np.ndarray, defective: Dict[str, np.ndarray], path: Path, title: str,
                   threshold: float = float("nan")) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    all_scores = np.concatenate([good] + list(defective.values())) if defective else good
    bins = np.linspace(float(all_scores.min()), float(all_scores.max()), 40)
    ax.hist(good, bins=bins, alpha=0.6, label=f"good (n={len(good)})", color="tab:green")
    for name, scores in defective.items():
        ax.hist(scores, bins=bins, alpha=0.45, label=f"{name} (n={len(scores)})", histtype="stepfilled")
    if np.isfinite(threshold):
        ax.axvline(threshold, color="k", ls="--", label=f"threshold {threshold:.3g}")
    ax.set(xlabel="image anomaly score", ylabel="images", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def heat_overlay(image: np.ndarray, amap: np.ndarray, vmax: float) -> np.ndarray:
    """Gray or RGB image in [0,1] + map -> RGB uint8 with a jet heat map blended in."""
    import cv2

    rgb = np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image
    heat = np.clip(amap / max(vmax, 1e-12), 0, 1)
    colour = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)[:, :, ::-1] / 255.0
    return ((1 - OVERLAY_ALPHA) * rgb + OVERLAY_ALPHA * colour * 1.0).clip(0, 1)


def plot_overlays(items: Sequence[Tuple[str, np.ndarray, np.ndarray, np.ndarray]], path: Path, title: str,
                  vmax: float) -> Path:
    """items: (caption, image [0,1], map, mask bool) -> a grid of image | overlay with the mask outline."""
    plt = _pyplot()
    n = max(1, len(items))
    cols = min(OVERLAY_COLUMNS, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols * 2, figsize=(cols * 4, rows * 2.2), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for k, (caption, image, amap, mask) in enumerate(items):
        r, c = divmod(k, cols)
        axes[r][2 * c].imshow(image, cmap="gray", vmin=0, vmax=1)
        axes[r][2 * c].set_title(caption, fontsize=7)
        axes[r][2 * c + 1].imshow(heat_overlay(image, amap, vmax))
        if mask.any():
            axes[r][2 * c + 1].contour(mask, levels=[0.5], colors="white", linewidths=0.8)
        axes[r][2 * c + 1].set_title("heat map (white: true defect)", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def order_cases(labels: np.ndarray, scores: np.ndarray, k: int) -> Dict[str, List[int]]:
    """Indices of the best and worst cases: hits/clean passes vs misses/false alarms."""
    good = np.flatnonzero(labels == 0)
    bad = np.flatnonzero(labels == 1)
    return {
        "best": list(bad[np.argsort(-scores[bad])][: k // 2]) + list(good[np.argsort(scores[good])][: k - k // 2]),
        "worst": list(bad[np.argsort(scores[bad])][: k // 2]) + list(good[np.argsort(-scores[good])][: k - k // 2]),
    }
