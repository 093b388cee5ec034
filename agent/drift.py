"""Drift alarm: do the line's good parts still score like the calibration's good parts?

The test (pure functions, below): the agent keeps the last `window` image scores of frames it judged good
and counts how many lie above the calibration's reference score (thresholds.yaml `drift_reference`, by
default the median of the calibration frames at or below the image threshold: k of its n frames above).
Unchanged, a good frame lies above it with the calibration's probability p, which the calibration only
estimates: so the count X in the window is compared with its predictive distribution given the calibration,
beta-binomial(window, k+1, n-k+1) (binomial with p ~ Beta(k+1, n-k+1), the uniform prior's posterior). It
tends to Binomial(window, k/n) for large n, and it keeps the level for a calibration of a few hundred frames,
where the plain binomial test with p = k/n raised the spurious alarms (benchmarks/bench_drift.py).

Every `interval` good frames the one-sided p-value P(X >= count) is computed. A run of F unchanged frames
holds F / interval tests; with each at level alpha = interval / alarm_per_frames, the expected number of
rejecting tests in alarm_per_frames unchanged frames is at most 1 (Bonferroni: the sum of the levels bounds
the expected number of rejections whatever the overlap between windows), so spurious `recalibrate` alarms are
<= 1 per alarm_per_frames frames by design (default: per test 50 / 100 000 = 5e-4). `warning` uses the same
rule with warning_per_frames (default 5e-3). The state follows the last test (no stickiness): it returns to
ok once a window no longer warns.

Assumptions stated rather than hidden: frames are independent given the line's state (the same part filmed
twice counts twice); the level is averaged over calibrations (one calibration's frames are one draw).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Deque, Dict, Mapping, NamedTuple, Optional

DRIFT_OFF = "off"  # the thresholds file holds no drift reference (written before drift monitoring), or disabled
DRIFT_COLLECTING = "collecting"  # fewer than `window` good frames since start or since the thresholds changed
DRIFT_OK = "ok"
DRIFT_WARNING = "warning"  # good parts score higher than at calibration: watch the line
DRIFT_RECALIBRATE = "recalibrate"  # they clearly do: recalibrate (or teach / retrain), the false-alarm rate is off
DRIFT_STATES = (DRIFT_OFF, DRIFT_COLLECTING, DRIFT_OK, DRIFT_WARNING, DRIFT_RECALIBRATE)


@dataclass(frozen=True)
class DriftReference:
    """What calibration saw: `share_above` of its `n_frames` good frames (those at or below the image
    threshold) scored above `score`, the `level` quantile of them."""

    level: float
    score: float
    above: int
    n_frames: int

    @property
    def p0(self) -> float:
        """The expected share above score, (k+1)/(n+2): the mean of Beta(k+1, n-k+1)."""
        return (self.above + 1) / (self.n_frames + 2)

    def p_value(self, count: int, window: int) -> float:
        """P(X >= count) for the window's count under the calibration's predictive distribution."""
        return beta_binomial_upper_tail(count, window, self.above + 1, self.n_frames - self.above + 1)


def reference_from_dict(data: Mapping[str, Any]) -> DriftReference:
    """thresholds.yaml `drift_reference` -> DriftReference; ValueError naming the key when wrong."""
    try:
        level, score = float(data["level"]), float(data["score"])
        above, n = data["above"], data["n_frames"]
    except KeyError as exc:
        raise ValueError(f"missing key {exc.args[0]!r}") from None
    except (TypeError, ValueError):
        raise ValueError("`level` and `score` must be numbers") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (above, n)):
        raise ValueError(f"`above` and `n_frames` must be integers, got {above!r} and {n!r}")
    if not (0.0 < level < 1.0) or not math.isfinite(score):
        raise ValueError(f"`level` must be in (0, 1) and `score` finite, got {level!r} and {score!r}")
    if not (0 <= above <= n) or n < 1:
        raise ValueError(f"expected 0 <= above <= n_frames and n_frames >= 1, got above {above} of {n}")
    return DriftReference(level=level, score=score, above=int(above), n_frames=int(n))


def binomial_upper_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed in log space (exact; n up to a few 10 000 is cheap)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
            for i in range(k, n + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * math.fsum(math.exp(v - top) for v in logs))


def beta_binomial_upper_tail(k: int, n: int, a: float, b: float) -> float:
    """P(X >= k) for X ~ BetaBinomial(n, a, b), summed in log space (exact)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    log_norm = _log_beta(a, b)
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + _log_beta(i + a, n - i + b) - log_norm
            for i in range(k, n + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * math.fsum(math.exp(v - top) for v in logs))


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def per_test_level(interval: int, per_frames: int) -> float:
    """Bonferroni: per_frames / interval tests in per_frames frames, each at this level, expect <= 1 rejection."""
    return interval / per_frames


