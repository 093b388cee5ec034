"""agent.payloads: pure builders of the versioned MQTT payloads, checked against their JSON Schemas."""
from __future__ import annotations

import base64
import copy
import json
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Dict

import jsonschema
import numpy as np
import pytest

from agent import payloads
from agent.payloads import (
    AVAILABILITY_OFFLINE,
    AVAILABILITY_ONLINE,
    PAYLOAD_VERSION,
    defect_event,
    load_schema,
    make_event_id,
    status_payload,
    utc_timestamp,
)

SHA = "ab" * 32
WHEN = datetime(2024, 5, 1, 12, 0, 0, 250000, tzinfo=timezone.utc)


def validator(name: str) -> jsonschema.Draft202012Validator:
    schema = load_schema(name)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def event_kwargs(**overrides: Any) -> Dict[str, Any]:
    kwargs: Dict[str, Any] = dict(
        event_id=make_event_id("st1", "cam0", "boot1", 7),
        station="st1",
        camera="cam0",
        seq=7,
        timestamp=WHEN,
        image_score=0.91,
        image_threshold=0.5,
        regions=[{"bbox": [10, 20, 30, 40], "area": 900, "peak": 1.5}],
        bundle_name="daad-bottle",
        bundle_sha256=SHA,
        frame_size=(640, 480),
    )
    kwargs.update(overrides)
    return kwargs


def status_kwargs(**overrides: Any) -> Dict[str, Any]:
    kwargs: Dict[str, Any] = dict(
        station="st1",
        state="running",
        fps=14.5,
        latency_ms={"p50": 21.0, "p99": 48.5},
        frames_scored=1200,
        frames_dropped=3,
        defects=2,
        spool_depth=0,
        spool_dropped=0,
        camera_state="streaming",
        mqtt_connected=True,
        image_threshold=0.5,
        pixel_threshold=0.4,
        bundle_name="daad-bottle",
        bundle_sha256=SHA,
        uptime_s=3600.0,
        timestamp=WHEN,
    )
    kwargs.update(overrides)
    return kwargs


def roundtrip(payload: Dict[str, Any]) -> Any:
    """What a consumer receives: strict JSON (no NaN), parsed back."""
    return json.loads(json.dumps(payload, allow_nan=False))


