"""Versioned MQTT payloads (design.md §5), built by pure functions.

Every builder checks its inputs and converts numpy scalars to plain Python numbers, so the result
always serialises with `json.dumps(..., allow_nan=False)` and validates against the JSON Schema of
the same name in agent/schemas/ (`load_schema`). A wrong input raises ValueError naming the field:
it is a bug in the caller, better caught by its tests than by a consumer.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import operator
import re
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

PAYLOAD_VERSION = 1

AVAILABILITY_ONLINE = "online"
AVAILABILITY_OFFLINE = "offline"

# Agent states published in status.state.
STATE_STARTING = "starting"  # loading bundle/thresholds, opening the camera
STATE_RUNNING = "running"  # frames are being scored
STATE_DEGRADED = "degraded"  # alive but not scoring (camera stalled, backend failing)
STATE_STOPPING = "stopping"  # shutting down
STATE_ERROR = "error"  # only in error_status_payload: the agent refused to start
STATES = (STATE_STARTING, STATE_RUNNING, STATE_DEGRADED, STATE_STOPPING)

# Camera states published in status.camera_state.
CAMERA_CONNECTING = "connecting"
CAMERA_STREAMING = "streaming"
CAMERA_STALLED = "stalled"  # opened but no frame for too long
CAMERA_RECONNECTING = "reconnecting"  # waiting between reopen attempts
CAMERA_CLOSED = "closed"
CAMERA_ENDED = "ended"  # a file or non-watched folder source reached its end
CAMERA_ERROR = "error"  # the source failed in a way reopening cannot fix
CAMERA_STATES = (CAMERA_CONNECTING, CAMERA_STREAMING, CAMERA_STALLED, CAMERA_RECONNECTING, CAMERA_CLOSED,
                 CAMERA_ENDED, CAMERA_ERROR)

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
SCHEMA_SUFFIX = ".schema.json"

# A fixed namespace so that the same (station, camera, boot, seq) always gives the same event id.
EVENT_ID_NAMESPACE = uuid.UUID("5f0c6c1e-3d1b-5e43-9a0e-4f1d2b7a8c10")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
BBOX_LEN = 4  # [x, y, width, height]


# -- identity ------------------------------------------------------------------------------------
def new_boot_id() -> str:
    """A fresh id for this run of the agent; combined with the frame seq it makes event ids unique."""
    return uuid.uuid4().hex


def make_event_id(station: str, camera: str, boot_id: str, seq: int) -> str:
    """Stable for one frame (retries reuse it, so consumers can de-duplicate), unique across restarts."""
    key = "\x1f".join((_text(station, "station"), _text(camera, "camera"), _text(boot_id, "boot_id"),
                       str(_int(seq, "seq", minimum=0))))
    return str(uuid.uuid5(EVENT_ID_NAMESPACE, key))


def utc_timestamp(moment: datetime) -> str:
    """ISO 8601 in UTC with milliseconds and a Z suffix, e.g. 2024-05-01T12:00:00.250Z."""
    if not isinstance(moment, datetime):
        raise ValueError(f"timestamp must be a datetime, got {type(moment).__name__}")
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("timestamp must be timezone-aware (e.g. datetime.now(timezone.utc)), got a naive datetime")
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- payloads ------------------------------------------------------------------------------------
def defect_event(
    *,
    event_id: str,
    station: str,
    camera: str,
    seq: int,
    timestamp: datetime,
    image_score: float,
    image_threshold: float,
    regions: Sequence[Mapping[str, Any]],
    bundle_name: str,
    bundle_sha256: str,
    frame_path: Optional[str] = None,
    crop_jpeg_b64: Optional[str] = None,
    frame_size: Tuple[int, int],
) -> Dict[str, Any]:
    """One defective frame. Region bboxes [x, y, w, h] and areas are in original frame pixels."""
    width, height = _frame_size(frame_size)
    event: Dict[str, Any] = {
        "version": PAYLOAD_VERSION,
        "event_id": _text(event_id, "event_id"),
        "station": _text(station, "station"),
        "camera": _text(camera, "camera"),
        "seq": _int(seq, "seq", minimum=0),
        "timestamp": utc_timestamp(timestamp),
        "image_score": _float(image_score, "image_score"),
        "image_threshold": _float(image_threshold, "image_threshold"),
        "frame_size": {"width": width, "height": height},
        "regions": [_region(r, i, width, height) for i, r in enumerate(_sequence(regions, "regions"))],
        "bundle": _bundle(bundle_name, bundle_sha256),
    }
    if frame_path is not None:
        event["frame_path"] = _text(frame_path, "frame_path")
    if crop_jpeg_b64 is not None:
        event["crop_jpeg_b64"] = _base64(crop_jpeg_b64, "crop_jpeg_b64")
    return event


def status_payload(
    *,
    station: str,
    state: str,
    fps: float,
    latency_ms: Mapping[str, Optional[float]],
    frames_scored: int,
    frames_dropped: int,
    defects: int,
    spool_depth: int,
    spool_dropped: int,
    camera_state: str,
    mqtt_connected: bool,
    image_threshold: float,
    pixel_threshold: float,
    bundle_name: str,
    bundle_sha256: str,
    uptime_s: float,
    timestamp: datetime,
    camera_error: Optional[str] = None,
    frames_channel_mismatch: int = 0,
    mqtt_last_error: Optional[str] = None,
    mqtt_connect_failures: int = 0,
    events_unspooled: int = 0,
    spool_write_failures: int = 0,
    drift: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """The retained, periodic status. latency_ms p50/p99 may be None before the first frame.

    The fields after timestamp say why something does not work (optional in the schema, so
    consumers of the first status version keep validating)."""
    if state not in STATES:
        raise ValueError(f"state must be one of {STATES}, got {state!r}")
    if camera_state not in CAMERA_STATES:
        raise ValueError(f"camera_state must be one of {CAMERA_STATES}, got {camera_state!r}")
    if not isinstance(mqtt_connected, bool):
        raise ValueError(f"mqtt_connected must be a bool, got {mqtt_connected!r}")
    return {
        **_header(station, timestamp),
        "state": state,
        "uptime_s": _float(uptime_s, "uptime_s", minimum=0.0),
        "fps": _float(fps, "fps", minimum=0.0),
        "latency_ms": _latency(latency_ms),
        "frames_scored": _int(frames_scored, "frames_scored", minimum=0),
        "frames_dropped": _int(frames_dropped, "frames_dropped", minimum=0),
        "defects": _int(defects, "defects", minimum=0),
        "spool_depth": _int(spool_depth, "spool_depth", minimum=0),
        "spool_dropped": _int(spool_dropped, "spool_dropped", minimum=0),
        "camera_state": camera_state,
        "mqtt_connected": mqtt_connected,
        "image_threshold": _float(image_threshold, "image_threshold"),
        "pixel_threshold": _float(pixel_threshold, "pixel_threshold"),
        "bundle": _bundle(bundle_name, bundle_sha256),
        "camera_error": None if camera_error is None else _text(camera_error, "camera_error"),
        "frames_channel_mismatch": _int(frames_channel_mismatch, "frames_channel_mismatch", minimum=0),
        "mqtt_last_error": None if mqtt_last_error is None else _text(mqtt_last_error, "mqtt_last_error"),
        "mqtt_connect_failures": _int(mqtt_connect_failures, "mqtt_connect_failures", minimum=0),
        "events_unspooled": _int(events_unspooled, "events_unspooled", minimum=0),
        "spool_write_failures": _int(spool_write_failures, "spool_write_failures", minimum=0),
        **({} if drift is None else {"drift": drift_figures(drift)}),
    }


DRIFT_STATES = ("off", "collecting", "ok", "warning", "recalibrate")  # agent/drift.py's, in the schemas
REFERENCE_SOURCES = ("calibration", "calibration+line")  # agent/drift.py's SOURCE_*
_DRIFT_OPTIONAL_COUNTS = ("calibration_frames", "baseline_collected", "baseline_target", "baseline_restarts")
_DRIFT_INTS = ("frames_seen", "alarms", "warnings", "window")
_DRIFT_OPTIONAL_FLOATS = ("mean_z", "shift")
_DRIFT_OPTIONAL_NON_NEGATIVE = ("cusum", "limit", "warning_cusum", "warning_limit", "k", "expected_delay",
                                "reference_false_alarm_rate")


def drift_figures(figures: Mapping[str, Any]) -> Dict[str, Any]:
    """The drift alarm's figures (agent.drift.DriftFigures.to_dict()), checked; in status and the drift message."""
    state = figures.get("state")
    if state not in DRIFT_STATES:
        raise ValueError(f"drift.state must be one of {DRIFT_STATES}, got {state!r}")
    reason = figures.get("reason")
    out: Dict[str, Any] = {"state": state, "reason": None if reason is None else _text(reason, "drift.reason")}
    for key in _DRIFT_INTS:
        out[key] = _int(figures.get(key), f"drift.{key}", minimum=0)
    for key in _DRIFT_OPTIONAL_FLOATS + _DRIFT_OPTIONAL_NON_NEGATIVE:
        value = figures.get(key)
        minimum = 0.0 if key in _DRIFT_OPTIONAL_NON_NEGATIVE else None
        out[key] = None if value is None else _float(value, f"drift.{key}", minimum=minimum)
    ratio = _float(figures.get("detect_false_alarm_ratio"), "drift.detect_false_alarm_ratio")
    if ratio <= 1.0:
        raise ValueError(f"drift.detect_false_alarm_ratio must be above 1, got {ratio}")
    out["detect_false_alarm_ratio"] = ratio
    for key in ("alarm_per_frames", "warning_per_frames"):
        out[key] = _int(figures.get(key), f"drift.{key}", minimum=1)
    n = figures.get("reference_frames")
    out["reference_frames"] = None if n is None else _int(n, "drift.reference_frames", minimum=0)
    # optional (agents before the baseline extension leave them out)
    if "reference_source" in figures:
        source = figures["reference_source"]
        if source is not None and source not in REFERENCE_SOURCES:
            raise ValueError(f"drift.reference_source must be one of {REFERENCE_SOURCES} or null, got {source!r}")
        out["reference_source"] = source
    for key in _DRIFT_OPTIONAL_COUNTS:
        if key in figures:
            value = figures[key]
            out[key] = None if value is None else _int(value, f"drift.{key}", minimum=0)
    return out


