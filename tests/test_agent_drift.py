"""The drift alarm: its CUSUM (pure functions), its reference in thresholds.yaml, and the agent publishing it.

The agent tests run the real App on the template bundle (ONNX Runtime) against a real Mosquitto.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from datetime import datetime, timezone

import jsonschema
import numpy as np
import pytest
import yaml
from scipy import integrate
from scipy import stats as st

from agent import cusum
from agent.app import App
from agent.config import DriftConfig, dump_example_keys, load_config
from agent.drift import (
    DRIFT_COLLECTING,
    DRIFT_OFF,
    DRIFT_OK,
    DRIFT_RECALIBRATE,
    DRIFT_WARNING,
    ENABLE_FIX,
    SOURCE_CALIBRATION,
    SOURCE_POOLED,
    DriftMonitor,
    DriftReference,
    pooled_reference,
    reference_from_dict,
    reference_or_reason,
    reference_to_dict,
)
from agent.drift_state import EMPTY, DriftStateFile, binding_of
from agent.metrics_http import render_prometheus
from agent.payloads import drift_payload, load_schema, status_payload
from calibration import stats
from engine import drift_reference as drift_format
from engine.errors import ThresholdsError
from engine.thresholds import Thresholds, load_thresholds, parse_thresholds, save_thresholds
from tests.test_agent_app import (
    STATION,
    Subscriber,
    parts,
    quiet_notifier,
    write_config,
    write_folder,
)

RATE = 0.01
NORMAL_QUANTILES = tuple(float(v) for v in st.norm.ppf(drift_format.levels(1000)))


def known_reference(n_frames: int = 10**9) -> DriftReference:
    """Good scores ~ N(0, 1), the reference (1000 quantiles) as good as known."""
    return DriftReference(n_frames=n_frames, false_alarm_rate=RATE, quantiles=NORMAL_QUANTILES)


def monitor(ref, window=500, alarm=100_000, warning=10_000, ratio=2.0):
    return DriftMonitor(window, alarm, warning, ref, ratio)


def simulate_cusum(mean: float, k: float, h: float, runs: int, rng: np.random.Generator, cap: int = 200_000) -> np.ndarray:
    """Run lengths of max(0, S + X - k) > h from S = 0, X ~ N(mean, 1), many runs side by side."""
    s = np.zeros(runs)
    length = np.zeros(runs, dtype=np.int64)
    alive = np.ones(runs, dtype=bool)
    for t in range(1, cap + 1):
        idx = np.flatnonzero(alive)
        if idx.size == 0:
            break
        s[idx] = np.maximum(0.0, s[idx] + rng.normal(mean, 1.0, idx.size) - k)
        done = idx[s[idx] > h]
        length[done] = t
        alive[done] = False
    assert not alive.any()
    return length


# -- the CUSUM, pure -----------------------------------------------------------------------------
@pytest.mark.parametrize("mean, k, h", [(0.0, 0.25, 5.0), (0.0, 0.1, 8.0), (0.3, 0.15, 10.0)])
def test_arl_approximation_matches_a_simulation(mean, k, h):
    sim = simulate_cusum(mean, k, h, 4000, np.random.default_rng(0))
    se = sim.std() / math.sqrt(sim.size)
    assert abs(cusum.siegmund_arl(mean, 1.0, k, h) - sim.mean()) < 4 * se + 0.02 * sim.mean(), (sim.mean(), se)
    assert abs(cusum.markov_arl(mean, 1.0, k, h) - sim.mean()) < 4 * se + 0.02 * sim.mean()


@pytest.mark.parametrize("mean, sd, k, h", [(0.0, 1.0, 0.0973, 37.6), (0.0, 1.0, 0.137, 33.5), (0.26, 1.0, 0.137, 33.5),
                                            (0.05, 1.1, 0.17, 37.7), (-0.05, 0.9, 0.12, 23.0)])
def test_siegmund_agrees_with_the_markov_chain_at_the_limits_used(mean, sd, k, h):
    assert cusum.siegmund_arl(mean, sd, k, h) == pytest.approx(cusum.markov_arl(mean, sd, k, h, states=400), rel=0.02)


def test_good_frame_shift_is_the_mean_z_after_a_doubling():
    a = 0.01
    t, d = st.norm.ppf(1 - a), st.norm.ppf(1 - a) - st.norm.ppf(1 - 2 * a)
    num = integrate.quad(lambda x: st.norm.ppf(st.norm.cdf(x) / (1 - a)) * st.norm.pdf(x, d), d - 12, t, limit=200)[0]
    expected = num / st.norm.cdf(t, d)
    assert cusum.good_frame_shift(a, 2.0) == pytest.approx(expected, abs=2e-3)
    assert 0.25 < expected < d  # the truncation to good frames takes a little of the shift
    assert cusum.good_frame_shift(0.05, 2.0) > cusum.good_frame_shift(0.01, 2.0) > cusum.good_frame_shift(0.01, 1.5)
    with pytest.raises(ValueError):
        cusum.good_frame_shift(0.01, 1.0)


def test_limit_meets_the_rate_and_grows_for_small_calibrations():
    k = 0.12
    known = cusum.limit_for(k, 100_000, None)
    assert cusum.siegmund_arl(0.0, 1.0, k, known) == pytest.approx(100_000, rel=1e-6)
    limits = [cusum.limit_for(k, 100_000, n) for n in (300, 1000, 10_000)]
    assert limits[0] > limits[1] > limits[2] > known
    assert cusum.spurious_rate(k, limits[0], 300) == pytest.approx(1e-5, rel=1e-6)
    # the averaged rate is what the unlucky calibrations make it: far above the known reference's at the same h
    assert cusum.spurious_rate(k, known, 300) > 5e-5


def test_design_defaults():
    d = cusum.design(RATE, 2.0, 1000, 100_000, 10_000)
    assert d.k == pytest.approx(0.375 * d.shift + 1.25 / math.sqrt(1000))
    assert d.warning_limit < d.limit and 150 < d.delay < 300


def test_calibration_averaged_level_holds_in_a_simulation():
    """Calibrations of 300 frames, the design for 1 spurious alarm per 2000 frames: crossings over many sites."""
    rng = np.random.default_rng(3)
    crossings = frames = 0
    for _ in range(60):
        cal = rng.normal(size=300)
        thr = float(np.quantile(cal, 1 - RATE))
        mon = monitor(reference_from_dict(stats.drift_reference(cal, thr, RATE)), alarm=2000, warning=1000)
        x = rng.normal(size=6000)
        for s in x[x <= thr].tolist():
            mon.add(s)
        crossings += mon.alarms
        frames += x.size
    designed = frames / 2000
    assert 0.3 * designed < crossings < 1.3 * designed, (crossings, designed)


# -- the reference ------------------------------------------------------------------------------
def test_percentile_interpolates_ties_get_the_mid_rank_and_tails_are_clamped():
    ref = DriftReference(n_frames=4, false_alarm_rate=RATE, quantiles=(1.0, 2.0, 2.0, 4.0))
    assert ref.percentile(1.0) == pytest.approx(0.125)
    assert ref.percentile(2.0) == pytest.approx(0.5)  # levels 0.375 and 0.625
    assert ref.percentile(3.0) == pytest.approx(0.75)  # halfway from 0.625 to 0.875
    assert ref.percentile(-5.0) == pytest.approx(0.125) and ref.percentile(9.0) == pytest.approx(0.875)
    big = DriftReference(n_frames=10_000, false_alarm_rate=RATE, quantiles=(1.0, 2.0))
    assert big.percentile(0.0) == pytest.approx(0.25)  # 1000 quantiles of 10 000 frames: no finer than the grid
    assert known_reference().z(0.0) == pytest.approx(0.0, abs=1e-9)
    assert known_reference().z(1.0) == pytest.approx(1.0, abs=2e-3)


def test_calibrated_reference_makes_unchanged_scores_standard_normal():
    rng = np.random.default_rng(1)
    scores = rng.lognormal(0.0, 0.5, 3000)
    thr = float(np.quantile(scores, 0.99))
    ref = reference_from_dict(stats.drift_reference(scores, thr, RATE))
    fresh = rng.lognormal(0.0, 0.5, 40_000)
    z = np.array([ref.z(s) for s in fresh[fresh <= thr].tolist()])
    assert abs(z.mean()) < 3 / math.sqrt(ref.n_frames) and abs(z.std() - 1.0) < 0.03


def test_stats_reference_keeps_sorted_scores_or_1000_hazen_quantiles():
    scores = np.arange(100.0, 0.0, -1.0)  # 100..1
    ref = stats.drift_reference(scores, image_threshold=90.0, false_alarm_rate=0.1)
    assert ref == {"n_frames": 90, "false_alarm_rate": 0.1, "quantiles": [float(v) for v in range(1, 91)]}
    many = np.random.default_rng(0).normal(size=5000)
    big = stats.drift_reference(many, image_threshold=10.0, false_alarm_rate=RATE)
    assert big["n_frames"] == 5000 and len(big["quantiles"]) == drift_format.MAX_QUANTILES
    levels = drift_format.levels(drift_format.MAX_QUANTILES)
    sorted_scores = np.sort(many)
    positions = (np.arange(5000) + 0.5) / 5000  # Hazen: the i-th of n at (i - 0.5) / n
    assert np.allclose(big["quantiles"], np.interp(levels, positions, sorted_scores))
    assert drift_format.parse_drift_reference(big) == big
    with pytest.raises(stats.StatsError):
        stats.drift_reference(scores, image_threshold=0.5, false_alarm_rate=RATE)


def test_reference_or_reason_says_how_to_turn_the_alarm_on():
    ref, reason = reference_or_reason(None)
    assert ref is None and "no field `drift_reference`" in reason and ENABLE_FIX in reason
    ref, reason = reference_or_reason({"level": 0.5, "score": 1.0, "above": 100, "n_frames": 200})
    assert ref is None and "(level, score, above)" in reason and ENABLE_FIX in reason
    ref, reason = reference_or_reason({"n_frames": 50, "false_alarm_rate": RATE, "quantiles": [1.0, 2.0]})
    assert ref is None and "holds 50 good frames" in reason and "at least 100" in reason
    ref, reason = reference_or_reason({"n_frames": 500, "false_alarm_rate": RATE, "quantiles": [1.0, 2.0]})
    assert reason is None and ref == DriftReference(500, RATE, (1.0, 2.0))


@pytest.mark.parametrize("data, words", [
    ({"n_frames": 300, "quantiles": [1.0, 2.0]}, "missing false_alarm_rate"),
    ({"n_frames": 300, "false_alarm_rate": 0.7, "quantiles": [1.0, 2.0]}, "`false_alarm_rate` must be a number in (0, 0.5)"),
    ({"n_frames": 300, "false_alarm_rate": RATE, "quantiles": [2.0, 1.0]}, "sorted ascending"),
    ({"n_frames": 1, "false_alarm_rate": RATE, "quantiles": [1.0]}, "`n_frames` must be an integer >= 2"),
    ({"n_frames": 3, "false_alarm_rate": RATE, "quantiles": [1.0, 2.0, 3.0, 4.0]}, "got a list of 4"),
    ({"n_frames": 3, "false_alarm_rate": RATE, "quantiles": [1.0, "x"]}, "numbers only"),
])
def test_reference_format_names_the_problem(data, words):
    with pytest.raises(ValueError) as info:
        reference_from_dict(data)
    assert words in str(info.value)


def thresholds_dict(**extra):
    return {"format_version": 1, "image_threshold": 2.0, "pixel_threshold": 1.0, "min_defect_area": 3,
            "bundle_sha256": "a" * 64, **extra}


def test_thresholds_without_reference_still_load(tmp_path):
    t = parse_thresholds(thresholds_dict())
    assert t.drift_reference is None
    path = save_thresholds(tmp_path / "t.yaml", t)
    assert "drift_reference" not in path.read_text() and load_thresholds(path).drift_reference is None


def test_thresholds_reference_round_trips_and_the_old_format_still_loads(tmp_path):
    ref = {"n_frames": 297, "false_alarm_rate": 0.01, "quantiles": [0.5, 1.25, 1.25, 3.0]}
    t = parse_thresholds(thresholds_dict(drift_reference=ref))
    assert load_thresholds(save_thresholds(tmp_path / "t.yaml", t)).drift_reference == ref
    old = {"level": 0.5, "score": 1.25, "above": 140, "n_frames": 297}
    assert load_thresholds(save_thresholds(tmp_path / "old.yaml", parse_thresholds(thresholds_dict(drift_reference=old)))
                           ).drift_reference == old


@pytest.mark.parametrize("value, words", [
    ("p50", "field `drift_reference` must be a mapping with n_frames, false_alarm_rate, quantiles, got 'p50'"),
    ({"n_frames": 3, "false_alarm_rate": 0.01, "quantiles": [1, "x"]}, "field `drift_reference` key `quantiles` must hold numbers"),
    ({"level": 0.5, "score": 1.0, "above": 5, "n_frames": 3}, "expects 0 < level < 1 and 0 <= above <= n_frames"),
])
def test_bad_reference_is_one_line_naming_the_file_and_field(tmp_path, value, words):
    path = tmp_path / "thresholds.yaml"
    path.write_text(yaml.safe_dump(thresholds_dict(drift_reference=value)))
    with pytest.raises(ThresholdsError) as info:
        load_thresholds(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and words in message and "\n" not in message
    assert "daad-calibrate fit" in message


# -- the monitor ---------------------------------------------------------------------------------
def test_monitor_collects_then_stays_ok_on_unchanged_scores():
    rng = np.random.default_rng(0)
    mon = monitor(known_reference())
    for s in rng.normal(size=499).tolist():
        assert not mon.add(s)
    assert mon.state == DRIFT_COLLECTING and mon.figures().window == 499
    states = set()
    for s in rng.normal(size=20_000).tolist():  # 1 spurious alarm per 100 000 frames by design: none expected here
        mon.add(s)
        states.add(mon.state)
    # no alarm; warnings at their designed rate (1 per 10 000 frames: 2 expected)
    assert states <= {DRIFT_OK, DRIFT_WARNING} and mon.alarms == 0 and mon.warnings <= 6 and len(mon._z) == 500
    f = mon.figures()
    assert abs(f.mean_z) < 4 / math.sqrt(500) and 0.0 <= f.cusum < f.limit and f.frames_seen == 20_499


def test_monitor_fires_within_500_frames_of_a_doubled_false_alarm_rate_and_recovers():
    rng = np.random.default_rng(1)
    t = st.norm.ppf(1 - RATE)
    shift = t - st.norm.ppf(1 - 2 * RATE)  # the scores' shift that doubles the false-alarm rate at t
    delays = []
    for _ in range(20):
        mon = monitor(known_reference())
        for s in rng.normal(size=1000).tolist():
            mon.add(s)
        assert mon.state == DRIFT_OK
        for i, s in enumerate((rng.normal(size=3000) + shift).tolist()):
            if s <= t and mon.add(s) and mon.state == DRIFT_RECALIBRATE:
                delays.append(i + 1)
                break
    assert len(delays) == 20 and sorted(delays)[18] <= 500, delays  # 19 of 20 within 500 frames
    f = mon.figures()
    assert f.mean_z > 0.0 and f.alarms == 1 and f.cusum < f.limit  # restarted at the crossing
    seen = []
    for s in rng.normal(size=1500).tolist():  # the line is back to normal: the state follows, after `window` frames
        if mon.add(s):
            seen.append(mon.state)
    assert seen and seen[-1] == DRIFT_OK and mon.state == DRIFT_OK


def test_a_persisting_drift_keeps_the_state_and_a_warning_comes_first():
    rng = np.random.default_rng(2)
    mon = monitor(known_reference())
    changes = [mon.state for s in (rng.normal(size=5000) + 0.4).tolist() if mon.add(s)]
    assert changes[:2] == [DRIFT_WARNING, DRIFT_RECALIBRATE] and changes[-1] == DRIFT_RECALIBRATE
    assert len(changes) == 2 and mon.alarms > 5  # re-crossing every few hundred frames: it never left recalibrate


def test_monitor_without_reference_is_off_and_reset_takes_a_new_one():
    mon = monitor(None)
    assert not any(mon.add(9.0) for _ in range(100)) and mon.state == DRIFT_OFF and mon.figures().window == 0
    assert mon.figures().reason == "drift monitoring is off" and mon.figures().limit is None
    mon.reset(known_reference(300))
    assert mon.state == DRIFT_COLLECTING and mon.figures().reason is None
    changes = [mon.state for _ in range(50) if mon.add(9.0)]
    assert changes == [DRIFT_WARNING, DRIFT_RECALIBRATE]  # z ~ 3.1 a frame: alarms do not wait for `collecting` to end
    mon.reset(None, "why")
    assert mon.state == DRIFT_OFF and mon.frames_seen == 0 and mon.figures().reason == "why"


def test_monitor_refuses_inconsistent_settings():
    with pytest.raises(ValueError):
        DriftMonitor(500, 10_000, 100_000, None)
    with pytest.raises(ValueError):
        DriftMonitor(500, 100_000, 10_000, None, 1.0)


# -- config --------------------------------------------------------------------------------------
def test_config_defaults_and_the_ignored_interval():
    d = DriftConfig()
    assert (d.detect_false_alarm_ratio, d.window, d.alarm_per_frames, d.warning_per_frames) == (2.0, 500, 100_000, 10_000)
    assert DriftConfig.model_validate({"interval": 50}).interval == 50  # configs written for the older test load
    assert "drift.interval" not in dump_example_keys() and "drift.detect_false_alarm_ratio" in dump_example_keys()


# -- payloads ------------------------------------------------------------------------------------
def test_drift_payload_validates_and_refuses_unknown_states():
    mon = monitor(known_reference(300), window=50)
    for _ in range(50):
        mon.add(9.0)
    now = datetime.now(timezone.utc)
    payload = drift_payload(station="s1", timestamp=now, previous_state=DRIFT_COLLECTING,
                            figures=mon.figures().to_dict(), bundle_name="b", bundle_sha256="0" * 64)
    jsonschema.Draft202012Validator(load_schema("drift")).validate(payload)
    assert payload["state"] == DRIFT_RECALIBRATE and payload["alarms"] >= 1 and payload["reference_frames"] == 300
    assert payload["mean_z"] > 2.9 and payload["limit"] > payload["warning_limit"] > 0
    json.dumps(payload, allow_nan=False)
    off = monitor(None)
    off.reset(None, f"no reference; {ENABLE_FIX}")
    payload = drift_payload(station="s1", timestamp=now, previous_state=DRIFT_OK, figures=off.figures().to_dict(),
                            bundle_name="b", bundle_sha256="0" * 64)
    jsonschema.Draft202012Validator(load_schema("drift")).validate(payload)
    assert payload["reason"].endswith(ENABLE_FIX) and payload["cusum"] is None
    with pytest.raises(ValueError, match="previous_state"):
        drift_payload(station="s1", timestamp=now, previous_state="bad",
                      figures=mon.figures().to_dict(), bundle_name="b", bundle_sha256="0" * 64)
    with pytest.raises(ValueError, match="drift.cusum"):
        drift_payload(station="s1", timestamp=now, previous_state=DRIFT_OK,
                      figures={**mon.figures().to_dict(), "cusum": -1.0}, bundle_name="b", bundle_sha256="0" * 64)
    text = render_prometheus({"drift_state": "recalibrate", "drift_alarms_total": 1, "drift_cusum": 3.5,
                              "drift_cusum_limit": 33.5, "drift_mean_z": 0.3, "drift_reference_frames": 3300,
                              "drift_baseline_frames": None})
    assert "daad_agent_drift_reference_frames 3300" in text and "drift_baseline_frames " not in text
    assert 'daad_agent_drift_state{reason="recalibrate"} 1' in text and "daad_agent_drift_alarms_total 1" in text
    assert "daad_agent_drift_cusum 3.5" in text and "daad_agent_drift_cusum_limit 33.5" in text


def test_status_payload_carries_the_drift_figures():
    mon = monitor(known_reference(1000))
    for s in np.random.default_rng(4).normal(size=600).tolist():
        mon.add(s)
    payload = status_payload(
        station="s1", state="running", fps=10.0, latency_ms={"p50": 1.0, "p99": 2.0}, frames_scored=600,
        frames_dropped=0, defects=0, spool_depth=0, spool_dropped=0, camera_state="streaming", mqtt_connected=True,
        image_threshold=2.0, pixel_threshold=1.0, bundle_name="b", bundle_sha256="0" * 64, uptime_s=60.0,
        timestamp=datetime.now(timezone.utc), drift=mon.figures().to_dict())
    jsonschema.Draft202012Validator(load_schema("status")).validate(payload)
    assert payload["drift"]["state"] == DRIFT_OK and payload["drift"]["window"] == 500


# -- the agent -----------------------------------------------------------------------------------
def old_thresholds(bundle, path):
    """thresholds.yaml as written before drift monitoring; nothing is a defect (every frame is a good one)."""
    return save_thresholds(path, Thresholds(1e6, 1e6, 4, bundle.sha256, strategy="manual", bundle_name=bundle.name))


def test_agent_publishes_recalibrate_when_good_parts_score_above_the_reference(
    tmp_path, template_bundle, mosquitto, caplog
):
    t = load_thresholds(old_thresholds(template_bundle, tmp_path / "old.yaml"), template_bundle)
    # a reference below every good score: every good frame is at the calibration's top, as after a strong drift
    drifted = dataclasses.replace(t, drift_reference={"n_frames": 200, "false_alarm_rate": 0.01,
                                                      "quantiles": [-2e9 + i for i in range(200)]})
    thresholds = save_thresholds(tmp_path / "thresholds.yaml", drifted)
    folder = write_folder(tmp_path / "incoming", parts("g" * 60))
    config = load_config(write_config(tmp_path, template_bundle, thresholds, mosquitto.port,
                                      {"kind": "folder", "path": str(folder)}, drift={"window": 50}))
    sub = Subscriber(mosquitto.port)
    try:
        caplog.set_level(logging.INFO)
        app = App(config, notifier=quiet_notifier())
        assert app.run() == 0
        assert sub.wait(lambda s: [p["state"] for p in s.payloads("drift")]
                        == [DRIFT_COLLECTING, DRIFT_WARNING, DRIFT_RECALIBRATE])
        drift = sub.payloads("drift")[-1]
        jsonschema.Draft202012Validator(load_schema("drift")).validate(drift)
        assert drift["previous_state"] == DRIFT_WARNING and drift["alarms"] == 1 and drift["frames_seen"] < 50
        assert drift["mean_z"] > 2.5 and drift["reference_frames"] == 200 and drift["cusum"] < drift["limit"]
        assert sub.wait(lambda s: s.payloads("status") and s.payloads("status")[-1]["drift"]["state"] == DRIFT_RECALIBRATE)
        jsonschema.Draft202012Validator(load_schema("status")).validate(sub.payloads("status")[-1])
        retained = [r for t_, _, r in sub.messages if t_ == f"daad/{STATION}/drift"]
        assert retained and not any(retained)  # live deliveries; the broker keeps the last as retained
        snap = app.snapshot()
        assert snap["drift_alarms_total"] == 1 and snap["drift_changes_total"] == 2 and snap["drift_state"] == DRIFT_RECALIBRATE
        assert snap["drift_cusum_limit"] == pytest.approx(drift["limit"]) and snap["drift_mean_z"] > 2.5
        assert snap["drift_reference_frames"] == drift["reference_frames"]  # also on /metrics
        assert any("drift: monitoring on: CUSUM" in r.getMessage() and "averaged over calibrations of 200" in r.getMessage()
                   for r in caplog.records)
        assert any("drift: warning -> recalibrate: mean normal score +" in r.getMessage()
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
                                      {"kind": "folder", "path": str(folder)}, drift={"window": 50}))
    caplog.set_level(logging.INFO)
    app = App(config, notifier=quiet_notifier())
    assert app.run() == 0 and app.frames_scored == 12
    said = [r for r in caplog.records if "drift: monitoring off" in r.getMessage()]
    assert len(said) == 1 and "has no field `drift_reference`" in said[0].getMessage()
    assert app.drift.state == DRIFT_OFF and app.snapshot()["drift_changes_total"] == 0


def test_thresholds_with_the_older_reference_run_with_drift_off_and_say_how_to_enable_it(
    tmp_path, template_bundle, mosquitto, caplog
):
    t = load_thresholds(old_thresholds(template_bundle, tmp_path / "old.yaml"), template_bundle)
    older = dataclasses.replace(t, drift_reference={"level": 0.5, "score": 1.0, "above": 100, "n_frames": 200})
    thresholds = save_thresholds(tmp_path / "thresholds.yaml", older)
    folder = write_folder(tmp_path / "incoming", parts("g" * 6))
    config = load_config(write_config(tmp_path, template_bundle, thresholds, mosquitto.port,
                                      {"kind": "folder", "path": str(folder)}, drift={"window": 50, "interval": 10}))
    caplog.set_level(logging.INFO)
    app = App(config, notifier=quiet_notifier())
    assert app.run() == 0 and app.frames_scored == 6
    said = [r.getMessage() for r in caplog.records if "drift: monitoring off" in r.getMessage()]
    assert len(said) == 1 and said[0].endswith(ENABLE_FIX) and "\n" not in said[0]
    assert any("drift.interval in the config is ignored" in r.getMessage() for r in caplog.records)
    f = app.drift.figures()
    assert f.state == DRIFT_OFF and f.reason.endswith(ENABLE_FIX)


# -- the baseline extension: the reference grows from the line's first good frames ---------------------------
def normal_reference(n: int) -> DriftReference:
    """N(0, 1) good scores, a calibration of n frames stated at its n Hazen quantiles (a valid drift_reference)."""
    return DriftReference(n_frames=n, false_alarm_rate=RATE,
                          quantiles=tuple(float(v) for v in st.norm.ppf(drift_format.levels(n))))


def extended(ref, baseline, window=500):
    return DriftMonitor(window, 100_000, 10_000, ref, 2.0, baseline_frames=baseline)


def test_pool_keeps_sorted_scores_or_weights_a_quantile_summary_by_its_frames():
    n, q = drift_format.pool([1.0, 3.0], 2, [2.0, 0.5])
    assert (n, q) == (4, [0.5, 1.0, 2.0, 3.0])  # every value a frame, few: the sorted union, as calibration keeps it
    rng = np.random.default_rng(5)
    cal = np.sort(rng.normal(size=5000))
    ref = stats.drift_reference(cal, float(cal.max()), RATE)  # 1000 quantiles standing for 5000 frames
    line = rng.normal(loc=1.0, size=5000)  # another population, to see the weights
    n, q = drift_format.pool(ref["quantiles"], ref["n_frames"], line)
    assert n == 10_000 and len(q) == drift_format.MAX_QUANTILES and q == sorted(q)
    both = np.sort(np.concatenate([cal, line]))
    exact = np.interp(np.asarray(drift_format.levels(1000)) * both.size - 0.5, np.arange(both.size), both)  # Hazen
    error = np.abs(np.asarray(q) - exact)
    assert np.max(error[10:-10]) < 0.01 and np.max(error) < 0.1  # as pooling the frames themselves (tails: coarser)
    with pytest.raises(ValueError):
        drift_format.pool([1.0, 2.0, 3.0], 2, [1.0])


def test_pooled_reference_narrows_k_and_the_offset_it_must_cover():
    rng = np.random.default_rng(6)
    cal = reference_from_dict(stats.drift_reference(rng.normal(size=300), 10.0, RATE))
    pooled = pooled_reference(cal, rng.normal(size=3000).tolist())
    assert pooled.n_frames == 3300 and pooled.false_alarm_rate == RATE and len(pooled.quantiles) == 1000
    small, big = (cusum.design(RATE, 2.0, r.n_frames, 1e5, 1e4) for r in (cal, pooled))
    assert big.k < small.k and big.k == pytest.approx(cusum.allowance(small.shift, 3300))
    assert reference_from_dict(reference_to_dict(pooled)) == pooled


def test_monitor_switches_to_the_pool_when_the_baseline_completes():
    rng = np.random.default_rng(8)  # a calibration and baseline without a warning (seed 7 warns: not pooled, below)
    cal = reference_from_dict(stats.drift_reference(rng.normal(size=300), 10.0, RATE))
    mon = extended(cal, 1000)
    f = mon.figures()
    assert (f.reference_source, f.reference_frames, f.baseline_collected, f.baseline_target) == (
        SOURCE_CALIBRATION, 300, 0, 1000)
    k_before = f.k
    scores = rng.normal(size=1200).tolist()
    for s in scores[:999]:
        mon.add(s)
    assert mon.source == SOURCE_CALIBRATION and mon.figures().baseline_collected == 999
    mon.add(scores[999])
    f = mon.figures()
    assert f.reference_source == SOURCE_POOLED and f.reference_frames == 1300 and f.calibration_frames == 300
    assert f.baseline_collected is None and f.k < k_before and f.cusum == 0.0 and f.warning_cusum == 0.0
    assert f.frames_seen == 1000 and f.window == 500 and abs(f.mean_z) < 4 / math.sqrt(500)
    assert f.mean_z == pytest.approx(np.mean([mon.reference.z(s) for s in scores[500:1000]]))  # against the pool
    for s in scores[1000:]:
        mon.add(s)
    assert mon.source == SOURCE_POOLED and mon.reference.n_frames == 1300 and mon.baseline == []
    payload = status_payload(
        station="s", state="running", fps=1.0, latency_ms={"p50": 1.0, "p99": 2.0}, frames_scored=1, frames_dropped=0,
        defects=0, spool_depth=0, spool_dropped=0, camera_state="streaming", mqtt_connected=True, image_threshold=1.0,
        pixel_threshold=1.0, bundle_name="b", bundle_sha256="0" * 64, uptime_s=1.0,
        timestamp=datetime.now(timezone.utc), drift=mon.figures().to_dict())
    jsonschema.Draft202012Validator(load_schema("status")).validate(payload)
    assert payload["drift"]["reference_source"] == SOURCE_POOLED and payload["drift"]["reference_frames"] == 1300


def test_a_drifting_line_does_not_become_the_reference():
    # an alarm while collecting discards the baseline; the calibration's CUSUM keeps watching
    mon = extended(normal_reference(300), 1000, window=50)
    changes = [mon.state for _ in range(200) if mon.add(9.0)]
    assert changes == [DRIFT_WARNING, DRIFT_RECALIBRATE] and mon.source == SOURCE_CALIBRATION
    assert mon.baseline_restarts >= 1 and len(mon.baseline) < 200 and mon.alarms >= 1
    # a baseline that completes while the state is warning (or recalibrate) is not pooled either: started again
    mon = extended(normal_reference(300), 30, window=50)
    for _ in range(29):
        mon.add(0.0)
    mon.state = DRIFT_WARNING  # as if the warning CUSUM had crossed within the window (no alarm: kept so far)
    mon._last_warning = mon.frames_seen + 1
    mon.add(0.0)
    assert mon.source == SOURCE_CALIBRATION and mon.baseline == [] and mon.baseline_restarts == 1
    # and once the line is quiet again, a full quiet baseline is pooled
    for s in np.random.default_rng(8).normal(size=200).tolist():
        mon.add(s)
    assert mon.source == SOURCE_POOLED and mon.reference.n_frames == 330


def test_no_extension_with_zero_baseline_frames_and_a_reset_starts_over():
    mon = extended(normal_reference(300), 0)
    for s in np.random.default_rng(9).normal(size=600).tolist():
        mon.add(s)
    assert mon.source == SOURCE_CALIBRATION and mon.baseline == [] and mon.figures().baseline_collected is None
    mon = extended(normal_reference(300), 100)
    pooled = pooled_reference(normal_reference(300), [0.0] * 100)
    mon.reset(normal_reference(300), pooled=pooled)
    assert mon.source == SOURCE_POOLED and mon.reference is pooled and mon.figures().calibration_frames == 300
    mon.reset(normal_reference(300), baseline=[0.1] * 150)  # a saved partial baseline, clipped to the target
    assert mon.source == SOURCE_CALIBRATION and len(mon.baseline) == 100
    mon.reset(None, "why")
    assert mon.source is None and mon.figures().reference_source is None and mon.baseline == []


# -- the state file --------------------------------------------------------------------------------------
BINDING = binding_of("a" * 64, {"n_frames": 300, "false_alarm_rate": RATE, "quantiles": [0.0, 1.0]})


def now():
    return datetime(2026, 12, 7, tzinfo=timezone.utc)


def feed_and_save(mon, store, scores) -> int:
    """As the agent does after each good frame; the number of switches to the pool."""
    switches = 0
    for s in scores.tolist():
        mon.add(s)
        switches += store.after_add(mon, now)
    return switches


def test_state_binding_follows_the_calibration_not_the_file():
    ref = {"n_frames": 300, "false_alarm_rate": RATE, "quantiles": [0.0, 1.0]}
    assert binding_of("a" * 64, dict(reversed(list(ref.items())))) == BINDING  # key order is not identity
    assert binding_of("b" * 64, ref) != BINDING
    assert binding_of("a" * 64, {**ref, "n_frames": 301}) != BINDING


def test_state_file_round_trips_a_partial_baseline_and_the_pool(tmp_path):
    path = tmp_path / "state" / "drift_state.json"
    store = DriftStateFile(path)
    assert store.load(BINDING) == DriftStateFile(path).load(BINDING) and not path.exists()
    mon = extended(normal_reference(300), 1000)
    feed_and_save(mon, store, np.random.default_rng(10).normal(size=600))
    saved = json.loads(path.read_text())  # saved every SAVE_EVERY frames of the baseline
    assert saved["pooled"] is None and len(saved["baseline"]) == 500 and saved["written"] == "2026-12-07T00:00:00Z"
    assert store.save(mon, now) and DriftStateFile(path).load(BINDING).baseline == mon.baseline
    switched = feed_and_save(mon, store, np.random.default_rng(11).normal(size=400))
    assert switched == 1 and mon.source == SOURCE_POOLED
    back = DriftStateFile(path).load(BINDING)
    assert back.baseline == [] and back.pooled == mon.reference and back.pooled.n_frames == 1300
    assert not list(path.parent.glob(".*.tmp"))  # atomic: no temporary left behind


def test_state_file_for_other_thresholds_is_ignored_and_replaced(tmp_path, caplog):
    path = tmp_path / "drift_state.json"
    other = binding_of("b" * 64, {"n_frames": 300, "false_alarm_rate": RATE, "quantiles": [0.0, 1.0]})
    mon = extended(normal_reference(300), 1000)
    mon.reset(normal_reference(300), baseline=[0.5] * 10)
    writer = DriftStateFile(path)
    writer.load(other)
    assert writer.save(mon, now)
    caplog.set_level(logging.INFO)
    store = DriftStateFile(path)
    assert store.load(BINDING) == EMPTY
    assert any("is for other thresholds: ignored" in r.getMessage() for r in caplog.records)
    mon.reset(normal_reference(300))
    assert store.save(mon, now) and json.loads(path.read_text())["bundle_sha256"] == "a" * 64


@pytest.mark.parametrize("text, words", [
    ("{not json", "Expecting"),
    ('{"version": 2}', "version 1"),
    (json.dumps({"version": 1, "bundle_sha256": BINDING.bundle_sha256,
                 "drift_reference_sha256": BINDING.drift_reference_sha256, "baseline": [1.0, "x"], "pooled": None}),
     "`baseline`"),
    (json.dumps({"version": 1, "bundle_sha256": BINDING.bundle_sha256,
                 "drift_reference_sha256": BINDING.drift_reference_sha256, "baseline": [],
                 "pooled": {"n_frames": 5, "false_alarm_rate": RATE, "quantiles": [2.0, 1.0]}}), "`pooled`"),
])
def test_corrupt_state_file_is_said_once_and_ignored(tmp_path, caplog, text, words):
    path = tmp_path / "drift_state.json"
    path.write_text(text)
    caplog.set_level(logging.INFO)
    assert DriftStateFile(path).load(BINDING) == EMPTY
    said = [r.getMessage() for r in caplog.records if "drift: state file" in r.getMessage()]
    assert len(said) == 1 and words in said[0] and "is corrupt" in said[0] and str(path) in said[0]


def test_unwritable_state_dir_is_said_once_and_the_baseline_goes_on_in_memory(tmp_path, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state folder should be")
    store = DriftStateFile(blocker / "drift_state.json")
    store.load(BINDING)
    mon = extended(normal_reference(300), 1000)
    caplog.set_level(logging.INFO)
    feed_and_save(mon, store, np.random.default_rng(12).normal(size=1100))
    assert mon.source == SOURCE_POOLED and store.save_failures >= 4 and store.saves == 0
    said = [r.getMessage() for r in caplog.records if "cannot write the state file" in r.getMessage()]
    assert len(said) == 1 and "goes on in memory" in said[0]


def test_agent_pools_the_line_baseline_and_keeps_the_pool_across_a_restart(tmp_path, template_bundle, mosquitto, caplog):
    t = load_thresholds(old_thresholds(template_bundle, tmp_path / "old.yaml"), template_bundle)
    # a reference above every good score: the line looks better than calibration, never an alarm
    quiet = dataclasses.replace(t, drift_reference={"n_frames": 200, "false_alarm_rate": 0.01,
                                                    "quantiles": [1e6 + i for i in range(200)]})
    thresholds = save_thresholds(tmp_path / "thresholds.yaml", quiet)
    folder = write_folder(tmp_path / "incoming", parts("g" * 30))
    config = load_config(write_config(tmp_path, template_bundle, thresholds, mosquitto.port,
                                      {"kind": "folder", "path": str(folder)},
                                      drift={"window": 50, "baseline_frames": 20}))
    state = tmp_path / "state" / "drift_state.json"
    assert config.drift_state_file == state  # beside the spool (spool.path state/spool.db)
    caplog.set_level(logging.INFO)
    sub = Subscriber(mosquitto.port)
    try:
        app = App(config, notifier=quiet_notifier())
        assert app.run() == 0 and app.frames_scored == 30
        f = app.drift.figures()
        assert (f.reference_source, f.reference_frames, f.calibration_frames) == (SOURCE_POOLED, 220, 200)
        saved = json.loads(state.read_text())
        assert saved["pooled"]["n_frames"] == 220 and saved["bundle_sha256"] == template_bundle.sha256
        assert any("the line's first 20 good frames pooled with the calibration's 200: the reference is now 220"
                   in r.getMessage() for r in caplog.records)
        assert sub.wait(lambda s: any(p.get("reference_source") == SOURCE_POOLED for p in s.payloads("drift")))
        switch = [p for p in sub.payloads("drift") if p.get("reference_source") == SOURCE_POOLED][0]
        jsonschema.Draft202012Validator(load_schema("drift")).validate(switch)
        assert switch["previous_state"] == switch["state"] and switch["reference_frames"] == 220
        assert app.snapshot()["drift_changes_total"] == 0  # the reference changed, not the state

        caplog.clear()  # a restart on the same thresholds starts from the pool, not from the calibration
        again = App(config, notifier=quiet_notifier())
        assert again.run() == 0
        f = again.drift.figures()
        assert (f.reference_source, f.reference_frames, f.baseline_collected) == (SOURCE_POOLED, 220, None)
        assert any("drift: reference from" in r.getMessage() and "pooled with 20 of the line's" in r.getMessage()
                   for r in caplog.records)
        assert "averaged over calibrations of 220" in "".join(r.getMessage() for r in caplog.records)
        assert sub.wait(lambda s: s.payloads("status")[-1]["drift"]["reference_source"] == SOURCE_POOLED)
        jsonschema.Draft202012Validator(load_schema("status")).validate(sub.payloads("status")[-1])
    finally:
        sub.close()

    # a new calibration: the state is for other thresholds, ignored; the baseline starts over and replaces it
    save_thresholds(thresholds, dataclasses.replace(quiet, drift_reference={
        "n_frames": 201, "false_alarm_rate": 0.01, "quantiles": [1e6 + i for i in range(201)]}))
    caplog.clear()
    third = App(config, notifier=quiet_notifier(), max_frames=10)
    assert third.run() == 0
    assert any("is for other thresholds: ignored" in r.getMessage() for r in caplog.records)
    f = third.drift.figures()
    assert (f.reference_source, f.reference_frames, f.baseline_collected) == (SOURCE_CALIBRATION, 201, 10)
    saved = json.loads(state.read_text())  # the partial baseline, saved at stop, for the new calibration
    assert saved["pooled"] is None and len(saved["baseline"]) == 10
    assert saved["drift_reference_sha256"] == drift_format.digest(load_thresholds(thresholds, template_bundle).drift_reference)
