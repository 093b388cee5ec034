"""Drift alarm: do the line's good parts still score like the calibration's good parts?

The reference (thresholds.yaml `drift_reference`, engine/drift_reference.py) is the calibration's good frames'
score distribution (those at or below the image threshold): n_frames of them, as quantiles. The agent maps each
frame it judged good to its calibration percentile u (the interpolated empirical CDF, clamped to
[1/(2n), 1 - 1/(2n)]) and to the normal score z = Phi^-1(u): N(0, 1) while nothing changed, whatever the scores'
distribution. A one-sided CUSUM (agent/cusum.py) accumulates S = max(0, S + z - k) on every good frame, O(1).

Sensitivity: `detect_false_alarm_ratio` (default 2): detect a drift that multiplies the calibrated false-alarm
rate a by it; that is a shift of z's mean (cusum.good_frame_shift: 0.26 for a = 1 %). Level by design: the
limit h makes the in-control average run length ARL0 >= alarm_per_frames, averaged over calibrations of the
reference's n frames (cusum.spurious_rate); S restarts after each alarm, so a run of F unchanged frames holds
F / ARL0 <= F / alarm_per_frames spurious alarms on average: <= 1 per 100 000 frames by default. `warning` is a
second copy of S with its own limit (warning_per_frames, default 1 per 10 000) and its own restarts.

States follow the data: `recalibrate` while the alarm's CUSUM crossed its limit within the last `window` good
frames, else `warning` while the warning's did, else `collecting` until `window` good frames were seen since the
reference was set, else `ok`. A drift that persists keeps crossing (one crossing per ~200 frames at the detected
shift), so the state holds; once `window` frames pass without a crossing it returns to warning or ok. An alarm
never waits for `collecting` to end.

Measured (benchmarks/bench_drift.py, docs/research/drift_alarm.md): with a = 1 % and the defaults, a doubling is
caught within 500 frames after 99.5 % of shifts with the reference known, 97 % with calibrations of 3000 good
frames, 91 % with 1000, 62 % with 300 (the calibration's own noise has to be covered), which `daad-calibrate fit`
says. With the baseline extension (below) a 300-frame calibration grown by 3000 line frames reaches 97.0 % after
the switch (1000: 97.9 %), at 1.06 [0.87, 1.28] / 0.73 spurious crossings per 100 000 frames.

Baseline extension (drift.baseline_frames, default 3000; 0: off): a small calibration is the alarm's weak point
(its offset, sd 1/sqrt(n), has to be covered by a wider k). So after thresholds load, the monitor keeps the scores
of its first baseline_frames good frames while the CUSUM runs on the calibration's reference; then the reference
becomes the pool of both (engine.drift_reference.pool, n_cal + baseline_frames frames) and the CUSUMs restart with
k and h designed for the pooled n. The assumption is calibration's own: the line right after calibration is in
control. A drift during the baseline is still watched by the calibration's CUSUM, and a drifting line must not
become the reference: an alarm crossing during the baseline discards it and collecting starts again, and so does a
baseline that completes while the state is warning or recalibrate (restarting rather than keeping the calibration
reference for good: a spurious warning, 1 per warning_per_frames, must not cost the extension; a real drift keeps
restarting it until the line is recalibrated). The baseline and the pooled reference survive restarts
(agent/drift_state.py).

Assumptions stated rather than hidden: frames are independent given the line's state (the same part filmed
twice counts twice); scores are continuous (ties get the mid-rank); the level is averaged over calibrations (one
calibration's frames are one draw: an unlucky small one alarms more often, a lucky one less).
"""
from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections import deque
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Deque, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from engine import drift_reference as fmt

from .cusum import CusumDesign, design

DRIFT_OFF = "off"  # no usable drift reference in thresholds.yaml (see `reason`), or drift.enabled is false
DRIFT_COLLECTING = "collecting"  # fewer than `window` good frames since start or since the thresholds changed
DRIFT_OK = "ok"
DRIFT_WARNING = "warning"  # good parts score higher than at calibration: watch the line
DRIFT_RECALIBRATE = "recalibrate"  # they clearly do: recalibrate (or teach / retrain), the false-alarm rate is off
DRIFT_STATES = (DRIFT_OFF, DRIFT_COLLECTING, DRIFT_OK, DRIFT_WARNING, DRIFT_RECALIBRATE)

