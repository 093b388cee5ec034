"""Evaluation on an MVTec-layout test set: metrics as JSON, plus ROC, histogram and overlay plots."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from engine.bundle import atomic_write_text
from engine.preprocess import denormalize

from .data import eval_samples, load_images, load_mask, split_eval
from .groups import Groups, grouped_protocol, split_by_group
from .metrics import (aupro, best_f1, group_bootstrap_auroc, image_auroc, part_ranks, pixel_auroc,
                      pixel_auroc_breakdown)
from .preprocessing import preprocess_spec
from .runtime import resolve_device
from .transplant import transplant_set
from .views import Scorer
from . import plots, report

logger = logging.getLogger(__name__)

EVAL_BATCH = 16
OVERLAY_CASES = 8


@torch.no_grad()
def predict(model: Scorer, images: np.ndarray, device: torch.device, progress: bool = False) -> Dict[str, np.ndarray]:
    model.eval().to(device)
    maps, scores = [], []
    starts = range(0, len(images), EVAL_BATCH)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="score", unit="batch", dynamic_ncols=True)
    for start in starts:
        out = model(torch.from_numpy(images[start:start + EVAL_BATCH]).to(device))
        maps.append(out.anomaly_map[:, 0].float().cpu().numpy())
        scores.append(out.score.float().cpu().numpy())
    return {"maps": np.concatenate(maps), "scores": np.concatenate(scores)}


def compute_metrics(labels: np.ndarray, types: List[str], scores: np.ndarray, maps: np.ndarray,
                    masks: np.ndarray) -> Dict[str, Any]:
    per_type = {}
    for t in sorted(set(types) - {"good"}):
        sel = np.array([ty in ("good", t) for ty in types])
        per_type[t] = image_auroc(labels[sel], scores[sel])
    return {
        "image_auroc": image_auroc(labels, scores),
        "pixel_auroc": pixel_auroc(masks, maps),
        "pixel_auroc_breakdown": pixel_auroc_breakdown(masks, maps, labels, types),
        "aupro": aupro(masks, maps),
        "best_f1": best_f1(labels, scores),
        "image_auroc_per_type": per_type,
        "n_good": int((labels == 0).sum()),
        "n_defective": int((labels == 1).sum()),
    }


def group_intervals(labels: np.ndarray, types: List[str], scores: np.ndarray, part_of: List[str]) -> Dict[str, Any]:
    """Image AUROC, overall and per type, each with a 95 % interval from resampling whole parts (groups):
    a type seen on six parts has a figure that six other parts could move by several points."""
    out: Dict[str, Any] = {"all": group_bootstrap_auroc(labels, scores, part_of)}
    for t in sorted(set(types) - {"good"}):
        sel = np.flatnonzero([ty in ("good", t) for ty in types])
        out[t] = group_bootstrap_auroc(labels[sel], scores[sel], [part_of[i] for i in sel])
    return out


def load_split(data_root: Path, spec: Any, split: str = "all", split_seed: int = 0,
               groups: Optional[Groups] = None) -> Tuple[list, np.ndarray, np.ndarray, np.ndarray, List[str]]:
    """The samples of one split of test/ (see data.split_eval), or with `groups` of the grouped protocol's
    evaluation images (train.groups), their preprocessed images, masks, labels and types."""
    if groups is not None:
        samples = grouped_protocol(data_root, groups)[1]
        samples = [samples[i] for i in split_by_group(samples, split, groups, split_seed)]
    else:
        samples = eval_samples(data_root)
        samples = [samples[i] for i in split_eval(samples, split, split_seed)]
    images = load_images(samples, spec)
    masks = np.stack([load_mask(s, spec) for s in samples])
    labels = np.array([s.label for s in samples])
    return samples, images, masks, labels, [s.defect_type for s in samples]


def evaluate(model: Scorer, data_root: Path, out_dir: Optional[Path] = None, device: str = "auto",
             plot: bool = True, progress: bool = False, split: str = "all", split_seed: int = 0,
             transplant: bool = False, groups: Optional[Groups] = None,
             calibrated: Optional[plots.Threshold] = None) -> Dict[str, Any]:
    """Score the test set (or a fixed half of it, see data.split_eval), compute metrics, write
    metrics.json, plots and report.html into out_dir.

    transplant: score the set's defects pasted onto its good images instead (train.transplant), so
    that defective and good images share their backgrounds.
    calibrated: the agent's threshold (train.report.calibrated_threshold), drawn beside the best-F1 one and
    used for the verdicts."""
    spec = preprocess_spec(model.cfg)
    samples, images, masks, labels, types = load_split(Path(data_root), spec, split, split_seed, groups)
    if transplant:
        images, _ = transplant_set(images, masks, labels, seed=split_seed)
    pred = predict(model, images, resolve_device(device), progress)
    metrics = compute_metrics(labels, types, pred["scores"], pred["maps"], masks)
    metrics["model"] = model.name
    metrics["data"] = str(data_root)
    metrics["split"] = split
    metrics["transplant"] = transplant
    metrics["groups"] = str(groups.path) if groups is not None else ""
    if groups is not None:
        part_of = [groups.group(s) for s in samples]
        metrics["image_auroc_group_intervals"] = group_intervals(labels, types, pred["scores"], part_of)
        metrics["parts"] = part_ranks(labels, types, pred["scores"], part_of)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if plot:
            metrics["plots"] = write_plots(out_dir, samples, images, masks, labels, types, pred, metrics, spec,
                                           calibrated)
        atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2, default=float))
    return metrics


def write_plots(out_dir: Path, samples: list, images: np.ndarray, masks: np.ndarray, labels: np.ndarray,
                types: List[str], pred: Dict[str, np.ndarray], metrics: Dict[str, Any], spec: Any,
                calibrated: Optional[plots.Threshold] = None) -> Dict[str, str]:
    """The PNGs and report.html tying them together; returns what -> path."""
    from sklearn.metrics import roc_curve

    scores, maps = pred["scores"], pred["maps"]
    name = metrics["model"]
    best = report.best_f1_threshold(metrics["best_f1"]["threshold"])
    verdicts = calibrated or best  # what the agent would do, where known
    curves = {"all": (*roc_curve(labels, scores)[:2], metrics["image_auroc"])}
    for t, auc in metrics["image_auroc_per_type"].items():
        sel = np.array([ty in ("good", t) for ty in types])
        curves[t] = (*roc_curve(labels[sel], scores[sel])[:2], auc)
    written = {"roc": out_dir / "roc.png", "histogram": out_dir / "scores.png"}
    plots.plot_roc(curves, written["roc"], f"{name}: image ROC")
    defective = {t: scores[np.array(types) == t] for t in metrics["image_auroc_per_type"]}
    plots.plot_histogram(scores[labels == 0], defective, written["histogram"], f"{name}: image scores",
                         [best] + ([calibrated] if calibrated else []))
    vmax = float(np.quantile(maps, 0.999))
    for kind, idxs in plots.order_cases(labels, scores, OVERLAY_CASES).items():
        cases = [plots.Case(samples[i].image.name, types[i], denormalize(images[i], spec), maps[i], masks[i],
                            float(scores[i])) for i in idxs]
        written[f"overlays_{kind}"] = out_dir / f"overlays_{kind}.png"
        plots.plot_overlays(cases, written[f"overlays_{kind}"], f"{name}: {kind} cases", vmax, verdicts)
    captions = [
        ("scores.png", "Image scores: good images filled, each defect type outlined; the threshold lines and what "
                       "each is"),
        ("roc.png", "Image ROC, all defects together and per type against the good images"),
        ("overlays_best.png", "Best cases: the highest-scoring defects and the lowest-scoring good images"),
        ("overlays_worst.png", "Worst cases: the lowest-scoring defects and the highest-scoring good images"),
    ]
    counts = report.caught_counts(scores.tolist(), types, verdicts)
    written["report"] = report.write_report(out_dir, metrics, captions, counts, verdicts, calibrated)
    return {k: str(v) for k, v in written.items()}