def drift_payload(*, station: str, timestamp: datetime, previous_state: str, figures: Mapping[str, Any],
                  bundle_name: str, bundle_sha256: str) -> Dict[str, Any]:
    """The retained <prefix>/<station>/drift message, published when the drift state changes."""
    if previous_state not in DRIFT_STATES:
        raise ValueError(f"previous_state must be one of {DRIFT_STATES}, got {previous_state!r}")
    return {
        **_header(station, timestamp),
        "previous_state": previous_state,
        **drift_figures(figures),
        "bundle": _bundle(bundle_name, bundle_sha256),
    }


def load_schema(name: str) -> Dict[str, Any]:
    """The JSON Schema of a payload: "defect_event", "status" or "availability"."""
    stem = name[: -len(SCHEMA_SUFFIX)] if name.endswith(SCHEMA_SUFFIX) else name
    path = SCHEMA_DIR / f"{stem}{SCHEMA_SUFFIX}"
    if not path.is_file():
        known = sorted(p.name[: -len(SCHEMA_SUFFIX)] for p in SCHEMA_DIR.glob(f"*{SCHEMA_SUFFIX}"))
        raise ValueError(f"no payload schema named {name!r} in {SCHEMA_DIR}; known: {known}")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# -- field checks (pure) -------------------------------------------------------------------------
