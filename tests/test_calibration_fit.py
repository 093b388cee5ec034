"""Capture -> fit -> thresholds.yaml on synthetic parts, scored by the real template bundle (ONNX Runtime).

The claims under test are the ones the report makes to a technician: the false-alarm interval holds on
fresh good parts, best F1 beats the target-rate threshold on F1 when labelled defects exist, the file
round-trips, and another bundle is refused.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator, Tuple

import numpy as np
import pytest
from scipy.stats import binom

from calibration import stats
from calibration.capture import CaptureError, capture_from_images, load_capture, run_capture
from calibration.fit import fit_thresholds, score_defect_dataset, summary_lines, write_thresholds
from engine.thresholds import load_thresholds
from engine.backend import open_backend
from engine.bundle import Bundle, load_bundle, write_bundle_yaml
from engine.errors import ThresholdsError
from engine.preprocess import preprocess
from engine.regions import count_regions
from tests.bundle_factory import make_template_bundle
from train.synthetic import make_defective, make_good

SEED = 0  # the template bundle's seed: same parts, other indices
CALIBRATION_START = 300_000  # indices of the calibration frames ...
FRESH_START = 400_000  # ... and of fresh frames never seen by the fit
PLAUSIBLE = 0.999  # a fresh count outside the central 99.9% of Binomial(M, p) for every p in the interval refutes it


def good_frames(start: int, n: int) -> Iterator[Tuple[str, np.ndarray]]:
    for i in range(start, start + n):
        yield f"good#{i}", make_good(SEED, i)


def scores_of(bundle: Bundle, frames: Iterator[Tuple[str, np.ndarray]]) -> np.ndarray:
    with open_backend(bundle, prefer="onnxruntime") as be:
        return np.asarray([float(be.infer(preprocess(im, bundle.preprocess)[None]).score[0]) for _, im in frames])


def consistent(flagged: int, m: int, ci: Tuple[float, float]) -> bool:
    """Could `flagged` of m fresh good frames come from a true rate inside the stated interval?"""
    lo, hi = ci
    tail = (1 - PLAUSIBLE) / 2
    return binom.ppf(tail, m, lo) <= flagged <= binom.ppf(1 - tail, m, hi)


@pytest.fixture(scope="module")
def calibration_capture(template_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("capture")
    (out / "frames").mkdir()
    with open_backend(template_bundle, prefer="onnxruntime") as be:
        return run_capture(good_frames(CALIBRATION_START, 300), template_bundle, be, 300, out,
                           {"kind": "test"}, progress=False)


@pytest.fixture(scope="module")
def fresh_scores(template_bundle: Bundle) -> np.ndarray:
    return scores_of(template_bundle, good_frames(FRESH_START, 600))


def test_false_alarm_rate_on_fresh_frames_is_within_the_stated_interval(calibration_capture, fresh_scores) -> None:
    result = fit_thresholds(calibration_capture, 0.05)
    t = result.at_chosen
    assert t.strategy == "quantile" and t.n == 300  # 3/300 = 1% resolves 5%
    flagged = int(np.sum(fresh_scores > result.thresholds.image_threshold))
    assert consistent(flagged, fresh_scores.size, t.ci), (flagged, t.ci)
    # the check can fail: a threshold at the calibration p80 with the same stated interval is refuted
    wrong = float(np.quantile(calibration_capture.scores, 0.8))
    assert not consistent(int(np.sum(fresh_scores > wrong)), fresh_scores.size, t.ci)


def test_low_rate_with_an_unsound_tail_falls_back_to_the_highest_score(calibration_capture, fresh_scores) -> None:
    """The template model's score (a map maximum) has a bounded tail (shape < -0.5): no extrapolation, the quantile
    fallback takes the highest good score, says why, and its interval still holds on fresh frames."""
    result = fit_thresholds(calibration_capture, 0.002)
    t = result.at_chosen
    assert t.strategy == "quantile" and t.threshold == calibration_capture.scores.max()
    assert any("1500 good frames" in w for w in result.warnings)  # 3 / 0.002
    assert any("no tail extrapolation" in w and "shape" in w for w in result.warnings)
    flagged = int(np.sum(fresh_scores > result.thresholds.image_threshold))
    assert consistent(flagged, fresh_scores.size, t.ci), (flagged, t.ci)


def test_pixel_threshold_leaves_good_frames_almost_free_of_regions(calibration_capture) -> None:
    result = fit_thresholds(calibration_capture, 0.05)
    p = result.thresholds
    regions = [count_regions(m, p.pixel_threshold, p.min_defect_area) for m in calibration_capture.maps]
    with_regions = sum(r > 0 for r in regions)
    assert with_regions == result.pixel.frames_with_regions
    assert with_regions <= 0.05 * 301  # the conformal bound on the calibration frames themselves


def test_thresholds_file_round_trips_and_refuses_another_bundle(calibration_capture, template_bundle, tmp_path) -> None:
    result = fit_thresholds(calibration_capture, 0.05)
    path = write_thresholds(result, tmp_path / "thresholds.yaml")
    loaded = load_thresholds(path, template_bundle)
    assert loaded == result.thresholds
    assert loaded.bundle_sha256 == template_bundle.sha256 and loaded.n_frames == 300
    ref = loaded.drift_reference  # the agent's drift alarm: the frames at or below the threshold, sorted
    judged_good = calibration_capture.scores[calibration_capture.scores <= loaded.image_threshold]
    assert ref["n_frames"] == judged_good.size and ref["quantiles"] == sorted(float(v) for v in judged_good)
    assert ref["false_alarm_rate"] == 0.05
    assert any(line.startswith(f"drift reference   {judged_good.size} good frames") for line in summary_lines(result, calibration_capture))
    assert any("the drift alarm's reference holds" in w for w in result.warnings)  # < 1000 frames: slower, said
    prov = loaded.provenance["image_threshold"]
    assert prov["false_alarm_rate_ci95"] == list(result.at_chosen.ci)
    other = make_template_bundle(tmp_path / "other", size=64, seed=1)  # another template: another model hash
    with pytest.raises(ThresholdsError, match="another model") as err:
        load_thresholds(path, other)
    assert str(path) in str(err.value)
    with pytest.raises(CaptureError, match="another model") as err:
        load_capture(calibration_capture.root, other)
    assert "capture.yaml" in str(err.value)


SUBTLE = 0.7  # defects drawn at 70% contrast: their scores overlap the upper half of the good scores


def write_labelled_set(root: Path, seed: int, n_good: int = 100, n_defect: int = 50) -> Path:
    """MVTec layout: test/good and test/subtle (faint defects of every kind)."""
    import cv2

    for sub in ("good", "subtle"):
        (root / "test" / sub).mkdir(parents=True)
    for i in range(n_good):
        cv2.imwrite(str(root / "test" / "good" / f"{i:03d}.png"), make_good(seed, i))
    for i in range(n_defect):
        good = make_good(seed, 1000 + i).astype(np.float32)
        defective = make_defective(seed, 1000 + i)[0].astype(np.float32)
        faint = np.clip(good + SUBTLE * (defective - good), 0, 255).astype(np.uint8)
        cv2.imwrite(str(root / "test" / "subtle" / f"{i:03d}.png"), faint)
    return root


def test_best_f1_beats_the_target_rate_threshold_on_fresh_labelled_parts(template_bundle, tmp_path) -> None:
    """Faint defects overlap the good tail: a 1% target puts the threshold above most of them, best F1 below.
    Both are fitted on one labelled set and compared on a fresh one (on the fitting set best F1 wins by definition)."""
    fit_set = write_labelled_set(tmp_path / "fit_set", seed=11)
    fresh_set = write_labelled_set(tmp_path / "fresh_set", seed=12)
    capture = capture_from_images(fit_set / "test" / "good", template_bundle.root, tmp_path / "cap",
                                  backend="onnxruntime", progress=False)
    defects = score_defect_dataset(fit_set, template_bundle, backend="onnxruntime", progress=False)
    by_rate = fit_thresholds(capture, 0.01, "quantile", defects)
    by_f1 = fit_thresholds(capture, 0.01, "best_f1", defects, n_boot=10)  # 100 frames: 1% needs the tail fit
    assert by_f1.thresholds.strategy == "best_f1"
    assert by_f1.thresholds.image_threshold < by_rate.thresholds.image_threshold
    fresh = score_defect_dataset(fresh_set, template_bundle, backend="onnxruntime", progress=False)
    assert fresh.good_scores.size == 100  # test/good is scored as held-out good
    f1_rate = stats.f1_at(fresh.good_scores, fresh.all_scores, by_rate.thresholds.image_threshold).f1
    f1_best = stats.f1_at(fresh.good_scores, fresh.all_scores, by_f1.thresholds.image_threshold).f1
    assert f1_best > f1_rate + 0.2, (f1_best, f1_rate)
    # the labelled figures are in the file: miss rate per type, and what the target rate would have given
    prov = by_f1.thresholds.provenance
    assert prov["defects"]["miss_rates"]["subtle"]["n"] == 50
    assert prov["defects"]["heldout_good"]["n"] == 100
    assert prov["target_rate_threshold"]["threshold"] == by_f1.image.threshold


def test_best_f1_without_defects_is_refused(calibration_capture) -> None:
    with pytest.raises(stats.StatsError, match="--defects"):
        fit_thresholds(calibration_capture, 0.05, "best_f1")


def test_capture_warns_when_frames_score_unlike_the_training_images(template_bundle, calibration_capture, tmp_path) -> None:
    """A bundle whose score statistics describe the good parts: normal frames pass, frames from another camera
    setting (overexposed) are flagged in capture.yaml."""
    root = tmp_path / "bundle"
    shutil.copytree(template_bundle.root, root)
    s = calibration_capture.scores
    meta = dict(template_bundle.metadata)
    meta["score_stats"] = {"mean": float(s.mean()), "std": float(s.std()), "p50": float(np.median(s)),
                           "p95": float(np.quantile(s, 0.95)), "p99": float(np.quantile(s, 0.99)), "max": float(s.max()),
                           "n": int(s.size)}
    write_bundle_yaml(root, meta)
    bundle = load_bundle(root)
    # statistics live in bundle.yaml: the bundle's identity (its manifest) changes, its graph does not
    assert bundle.sha256 != template_bundle.sha256 and bundle.graph_sha256 == template_bundle.graph_sha256

    def frames(gain: float) -> Iterator[Tuple[str, np.ndarray]]:
        for name, im in good_frames(500_000, 40):
            yield name, np.clip(im.astype(np.float32) * gain, 0, 255).astype(np.uint8)

    with open_backend(bundle, prefer="onnxruntime") as be:
        (tmp_path / "ok" / "frames").mkdir(parents=True)
        ok = run_capture(frames(1.0), bundle, be, 40, tmp_path / "ok", {"kind": "test"}, progress=False)
        (tmp_path / "bright" / "frames").mkdir(parents=True)
        bright = run_capture(frames(1.6), bundle, be, 40, tmp_path / "bright", {"kind": "test"}, progress=False)
    assert not any("training" in w for w in ok.meta["warnings"])
    assert any("unlike the training images" in w for w in bright.meta["warnings"])
    # and fit repeats it from capture.yaml's copy of the statistics, without the bundle
    assert any("unlike the training images" in w for w in fit_thresholds(load_capture(bright.root), 0.05).warnings)


def test_capture_warns_on_mixed_frame_sizes(template_bundle, tmp_path) -> None:
    import cv2

    def frames() -> Iterator[Tuple[str, np.ndarray]]:
        for i, (name, im) in enumerate(good_frames(600_000, 24)):
            yield name, (im if i % 2 else cv2.resize(im, (160, 96)))

    (tmp_path / "frames").mkdir()
    with open_backend(template_bundle, prefer="onnxruntime") as be:
        cap = run_capture(frames(), template_bundle, be, 24, tmp_path, {"kind": "test"}, progress=False)
    assert cap.meta["frame_sizes"] == {"128x128": 12, "160x96": 12}
    assert any("2 sizes" in w for w in cap.meta["warnings"])
