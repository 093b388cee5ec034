"""The drift alarm's state file: the baseline (the line's first good frames after calibration) or the reference
pooled from it (agent/drift.py), so that a restart neither throws the baseline away nor falls back to the smaller
calibration reference.

One JSON file, written atomically (engine.bundle.atomic_write_text), bound to the thresholds it was grown from:
the bundle's digest and a digest of thresholds.yaml's drift_reference (engine.drift_reference.digest), so that a
rewritten thresholds file with the same calibration keeps it and a new calibration does not. On start a state for
other thresholds is ignored (and replaced at the next save); a corrupt one is logged once and ignored. A state
folder that cannot be written (disk full, read-only) does not stop the agent: said once, the baseline goes on in
memory, and the next save that succeeds says so.

    {"version": 1, "bundle_sha256": "...", "drift_reference_sha256": "...", "written": "2026-...Z",
     "baseline": [scores...],            # while collecting; [] once pooled
     "pooled": null | {n_frames, false_alarm_rate, quantiles}}
"""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional

from engine import drift_reference as fmt
from engine.bundle import atomic_write_text

from .drift import SOURCE_POOLED, DriftMonitor, DriftReference, reference_from_dict, reference_to_dict

logger = logging.getLogger(__name__)

STATE_VERSION = 1
SAVE_EVERY = 250  # baseline frames between saves of a partial baseline (~5 kB of JSON each; a restart loses fewer)


class Binding(NamedTuple):
    """What a state belongs to: the bundle and the calibration's drift_reference."""

    bundle_sha256: str
    drift_reference_sha256: str


def binding_of(bundle_sha256: str, drift_reference: Mapping[str, Any]) -> Binding:
    return Binding(bundle_sha256, fmt.digest(drift_reference))


class Saved(NamedTuple):
    """What a state file gives back for its binding: a pooled reference, or a partial baseline (maybe empty)."""

    pooled: Optional[DriftReference]
    baseline: List[float]


EMPTY = Saved(None, [])


def state_to_dict(binding: Binding, monitor: DriftMonitor, now: datetime) -> Dict[str, Any]:
    pooled = monitor.reference if monitor.source == SOURCE_POOLED else None
    return {"version": STATE_VERSION, "bundle_sha256": binding.bundle_sha256,
            "drift_reference_sha256": binding.drift_reference_sha256,
            "written": now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "baseline": [] if pooled is not None else list(monitor.baseline),
            "pooled": None if pooled is None else reference_to_dict(pooled)}


def state_from_dict(data: Any, binding: Binding) -> Optional[Saved]:
    """The state if it is for `binding`; None for another; ValueError naming what is wrong with a corrupt one."""
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        raise ValueError(f"expected a mapping with version {STATE_VERSION}")
    if (data.get("bundle_sha256"), data.get("drift_reference_sha256")) != tuple(binding):
        return None
    baseline = data.get("baseline")
    if not isinstance(baseline, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")
            for v in baseline):
        raise ValueError("key `baseline` must be a list of finite numbers")
    pooled = data.get("pooled")
    try:
        ref = None if pooled is None else reference_from_dict(pooled)
    except ValueError as exc:
        raise ValueError(f"key `pooled`: {exc}") from None
    return Saved(ref, [float(v) for v in baseline])


class DriftStateFile:
    """Load once per thresholds, save on progress; every OS problem said once, never raised."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.binding: Optional[Binding] = None
        self._saved_len = 0  # baseline length at the last save
        self._saved_source: Optional[str] = None
        self._write_failed = False
        self.saves = 0
        self.save_failures = 0

    def load(self, binding: Binding) -> Saved:
        """The state kept for these thresholds, or EMPTY (missing, for other thresholds, or corrupt: said)."""
        self.binding = binding
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return EMPTY
        except (OSError, UnicodeDecodeError) as exc:
            logger.warning("drift: state file %s cannot be read (%s): ignored, the baseline starts again", self.path, exc)
            return EMPTY
        try:
            saved = state_from_dict(json.loads(text), binding)
        except ValueError as exc:  # json.JSONDecodeError is one
            logger.warning("drift: state file %s is corrupt (%s): ignored, the baseline starts again and the file is "
                           "replaced", self.path, str(exc).splitlines()[0][:200])
            return EMPTY
        if saved is None:
            logger.info("drift: state file %s is for other thresholds: ignored (replaced at the next save)", self.path)
            return EMPTY
        return saved

    def resumed(self, monitor: DriftMonitor) -> None:
        """The monitor now holds what was loaded: nothing to save until it progresses."""
        self._saved_len = len(monitor.baseline)
        self._saved_source = monitor.source

    def after_add(self, monitor: DriftMonitor, now: Callable[[], datetime]) -> bool:
        """After each good frame: save on the switch to the pool, a restarted baseline, or every SAVE_EVERY
        frames of it; True on the switch. O(1) when there is nothing to save."""
        switched = monitor.source == SOURCE_POOLED and self._saved_source != SOURCE_POOLED
        n = len(monitor.baseline)
        if switched or n < self._saved_len or n - self._saved_len >= SAVE_EVERY:
            self.save(monitor, now)
        return switched

    def save(self, monitor: DriftMonitor, now: Callable[[], datetime]) -> bool:
        if self.binding is None or monitor.calibration is None:
            return False
        self._saved_len = len(monitor.baseline)
        self._saved_source = monitor.source
        try:
            atomic_write_text(self.path, json.dumps(state_to_dict(self.binding, monitor, now())))
        except OSError as exc:
            self.save_failures += 1
            if not self._write_failed:
                self._write_failed = True
                logger.warning("drift: cannot write the state file %s (%s): the baseline goes on in memory and is lost "
                               "at a restart; free the disk or set drift.state_file to a writable place (said once)",
                               self.path, exc.strerror or exc)
            return False
        if self._write_failed:
            self._write_failed = False
            logger.info("drift: the state file %s is written again", self.path)
        self.saves += 1
        return True