def error_status_payload(*, station: str, error: str, timestamp: datetime) -> Dict[str, Any]:
    """The retained status an agent leaves when it refuses to start (exit 78): consumers see why it is not
    running instead of its last `running` status (the schema's `state: error` case)."""
    return {**_header(station, timestamp), "state": STATE_ERROR, "error": _text(error, "error")}


def _header(station: str, timestamp: datetime) -> Dict[str, Any]:
    """What every retained station message starts with: the payload version, the station and the UTC time."""
    return {"version": PAYLOAD_VERSION, "station": _text(station, "station"), "timestamp": utc_timestamp(timestamp)}


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{field} must be a non-empty string, got {value!r}")
    return value


def _int(value: Any, field: str, minimum: Optional[int] = None) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{field} must be an integer, got {value!r}")
    try:
        out = operator.index(value)  # int and numpy integers
    except TypeError:
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{field} must be an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ValueError(f"{field} must be a whole number, got {value!r}")
        out = int(as_float)
    if minimum is not None and out < minimum:
        raise ValueError(f"{field} must be at least {minimum}, got {out}")
    return int(out)


def _float(value: Any, field: str, minimum: Optional[float] = None) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{field} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{field} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{field} must be finite, got {out}")
    if minimum is not None and out < minimum:
        raise ValueError(f"{field} must be at least {minimum}, got {out}")
    return out


