"""Anomaly-detection metrics (pure functions of scores, maps and masks).

Image AUROC, pixel AUROC and best F1 come from scikit-learn; AUPRO follows MVTec AD's definition:
the mean per-region overlap (each connected ground-truth region weighs the same, however large)
as a function of the false-positive rate on good pixels, integrated up to FPR 0.3 and divided by 0.3.
pixel_auroc_breakdown splits the pooled pixel AUROC by its negatives (good images, defective images'
backgrounds) and by defect type. group_bootstrap_auroc and group_bootstrap_auroc_difference say how sure
an image AUROC, or a difference between two scorings, is when images come in groups (one part
photographed several times).
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Sequence, Tuple

import numpy as np

AUPRO_FPR_LIMIT = 0.3
AUPRO_THRESHOLDS = 200
PIXEL_AUROC_MAX_PIXELS = 4_000_000  # subsample beyond this: the ROC of 4M pixels is already exact to ~1e-3


def image_auroc(labels: Sequence[int], scores: Sequence[float]) -> float:
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    if labels.min() == labels.max():
        return float("nan")
    return float(roc_auc_score(labels, np.asarray(scores)))


def pixel_auroc(masks: np.ndarray, maps: np.ndarray, seed: int = 0) -> float:
    from sklearn.metrics import roc_auc_score

    y = masks.reshape(-1).astype(np.uint8)
    s = maps.reshape(-1)
    if y.min() == y.max():
        return float("nan")
    if y.size > PIXEL_AUROC_MAX_PIXELS:
        idx = np.random.default_rng(seed).choice(y.size, PIXEL_AUROC_MAX_PIXELS, replace=False)
        y, s = y[idx], s[idx]
    return float(roc_auc_score(y, s))


def _auroc_of(positives: np.ndarray, negatives: np.ndarray, seed: int) -> float:
    """AUROC of two score samples (positives above negatives), subsampled like pixel_auroc."""
    if positives.size == 0 or negatives.size == 0:
        return float("nan")
    y = np.concatenate([np.ones(positives.size, np.uint8), np.zeros(negatives.size, np.uint8)])
    return pixel_auroc(y, np.concatenate([positives.ravel(), negatives.ravel()]), seed)


def pixel_auroc_breakdown(masks: np.ndarray, maps: np.ndarray, labels: np.ndarray, types: Sequence[str],
                          seed: int = 0) -> Dict[str, Any]:
    """Where the pooled pixel AUROC is lost. Its negatives are the good images' pixels and the defective
    images' own background; a map that localises well but lifts a defective image's whole background
    scores high against the first and low against the second. Per type: that type's images and the good
    ones, like image_auroc_per_type.

    masks: (N, H, W) bool; maps: (N, H, W) float; labels: (N,) 0 good / 1 defective."""
    masks, labels, types = masks.astype(bool), np.asarray(labels), np.asarray(types)
    good, defective = labels == 0, labels == 1
    positives = maps[masks]
    per_type = {}
    for t in sorted(set(types.tolist()) - {"good"}):
        sel = (types == t) | (types == "good")
        per_type[t] = pixel_auroc(masks[sel], maps[sel], seed)
    return {
        "against_good_images": _auroc_of(positives, maps[good], seed),
        "against_defective_backgrounds": _auroc_of(positives, maps[defective][~masks[defective]], seed),
        "per_type": per_type,
    }


def best_f1(labels: Sequence[int], scores: Sequence[float]) -> Dict[str, float]:
    """Highest F1 over all thresholds, and the threshold that gives it."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(np.asarray(labels), np.asarray(scores))
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1])) if len(thresholds) else 0
    return {"f1": float(f1[best]), "threshold": float(thresholds[best]) if len(thresholds) else float("nan"),
            "precision": float(precision[best]), "recall": float(recall[best])}


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = AUPRO_FPR_LIMIT,
          n_thresholds: int = AUPRO_THRESHOLDS) -> float:
    """Area under the per-region-overlap curve up to `fpr_limit`, normalised to [0, 1].

    masks: (N, H, W) bool; maps: (N, H, W) float.
    """
    from scipy import ndimage

    masks = masks.astype(bool)
    if not masks.any():
        return float("nan")
    regions = []  # (image index, flat pixel indices) of every connected ground-truth region
    for i, mask in enumerate(masks):
        labelled, n = ndimage.label(mask)
        for r in range(1, n + 1):
            regions.append((i, np.flatnonzero(labelled == r)))
    good_scores = maps[~masks]
    lo, hi = float(maps.min()), float(maps.max())
    thresholds = np.linspace(hi, lo, n_thresholds)
    # FPR per threshold from the sorted good-pixel scores
    sorted_good = np.sort(good_scores)
    fprs = 1.0 - np.searchsorted(sorted_good, thresholds, side="right") / max(1, sorted_good.size)
    flat_maps = maps.reshape(len(maps), -1)
    region_scores = [np.sort(flat_maps[i][idx]) for i, idx in regions]
    pros = np.array([
        np.mean([1.0 - np.searchsorted(rs, t, side="right") / rs.size for rs in region_scores]) for t in thresholds
    ])
    keep = fprs <= fpr_limit
    fpr_k, pro_k = fprs[keep], pros[keep]
    if fpr_k.size == 0:
        return 0.0
    # extend the curve to exactly fpr_limit by interpolating with the first point beyond it
    beyond = np.flatnonzero(~keep)
    if beyond.size and fpr_k[-1] < fpr_limit:
        j = beyond[0]
        f0, f1_, p0, p1 = fpr_k[-1], fprs[j], pro_k[-1], pros[j]
        p_lim = p0 + (p1 - p0) * (fpr_limit - f0) / max(f1_ - f0, 1e-12)
        fpr_k, pro_k = np.append(fpr_k, fpr_limit), np.append(pro_k, p_lim)
    fpr_k = np.concatenate([[0.0], fpr_k])
    pro_k = np.concatenate([[pro_k[0] if fpr_k[1] == 0 else 0.0], pro_k])
    return float(np.trapz(pro_k, fpr_k) / fpr_limit) if hasattr(np, "trapz") else float(np.trapezoid(pro_k, fpr_k) / fpr_limit)


