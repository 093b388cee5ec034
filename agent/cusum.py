"""Page's CUSUM on normal scores, and its limits for a stated spurious-alarm rate (pure functions).

The drift alarm (agent/drift.py) turns each good frame's score into a normal score z, N(0, 1) while nothing
changed, and accumulates S = max(0, S + z - k); S > h is an alarm, after which S restarts at 0. The CUSUM is
the optimal detector of a shift of the mean (Page 1954, Moustakides 1986). Its in-control average run length
ARL0 (frames from a restart to a spurious alarm) sets the level: since S restarts after each alarm, alarms are a
renewal process and F unchanged frames hold F / ARL0 spurious alarms on average. h is chosen so that
ARL0 >= alarm_per_frames, i.e. <= 1 spurious alarm per alarm_per_frames unchanged frames.

ARL: Siegmund's approximation for normal increments (closed form, what the agent uses), checked against the
Brook-Evans Markov chain (markov_arl) in tests/test_agent_drift.py: within 1-2 % for the limits used here.

The calibration's uncertainty: the reference is n good frames, not the distribution. Mapped through their
empirical CDF, the unchanged line's z has mean mu ~ N(0, 1/n) and standard deviation sigma ~ N(1, 1/(2n))
(Hoeffding's covariance identity applied to the linearised normal-score transform; measured in
docs/research/drift_alarm.md). A site whose calibration happened to score low sees a permanent upward offset,
which would eat the ARL0 of a CUSUM designed for a known reference. So the limit is set for the spurious-alarm
rate averaged over calibrations, E[1 / ARL(mu, sigma)], integrated over those distributions (spurious_rate),
and k grows by K_CALIBRATION / sqrt(n): a limit h alone would have to grow enormously for small n (the
unlucky calibrations drift up at mu - k per frame). Both rules are measured in benchmarks/bench_drift.py.
"""
from __future__ import annotations

import math
from functools import lru_cache
from statistics import NormalDist
from typing import NamedTuple, Optional

import numpy as np

NORMAL = NormalDist()
SIEGMUND_OVERSHOOT = 1.166  # 2 x 0.583: a normal random walk's expected overshoot over the limit (Siegmund 1985)
# k = K_SHIFT_SHARE x shift + K_CALIBRATION / sqrt(n). Page's k = shift / 2 minimises the mean delay for large
# limits; a smaller k narrows the run length's spread, which a fixed horizon ("within 500 frames") asks for; the
# second term keeps the calibration's offset (sd 1/sqrt(n)) from being accumulated. Both picked on a grid
# (`python benchmarks/bench_drift.py --grid`: among the best for n = 300, 1000, 3000, within the trials' noise).
K_SHIFT_SHARE = 0.375
K_CALIBRATION = 1.25
_MU_GRID = np.linspace(-8.0, 8.0, 321)  # standard-normal nodes for the calibration offset (trapezoid rule)
_SIGMA_GRID = np.linspace(-6.0, 6.0, 41)  # ... and for its spread
_LIMIT_MAX = 10_000.0


class CusumDesign(NamedTuple):
    shift: float  # the mean shift of z to detect (good_frame_shift)
    k: float  # the CUSUM's allowance
    limit: float  # h: S above it is a `recalibrate` alarm
    warning_limit: float  # S (its own copy) above it is a warning
    reference_frames: Optional[int]  # n of the calibration (None: the reference taken as exact)
    delay: float  # ARL at the shift from a restart, for a calibration of typical luck (mu = 0): frames


def good_frame_shift(false_alarm_rate: float, ratio: float) -> float:
    """The mean of a good frame's z once the false-alarm rate went from a to ratio x a, by a shift of the scores'
    normal-score scale (exact for log-normal scores shifted in log, a location model otherwise).

    With x the full distribution's normal score (the image threshold at t = Phi^-1(1 - a)), the shift is
    d = t - Phi^-1(1 - ratio a); the agent sees only frames at or below the threshold, scored against the
    calibration's good frames: z = Phi^-1(Phi(x) / (1 - a)) for x ~ N(d, 1) truncated to x <= t. Its mean, by
    the midpoint rule (0.2596 for a = 1 %, ratio 2, where d = 0.2726).
    """
    a = false_alarm_rate
    if not (0.0 < a < 0.5) or ratio <= 1.0:
        raise ValueError(f"expected 0 < false_alarm_rate < 0.5 and ratio > 1, got {a!r} and {ratio!r}")
    t = NORMAL.inv_cdf(1.0 - a)
    d = t - NORMAL.inv_cdf(1.0 - min(ratio * a, 0.5))
    lo, steps = d - 10.0, 4000
    width = (t - lo) / steps
    total = mass = 0.0
    for i in range(steps):
        x = lo + (i + 0.5) * width
        w = math.exp(-0.5 * (x - d) ** 2)
        u = min(NORMAL.cdf(x) / (1.0 - a), 1.0 - 1e-15)
        total += w * NORMAL.inv_cdf(max(u, 1e-300))
        mass += w
    return total / mass


