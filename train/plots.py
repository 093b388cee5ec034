"""Plots a person looks at after evaluation: ROC curves, score histograms, heat-map overlays.

Each function writes its PNG and returns the matplotlib Figure, so tests read the panels and legends it drew
instead of its pixels. Colours, layout and ticks come from engine.figures, shared with the calibration report.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from engine import figures

OVERLAY_COLUMNS = 4
HIST_BINS = 40
PANEL_INCHES = 2.0  # per image of an overlay pair


class Threshold(NamedTuple):
    """A threshold line and what it is, for the legend: the best-F1 one on labelled data, the calibrated one the
    agent uses."""

    value: float
    label: str
    calibrated: bool = False
    inclusive: bool = False  # a score equal to it is flagged (sklearn's best-F1 convention; the agent's is `>`)

    def flags(self, score: float) -> bool:
        return score >= self.value if self.inclusive else score > self.value


class Case(NamedTuple):
    """One image of the best/worst overlays."""

    name: str  # the file's name, e.g. 001.png
    kind: str  # "good" or the defect type
    image: np.ndarray  # [0, 1], gray or RGB
    anomaly_map: np.ndarray
    mask: np.ndarray  # bool, the labelled defect
    score: float


def plot_roc(curves: Dict[str, Tuple[np.ndarray, np.ndarray, float]], path: Path, title: str) -> Any:
    """curves: name -> (fpr, tpr, auc); "all" (every defect type against the good images) drawn in black."""
    fig = figures.new_figure(5.5, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    styles = figures.defect_styles([n for n in curves if n != "all"])
    for name, (fpr, tpr, auc) in curves.items():
        style = {"color": "black", "linewidth": 2.2} if name == "all" else {**styles[name], "linewidth": 1.4}
        ax.plot(fpr, tpr, label=f"{'all defects' if name == 'all' else name} (AUROC {auc:.3f})", **style)
    ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=0.8, label="chance")
    ax.set(xlabel="false-positive rate (good parts flagged)", ylabel="true-positive rate (defects caught)", title=title,
           xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    figures.save(fig, path)
    return fig


def plot_histogram(good: np.ndarray, defective: Dict[str, np.ndarray], path: Path, title: str,
                   thresholds: Sequence[Threshold] = ()) -> Any:
    """Good scores filled and behind, each defect type an outline of its own colour, each threshold labelled."""
    fig = figures.new_figure(9.0, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    values = [good, *defective.values(), np.array([t.value for t in thresholds if np.isfinite(t.value)])]
    pooled = np.concatenate([v for v in values if v.size])
    bins = np.linspace(float(pooled.min()), float(pooled.max()) + 1e-9, HIST_BINS + 1)
    ax.hist(good, bins=bins, color=figures.GOOD_COLOUR, alpha=0.5, zorder=1, label=f"good (n={len(good)})")
    for (name, scores), style in zip(defective.items(), figures.defect_styles(list(defective)).values()):
        ax.hist(scores, bins=bins, histtype="step", linewidth=1.8, zorder=2, label=f"{name} (n={len(scores)})", **style)
    for t in thresholds:
        if np.isfinite(t.value):
            ax.axvline(t.value, zorder=3, label=t.label, linewidth=2 if t.calibrated else 1.5,
                       color=figures.CALIBRATED_COLOUR if t.calibrated else figures.BEST_F1_COLOUR,
                       linestyle="-" if t.calibrated else "--")
    ax.set(xlabel="image anomaly score", ylabel="images", title=title)
    ax.yaxis.get_major_locator().set_params(integer=True)  # counts of images
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figures.save(fig, path)
    return fig


def verdict(case: Case, threshold: Threshold) -> str:
    """What the threshold makes of this image."""
    flagged = threshold.flags(case.score)
    if case.kind == "good":
        return "false alarm" if flagged else "passed"
    return "caught" if flagged else "missed"


def caption(case: Case, threshold: Optional[Threshold]) -> str:
    """`pit/001.png: score 6.36, caught`; without a score or a threshold, what there is."""
    text = f"{case.kind}/{case.name}"
    if np.isfinite(case.score):
        text += f": score {case.score:.4g}"  # the thresholds' precision: 6.996 is not shown as 7
        if threshold is not None:
            text += f", {verdict(case, threshold)}"
    return text


def plot_overlays(cases: Sequence[Case], path: Path, title: str, vmax: float,
                  threshold: Optional[Threshold] = None) -> Any:
    """One cell per image: the image and its heat map side by side under one caption (its type, file, score and
    what the threshold makes of it); defective images carry the outline of their labelled defect."""
    n = max(1, len(cases))
    cols = min(OVERLAY_COLUMNS, n)
    rows = int(np.ceil(n / cols))
    fig = figures.new_figure(cols * 2 * PANEL_INCHES, rows * (PANEL_INCHES + 0.55) + 0.5)
    cells = fig.subfigures(rows, cols, squeeze=False)
    for cell in cells.ravel()[len(cases):]:
        cell.set_visible(False)
    for case, cell in zip(cases, cells.ravel()):
        left, right = cell.subplots(1, 2)
        left.imshow(case.image, cmap="gray", vmin=0, vmax=1)
        right.imshow(figures.heat_overlay(case.image, case.anomaly_map, 0.0, vmax))
        if case.kind == "good":
            right.set_title("heat map (good: no defect)", fontsize=7)
        elif case.mask.any():
            right.contour(case.mask, levels=[0.5], colors=figures.TRUE_DEFECT_OUTLINE, linewidths=1.5)
            right.set_title("heat map; outline: true defect", fontsize=7)
        else:  # a defect type whose ground-truth mask is missing or empty
            right.set_title("heat map (no defect mask)", fontsize=7)
        left.set_title("image", fontsize=7)
        for ax in (left, right):
            ax.set_xticks([])
            ax.set_yticks([])
        cell.suptitle(caption(case, threshold), fontsize=8)
    verdicts = f"; verdicts at the {threshold.label}" if threshold is not None else ""
    fig.suptitle(f"{title}{verdicts}; heat scale 0 - {vmax:.3g}", fontsize=10)
    figures.save(fig, path)
    return fig


def order_cases(labels: np.ndarray, scores: np.ndarray, k: int) -> Dict[str, List[int]]:
    """Indices of the best and worst cases: hits/clean passes vs misses/false alarms."""
    good = np.flatnonzero(labels == 0)
    bad = np.flatnonzero(labels == 1)
    return {
        "best": list(bad[np.argsort(-scores[bad])][: k // 2]) + list(good[np.argsort(scores[good])][: k - k // 2]),
        "worst": list(bad[np.argsort(scores[bad])][: k // 2]) + list(good[np.argsort(-scores[good])][: k - k // 2]),
    }
