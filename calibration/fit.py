"""Fit: a capture (and optionally labelled defects) in, thresholds out.

`fit_thresholds` is a pure function of the scores and maps; reading the capture, scoring the
defect folder and writing thresholds.yaml happen at the edges (`score_defect_dataset`,
`write_thresholds`). The statistics live in calibration.stats.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np

from engine.backend import open_backend
from engine.bundle import Bundle
from engine.errors import DatasetError
from engine.messages import pct
from engine.preprocess import list_images
from engine.regions import CONNECTIVITY

from . import stats
from .capture import Capture, read_image_files, score_frames, software_versions
from engine.thresholds import Thresholds, save_thresholds

logger = logging.getLogger(__name__)

STRATEGY_CHOICES = ("auto", "quantile", "gpd", "best_f1")
# The agent's drift alarm (agent/drift.py, its limits set from the reference's size) needs >= 100 good frames to run
# and this many to reach its target; measured by benchmarks/bench_drift.py (docs/research/drift_alarm.md).
DRIFT_MIN_FRAMES = 100
DRIFT_ADVISED_FRAMES = 3000
DRIFT_DELAY_NOTE = ("a doubling of a 1% false-alarm rate is caught within 500 frames after 62% of calibrations of 300 "
                    "good frames, 91% of 1000, 97% of 3000")
GOOD_DIR = "good"  # MVTec: test/good holds defect-free test images, every other test/<type> is a defect type


@dataclass
class DefectSet:
    """A labelled folder (MVTec layout) scored with the bundle."""

    root: Path
    scores: Dict[str, np.ndarray]  # defect type -> (n,) scores
    files: Dict[str, List[str]]
    maps: Dict[str, np.ndarray]  # defect type -> (n, H, W)
    good_scores: np.ndarray  # test/good, when present (a held-out check, not used for fitting)
    skipped: List[str] = field(default_factory=list)

    @property
    def all_scores(self) -> np.ndarray:
        return np.concatenate([self.scores[k] for k in sorted(self.scores)]) if self.scores else np.zeros(0)


@dataclass
class ThresholdsFit:
    thresholds: Thresholds
    image: stats.ImageThreshold  # the false-alarm-rate threshold (quantile or gpd) and its uncertainty
    at_chosen: stats.ImageThreshold  # false-alarm figures at the threshold actually written
    pixel: stats.PixelThresholds
    best_f1: Optional[stats.F1Point] = None
    f1_at_chosen: Optional[stats.F1Point] = None
    misses: Dict[str, Dict[str, float]] = field(default_factory=dict)
    heldout_good: Optional[Dict[str, float]] = None  # test/good of the defect folder at the chosen threshold
    warnings: List[str] = field(default_factory=list)


def score_defect_dataset(root: Union[str, Path], bundle: Bundle, backend: str = "auto", progress: bool = True,
                         precision: str = "fp32") -> DefectSet:
    """Score every image of test/<type>/ (MVTec layout); test/good is scored as held-out good."""
    from tqdm import tqdm

    root = Path(root)
    test = root / "test"
    if not root.is_dir():
        raise DatasetError(f"{root}: defect folder not found; pass an MVTec-layout folder (test/<defect type>/*.png) with --defects")
    if not test.is_dir():
        raise DatasetError(f"{test}: missing; --defects expects the MVTec layout: {root}/test/<defect type>/*.png")
    kinds = sorted(d.name for d in test.iterdir() if d.is_dir() and d.name != GOOD_DIR and list_images(d))
    if not kinds:
        raise DatasetError(f"{test}: no defect images (expected folders test/<defect type>/ with images besides test/good)")
    skipped: List[str] = []
    scores: Dict[str, np.ndarray] = {}
    files: Dict[str, List[str]] = {}
    maps: Dict[str, np.ndarray] = {}
    good = np.zeros(0)
    groups = kinds + ([GOOD_DIR] if (test / GOOD_DIR).is_dir() and list_images(test / GOOD_DIR) else [])
    total = sum(len(list_images(test / k)) for k in groups)
    with open_backend(bundle, prefer=backend, precision=precision) as be, tqdm(total=total, desc="defects", unit="image",
                                                          disable=None if progress else True) as bar:
        for kind in groups:
            s, f, m = [], [], []
            for name, _, scored in score_frames(read_image_files(list_images(test / kind), skipped), bundle, be):
                s.append(scored.score)
                f.append(name)
                m.append(scored.anomaly_map)
                bar.update(1)
            if kind == GOOD_DIR:
                good = np.asarray(s, dtype=np.float64)
            elif s:
                scores[kind], files[kind], maps[kind] = np.asarray(s, dtype=np.float64), f, np.stack(m)
    if skipped:
        logger.warning("%d unreadable image(s) skipped in %s", len(skipped), root)
    if not scores:
        raise DatasetError(f"{test}: none of the defect images could be read")
    return DefectSet(root=root, scores=scores, files=files, maps=maps, good_scores=good, skipped=skipped)


def at_threshold(scores: np.ndarray, threshold: float, target: float, strategy: str) -> stats.ImageThreshold:
    """False-alarm figures of good scores at a threshold chosen by other means (best F1)."""
    n = int(scores.size)
    k = int(np.sum(scores > threshold))
    return stats.ImageThreshold(threshold=float(threshold), strategy=strategy, target=target, n=n, exceedances=k,
                                expected_rate=k / n, ci=stats.clopper_pearson(k, n))


def fit_thresholds(
    capture: Capture,
    rate: float,
    strategy: str = "auto",
    defects: Optional[DefectSet] = None,
    score_stats: Optional[Dict[str, Any]] = None,
    n_boot: int = stats.GPD_BOOTSTRAP,
) -> ThresholdsFit:
    """Thresholds for a target false-alarm rate from a capture of good frames (no I/O)."""
    if strategy not in STRATEGY_CHOICES:
        raise stats.StatsError(f"--strategy must be one of {STRATEGY_CHOICES}, got {strategy!r}")
    if strategy == "best_f1" and defects is None:
        raise stats.StatsError("--strategy best_f1 needs labelled defects: pass --defects MVTEC_DIR")
    scores = capture.scores
    if scores.size < stats.MIN_FRAMES:
        raise stats.StatsError(f"{capture.root}: only {scores.size} good frames; at least {stats.MIN_FRAMES} are needed "
                               f"(and {stats.frames_needed(rate)} to resolve a false-alarm rate of {pct(rate)}): capture more")
    warnings: List[str] = []
    shift = stats.score_shift_warning(scores, score_stats if score_stats is not None else capture.meta.get("bundle_score_stats") or {})
    if shift:
        warnings.append(shift)
    image = stats.choose_image_threshold(scores, rate, "auto" if strategy == "best_f1" else strategy, n_boot=n_boot)
    warnings.extend(image.warnings)
    pixel = stats.fit_pixel_thresholds(capture.maps, rate)
    warnings.extend(pixel.warnings)
    chosen = image
    best = f1_chosen = None
    misses: Dict[str, Dict[str, float]] = {}
    heldout = None
    if defects is not None:
        best = stats.best_f1_threshold(scores, defects.all_scores)
        if strategy == "best_f1":
            chosen = at_threshold(scores, best.threshold, rate, "best_f1")
            if chosen.ci[0] > rate:
                warnings.append(f"the best-F1 threshold flags {chosen.exceedances} of {chosen.n} good frames: its false-alarm "
                                f"rate (95% interval {pct(chosen.ci[0])} - {pct(chosen.ci[1])}) is above the target {pct(rate)}")
        f1_chosen = stats.f1_at(scores, defects.all_scores, chosen.threshold)
        misses = stats.miss_rates(defects.scores, chosen.threshold)
        if defects.good_scores.size:
            k = int(np.sum(defects.good_scores > chosen.threshold))
            lo, hi = stats.clopper_pearson(k, int(defects.good_scores.size))
            heldout = {"n": int(defects.good_scores.size), "flagged": k, "rate": k / defects.good_scores.size,
                       "ci_low": lo, "ci_high": hi}
    thresholds = Thresholds(
        image_threshold=float(chosen.threshold),
        pixel_threshold=float(pixel.pixel_threshold),
        min_defect_area=int(pixel.min_defect_area),
        bundle_sha256=capture.bundle_sha256,
        strategy=chosen.strategy,
        target_false_alarm_rate=float(rate),
        n_frames=int(scores.size),
        score_quantiles=stats.score_quantiles(scores),
        bundle_name=capture.bundle_name,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        provenance={},
        drift_reference=_drift_reference(scores, chosen, rate, warnings),
    )
    result = ThresholdsFit(thresholds=thresholds, image=image, at_chosen=chosen, pixel=pixel, best_f1=best,
                       f1_at_chosen=f1_chosen, misses=misses, heldout_good=heldout, warnings=warnings)
    provenance = _provenance(result, capture, defects)
    result.thresholds = replace(thresholds, provenance=provenance)
    return result


def _drift_reference(scores: np.ndarray, chosen: stats.ImageThreshold, rate: float,
                     warnings: List[str]) -> Optional[Dict[str, Any]]:
    """The agent's drift reference; its sensitivity is a multiple of the false-alarm rate the threshold was set for:
    the target, or for best F1 the share of calibration frames above it."""
    if chosen.strategy == "best_f1":
        rate = min(max(chosen.exceedances, 0.5) / chosen.n, 0.49)
    try:
        ref = stats.drift_reference(scores, chosen.threshold, rate)
    except stats.StatsError as exc:
        warnings.append(f"drift monitoring off for these thresholds: {exc}")
        return None
    if ref["n_frames"] < DRIFT_ADVISED_FRAMES:
        warnings.append(f"the drift alarm's reference holds {ref['n_frames']} good frames: the agent adds the line's "
                        f"first good frames to it (drift.baseline_frames, {DRIFT_ADVISED_FRAMES} by default) and is "
                        f"slower to see a drift until then ({DRIFT_DELAY_NOTE}); keep the line as calibrated meanwhile, "
                        "or capture more good frames")
    return ref


def _plain(value: Any) -> Any:
    """YAML-safe: numpy scalars to Python numbers, tuples to lists, NaN kept out."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _threshold_dict(t: stats.ImageThreshold) -> Dict[str, Any]:
    d: Dict[str, Any] = {
        "threshold": t.threshold,
        "strategy": t.strategy,
        "good_frames_above": t.exceedances,
        "expected_false_alarm_rate": t.expected_rate,
        "false_alarm_rate_ci95": list(t.ci),
        "ci_method": "Clopper-Pearson exact binomial, from the good frames alone",
    }
    if t.model_ci is not None:
        d["model_false_alarm_rate_ci95"] = list(t.model_ci)
        d["model_ci_method"] = f"approximate: bootstrap of the generalised Pareto tail fit ({stats.GPD_BOOTSTRAP} resamples)"
    if t.gpd is not None:
        d["gpd_fit"] = t.gpd
    return d