SOURCE_CALIBRATION = "calibration"  # the reference is thresholds.yaml's drift_reference
SOURCE_POOLED = "calibration+line"  # ... pooled with the line's first good frames after it (the baseline)
REFERENCE_SOURCES = (SOURCE_CALIBRATION, SOURCE_POOLED)
MIN_REFERENCE_FRAMES = 100  # below this the calibration's noise is too coarse to model (and the alarm too slow)
ADVISED_REFERENCE_FRAMES = 3000  # what the target (a doubling caught within 500 frames, 97 %) needs, measured
ENABLE_FIX = "recalibrate with `daad-calibrate fit` to enable the drift alarm"
_NORMAL = NormalDist()


@dataclass(frozen=True)
class DriftReference:
    """The calibration's good frames: n_frames of them, their scores at levels (i + 0.5) / m (`quantiles`),
    and the false-alarm rate their image threshold was set for."""

    n_frames: int
    false_alarm_rate: float
    quantiles: Tuple[float, ...]

    def percentile(self, score: float) -> float:
        """u: the interpolated empirical CDF at score, mid-rank at ties, clamped to [1/(2n), 1 - 1/(2n)]."""
        q, m = self.quantiles, len(self.quantiles)
        lo, hi = bisect_left(q, score), bisect_right(q, score)
        if lo < hi:  # equal to stored values: the middle of their levels
            u = (lo + hi) / (2.0 * m)
        elif lo == 0:
            u = 0.5 / m
        elif lo == m:
            u = 1.0 - 0.5 / m
        else:
            left, right = q[lo - 1], q[lo]
            u = (lo - 0.5 + (score - left) / (right - left)) / m
        edge = 0.5 / self.n_frames
        return min(max(u, edge), 1.0 - edge)

    def z(self, score: float) -> float:
        """The normal score of a good frame: N(0, 1) while the line is as at calibration."""
        return _NORMAL.inv_cdf(self.percentile(score))


def reference_from_dict(data: Mapping[str, Any]) -> DriftReference:
    """thresholds.yaml `drift_reference` (current format) -> DriftReference; ValueError naming the key."""
    checked = fmt.parse_drift_reference(dict(data))
    return DriftReference(n_frames=checked["n_frames"], false_alarm_rate=checked["false_alarm_rate"],
                          quantiles=tuple(checked["quantiles"]))


def pooled_reference(calibration: DriftReference, scores: Sequence[float]) -> DriftReference:
    """The calibration's reference pooled with the line's baseline scores (same false-alarm rate)."""
    n, quantiles = fmt.pool(calibration.quantiles, calibration.n_frames, scores)
    return DriftReference(n_frames=n, false_alarm_rate=calibration.false_alarm_rate, quantiles=tuple(quantiles))


def reference_to_dict(reference: DriftReference) -> Dict[str, Any]:
    """The thresholds.yaml `drift_reference` format (also the state file's pooled reference)."""
    return {"n_frames": reference.n_frames, "false_alarm_rate": reference.false_alarm_rate,
            "quantiles": list(reference.quantiles)}


def reference_or_reason(data: Optional[Mapping[str, Any]]) -> Tuple[Optional[DriftReference], Optional[str]]:
    """The reference of a thresholds file, or None and the one-line reason drift monitoring is off."""
    if data is None:
        return None, f"the thresholds file has no field `drift_reference` (written before drift monitoring); {ENABLE_FIX}"
    if fmt.is_legacy(data):
        return None, (f"the thresholds file's `drift_reference` is in the format before the CUSUM drift alarm "
                      f"(level, score, above); {ENABLE_FIX}")
    try:
        ref = reference_from_dict(data)
    except ValueError as exc:
        return None, f"the thresholds file's `drift_reference` {exc}; {ENABLE_FIX}"
    if ref.n_frames < MIN_REFERENCE_FRAMES:
        return None, (f"the calibration holds {ref.n_frames} good frames, the drift alarm needs at least "
                      f"{MIN_REFERENCE_FRAMES} ({ADVISED_REFERENCE_FRAMES} for its target): capture more good frames "
                      "and recalibrate with `daad-calibrate fit`")
    return ref, None