def _rank_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUROC as the Mann-Whitney statistic (ties count half): roc_auc_score's value, ~20x faster for a bootstrap."""
    from scipy.stats import rankdata

    positives = labels == 1
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    return float((rankdata(scores)[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _group_resamples(labels: np.ndarray, groups: Sequence[str], draws: int, seed: int) -> Tuple[Iterator[np.ndarray], int]:
    """Row indices of `draws` resamples of whole groups with replacement, and the number of groups.

    Stratified: groups holding a defective image and groups of good images only are each resampled to their
    own count, so every draw shows as many defective parts as the split does (a type seen on four parts
    would otherwise draw one of them alone about one time in twenty-five, and its AUROC with it)."""
    names, index = np.unique(np.asarray(groups), return_inverse=True)
    members = [np.flatnonzero(index == g) for g in range(len(names))]
    defective = np.array([labels[m].max() == 1 for m in members])
    strata = [np.flatnonzero(defective), np.flatnonzero(~defective)]
    rng = np.random.default_rng(seed)

    def resamples() -> Iterator[np.ndarray]:
        for _ in range(draws):
            picked = np.concatenate([rng.choice(stratum, stratum.size) for stratum in strata if stratum.size])
            rows = np.concatenate([members[g] for g in picked])
            if labels[rows].min() != labels[rows].max():  # a split of one class only
                yield rows

    return resamples(), len(names)


def _interval(values: List[float]) -> Tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    low, high = np.quantile(values, [0.025, 0.975])
    return float(low), float(high)


def group_bootstrap_auroc(labels: Sequence[int], scores: Sequence[float], groups: Sequence[str],
                          draws: int = 2000, seed: int = 0) -> Dict[str, float]:
    """Image AUROC with a 95 % interval from resampling whole groups with replacement.

    The images of one group show one part (several exposures), so they are not independent draws: with few
    groups (a defect type seen on six tiles) the interval says how far the figure could move on other parts."""
    labels, s = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    resamples, n_groups = _group_resamples(labels, groups, draws, seed)
    values = [_rank_auroc(labels[rows], s[rows]) for rows in resamples]
    low, high = _interval(values)
    return {"auroc": image_auroc(labels, s), "low": low, "high": high, "draws": len(values), "groups": n_groups}


def group_bootstrap_auroc_difference(labels: Sequence[int], scores_a: Sequence[float], scores_b: Sequence[float],
                                     groups: Sequence[str], draws: int = 2000, seed: int = 0) -> Dict[str, float]:
    """Image AUROC of scoring b minus that of scoring a on the same images, with a 95 % interval from
    resampling whole groups with replacement (paired: both scorings see each draw).

    The images of one group show one part (several exposures), so they are not independent draws: resampling
    images would make a difference look surer than it is (see _group_resamples)."""
    labels, a, b = np.asarray(labels), np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    resamples, n_groups = _group_resamples(labels, groups, draws, seed)
    differences = [_rank_auroc(labels[rows], b[rows]) - _rank_auroc(labels[rows], a[rows]) for rows in resamples]
    low, high = _interval(differences)
    return {"difference": image_auroc(labels, b) - image_auroc(labels, a), "low": low, "high": high,
            "draws": len(differences), "groups": n_groups}


def part_ranks(labels: Sequence[int], types: Sequence[str], scores: Sequence[float],
               parts: Sequence[str]) -> List[Dict[str, Any]]:
    """Per part (group): how its images rank against the other class, worst first.

    A defective image's rank is the fraction of good images it scores above (ties half), a good image's the
    fraction of defective images it scores below; a part's is the mean over its images of its own class
    (a part of both holds its defective images' rank). Near 0 is a part the model misses or mistakes for a
    defect; the list says which parts an AUROC is lost on."""
    labels, s = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    good, defective = np.sort(s[labels == 0]), np.sort(s[labels == 1])

    def above(values: np.ndarray, reference: np.ndarray) -> np.ndarray:  # fraction of reference below, ties half
        return (np.searchsorted(reference, values, "left") + np.searchsorted(reference, values, "right")) / (2 * reference.size)

    rank = np.where(labels == 1, above(s, good) if good.size else np.nan,
                    1.0 - above(s, defective) if defective.size else np.nan)
    out = []
    names = np.asarray(parts)
    for part in np.unique(names):
        rows = np.flatnonzero(names == part)
        has_defect = bool(labels[rows].max() == 1)
        own = rows[labels[rows] == 1] if has_defect else rows
        out.append({"part": str(part), "defective": has_defect, "types": sorted({types[i] for i in own}),
                    "images": int(own.size), "rank": float(rank[own].mean())})
    return sorted(out, key=lambda r: (r["rank"], r["part"]))
