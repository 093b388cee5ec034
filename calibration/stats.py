"""Pure statistics behind the thresholds: no I/O, no logging of results, numbers in, numbers out.

Conventions shared with the agent (design contract §4) are engine.regions': a frame is flagged when its
image score is strictly above the image threshold; a region is an 8-connected component of anomaly-map
pixels strictly above the pixel threshold whose area (in anomaly-map pixels) is at least the minimum
defect area.

The false-alarm statements assume the calibration frames are independent draws of what the line
produces; consecutive camera frames of one part are not (capture with an interval between frames).
scipy is imported inside the functions that need it (the `jetson`/`train` extras install it), so
importing this module costs nothing.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from engine import drift_reference as drift_format
from engine.errors import DaadError, require_module
from engine.messages import pct
from engine.regions import component_areas, count_regions

CONFIDENCE = 0.95  # two-sided level of every interval we state
RULE_OF_THREE = 3.0  # N frames resolve a rate down to ~3/N (95% upper bound with no exceedance)
MIN_FRAMES = 20  # below this no threshold is worth stating
QUANTILE_REPORT_LEVELS = (0.5, 0.9, 0.95, 0.99, 0.999)
# Generalised Pareto tail fit: exceedances over a high empirical quantile.
GPD_TAIL_FRACTION = 0.1  # fit the top 10% of the scores ...
GPD_MIN_EXCEEDANCES = 20  # ... but never fewer than 20 points (MLE is erratic below that)
GPD_MAX_TAIL_SHARE = 0.25  # and never more than a quarter of the frames (no longer a tail)
GPD_SHAPE_RANGE = (-0.5, 0.5)  # outside: MLE irregular (< -0.5) or variance unbounded (> 0.5)
GPD_MIN_GOF_PVALUE = 0.05  # Kolmogorov-Smirnov screen of the fitted tail
GPD_BOOTSTRAP = 100  # refits for the model-based interval (~2-4 s on a desktop)
GPD_SEED = 0  # the bootstrap is deterministic: the same capture gives the same file
# Distribution shift against the bundle's training statistics. Loose on purpose: those statistics come
# from the training images, which score lower than unseen good parts of the same setting.
SHIFT_SIGMAS = 6.0  # median moved by more than this many training std devs
SHIFT_P99_SHARE = 0.5  # or most frames above the training p99 (1% expected, a few times that for unseen parts)
MIN_AREA_QUANTILE = 0.5  # min area = median size of the regions good frames show (see fit_pixel_thresholds)
MAX_MIN_AREA_SHARE = 0.002  # but never above 0.2% of the map: a few odd good blobs must not hide small defects


class StatsError(DaadError):
    """The numbers cannot support a threshold (too few frames, no defects, ...)."""


def _scipy_stats() -> Any:
    return require_module("scipy.stats", StatsError, "scipy is needed for the confidence intervals and tail fit: "
                          "pip install 'daad-inspect[jetson]' (or pip install scipy)")


def as_scores(values: Sequence[float], what: str = "scores") -> np.ndarray:
    """1-D float64 array of finite values; StatsError naming `what` otherwise."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size and not np.all(np.isfinite(arr)):
        bad = int(np.sum(~np.isfinite(arr)))
        raise StatsError(f"{what}: {bad} of {arr.size} values are NaN or infinite; the model output is broken")
    return arr


# ---------------------------------------------------------------- binomial uncertainty


def clopper_pearson(k: int, n: int, confidence: float = CONFIDENCE) -> Tuple[float, float]:
    """Exact two-sided interval for a binomial rate with k events in n trials.

    For a threshold set at an order statistic of continuous scores with k calibration scores above
    it, the true exceedance rate is Beta(k+1, n-k) distributed; the upper bound here is exactly that
    distribution's quantile, the lower bound (Beta(k, n-k+1)) is slightly conservative.
    """
    if n <= 0 or not 0 <= k <= n:
        raise StatsError(f"clopper_pearson needs 0 <= k <= n and n > 0, got k={k}, n={n}")
    beta = _scipy_stats().beta
    alpha = 1.0 - confidence
    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def frames_needed(rate: float) -> int:
    """Good frames needed before a false-alarm rate can be resolved at all (rule of three)."""
    return int(math.ceil(RULE_OF_THREE / rate))