class DriftFigures(NamedTuple):
    """One evaluation, as published (status.drift, the drift topic)."""

    state: str
    reason: Optional[str]  # why the state is off; None otherwise
    frames_seen: int  # good frames offered since the reference was set
    alarms: int  # crossings of the alarm limit since then (each restarts its CUSUM)
    warnings: int  # crossings of the warning limit
    window: int  # good frames in the window mean_z is taken over
    mean_z: Optional[float]  # their mean normal score: ~0 as at calibration, the shift once drifted
    cusum: Optional[float]  # S of the alarm
    limit: Optional[float]  # h: S above it is `recalibrate`
    warning_cusum: Optional[float]  # S of the warning (restarts at its own crossings)
    warning_limit: Optional[float]
    k: Optional[float]  # allowance subtracted from each z
    shift: Optional[float]  # mean z the alarm is designed to detect
    expected_delay: Optional[float]  # frames to detect that shift, from a restart, for a typical calibration
    detect_false_alarm_ratio: float
    alarm_per_frames: int
    warning_per_frames: int
    reference_frames: Optional[int]  # good frames of the reference in use (calibration, + baseline once pooled)
    reference_false_alarm_rate: Optional[float]
    reference_source: Optional[str] = None  # SOURCE_CALIBRATION or SOURCE_POOLED; None while off
    calibration_frames: Optional[int] = None  # the calibration's good frames (thresholds.yaml)
    baseline_collected: Optional[int] = None  # line frames kept towards the pool; None when off or pooled
    baseline_target: Optional[int] = None  # drift.baseline_frames (0: no extension)
    baseline_restarts: int = 0  # baselines discarded (the line alarmed while collecting) since the reference was set

    def to_dict(self) -> Dict[str, Any]:
        return self._asdict()


