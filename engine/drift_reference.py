"""thresholds.yaml `drift_reference`: the calibration's good-frame score distribution, for the agent's drift alarm.

Written by `daad-calibrate fit` (calibration.stats.drift_reference), read by the agent (agent/drift.py); validated
here, beside thresholds.yaml's other fields, so that a bad file is refused on load with one line.

    drift_reference:
      n_frames: 297            # calibration frames at or below the image threshold (the good ones)
      false_alarm_rate: 0.01   # the rate the image threshold was set for
      quantiles: [...]         # their scores at the levels (i - 0.5) / m, i = 1..m (m = len(quantiles));
                               # the sorted scores themselves when n_frames <= MAX_QUANTILES

The agent may grow a reference with the line's first good frames after calibration (`pool`): the same format,
n_frames counting both.

Files written before this format hold {level, score, above, n_frames} (one quantile and a count): they still
load; the agent then runs with drift monitoring off and says how to turn it on (LEGACY_KEYS, is_legacy).
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np

KEYS = ("n_frames", "false_alarm_rate", "quantiles")
LEGACY_KEYS = ("level", "score", "above", "n_frames")
MAX_QUANTILES = 1000  # more calibration frames than this are summarised by 1000 quantiles (~20 kB of YAML)
MIN_FRAMES = 2


def is_legacy(value: Mapping[str, Any]) -> bool:
    """The format written before the CUSUM drift alarm (a median and a count)."""
    return "quantiles" not in value and all(k in value for k in LEGACY_KEYS)


def levels(m: int) -> List[float]:
    """The probability level of each stored quantile: (i - 0.5) / m, the Hazen plotting positions."""
    return [(i + 0.5) / m for i in range(m)]


def parse_drift_reference(value: Any) -> Dict[str, Any]:
    """A `drift_reference` mapping in the current format, checked; ValueError naming the key and the problem."""
    if not isinstance(value, dict):
        raise ValueError(f"must be a mapping with {', '.join(KEYS)}, got {value!r}")
    missing = [k for k in KEYS if k not in value]
    if missing:
        raise ValueError(f"must be a mapping with {', '.join(KEYS)}, missing {', '.join(missing)}")
    n, rate, quantiles = value["n_frames"], value["false_alarm_rate"], value["quantiles"]
    if isinstance(n, bool) or not isinstance(n, int) or n < MIN_FRAMES:
        raise ValueError(f"key `n_frames` must be an integer >= {MIN_FRAMES}, got {n!r}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (0.0 < rate < 0.5):
        raise ValueError(f"key `false_alarm_rate` must be a number in (0, 0.5), got {rate!r}")
    if not isinstance(quantiles, list) or not (MIN_FRAMES <= len(quantiles) <= min(n, MAX_QUANTILES)):
        raise ValueError(f"key `quantiles` must be a list of {MIN_FRAMES} to min(n_frames, {MAX_QUANTILES}) numbers, "
                         f"got {_describe(quantiles)}")
    try:
        q = [float(v) for v in quantiles]
    except (TypeError, ValueError):
        raise ValueError("key `quantiles` must hold numbers only") from None
    if not all(math.isfinite(v) for v in q) or any(b < a for a, b in zip(q, q[1:])):
        raise ValueError("key `quantiles` must be finite and sorted ascending")
    return {"n_frames": int(n), "false_alarm_rate": float(rate), "quantiles": q}


def pool(quantiles: Sequence[float], n_frames: int, scores: Sequence[float]) -> Tuple[int, List[float]]:
    """A reference of n_frames frames (its `quantiles`) pooled with more frames of the same population (`scores`):
    n_frames + len(scores) frames, as their sorted scores when every stored quantile is a frame and the pool holds
    at most MAX_QUANTILES, else MAX_QUANTILES Hazen quantiles of the pooled empirical distribution. A stored
    quantile stands for n_frames / m frames; each value sits at (cumulative weight - its weight / 2) / total, the
    Hazen position that the calibration's own quantiles use (calibration.stats.drift_reference)."""
    q = np.asarray(quantiles, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if q.size < 1 or n_frames < q.size or not np.all(np.isfinite(s)):
        raise ValueError(f"expected 1 to n_frames quantiles and finite scores, got {q.size} for {n_frames} frames")
    total = n_frames + s.size
    values = np.concatenate([q, s])
    weights = np.concatenate([np.full(q.size, n_frames / q.size), np.ones(s.size)])
    order = np.argsort(values, kind="stable")
    values, weights = values[order], weights[order]
    if q.size == n_frames and total <= MAX_QUANTILES:
        return total, [float(v) for v in values]
    position = (np.cumsum(weights) - 0.5 * weights) / total
    m = min(total, MAX_QUANTILES)
    return total, [float(v) for v in np.interp(np.asarray(levels(m)), position, values)]


def digest(value: Mapping[str, Any]) -> str:
    """sha256 of a `drift_reference` mapping in canonical JSON: what a state derived from it is bound to."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def _describe(value: Any) -> str:
    return f"a list of {len(value)}" if isinstance(value, list) else repr(value)[:80]