def resolvable(rate: float, n: int) -> bool:
    return n >= frames_needed(rate)


def conformal_index(rate: float, n: int) -> Optional[int]:
    """0-based index into the ascending scores of the conservative (1 - rate) order statistic.

    The ceil((1 - rate)(n + 1))-th smallest of n exchangeable scores is exceeded by a fresh score
    with probability at most `rate` (split-conformal bound). None when n is too small for that
    (rate < 1/(n + 1)): even the maximum does not guarantee it.
    """
    rank = int(math.ceil((1.0 - rate) * (n + 1) - 1e-9))  # 1-based; epsilon: (1-r)(n+1) exact ints
    if rank > n:
        return None
    return max(rank, 1) - 1


# ---------------------------------------------------------------- image threshold


@dataclass(frozen=True)
class ImageThreshold:
    """An image threshold and the uncertainty the calibration frames allow."""

    threshold: float
    strategy: str  # "quantile" or "gpd"
    target: float  # the requested false-alarm rate
    n: int  # good frames it was fitted on
    exceedances: int  # good frames strictly above the threshold
    expected_rate: float  # the point estimate of the false-alarm rate at the threshold
    ci: Tuple[float, float]  # Clopper-Pearson interval of the true rate, from the frames alone
    model_ci: Optional[Tuple[float, float]] = None  # GPD bootstrap interval (gpd only)
    gpd: Optional[Dict[str, float]] = None  # the tail fit (gpd only, also when not chosen)
    warnings: Tuple[str, ...] = ()


def quantile_threshold(scores: Sequence[float], rate: float) -> ImageThreshold:
    """Conservative empirical (1 - rate) quantile of good scores, with its binomial interval."""
    s = np.sort(as_scores(scores))
    n = int(s.size)
    _check_rate(rate)
    _check_n(n)
    warnings: List[str] = []
    idx = conformal_index(rate, n)
    if idx is None:
        idx = n - 1
        warnings.append(
            f"target false-alarm rate {pct(rate)} is below 1/(N+1) = {pct(1 / (n + 1))}: the threshold is the "
            f"highest of the {n} good scores, whose expected false-alarm rate is ~{pct(1 / (n + 1))}; "
            f"capture at least {frames_needed(rate)} good frames to reach the target"
        )
    threshold = float(s[idx])
    k = int(np.sum(s > threshold))
    if not resolvable(rate, n):
        warnings.insert(0, _resolution_warning(rate, n))
    return ImageThreshold(
        threshold=threshold,
        strategy="quantile",
        target=rate,
        n=n,
        exceedances=k,
        expected_rate=(k + 1) / (n + 1),
        ci=clopper_pearson(k, n),
        warnings=tuple(warnings),
    )


def _resolution_warning(rate: float, n: int) -> str:
    return (
        f"{n} good frames cannot resolve a false-alarm rate of {pct(rate)} (they resolve down to ~{pct(RULE_OF_THREE / n)}); "
        f"capture at least {frames_needed(rate)} good frames to measure it"
    )


def _check_rate(rate: float) -> None:
    if not 0.0 < rate < 1.0:
        raise StatsError(f"the false-alarm rate must be between 0% and 100% (e.g. 1%), got {rate:g}")


def _check_n(n: int) -> None:
    if n < MIN_FRAMES:
        raise StatsError(f"only {n} good frames: at least {MIN_FRAMES} are needed for any threshold (more for low rates)")