def _provenance(result: ThresholdsFit, capture: Capture, defects: Optional[DefectSet]) -> Dict[str, Any]:
    meta = capture.meta
    prov: Dict[str, Any] = {
        "capture": {
            "path": str(Path(capture.root).resolve()),
            "source": meta.get("source"),
            "started": meta.get("started"),
            "finished": meta.get("finished"),
            "skipped_images": (meta.get("skipped") or {}).get("count", 0),
            "frame_sizes": meta.get("frame_sizes"),
        },
        "image_threshold": _threshold_dict(result.at_chosen),
        "pixel_threshold": {
            "method": result.pixel.method,
            "good_frames_with_regions": result.pixel.frames_with_regions,
            "good_component_areas": list(result.pixel.good_component_areas[-20:]),
            "connectivity": CONNECTIVITY,
            "map_size": meta.get("map_size"),
        },
        "warnings": list(result.warnings),
        "software": software_versions(),
    }
    if result.at_chosen.strategy != result.image.strategy:  # best F1: keep what the target rate would have given
        prov["target_rate_threshold"] = _threshold_dict(result.image)
    if defects is not None and result.best_f1 is not None and result.f1_at_chosen is not None:
        prov["defects"] = {
            "path": str(Path(defects.root).resolve()),
            "images": {k: int(v.size) for k, v in defects.scores.items()},
            "best_f1": asdict(result.best_f1),
            "at_chosen": asdict(result.f1_at_chosen),
            "miss_rates": result.misses,
            "heldout_good": result.heldout_good,
        }
    return _plain(prov)