def _sequence(value: Any, field: str) -> Sequence[Any]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or not hasattr(value, "__iter__"):
        raise ValueError(f"{field} must be a list, got {type(value).__name__}")
    return list(value)


def _frame_size(value: Any) -> Tuple[int, int]:
    size = _sequence(value, "frame_size")
    if len(size) != 2:
        raise ValueError(f"frame_size must be (width, height), got {value!r}")
    return _int(size[0], "frame_size.width", minimum=1), _int(size[1], "frame_size.height", minimum=1)


def _region(region: Any, index: int, width: int, height: int) -> Dict[str, Any]:
    where = f"regions[{index}]"
    if not isinstance(region, Mapping):
        raise ValueError(f"{where} must be a mapping with bbox, area and peak, got {type(region).__name__}")
    unknown = set(region) - {"bbox", "area", "peak"}
    if unknown or not {"bbox", "area", "peak"} <= set(region):
        raise ValueError(f"{where} must have exactly the keys bbox, area, peak; got {sorted(region)}")
    bbox = _sequence(region["bbox"], f"{where}.bbox")
    if len(bbox) != BBOX_LEN:
        raise ValueError(f"{where}.bbox must be [x, y, width, height], got {region['bbox']!r}")
    x = _int(bbox[0], f"{where}.bbox.x", minimum=0)
    y = _int(bbox[1], f"{where}.bbox.y", minimum=0)
    w = _int(bbox[2], f"{where}.bbox.width", minimum=1)
    h = _int(bbox[3], f"{where}.bbox.height", minimum=1)
    if x + w > width or y + h > height:
        raise ValueError(
            f"{where}.bbox {[x, y, w, h]} extends past the {width}x{height} frame; bboxes are in original frame pixels"
        )
    area = _float(region["area"], f"{where}.area", minimum=0.0)
    return {"bbox": [x, y, w, h], "area": int(round(area)), "peak": _float(region["peak"], f"{where}.peak")}


def _bundle(name: Any, sha256: Any) -> Dict[str, str]:
    digest = _text(sha256, "bundle_sha256")
    if not _SHA256_RE.match(digest):
        raise ValueError(f"bundle_sha256 must be 64 lowercase hex digits, got {digest!r}")
    return {"name": _text(name, "bundle_name"), "sha256": digest}


def _latency(value: Any) -> Dict[str, Optional[float]]:
    if not isinstance(value, Mapping) or set(value) != {"p50", "p99"}:
        raise ValueError(f"latency_ms must be a mapping with exactly p50 and p99, got {value!r}")
    return {
        key: None if value[key] is None else _float(value[key], f"latency_ms.{key}", minimum=0.0)
        for key in ("p50", "p99")
    }


def _base64(value: Any, field: str) -> str:
    text = _text(value, field)
    try:
        base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{field} must be standard base64 (the JPEG bytes), got invalid data") from None
    return text