# -- schemas ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["defect_event", "status", "availability"])
def test_schemas_are_valid_draft_2020_12(name: str) -> None:
    schema = load_schema(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    if schema.get("type") == "object":
        assert schema["additionalProperties"] is False
        assert schema["properties"]["version"]["const"] == PAYLOAD_VERSION
        assert "version" in schema["required"]


def test_load_schema_accepts_file_name_and_refuses_unknown() -> None:
    assert load_schema("status.schema.json") == load_schema("status")
    with pytest.raises(ValueError, match="known: .*defect_event"):
        load_schema("nope")


# -- defect events ---------------------------------------------------------------------------------
def test_defect_event_validates_and_carries_the_contract_fields() -> None:
    crop = base64.b64encode(b"\xff\xd8 fake jpeg \xff\xd9").decode()
    event = defect_event(**event_kwargs(frame_path="/var/lib/daad/frames/7.jpg", crop_jpeg_b64=crop))
    validator("defect_event").validate(roundtrip(event))
    assert event["version"] == PAYLOAD_VERSION
    assert event["timestamp"] == "2024-05-01T12:00:00.250Z"
    assert event["regions"] == [{"bbox": [10, 20, 30, 40], "area": 900, "peak": 1.5}]
    assert event["frame_size"] == {"width": 640, "height": 480}
    assert event["bundle"] == {"name": "daad-bottle", "sha256": SHA}
    assert event["frame_path"] == "/var/lib/daad/frames/7.jpg" and event["crop_jpeg_b64"] == crop


def test_defect_event_omits_absent_optionals_and_accepts_no_regions() -> None:
    event = defect_event(**event_kwargs(regions=[]))
    validator("defect_event").validate(roundtrip(event))
    assert "frame_path" not in event and "crop_jpeg_b64" not in event


def test_defect_event_converts_numpy_scalars() -> None:
    region = {"bbox": np.array([1, 2, 3, 4], dtype=np.int64), "area": np.float32(12.4), "peak": np.float32(0.75)}
    event = defect_event(**event_kwargs(seq=np.int64(3), image_score=np.float32(0.8), regions=[region],
                                        frame_size=(np.int32(64), np.int32(48))))
    text = json.dumps(event, allow_nan=False)  # would raise on numpy types
    validator("defect_event").validate(json.loads(text))
    assert event["regions"][0] == {"bbox": [1, 2, 3, 4], "area": 12, "peak": pytest.approx(0.75)}
    assert type(event["seq"]) is int and type(event["image_score"]) is float


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"timestamp": datetime(2024, 5, 1, 12, 0)}, "timezone-aware"),  # naive datetime
        ({"image_score": float("nan")}, "image_score"),
        ({"image_threshold": float("inf")}, "image_threshold"),
        ({"seq": -1}, "seq"),
        ({"event_id": ""}, "event_id"),
        ({"bundle_sha256": "ABC"}, "bundle_sha256"),
        ({"frame_size": (640,)}, "frame_size"),
        ({"regions": [{"bbox": [630, 0, 20, 10], "area": 5, "peak": 1.0}]}, "past the 640x480 frame"),
        ({"regions": [{"bbox": [0, 0, 10], "area": 5, "peak": 1.0}]}, r"regions\[0\].bbox"),
        ({"regions": [{"bbox": [0, 0, 0, 10], "area": 5, "peak": 1.0}]}, r"regions\[0\].bbox.width"),
        ({"regions": [{"bbox": [0, 0, 1, 1], "area": 1}]}, r"regions\[0\] must have exactly"),
        ({"regions": [{"bbox": [0, 0, 1, 1], "area": 1, "peak": 1.0, "score": 2}]}, r"regions\[0\] must have exactly"),
        ({"regions": [{"bbox": [0.5, 0, 1, 1], "area": 1, "peak": 1.0}]}, "whole number"),
        ({"crop_jpeg_b64": "not base64!"}, "crop_jpeg_b64"),
    ],
)
def test_defect_event_refuses_bad_input_naming_the_field(overrides: Dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        defect_event(**event_kwargs(**overrides))


def _drop(key: str) -> Callable[[Dict[str, Any]], None]:
    return lambda p: p.pop(key)


@pytest.mark.parametrize(
    "mutate",
    [
        _drop("event_id"),  # required field missing
        lambda p: p.update(version=2),  # a version consumers do not know
        lambda p: p.update(extra=1),  # unknown field
        lambda p: p.update(timestamp="2024-05-01 12:00:00"),  # not ISO 8601 UTC
        lambda p: p["regions"][0].update(bbox=[1, 2, 3]),  # bbox too short
        lambda p: p["regions"][0].update(bbox=[1, 2, 3, 4, 5]),  # bbox too long
        lambda p: p["bundle"].update(sha256="xyz"),
        lambda p: p.update(station="a/b"),  # would break the topic layout
    ],
)
def test_schema_rejects_bad_defect_events(mutate: Callable[[Dict[str, Any]], None]) -> None:
    good = roundtrip(defect_event(**event_kwargs()))
    check = validator("defect_event")
    check.validate(good)
    bad = copy.deepcopy(good)
    mutate(bad)
    with pytest.raises(jsonschema.ValidationError):
        check.validate(bad)


# -- event ids ------------------------------------------------------------------------------------
def test_event_id_is_stable_and_unique_across_boots_and_frames() -> None:
    first = make_event_id("st1", "cam0", "boot1", 7)
    assert first == make_event_id("st1", "cam0", "boot1", 7)  # a retry reuses it
    others = {
        make_event_id("st1", "cam0", "boot2", 7),  # after a restart seq starts again
        make_event_id("st1", "cam0", "boot1", 8),
        make_event_id("st1", "cam1", "boot1", 7),
        make_event_id("st2", "cam0", "boot1", 7),
    }
    assert first not in others and len(others) == 4
    assert payloads.new_boot_id() != payloads.new_boot_id()


def test_utc_timestamp_converts_other_zones() -> None:
    plus_two = timezone(timedelta(hours=2))
    assert utc_timestamp(datetime(2024, 5, 1, 14, 0, 0, tzinfo=plus_two)) == "2024-05-01T12:00:00.000Z"


# -- status -----------------------------------------------------------------------------------------
def test_status_payload_validates() -> None:
    status = status_payload(**status_kwargs())
    validator("status").validate(roundtrip(status))
    assert status["version"] == PAYLOAD_VERSION
    assert status["latency_ms"] == {"p50": 21.0, "p99": 48.5}
    assert status["bundle"] == {"name": "daad-bottle", "sha256": SHA}


def test_status_before_first_frame_has_null_latency() -> None:
    status = status_payload(**status_kwargs(state="starting", camera_state="connecting", fps=0.0,
                                            latency_ms={"p50": None, "p99": None}, frames_scored=0))
    validator("status").validate(roundtrip(status))


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"state": "fine"}, "state"),
        ({"camera_state": "ok"}, "camera_state"),
        ({"fps": -1.0}, "fps"),
        ({"latency_ms": {"p50": 1.0}}, "latency_ms"),
        ({"frames_dropped": 1.5}, "frames_dropped"),
        ({"mqtt_connected": 1}, "mqtt_connected"),
        ({"pixel_threshold": float("nan")}, "pixel_threshold"),
    ],
)
def test_status_refuses_bad_input_naming_the_field(overrides: Dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        status_payload(**status_kwargs(**overrides))


@pytest.mark.parametrize(
    "mutate",
    [
        _drop("spool_depth"),
        lambda p: p.update(version=0),
        lambda p: p.update(state="fine"),
        lambda p: p.update(unknown=True),
        lambda p: p["latency_ms"].update(p90=3.0),
    ],
)
def test_schema_rejects_bad_status(mutate: Callable[[Dict[str, Any]], None]) -> None:
    bad = roundtrip(status_payload(**status_kwargs()))
    mutate(bad)
    with pytest.raises(jsonschema.ValidationError):
        validator("status").validate(bad)


def test_states_in_code_match_schema_enums() -> None:
    schema = load_schema("status")
    # the running states, and `error`, which only a refused start leaves (error_status_payload)
    assert tuple(schema["properties"]["state"]["enum"]) == payloads.STATES + (payloads.STATE_ERROR,)
    assert tuple(schema["properties"]["camera_state"]["enum"]) == payloads.CAMERA_STATES


# -- availability -----------------------------------------------------------------------------------
def test_availability_values_match_schema() -> None:
    check = validator("availability")
    check.validate(AVAILABILITY_ONLINE)
    check.validate(AVAILABILITY_OFFLINE)
    with pytest.raises(jsonschema.ValidationError):
        check.validate("maybe")