@dataclass(frozen=True)
class GpdFit:
    """Generalised Pareto fit of the exceedances over `u`: P(X > x) = zeta * (1 - G(x - u)) for x > u."""

    u: float  # the high quantile the tail starts at
    zeta: float  # share of frames above u
    shape: float  # xi (scipy's c): 0 exponential tail, < 0 bounded, > 0 heavy
    scale: float
    n_exceed: int
    gof_pvalue: float  # Kolmogorov-Smirnov p-value of the exceedances against the fit
    problems: Tuple[str, ...] = ()  # why the fit is not sound (empty when it is)

    @property
    def sound(self) -> bool:
        return not self.problems

    def rate_at(self, x: float) -> float:
        """Model false-alarm rate at threshold x (only meaningful for x >= u)."""
        stats = _scipy_stats()
        return float(self.zeta * stats.genpareto.sf(max(x - self.u, 0.0), self.shape, loc=0.0, scale=self.scale))

    def threshold_for(self, rate: float) -> float:
        stats = _scipy_stats()
        tail_prob = min(rate / self.zeta, 1.0)
        return float(self.u + stats.genpareto.isf(tail_prob, self.shape, loc=0.0, scale=self.scale))

    def to_dict(self) -> Dict[str, Any]:
        return {**asdict(self), "problems": list(self.problems)}  # a list: YAML and JSON have no tuples


def fit_gpd_tail(scores: Sequence[float]) -> GpdFit:
    """Fit a generalised Pareto to the top of the good scores; says whether the fit is sound."""
    stats = _scipy_stats()
    s = np.sort(as_scores(scores))
    n = int(s.size)
    n_exceed = max(GPD_MIN_EXCEEDANCES, int(round(GPD_TAIL_FRACTION * n)))
    if n_exceed > GPD_MAX_TAIL_SHARE * n:
        need = int(math.ceil(GPD_MIN_EXCEEDANCES / GPD_MAX_TAIL_SHARE))
        return GpdFit(u=float(s[-1]) if n else 0.0, zeta=0.0, shape=0.0, scale=0.0, n_exceed=0, gof_pvalue=0.0,
                      problems=(f"a tail fit needs at least {need} good frames, got {n}",))
    # u halfway between the order statistics around the cut, so exactly n_exceed points lie above it
    u = float(0.5 * (s[n - n_exceed - 1] + s[n - n_exceed]))
    excess = s[n - n_exceed:] - u
    problems: List[str] = []
    if np.ptp(excess) <= 0:
        return GpdFit(u=u, zeta=n_exceed / n, shape=0.0, scale=0.0, n_exceed=n_exceed, gof_pvalue=0.0,
                      problems=("the top scores are all equal: no tail to fit",))
    shape, _, scale = stats.genpareto.fit(excess, floc=0.0)
    gof = float(stats.kstest(excess, "genpareto", args=(shape, 0.0, scale)).pvalue)
    if not GPD_SHAPE_RANGE[0] <= shape <= GPD_SHAPE_RANGE[1]:
        problems.append(f"tail shape {shape:.2f} outside {GPD_SHAPE_RANGE}: extrapolation would be unreliable")
    if gof < GPD_MIN_GOF_PVALUE:
        problems.append(f"the tail does not follow a generalised Pareto (KS p-value {gof:.3f} < {GPD_MIN_GOF_PVALUE})")
    return GpdFit(u=u, zeta=n_exceed / n, shape=float(shape), scale=float(scale), n_exceed=n_exceed,
                  gof_pvalue=gof, problems=tuple(problems))