def classify(p_value: float, alarm_level: float, warning_level: float) -> str:
    if p_value <= alarm_level:
        return DRIFT_RECALIBRATE
    if p_value <= warning_level:
        return DRIFT_WARNING
    return DRIFT_OK


class DriftFigures(NamedTuple):
    """One evaluation, as published."""

    state: str
    window: int  # good frames in the window
    above: int  # of them above the reference score
    share_above: Optional[float]
    expected_share: Optional[float]  # p0
    p_value: Optional[float]
    alarm_level: float
    warning_level: float
    reference_score: Optional[float]
    reference_level: Optional[float]
    frames_seen: int  # good frames offered since the reference was set

    def to_dict(self) -> Dict[str, Any]:
        return self._asdict()


class DriftMonitor:
    """The window and its test; fed one good frame's score at a time (scoring loop only, no locking)."""

    def __init__(self, window: int, interval: int, alarm_per_frames: int, warning_per_frames: int,
                 reference: Optional[DriftReference]) -> None:
        if not (1 <= interval <= window) or not (interval <= warning_per_frames <= alarm_per_frames):
            raise ValueError("expected 1 <= interval <= window and interval <= warning_per_frames <= alarm_per_frames")
        self.window = window
        self.interval = interval
        self.alarm_level = per_test_level(interval, alarm_per_frames)
        self.warning_level = per_test_level(interval, warning_per_frames)
        self._above: Deque[bool] = deque(maxlen=window)
        self._count = 0
        self.reference = reference
        self.frames_seen = 0
        self.tests = 0
        self.state = DRIFT_OFF if reference is None else DRIFT_COLLECTING
        self.p_value: Optional[float] = None

    def reset(self, reference: Optional[DriftReference]) -> None:
        """New thresholds: a new reference, an empty window."""
        self._above.clear()
        self._count = 0
        self.reference = reference
        self.frames_seen = 0
        self.state = DRIFT_OFF if reference is None else DRIFT_COLLECTING
        self.p_value = None

    def add(self, score: float) -> bool:
        """Offer one good frame's score; True when the state changed (evaluated every `interval` frames)."""
        if self.reference is None:
            return False
        above = score > self.reference.score
        if len(self._above) == self.window and self._above[0]:
            self._count -= 1
        self._above.append(above)
        self._count += int(above)
        self.frames_seen += 1
        if len(self._above) < self.window or self.frames_seen % self.interval:
            return False
        self.tests += 1
        self.p_value = self.reference.p_value(self._count, self.window)
        old, self.state = self.state, classify(self.p_value, self.alarm_level, self.warning_level)
        return old != self.state

    def figures(self) -> DriftFigures:
        ref = self.reference
        n = len(self._above)
        return DriftFigures(
            state=self.state, window=n, above=self._count, share_above=(self._count / n) if n else None,
            expected_share=None if ref is None else ref.p0, p_value=self.p_value, alarm_level=self.alarm_level,
            warning_level=self.warning_level, reference_score=None if ref is None else ref.score,
            reference_level=None if ref is None else ref.level, frames_seen=self.frames_seen,
        )