def write_thresholds(result: ThresholdsFit, path: Union[str, Path]) -> Path:
    """Atomic write of thresholds.yaml (the agent may be watching it)."""
    return save_thresholds(path, result.thresholds)


# How each strategy estimates the rate on new parts, so the capture's own share and the estimate do not
# read as a contradiction when they differ.
ESTIMATE_BASIS = {
    "quantile": "(k+1)/(N+1): the count here plus one, for the parts not yet seen",
    "gpd": "from the tail fit of the good scores",
    "best_f1": "the capture's own share",
}


def summary_lines(result: ThresholdsFit, capture: Capture) -> List[str]:
    """What a person needs to know, as plain lines (CLI output and report)."""
    t, img, chosen = result.thresholds, result.image, result.at_chosen
    lines = [
        f"bundle            {t.bundle_name} ({t.bundle_sha256[:12]})",
        f"good frames       {t.n_frames} from {capture.root}",
        f"target            false-alarm rate {pct(img.target)}",
        f"image threshold   {t.image_threshold:.6g}  (strategy {t.strategy})",
        f"  in this capture {chosen.exceedances} of {chosen.n} good frames ({pct(chosen.exceedances / chosen.n)}) score "
        f"above it; on new good parts expect {pct(chosen.expected_rate)} to be flagged ({ESTIMATE_BASIS.get(chosen.strategy, chosen.strategy)})",
        f"  95% interval of the true false-alarm rate at this threshold: {pct(chosen.ci[0])} - {pct(chosen.ci[1])} "
        f"(exact binomial, {chosen.n} frames)",
    ]
    if chosen.model_ci is not None:
        lines.append(f"  tail model (generalised Pareto, shape {chosen.gpd['shape']:.3f}): 95% interval "
                     f"{pct(chosen.model_ci[0])} - {pct(chosen.model_ci[1])}")
    if chosen.strategy == "best_f1":
        lines.append(f"  (the false-alarm threshold for the target would be {img.threshold:.6g}, strategy {img.strategy})")
    lines.append(f"pixel threshold   {t.pixel_threshold:.6g}; min defect area {t.min_defect_area} px of the "
                 f"{'x'.join(str(v) for v in capture.maps.shape[1:])} anomaly map; "
                 f"{result.pixel.frames_with_regions} of {t.n_frames} good frames show a region")
    ref = t.drift_reference
    if ref is not None:
        lines.append(f"drift reference   {ref['n_frames']} good frames (at or below the image threshold) for the agent's "
                     f"drift alarm: it runs from {DRIFT_MIN_FRAMES}, reaches its target from {DRIFT_ADVISED_FRAMES} "
                     f"({DRIFT_DELAY_NOTE}), counting the line's first good frames the agent adds to it")
    if result.best_f1 is not None and result.f1_at_chosen is not None:
        b, c = result.best_f1, result.f1_at_chosen
        lines.append(f"defects           best F1 {b.f1:.3f} at threshold {b.threshold:.6g} "
                     f"(precision {b.precision:.3f}, recall {b.recall:.3f})")
        lines.append(f"  at the chosen threshold: F1 {c.f1:.3f}, precision {c.precision:.3f}, recall {c.recall:.3f}")
        for kind, m in result.misses.items():
            lines.append(f"  miss rate {kind:<12} {pct(m['miss_rate']):>7} ({m['missed']}/{m['n']}, "
                         f"95% {pct(m['ci_low'])} - {pct(m['ci_high'])})")
        if result.heldout_good:
            h = result.heldout_good
            lines.append(f"  held-out test/good: {h['flagged']} of {h['n']} flagged ({pct(h['rate'])})")
    if result.warnings:
        lines.append("warnings:")
        lines.extend(f"  - {w}" for w in result.warnings)
    return lines
