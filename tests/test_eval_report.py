"""The evaluation report's parts that need no model: the calibrated threshold read from a real thresholds.yaml
(written by calibration's own writer), its errors, and what the per-type table counts. The whole page, from a
trained model, is tested in test_fit.py (test_eval_writes_metrics_plots_and_the_report)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from engine.thresholds import Thresholds, save_thresholds
from engine.errors import ThresholdsError
from train.report import calibrated_threshold, caught_counts, per_type_rows


def test_the_calibrated_threshold_is_read_from_calibrations_own_file(tmp_path: Path) -> None:
    path = thresholds_file(tmp_path / "thresholds.yaml")
    got = calibrated_threshold(path)
    assert got.value == 6.4 and got.calibrated
    assert got.label == "calibrated threshold 6.4 (the agent's, thresholds.yaml)"


def thresholds_file(path: Path) -> Path:
    return save_thresholds(path, Thresholds(
        image_threshold=6.4, pixel_threshold=9.0, min_defect_area=8, bundle_sha256="a" * 64, strategy="gpd",
        target_false_alarm_rate=0.02))


@pytest.mark.parametrize("change,expected", [
    ("missing", "thresholds file not found"),  # no file at all
    ("yaml", "not valid YAML"),
    ("drop", "image_threshold: got nothing, expected a value (this key is required)"),
    ("high", "image_threshold: got 'high', expected a number"),
    ("nan", "image_threshold: got nan, expected a finite number"),
])
def test_a_bad_thresholds_file_is_one_line_naming_file_field_and_fix(tmp_path: Path, change: str,
                                                                      expected: str) -> None:
    """The agent's own reader (engine.thresholds) reads the file, so eval refuses what the agent would refuse."""
    path = tmp_path / "t.yaml"
    if change == "yaml":
        path.write_text("image_threshold: [1\n")
    elif change != "missing":
        data = yaml.safe_load(thresholds_file(path).read_text())
        if change == "drop":
            del data["image_threshold"]
        else:
            data["image_threshold"] = {"high": "high", "nan": float("nan")}[change]
        path.write_text(yaml.safe_dump(data))
    with pytest.raises(ThresholdsError) as info:
        calibrated_threshold(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and expected in message and "daad-calibrate fit" in message
    assert "\n" not in message


def test_the_per_type_table_counts_catches_and_false_alarms_at_the_threshold() -> None:
    from train.plots import Threshold
    from train.report import best_f1_threshold

    types = ["good", "good", "pit", "pit", "crack"]
    counts = caught_counts([1.0, 7.0, 9.0, 3.0, 8.0], types, Threshold(6.5, "calibrated", calibrated=True))
    assert counts == {"good": (1, 2), "pit": (1, 2), "crack": (1, 1)}
    # the agent flags above its threshold; best F1 (sklearn) counts a score equal to it as defective
    assert caught_counts([1.0, 7.0, 9.0, 3.0, 8.0], types, Threshold(8.0, "calibrated"))["crack"] == (0, 1)
    assert caught_counts([1.0, 7.0, 9.0, 3.0, 8.0], types, best_f1_threshold(8.0))["crack"] == (1, 1)
    metrics = {"image_auroc_per_type": {"crack": 1.0, "pit": 0.75},
               "pixel_auroc_breakdown": {"per_type": {"crack": 0.9, "pit": float("nan")}}}
    assert per_type_rows(metrics, counts) == [
        ["crack", "1", "1.000", "0.900", "1 of 1 caught"],
        ["pit", "2", "0.750", "n/a", "1 of 2 caught"],
        ["good", "2", "", "", "1 of 2 flagged (false alarms)"],
    ]