def _inverse_arl(mean: np.ndarray, sd: np.ndarray, k: float, h: float) -> np.ndarray:
    """1 / ARL by Siegmund's approximation, overflow-safe (the ARL of N(mean, sd^2) increments with k, h is that of
    N(mean/sd, 1) with k/sd, h/sd)."""
    delta = (mean - k) / sd
    b = h / sd + SIEGMUND_OVERSHOOT
    x = 2.0 * delta * b
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        small = np.abs(x) < 1e-6
        d2 = np.where(small, 1.0, 2.0 * delta * delta)
        up = d2 / (np.expm1(-np.minimum(x, 700.0)) + x)  # delta >= 0: (e^-x - 1 + x) / (2 delta^2) is tame
        y = np.maximum(-x, 0.0)
        e = np.exp(-y)
        down = d2 * e / (1.0 - e * (1.0 + y))  # delta < 0: the same, divided through by e^y
        out = np.where(x >= 0.0, up, down)
    return np.where(small, 1.0 / (b * b), out)


def siegmund_arl(mean: float, sd: float, k: float, h: float) -> float:
    """Average run length of the CUSUM max(0, S + X - k) > h from S = 0, X ~ N(mean, sd^2) (Siegmund 1985)."""
    return float(1.0 / _inverse_arl(np.array([mean]), np.array([sd]), k, h)[0])


def spurious_rate(k: float, h: float, reference_frames: Optional[int]) -> float:
    """Spurious alarms per unchanged frame, 1 / ARL0, averaged over calibrations of reference_frames frames
    (mu ~ N(0, 1/n), sigma ~ N(1, 1/(2n)), see the module's docstring); None: the reference is exact."""
    if reference_frames is None:
        return float(_inverse_arl(np.zeros(1), np.ones(1), k, h)[0])
    n = float(reference_frames)
    mu = _MU_GRID[:, None] / math.sqrt(n)
    sd = np.maximum(1.0 + _SIGMA_GRID[None, :] / math.sqrt(2.0 * n), 0.05)
    weights = np.exp(-0.5 * _MU_GRID ** 2)[:, None] * np.exp(-0.5 * _SIGMA_GRID ** 2)[None, :]
    return float(np.sum(weights * _inverse_arl(mu, sd, k, h)) / np.sum(weights))


def limit_for(k: float, per_frames: float, reference_frames: Optional[int]) -> float:
    """The smallest h whose (calibration-averaged) spurious rate is <= 1 / per_frames (bisection; the rate falls
    as h grows)."""
    target = 1.0 / per_frames
    lo, hi = 0.0, _LIMIT_MAX
    if spurious_rate(k, hi, reference_frames) > target:
        raise ValueError(f"no CUSUM limit up to {_LIMIT_MAX:g} reaches 1 spurious alarm per {per_frames:g} frames "
                         f"with k = {k:.3g} and a reference of {reference_frames} frames")
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if spurious_rate(k, mid, reference_frames) > target:
            lo = mid
        else:
            hi = mid
    return hi


def allowance(shift: float, reference_frames: Optional[int]) -> float:
    """k: a share of the shift, plus room for the calibration's offset (see K_SHIFT_SHARE, K_CALIBRATION)."""
    extra = 0.0 if reference_frames is None else K_CALIBRATION / math.sqrt(reference_frames)
    return K_SHIFT_SHARE * shift + extra


@lru_cache(maxsize=64)  # pure; a reload of the same thresholds costs nothing
def design(false_alarm_rate: float, ratio: float, reference_frames: Optional[int], alarm_per_frames: float,
           warning_per_frames: float) -> CusumDesign:
    """k, the alarm and warning limits, and the expected delay, for detecting a false-alarm rate multiplied by
    `ratio` with <= 1 spurious alarm (warning) per alarm_per_frames (warning_per_frames) unchanged frames."""
    shift = good_frame_shift(false_alarm_rate, ratio)
    k = allowance(shift, reference_frames)
    limit = limit_for(k, alarm_per_frames, reference_frames)
    warning = limit_for(k, warning_per_frames, reference_frames)
    return CusumDesign(shift=shift, k=k, limit=limit, warning_limit=warning, reference_frames=reference_frames,
                       delay=siegmund_arl(shift, 1.0, k, limit))


def markov_arl(mean: float, sd: float, k: float, h: float, states: int = 200) -> float:
    """ARL from S = 0 by the Brook-Evans Markov chain (states cells over [0, h], the first one holding S = 0):
    the reference Siegmund's approximation is checked against."""
    w = h / (states - 0.5)
    centers = np.arange(states) * w
    edges = (np.arange(states + 1) - 0.5) * w  # cell j is (edges[j], edges[j+1]]; beyond edges[-1] = h: alarm
    cdf = np.vectorize(lambda v: NORMAL.cdf(v))
    upper = cdf((edges[None, 1:] - centers[:, None] + k - mean) / sd)
    lower = cdf((edges[None, :-1] - centers[:, None] + k - mean) / sd)
    transition = upper - lower
    transition[:, 0] = upper[:, 0]  # everything at or below the first cell's top, S = 0 included
    arl = np.linalg.solve(np.eye(states) - transition, np.ones(states))
    return float(arl[0])