def gpd_model_interval(scores: Sequence[float], fit: GpdFit, threshold: float,
                       n_boot: int = GPD_BOOTSTRAP, confidence: float = CONFIDENCE) -> Tuple[float, float]:
    """Approximate interval of the model false-alarm rate at `threshold`: the whole sample resampled,
    the tail start and the fit redone each time (resampling only the exceedances under-covers)."""
    s = as_scores(scores)
    rng = np.random.default_rng(GPD_SEED)
    rates = []
    for _ in range(n_boot):
        refit = fit_gpd_tail(rng.choice(s, size=s.size, replace=True))
        if refit.scale > 0 and refit.zeta > 0:
            rates.append(refit.rate_at(threshold))
    if not rates:
        return (0.0, 1.0)
    alpha = 1.0 - confidence
    lo, hi = np.quantile(np.asarray(rates), [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def gpd_threshold(scores: Sequence[float], rate: float, fit: Optional[GpdFit] = None,
                  n_boot: int = GPD_BOOTSTRAP) -> ImageThreshold:
    """Threshold from the generalised Pareto tail; StatsError when the fit is not sound."""
    s = as_scores(scores)
    _check_rate(rate)
    _check_n(int(s.size))
    fit = fit or fit_gpd_tail(s)
    if not fit.sound:
        raise StatsError("the tail fit is not sound: " + "; ".join(fit.problems))
    if rate >= fit.zeta:
        raise StatsError(f"the rate {pct(rate)} lies inside the body of the scores (tail starts at {fit.zeta:.3g}): use the quantile")
    threshold = max(fit.threshold_for(rate), fit.u)
    n = int(s.size)
    k = int(np.sum(s > threshold))
    warnings: List[str] = []
    if not resolvable(rate, n):
        warnings.append(_resolution_warning(rate, n) + "; the threshold is extrapolated by a generalised Pareto tail fit")
    return ImageThreshold(
        threshold=threshold,
        strategy="gpd",
        target=rate,
        n=n,
        exceedances=k,
        expected_rate=fit.rate_at(threshold),
        ci=clopper_pearson(k, n),
        model_ci=gpd_model_interval(s, fit, threshold, n_boot=n_boot),
        gpd=fit.to_dict(),
        warnings=tuple(warnings),
    )


def choose_image_threshold(scores: Sequence[float], rate: float, strategy: str = "auto",
                           n_boot: int = GPD_BOOTSTRAP) -> ImageThreshold:
    """`quantile`, `gpd`, or `auto`: quantile where N resolves the rate, else the tail fit if sound."""
    s = as_scores(scores)
    _check_rate(rate)
    _check_n(int(s.size))
    if strategy == "quantile":
        return quantile_threshold(s, rate)
    fit = fit_gpd_tail(s)
    if strategy == "gpd":
        return gpd_threshold(s, rate, fit, n_boot=n_boot)
    if strategy != "auto":
        raise StatsError(f"strategy must be auto, quantile or gpd here, got {strategy!r}")
    if resolvable(rate, int(s.size)):
        return quantile_threshold(s, rate)
    if fit.sound and rate < fit.zeta:
        return gpd_threshold(s, rate, fit, n_boot=n_boot)
    q = quantile_threshold(s, rate)
    reason = "; ".join(fit.problems) or "the rate is not in the tail"
    return replace(q, gpd=fit.to_dict(),
                   warnings=q.warnings + (f"no tail extrapolation ({reason}): fell back to the empirical quantile",))


# ---------------------------------------------------------------- labelled defects


@dataclass(frozen=True)
class F1Point:
    threshold: float
    f1: float
    precision: float
    recall: float


def f1_at(good: Sequence[float], defect: Sequence[float], threshold: float) -> F1Point:
    """F1 of "defective = score > threshold" on labelled scores."""
    g, d = as_scores(good, "good scores"), as_scores(defect, "defect scores")
    tp = float(np.sum(d > threshold))
    fp = float(np.sum(g > threshold))
    fn = float(d.size) - tp
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return F1Point(threshold=float(threshold), f1=f1, precision=precision, recall=recall)


def best_f1_threshold(good: Sequence[float], defect: Sequence[float]) -> F1Point:
    """The threshold of highest F1, placed midway between the two scores it separates (margin both ways)."""
    g, d = as_scores(good, "good scores"), as_scores(defect, "defect scores")
    if d.size == 0:
        raise StatsError("best F1 needs labelled defect images; none were scored")
    if g.size == 0:
        raise StatsError("best F1 needs good frames; none were scored")
    values = np.unique(np.concatenate([g, d]))
    # candidates: below everything, between neighbours, at the top (flags nothing)
    candidates = np.concatenate([[values[0] - 1.0], 0.5 * (values[:-1] + values[1:]), [values[-1]]])
    scores = np.concatenate([g, d])
    is_defect = np.concatenate([np.zeros(g.size, bool), np.ones(d.size, bool)])
    order = np.argsort(scores)
    sorted_scores, sorted_defect = scores[order], is_defect[order]
    # counts strictly above each candidate, vectorised
    above = sorted_scores.size - np.searchsorted(sorted_scores, candidates, side="right")
    defect_above = np.concatenate([[0], np.cumsum(sorted_defect[::-1])])[above]
    tp = defect_above.astype(np.float64)
    fp = above - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(tp > 0, 2 * tp / (2 * tp + fp + (d.size - tp)), 0.0)
    # among equal F1, the highest threshold: fewer false alarms for the same F1
    ties = np.flatnonzero(np.isclose(f1, f1.max(), rtol=0, atol=1e-12))
    return f1_at(g, d, float(candidates[ties[-1]]))


def miss_rates(defect_scores: Mapping[str, Sequence[float]], threshold: float) -> Dict[str, Dict[str, float]]:
    """Per defect type and overall ("all"): n, missed, miss rate and its Clopper-Pearson interval."""
    out: Dict[str, Dict[str, float]] = {}
    everything: List[float] = []
    for kind in sorted(defect_scores):
        s = as_scores(defect_scores[kind], f"defect scores ({kind})")
        everything.extend(s.tolist())
        out[kind] = _miss(s, threshold)
    if everything:
        out["all"] = _miss(np.asarray(everything), threshold)
    return out


def _miss(s: np.ndarray, threshold: float) -> Dict[str, float]:
    n = int(s.size)
    missed = int(np.sum(s <= threshold))
    lo, hi = clopper_pearson(missed, n) if n else (0.0, 1.0)
    return {"n": n, "missed": missed, "miss_rate": missed / n if n else float("nan"), "ci_low": lo, "ci_high": hi}


# ---------------------------------------------------------------- pixel threshold and regions


@dataclass(frozen=True)
class PixelThresholds:
    pixel_threshold: float
    min_defect_area: int
    frames_with_regions: int  # good frames that still show a region with both applied
    good_component_areas: Tuple[int, ...] = ()
    method: str = ""
    warnings: Tuple[str, ...] = field(default_factory=tuple)


def fit_pixel_thresholds(maps: np.ndarray, rate: float) -> PixelThresholds:
    """Pixel threshold and min area from good frames' anomaly maps (N, H, W).

    Pixel threshold: the conservative (1 - rate) order statistic of each frame's map maximum, so at
    most a fraction `rate` of good frames has any pixel above it: good frames show regions no more
    often than they raise false alarms, before any area filter. Min area: the median size of the
    components the good frames above it do show (at least 1, at most MAX_MIN_AREA_SHARE of the map).
    Those are specks that barely cross the threshold; a defect's blob grows with how far its peak
    exceeds it, so the filter costs little sensitivity. Falls back to the highest maximum (no good
    frame has a region) when N is too small for the rate.
    """
    m = np.asarray(maps)
    if m.ndim != 3 or m.shape[0] == 0:
        raise StatsError(f"expected anomaly maps of shape (N, H, W), got {m.shape}")
    maxima = np.sort(m.reshape(m.shape[0], -1).max(axis=1).astype(np.float64))
    n = int(maxima.size)
    _check_n(n)
    warnings: List[str] = []
    idx = conformal_index(rate, n)
    if idx is None:
        idx = n - 1
        warnings.append(f"pixel threshold is the highest good-frame map value: {n} frames are too few for rate {pct(rate)}")
    pixel_threshold = float(maxima[idx])
    areas = np.concatenate([component_areas(frame, pixel_threshold) for frame in m])
    min_area = max(1, int(math.ceil(float(np.quantile(areas, MIN_AREA_QUANTILE))))) if areas.size else 1
    cap = max(1, int(MAX_MIN_AREA_SHARE * m.shape[1] * m.shape[2]))
    if min_area > cap:
        warnings.append(f"good frames show large regions above the pixel threshold (median {min_area} px); the min "
                        f"defect area is capped at {cap} px ({MAX_MIN_AREA_SHARE:.1%} of the map) to keep small defects")
        min_area = cap
    with_regions = sum(1 for frame in m if count_regions(frame, pixel_threshold, min_area) > 0)
    return PixelThresholds(
        pixel_threshold=pixel_threshold,
        min_defect_area=min_area,
        frames_with_regions=with_regions,
        good_component_areas=tuple(int(a) for a in np.sort(areas)),
        method=(f"pixel: conservative {1 - rate:.4g} order statistic of per-frame map maxima; "
                f"min area: median area of the {areas.size} good-frame components above it, "
                f"at most {MAX_MIN_AREA_SHARE:.1%} of the map"),
        warnings=tuple(warnings),
    )


# ---------------------------------------------------------------- summaries and shift


def score_quantiles(scores: Sequence[float]) -> Dict[str, float]:
    """The quantiles written to thresholds.yaml (keys p50, p90, ..., min, max, mean, std)."""
    s = as_scores(scores)
    if s.size == 0:
        return {}
    out = {_quantile_key(q): float(np.quantile(s, q)) for q in QUANTILE_REPORT_LEVELS}
    out.update({"min": float(s.min()), "max": float(s.max()), "mean": float(s.mean()), "std": float(s.std(ddof=1)) if s.size > 1 else 0.0})
    return out


def drift_reference(scores: Sequence[float], image_threshold: float, false_alarm_rate: float) -> Dict[str, Any]:
    """thresholds.yaml `drift_reference` (engine/drift_reference.py): the score distribution of the frames the agent
    would judge good (score <= image_threshold), as their sorted scores, or MAX_QUANTILES Hazen quantiles
    ((i - 0.5) / m) when there are more; the agent's drift alarm maps its good frames' scores through it
    (agent/drift.py). false_alarm_rate: the rate the image threshold was set for (the alarm's sensitivity is a
    multiple of it)."""
    s = as_scores(scores)
    good = np.sort(s[s <= image_threshold])
    if good.size < drift_format.MIN_FRAMES:
        raise StatsError(f"{good.size} good frame scores at or below the image threshold {image_threshold:.6g}: "
                         "no drift reference can be stated")
    if not (0.0 < false_alarm_rate < 0.5):
        raise StatsError(f"false-alarm rate {false_alarm_rate!r} outside (0, 0.5): no drift reference can be stated")
    if good.size > drift_format.MAX_QUANTILES:
        # Hazen quantiles (the empirical CDF through (i - 0.5) / n, interpolated), by hand: numpy >= 1.21 lacks `method`
        at = np.asarray(drift_format.levels(drift_format.MAX_QUANTILES)) * good.size - 0.5
        good = np.interp(at, np.arange(good.size), good)
    return {"n_frames": int(np.sum(s <= image_threshold)), "false_alarm_rate": float(false_alarm_rate),
            "quantiles": [float(v) for v in good]}


def _quantile_key(q: float) -> str:
    text = f"{q * 100:.1f}".rstrip("0").rstrip(".")
    return "p" + text


def _stat(stats: Mapping[str, Any], key: str) -> Optional[float]:
    value = stats.get(key)
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def score_shift_warning(scores: Sequence[float], score_stats: Mapping[str, Any]) -> Optional[str]:
    """A warning when good frames score far from the bundle's training statistics, else None.

    Tolerates any subset of the keys mean, std, p50, p95, p99 (None when there is nothing to compare).
    A shift usually means another camera setting: exposure, focus, lens, frame size or part.
    """
    s = as_scores(scores)
    if s.size == 0 or not score_stats:
        return None
    center = _stat(score_stats, "p50")
    if center is None:
        center = _stat(score_stats, "mean")
    scale = _stat(score_stats, "std")
    p95, p99 = _stat(score_stats, "p95"), _stat(score_stats, "p99")
    if (scale is None or scale <= 0) and center is not None and p95 is not None and p95 > center:
        scale = (p95 - center) / 1.645  # normal approximation of the spread
    median = float(np.median(s))
    problems: List[str] = []
    if center is not None and scale is not None and scale > 0:
        z = (median - center) / scale
        if abs(z) > SHIFT_SIGMAS:
            problems.append(f"the median score {median:.4g} is {z:+.1f} training std devs from the training median {center:.4g}")
    if p99 is not None:
        share = float(np.mean(s > p99))
        if share > SHIFT_P99_SHARE:
            problems.append(f"{share:.0%} of the frames score above the training p99 {p99:.4g} (expected ~1%)")
    if not problems:
        return None
    return ("good frames score unlike the training images (" + "; ".join(problems) + "): check the camera "
            "setting (exposure, focus, frame size, lens, lighting) and that the frames show good parts; a "
            "threshold calibrated on shifted frames will not hold")