class DriftMonitor:
    """Two CUSUMs over the good frames' normal scores; fed one score at a time (scoring loop only, no locking)."""

    def __init__(self, window: int, alarm_per_frames: int, warning_per_frames: int,
                 reference: Optional[DriftReference], detect_false_alarm_ratio: float = 2.0,
                 reason: Optional[str] = None, baseline_frames: int = 0) -> None:
        if baseline_frames < 0:
            raise ValueError("expected baseline_frames >= 0")
        if window < 1 or not (1 <= warning_per_frames <= alarm_per_frames) or detect_false_alarm_ratio <= 1.0:
            raise ValueError("expected window >= 1, 1 <= warning_per_frames <= alarm_per_frames and "
                             "detect_false_alarm_ratio > 1")
        self.window = window
        self.alarm_per_frames = alarm_per_frames
        self.warning_per_frames = warning_per_frames
        self.ratio = detect_false_alarm_ratio
        self.baseline_frames = baseline_frames
        self._z: Deque[float] = deque(maxlen=window)
        self.reset(reference, reason)

    def reset(self, reference: Optional[DriftReference], reason: Optional[str] = None, *,
              pooled: Optional[DriftReference] = None, baseline: Sequence[float] = ()) -> None:
        """New thresholds: a new reference (its design), empty statistics. `pooled` (a reference pooled earlier
        for this calibration) or `baseline` (a partial baseline) resume what a state file kept."""
        self.calibration = reference
        self.reason = None if reference is not None else (reason or "drift monitoring is off")
        self.baseline: List[float] = []
        self.baseline_restarts = 0
        self.source: Optional[str] = None if reference is None else SOURCE_CALIBRATION
        if reference is not None and pooled is not None:
            self._use(pooled)
            self.source = SOURCE_POOLED
        else:
            self._use(reference)
            if reference is not None and self.baseline_frames:
                self.baseline = [float(v) for v in baseline][: self.baseline_frames]
        self._z.clear()
        self._sum = 0.0
        self.cusum = 0.0
        self.warning_cusum = 0.0
        self.frames_seen = 0
        self.alarms = 0  # crossings of the alarm limit since the reference was set
        self.warnings = 0
        self._last_alarm: Optional[int] = None  # frames_seen at the last crossing
        self._last_warning: Optional[int] = None
        self.state = DRIFT_OFF if reference is None else DRIFT_COLLECTING

    def _use(self, reference: Optional[DriftReference]) -> None:
        self.reference = reference
        self.design: Optional[CusumDesign] = None
        if reference is not None:
            self.design = design(reference.false_alarm_rate, self.ratio, reference.n_frames,
                                 self.alarm_per_frames, self.warning_per_frames)

    @property
    def collecting_baseline(self) -> bool:
        return self.source == SOURCE_CALIBRATION and self.baseline_frames > 0

    def add(self, score: float) -> bool:
        """Offer one good frame's score; True when the state changed (see `source` for the switch to the pool)."""
        if self.reference is None or self.design is None:
            return False
        z = self.reference.z(score)
        if len(self._z) == self.window:
            self._sum -= self._z[0]
        self._z.append(z)
        self._sum += z
        self.frames_seen += 1
        if self.frames_seen % self.window == 0:
            self._sum = math.fsum(self._z)  # no rounding creep over millions of frames
        d = self.design
        self.cusum = max(0.0, self.cusum + z - d.k)
        self.warning_cusum = max(0.0, self.warning_cusum + z - d.k)
        alarm = self.cusum > d.limit
        if alarm:
            self.cusum = 0.0
            self.alarms += 1
            self._last_alarm = self.frames_seen
        if self.warning_cusum > d.warning_limit:
            self.warning_cusum = 0.0
            self.warnings += 1
            self._last_warning = self.frames_seen
        old, self.state = self.state, self._state()
        if self.collecting_baseline:
            self._grow_baseline(score, alarm)
        return old != self.state

    def _grow_baseline(self, score: float, alarm: bool) -> None:
        """Keep the frame for the pool; discard the baseline on an alarm crossing, or if it completes while the
        state is warning or recalibrate (a drifting line must not become the reference); pool when complete."""
        if alarm:
            self._restart_baseline()
            return
        self.baseline.append(score)
        if len(self.baseline) < self.baseline_frames:
            return
        if self.state in (DRIFT_WARNING, DRIFT_RECALIBRATE):
            self._restart_baseline()
            return
        self.switch_to_pool()

    def _restart_baseline(self) -> None:
        self.baseline = []
        self.baseline_restarts += 1

    def switch_to_pool(self) -> None:
        """The baseline is complete: the reference becomes calibration + baseline, the CUSUMs restart with k and h
        designed for the pooled n; the window's normal scores are recomputed against it."""
        pooled = pooled_reference(self.calibration, self.baseline)
        recent = self.baseline[-self.window:]
        self._use(pooled)
        self.source = SOURCE_POOLED
        self.baseline = []
        self.cusum = 0.0
        self.warning_cusum = 0.0
        self._z.clear()
        self._z.extend(pooled.z(s) for s in recent)
        self._sum = math.fsum(self._z)

    def _state(self) -> str:
        if self._last_alarm is not None and self.frames_seen - self._last_alarm < self.window:
            return DRIFT_RECALIBRATE
        if self._last_warning is not None and self.frames_seen - self._last_warning < self.window:
            return DRIFT_WARNING
        return DRIFT_COLLECTING if self.frames_seen < self.window else DRIFT_OK

    @property
    def mean_z(self) -> Optional[float]:
        return self._sum / len(self._z) if self._z else None

    def figures(self) -> DriftFigures:
        ref, d = self.reference, self.design
        on = d is not None
        return DriftFigures(
            state=self.state, reason=self.reason, frames_seen=self.frames_seen, alarms=self.alarms,
            warnings=self.warnings, window=len(self._z),
            mean_z=self.mean_z, cusum=self.cusum if on else None, limit=d.limit if on else None,
            warning_cusum=self.warning_cusum if on else None, warning_limit=d.warning_limit if on else None,
            k=d.k if on else None, shift=d.shift if on else None, expected_delay=d.delay if on else None,
            detect_false_alarm_ratio=self.ratio, alarm_per_frames=self.alarm_per_frames,
            warning_per_frames=self.warning_per_frames,
            reference_frames=None if ref is None else ref.n_frames,
            reference_false_alarm_rate=None if ref is None else ref.false_alarm_rate,
            reference_source=self.source,
            calibration_frames=None if self.calibration is None else self.calibration.n_frames,
            baseline_collected=len(self.baseline) if self.collecting_baseline else None,
            baseline_target=self.baseline_frames, baseline_restarts=self.baseline_restarts,
        )
