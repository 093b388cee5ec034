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
from typing import Any, Dict, Literal, Optional, Union

import yaml
from pydantic import BeforeValidator, Field, ValidationInfo, field_validator
from typing_extensions import Annotated  # typing.Annotated is 3.9+; typing_extensions comes with pydantic

from engine.bundle import Bundle, atomic_write_text
from engine.errors import ThresholdsError
from engine.validation import StrictModel, Text, read_yaml, show, validate

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


FIX = "regenerate it with `daad-calibrate fit`"
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


def _none_as_empty(value: Any) -> Any:
    return {} if value is None else value  # `provenance:` left empty by hand: read as {} before


FreeMapping = Annotated[Dict[Any, Any], BeforeValidator(_none_as_empty)]


class ThresholdsFile(StrictModel):
    """thresholds.yaml as written by `Thresholds.to_dict` (every key it writes, and nothing else)."""

    format_version: Literal[1]  # checked first, with its own fix (parse_thresholds)
    image_threshold: FiniteFloat
    pixel_threshold: FiniteFloat
    min_defect_area: Annotated[int, Field(ge=1)]  # anomaly-map pixels
    bundle_sha256: Text
    strategy: Literal[STRATEGIES] = "quantile"  # type: ignore[valid-type]
    target_false_alarm_rate: Optional[Annotated[float, Field(gt=0.0, lt=1.0)]] = None
    n_frames: Annotated[int, Field(ge=0)] = 0
    score_quantiles: Annotated[Dict[Text, float], BeforeValidator(_none_as_empty)] = {}
    bundle_name: Text = ""
    created: Text = ""
    provenance: FreeMapping = {}  # anything calibration records: free inside
    drift_reference: Optional[Dict[str, Any]] = None

    @field_validator("drift_reference", mode="before")
    @classmethod
    def _check_drift_reference(cls, value: Any, info: ValidationInfo) -> Optional[Dict[str, Any]]:
        # its own rules and messages (ThresholdsError, which pydantic lets through): None, or a checked mapping
        return _drift_reference(value, Path((info.context or {}).get("path", "<thresholds>")))


def parse_thresholds(data: Any, path: Union[str, Path] = "<thresholds>") -> Thresholds:
    """Thresholds from the mapping read from `path`; ThresholdsError with one line per problem
    (`path: key: got X, expected Y; regenerate it with `daad-calibrate fit``)."""
    path = Path(path)
    if isinstance(data, dict) and data.get("format_version") != THRESHOLDS_FORMAT_VERSION:
        version = data.get("format_version")
        newer = isinstance(version, int) and not isinstance(version, bool) and version > THRESHOLDS_FORMAT_VERSION
        fix = (f"written by a newer daad-calibrate: upgrade daad-inspect here, or {FIX} of this version" if newer
               else FIX)
        raise ThresholdsError(f"{path}: format_version: got {show(version) if 'format_version' in data else 'nothing'}, "
                              f"expected {THRESHOLDS_FORMAT_VERSION}; {fix}")
    parsed = validate(ThresholdsFile, data, str(path), ThresholdsError, FIX, context={"path": str(path)})
    return Thresholds(
        image_threshold=parsed.image_threshold,
        pixel_threshold=parsed.pixel_threshold,
        min_defect_area=parsed.min_defect_area,
        bundle_sha256=parsed.bundle_sha256,
        strategy=parsed.strategy,
        target_false_alarm_rate=parsed.target_false_alarm_rate,
        n_frames=parsed.n_frames,
        score_quantiles=dict(parsed.score_quantiles),
        bundle_name=parsed.bundle_name,
        created=parsed.created,
        provenance=dict(parsed.provenance),
        drift_reference=parsed.drift_reference,
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
    data = read_yaml(path, ThresholdsError, FIX)
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
