"""thresholds.yaml: what calibration writes and the agent reads (design contract §4); its one owner, in engine/ with the
other formats that travel to the Jetson (the bundle), so that neither calibration/ nor agent/ imports the other for it.

Coordinates and areas refer to the anomaly map, i.e. the model's input resolution
(bundle.preprocess height x width); the agent maps regions back to the frame itself.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Optional, Union

import yaml

from engine.bundle import Bundle, atomic_write_text, read_yaml
from engine.errors import ThresholdsError

logger = logging.getLogger(__name__)

THRESHOLDS_FORMAT_VERSION = 1
STRATEGIES = ("quantile", "gpd", "best_f1", "manual")


@dataclass(frozen=True)
class Thresholds:
    image_threshold: float  # a frame is defective when its image score is above this
    pixel_threshold: float  # anomaly-map pixels above this form defect regions
    min_defect_area: int  # regions smaller than this (in anomaly-map pixels) are ignored
    bundle_sha256: str  # the bundle these were calibrated for (its manifest digest, Bundle.sha256); others are refused
    strategy: str = "quantile"
    target_false_alarm_rate: Optional[float] = None
    n_frames: int = 0
    score_quantiles: Dict[str, float] = field(default_factory=dict)
    bundle_name: str = ""
    created: str = ""
    provenance: Dict[str, Any] = field(default_factory=dict)  # anything else worth keeping (F1, miss rate, ...)
    # The agent's drift alarm compares its good frames with this: {level, score, above, n_frames} (the `level`
    # quantile `score` of the n_frames calibration frames at or below image_threshold, `above` of them above it).
    # None in files written before drift monitoring: they load, with drift monitoring off.
    drift_reference: Optional[Dict[str, Any]] = None

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d = {"format_version": THRESHOLDS_FORMAT_VERSION, **d}
        if d["drift_reference"] is None:
            del d["drift_reference"]
        if not d["created"]:
            d["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return d


def _field(data: Dict[str, Any], key: str, path: Path, kind: type) -> Any:
    if key not in data:
        raise ThresholdsError(f"{path}: missing field `{key}`; regenerate the file with `daad-calibrate fit`")
    value = data[key]
    try:
        if kind is float:
            out = float(value)
            if not math.isfinite(out):
                raise ValueError
            return out
        if kind is int:
            if isinstance(value, bool) or int(value) != value:
                raise ValueError
            return int(value)
        return str(value)
    except (TypeError, ValueError):
        raise ThresholdsError(f"{path}: field `{key}` must be a finite {kind.__name__}, got {value!r}") from None


def parse_thresholds(data: Any, path: Union[str, Path] = "<thresholds>") -> Thresholds:
    path = Path(path)
    if not isinstance(data, dict):
        raise ThresholdsError(f"{path}: expected a mapping of threshold fields; regenerate it with `daad-calibrate fit`")
    version = data.get("format_version")
    if version != THRESHOLDS_FORMAT_VERSION:
        raise ThresholdsError(
            f"{path}: field `format_version` is {version!r}, expected {THRESHOLDS_FORMAT_VERSION}; regenerate it with `daad-calibrate fit`"
        )
    strategy = str(data.get("strategy", "quantile"))
    if strategy not in STRATEGIES:
        raise ThresholdsError(f"{path}: field `strategy` is {strategy!r}, expected one of {STRATEGIES}")
    min_area = _field(data, "min_defect_area", path, int)
    if min_area < 1:
        raise ThresholdsError(f"{path}: field `min_defect_area` must be at least 1 pixel, got {min_area}")
    target = data.get("target_false_alarm_rate")
    if target is not None and not (0.0 < float(target) < 1.0):
        raise ThresholdsError(f"{path}: field `target_false_alarm_rate` must be in (0, 1), got {target!r}")
    return Thresholds(
        image_threshold=_field(data, "image_threshold", path, float),
        pixel_threshold=_field(data, "pixel_threshold", path, float),
        min_defect_area=min_area,
        bundle_sha256=_field(data, "bundle_sha256", path, str),
        strategy=strategy,
        target_false_alarm_rate=None if target is None else float(target),
        n_frames=int(data.get("n_frames", 0)),
        score_quantiles={str(k): float(v) for k, v in (data.get("score_quantiles") or {}).items()},
        bundle_name=str(data.get("bundle_name", "")),
        created=str(data.get("created", "")),
        provenance=dict(data.get("provenance") or {}),
        drift_reference=_drift_reference(data.get("drift_reference"), path),
    )


DRIFT_KEYS = ("n_frames", "false_alarm_rate", "quantiles")  # engine.drift_reference.KEYS; the older format: LEGACY_KEYS


def _drift_reference(value: Any, path: Path) -> Optional[Dict[str, Any]]:
    from engine import drift_reference as drift_ref  # its format, validated in its own module

    if value is None:
        return None
    fix = "regenerate it with `daad-calibrate fit`, or delete the field to run without drift monitoring"
    if isinstance(value, dict) and drift_ref.is_legacy(value):  # loads; the agent runs with the drift alarm off
        level, score = _field(value, "level", path, float), _field(value, "score", path, float)
        above, n = _field(value, "above", path, int), _field(value, "n_frames", path, int)
        if not (0.0 < level < 1.0) or not (0 <= above <= n) or n < 1:
            raise ThresholdsError(f"{path}: field `drift_reference` expects 0 < level < 1 and 0 <= above <= n_frames, "
                                  f"got level {level}, above {above} of {n}; {fix}")
        return {"level": level, "score": score, "above": above, "n_frames": n}
    try:
        return drift_ref.parse_drift_reference(value)
    except ValueError as exc:
        raise ThresholdsError(f"{path}: field `drift_reference` {exc}; {fix}") from None


def load_thresholds(path: Union[str, Path], bundle: Optional[Bundle] = None) -> Thresholds:
    """Read and validate thresholds.yaml; refuse one made for another bundle."""
    path = Path(path)
    if not path.is_file():
        raise ThresholdsError(f"{path}: thresholds file not found; create it with `daad-calibrate fit`")
    data = read_yaml(path, ThresholdsError, "regenerate it with `daad-calibrate fit`")
    thresholds = parse_thresholds(data, path)
    if bundle is not None:
        check_binding(thresholds, bundle, path)
    return thresholds


def check_binding(thresholds: Thresholds, bundle: Bundle, path: Union[str, Path] = "<thresholds>") -> None:
    """Refuse thresholds made for another bundle. Thresholds written before bundle manifests name the graph's
    hash: still accepted for a bundle with that graph, with a warning to recalibrate (they cannot vouch for
    bundle.yaml's preprocessing)."""
    binding = bundle.binding(thresholds.bundle_sha256)
    if not binding:
        raise ThresholdsError(
            f"{path}: field `bundle_sha256` is {thresholds.bundle_sha256[:12]}... but the bundle {bundle.root} is "
            f"{bundle.sha256[:12]}...; these thresholds were made for another model (or another bundle.yaml): "
            "recalibrate with `daad-calibrate fit`"
        )
    if binding == "graph" and bundle.manifest_sha256:
        logger.warning("%s: field `bundle_sha256` names the bundle's graph only (written before bundle manifests); "
                       "recalibrate with `daad-calibrate fit` to bind the thresholds to all of %s", path, bundle.root)


def save_thresholds(path: Union[str, Path], thresholds: Thresholds) -> Path:
    """Atomic write (temporary file + rename), so the agent never reads half a file."""
    path = Path(path)
    atomic_write_text(path, yaml.safe_dump(thresholds.to_dict(), sort_keys=False))
    return path
