"""The drift alarm: its test (pure functions), its reference in thresholds.yaml, and the agent publishing it.

The agent tests run the real App on the template bundle (ONNX Runtime) against a real Mosquitto.
"""
from __future__ import annotations

import dataclasses
import json
import logging

import jsonschema
import numpy as np
import pytest
import yaml
from scipy import stats as st

from agent.app import App
from agent.config import load_config
from agent.drift import (
    DRIFT_COLLECTING,
    DRIFT_OFF,
    DRIFT_OK,
    DRIFT_RECALIBRATE,
    DRIFT_WARNING,
    DriftMonitor,
    DriftReference,
    beta_binomial_upper_tail,
    binomial_upper_tail,
    classify,
    per_test_level,
    reference_from_dict,
)
from agent.metrics_http import render_prometheus
from agent.payloads import drift_payload, load_schema
from calibration import stats
from engine.thresholds import Thresholds, load_thresholds, parse_thresholds, save_thresholds
from engine.errors import ThresholdsError
from tests.test_agent_app import (
    STATION,
    Subscriber,
    parts,
    quiet_notifier,
    write_config,
    write_folder,
)

REFERENCE = DriftReference(level=0.5, score=1.0, above=500, n_frames=1000)


# -- the test, pure ------------------------------------------------------------------------------
@pytest.mark.parametrize("k, n, p", [(0, 10, 0.3), (3, 10, 0.3), (10, 10, 0.3), (290, 500, 0.5), (60, 500, 0.05)])
def test_binomial_tail_matches_scipy(k, n, p):
    assert binomial_upper_tail(k, n, p) == pytest.approx(st.binom.sf(k - 1, n, p), rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("k, n, a, b", [(0, 50, 2, 3), (30, 50, 26, 26), (290, 500, 151, 151), (499, 500, 1, 1)])
def test_beta_binomial_tail_matches_scipy(k, n, a, b):
    assert beta_binomial_upper_tail(k, n, a, b) == pytest.approx(st.betabinom.sf(k - 1, n, a, b), rel=1e-8)


def test_beta_binomial_is_wider_than_binomial_and_tends_to_it():
    # a calibration of 300 frames: its share is uncertain, so the same count is less surprising
    small = DriftReference(0.5, 1.0, 150, 300).p_value(290, 500)
    large = DriftReference(0.5, 1.0, 5 * 10**8, 10**9).p_value(290, 500)
    assert small > 10 * large
    assert large == pytest.approx(st.binom.sf(289, 500, 0.5), rel=1e-3)


def test_levels_and_states():
    assert per_test_level(50, 100_000) == 5e-4  # 2000 tests per 100 000 frames, each at 5e-4: <= 1 expected
    assert classify(1e-4, 5e-4, 5e-3) == DRIFT_RECALIBRATE
    assert classify(1e-3, 5e-4, 5e-3) == DRIFT_WARNING
    assert classify(0.2, 5e-4, 5e-3) == DRIFT_OK


def test_monitor_collects_then_stays_ok_on_unchanged_scores():
    rng = np.random.default_rng(0)
    mon = DriftMonitor(500, 50, 100_000, 10_000, REFERENCE)
    for s in rng.lognormal(0.0, 0.5, 499).tolist():  # median 1.0 = REFERENCE.score
        assert not mon.add(s)
    assert mon.state == DRIFT_COLLECTING and mon.figures().window == 499
    states = set()
    for s in rng.lognormal(0.0, 0.5, 5000).tolist():
        mon.add(s)
        states.add(mon.state)
    assert states == {DRIFT_OK} and mon.tests == (5499 - 500) // 50 + 1  # a test every 50 once full
    assert len(mon._above) == 500  # bounded


def test_monitor_fires_on_a_shift_and_recovers():
    rng = np.random.default_rng(1)
    mon = DriftMonitor(500, 50, 100_000, 10_000, REFERENCE)
    for s in rng.lognormal(0.0, 0.5, 1000).tolist():
        mon.add(s)
    assert mon.state == DRIFT_OK
    seen = []
    for i, s in enumerate(rng.lognormal(0.3, 0.5, 1000).tolist()):  # 73% above the old median
        if mon.add(s):
            seen.append((i, mon.state))
    assert seen and seen[-1][1] == DRIFT_RECALIBRATE and seen[-1][0] < 300, seen
    f = mon.figures()
    assert f.p_value <= f.alarm_level and f.share_above > 0.6 and f.expected_share == pytest.approx(501 / 1002)
    for s in rng.lognormal(0.0, 0.5, 1000).tolist():
        mon.add(s)
    assert mon.state == DRIFT_OK


def test_monitor_without_reference_is_off_and_reset_takes_a_new_one():
    mon = DriftMonitor(50, 10, 100_000, 10_000, None)
    assert not any(mon.add(9.0) for _ in range(100)) and mon.state == DRIFT_OFF and mon.figures().window == 0
    mon.reset(REFERENCE)
    assert mon.state == DRIFT_COLLECTING
    changes = [mon.state for _ in range(50) if mon.add(9.0)]
    assert changes == [DRIFT_RECALIBRATE]
    mon.reset(None)
    assert mon.state == DRIFT_OFF and mon.frames_seen == 0


@pytest.mark.parametrize("data, words", [
    ({"level": 0.5, "score": 1.0, "above": 1}, "missing key 'n_frames'"),
    ({"level": 1.5, "score": 1.0, "above": 1, "n_frames": 3}, "`level` must be in (0, 1)"),
    ({"level": 0.5, "score": 1.0, "above": 4, "n_frames": 3}, "above 4 of 3"),
])
def test_reference_from_dict_names_the_problem(data, words):
    with pytest.raises(ValueError, match=None) as info:
        reference_from_dict(data)
    assert words in str(info.value)


# -- the reference, from calibration to thresholds.yaml ----------------------------------------------
def test_drift_reference_is_the_median_of_frames_judged_good():
    scores = np.arange(1.0, 101.0)  # 1..100
    ref = stats.drift_reference(scores, image_threshold=90.0)
    assert ref == {"level": 0.5, "score": 45.5, "above": 45, "n_frames": 90}
    with pytest.raises(stats.StatsError):
        stats.drift_reference(scores, image_threshold=0.5)


def thresholds_dict(**extra):
    return {"format_version": 1, "image_threshold": 2.0, "pixel_threshold": 1.0, "min_defect_area": 3,
            "bundle_sha256": "a" * 64, **extra}


def test_thresholds_without_reference_still_load(tmp_path):
    t = parse_thresholds(thresholds_dict())
    assert t.drift_reference is None
    path = save_thresholds(tmp_path / "t.yaml", t)
    assert "drift_reference" not in path.read_text() and load_thresholds(path).drift_reference is None


def test_thresholds_reference_round_trips(tmp_path):
    ref = {"level": 0.5, "score": 1.25, "above": 140, "n_frames": 297}
    t = parse_thresholds(thresholds_dict(drift_reference=ref))
    assert load_thresholds(save_thresholds(tmp_path / "t.yaml", t)).drift_reference == ref


@pytest.mark.parametrize("value, words", [
    ("p50", "field `drift_reference` must be a mapping with level, score, above, n_frames, got 'p50'"),
    ({"level": 0.5, "score": "x", "above": 1, "n_frames": 3}, "field `score` must be a finite float, got 'x'"),
    ({"level": 0.5, "score": 1.0, "above": 5, "n_frames": 3}, "expects 0 < level < 1 and 0 <= above <= n_frames"),
])
def test_bad_reference_is_one_line_naming_the_file_and_field(tmp_path, value, words):
    path = tmp_path / "thresholds.yaml"
    path.write_text(yaml.safe_dump(thresholds_dict(drift_reference=value)))
    with pytest.raises(ThresholdsError) as info:
        load_thresholds(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and words in message and "\n" not in message


# -- payloads ------------------------------------------------------------------------------------
def test_drift_payload_validates_and_refuses_unknown_states():
    from datetime import datetime, timezone

    mon = DriftMonitor(50, 10, 100_000, 10_000, REFERENCE)
    for _ in range(50):
        mon.add(9.0)
    payload = drift_payload(station="s1", timestamp=datetime.now(timezone.utc), previous_state=DRIFT_COLLECTING,
                            figures=mon.figures().to_dict(), bundle_name="b", bundle_sha256="0" * 64)
    jsonschema.Draft202012Validator(load_schema("drift")).validate(payload)
    assert payload["state"] == DRIFT_RECALIBRATE and payload["above"] == 50
    json.dumps(payload, allow_nan=False)
    with pytest.raises(ValueError, match="previous_state"):
        drift_payload(station="s1", timestamp=datetime.now(timezone.utc), previous_state="bad",
                      figures=mon.figures().to_dict(), bundle_name="b", bundle_sha256="0" * 64)
    text = render_prometheus({"drift_state": "recalibrate", "drift_alarms_total": 1})
    assert 'daad_agent_drift_state{reason="recalibrate"} 1' in text and "daad_agent_drift_alarms_total 1" in text


# -- the agent -----------------------------------------------------------------------------------
def old_thresholds(bundle, path):
    """thresholds.yaml as written before drift monitoring; nothing is a defect (every frame is a good one)."""
    return save_thresholds(path, Thresholds(1e6, 1e6, 4, bundle.sha256, strategy="manual", bundle_name=bundle.name))


def test_agent_publishes_recalibrate_when_good_parts_score_above_the_reference(
    tmp_path, template_bundle, mosquitto, caplog
):
    t = load_thresholds(old_thresholds(template_bundle, tmp_path / "old.yaml"), template_bundle)
    # a reference below every good score: every good frame counts "above", as after a strong drift
    drifted = dataclasses.replace(t, drift_reference={"level": 0.5, "score": -1e9, "above": 100, "n_frames": 200})
    thresholds = save_thresholds(tmp_path / "thresholds.yaml", drifted)
    folder = write_folder(tmp_path / "incoming", parts("g" * 60))
    config = load_config(write_config(tmp_path, template_bundle, thresholds, mosquitto.port,
                                      {"kind": "folder", "path": str(folder)}, drift={"window": 50, "interval": 10}))
    sub = Subscriber(mosquitto.port)
    try:
        caplog.set_level(logging.INFO)
        app = App(config, notifier=quiet_notifier())
        assert app.run() == 0
        assert sub.wait(lambda s: [p["state"] for p in s.payloads("drift")] == [DRIFT_COLLECTING, DRIFT_RECALIBRATE])
        drift = sub.payloads("drift")[-1]
        jsonschema.Draft202012Validator(load_schema("drift")).validate(drift)
        assert drift["previous_state"] == DRIFT_COLLECTING and drift["above"] == 50 and drift["window"] == 50
        assert drift["p_value"] <= drift["alarm_level"] == 10 / 100_000
        assert sub.wait(lambda s: s.payloads("status") and s.payloads("status")[-1]["drift"]["state"] == DRIFT_RECALIBRATE)
        jsonschema.Draft202012Validator(load_schema("status")).validate(sub.payloads("status")[-1])
        retained = [r for t_, _, r in sub.messages if t_ == f"daad/{STATION}/drift"]
        assert retained and not any(retained)  # live deliveries; the broker keeps the last as retained
        snap = app.snapshot()
        assert snap["drift_alarms_total"] == 1 and snap["drift_changes_total"] == 1 and snap["drift_state"] == DRIFT_RECALIBRATE
        assert any("drift: collecting -> recalibrate: 50 of the last 50 good frames" in r.getMessage()
                   and r.levelname == "WARNING" for r in caplog.records)
    finally:
        sub.close()
    late = Subscriber(mosquitto.port)  # a consumer that connects later reads the state at once
    try:
        assert late.wait(lambda s: s.payloads("drift") and s.payloads("drift")[-1]["state"] == DRIFT_RECALIBRATE)
    finally:
        late.close()


def test_old_thresholds_run_with_drift_off_said_once(tmp_path, template_bundle, mosquitto, caplog):
    calibrated = old_thresholds(template_bundle, tmp_path / "thresholds.yaml")
    assert "drift_reference" not in calibrated.read_text()
    folder = write_folder(tmp_path / "incoming", parts("g" * 12))
    config = load_config(write_config(tmp_path, template_bundle, calibrated, mosquitto.port,
                                      {"kind": "folder", "path": str(folder)}, drift={"window": 50, "interval": 10}))
    caplog.set_level(logging.INFO)
    app = App(config, notifier=quiet_notifier())
    assert app.run() == 0 and app.frames_scored == 12
    said = [r for r in caplog.records if "drift: monitoring off" in r.getMessage()]
    assert len(said) == 1 and "has no field `drift_reference`" in said[0].getMessage()
    assert app.drift.state == DRIFT_OFF and app.snapshot()["drift_changes_total"] == 0
