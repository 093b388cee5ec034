"""One validation style (engine/validation.py) for every file the product reads: a wrong type, an unknown key and
a missing key are each one line `FILE: key.path: got X, expected Y` (+ the fix), in the train config, bundle.yaml and
thresholds.yaml as in agent.yaml (tests/test_agent_config.py)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Dict

import pytest
import yaml

from engine.bundle import BUNDLE_YAML, Bundle, load_bundle, write_bundle_yaml
from engine.errors import BundleError, ConfigError, ThresholdsError
from engine.thresholds import Thresholds, load_thresholds, save_thresholds
from train.config import ModelConfig, TrainConfig, from_dict, model_config_file, preset, to_dict

THRESHOLDS_FIX = "regenerate it with `daad-calibrate fit`"
BUNDLE_FIX = "copy the bundle again or re-export the bundle with `daad-train export`"


def only_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text, text
    return text


# -- the train config --------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, line", [
    ("model:\n  memory_items: many\n", "model.memory_items: got 'many', expected an integer"),  # wrong type
    ("model:\n  skips: 1\n", "model.skips: got 1, expected true or false"),  # no number for a flag
    ("model:\n  skip: true\n", "model.skip: got unknown key 'skip', expected a known key (the nearest of 36: skips)"),
    ("model:\n  image_size: [256]\n", "model.image_size: got a list of 1, expected at least 2 items"),  # an item missing
    ("modle:\n  skips: true\n", "modle: got unknown key 'modle', expected one of model"),  # the file's own keys
])
def test_train_config_file_problems_are_one_line_each(tmp_path: Path, text: str, line: str) -> None:
    path = tmp_path / "train.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        model_config_file(path, preset("inspect"))
    assert only_line(err) == f"{path}: {line}"


def test_train_config_reports_every_problem_and_reads_back_what_it_wrote() -> None:
    with pytest.raises(ConfigError) as err:
        from_dict(ModelConfig, {"memory_items": 2.5, "backbone": 5, "foo": 1}, "x.yaml: model")
    assert str(err.value).splitlines() == [
        "x.yaml: model.memory_items: got 2.5, expected an integer",
        "x.yaml: model.backbone: got 5, expected a string",
        "x.yaml: model.foo: got unknown key 'foo', expected one of "
        + ", ".join(to_dict(ModelConfig())),  # no key near 'foo': all of them
    ]
    for name in ("inspect", "inspect_daad_plus", "daad_plus", "ae"):
        assert from_dict(ModelConfig, to_dict(preset(name))) == preset(name)  # a checkpoint's config, read back
    cfg = from_dict(TrainConfig, {**to_dict(TrainConfig()), "steps": 300.0, "loss": {"adv": 0.5}})
    assert cfg.steps == 300 and isinstance(cfg.steps, int) and cfg.loss.adv == 0.5 and cfg.loss.rec == 1.0
    with pytest.raises(ConfigError,
                       match=r"^ckpt: train_config.loss.foo: got unknown key 'foo', expected one of rec, adv, ali$"):
        from_dict(TrainConfig, {"loss": {"foo": 1}}, "ckpt: train_config")


# -- thresholds.yaml ---------------------------------------------------------------------------------------
def _thresholds(tmp_path: Path, edit: Callable[[Dict[str, Any]], None]) -> Path:
    path = save_thresholds(tmp_path / "thresholds.yaml", Thresholds(0.5, 0.4, 3, "a" * 64))
    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("edit, line", [
    (lambda d: d.update(min_defect_area="big"), "min_defect_area: got 'big', expected an integer"),
    (lambda d: d.update(image_threshold=float("inf")), "image_threshold: got inf, expected a finite number"),
    (lambda d: d.update(strategy="magic"), "strategy: got 'magic', expected 'quantile', 'gpd', 'best_f1' or 'manual'"),
    (lambda d: d.update(thresold=1.0), "thresold: got unknown key 'thresold', expected one of format_version, "
                                       "image_threshold, pixel_threshold, min_defect_area, bundle_sha256, strategy, "
                                       "target_false_alarm_rate, n_frames, score_quantiles, bundle_name, created, "
                                       "provenance, drift_reference"),
    (lambda d: d.pop("bundle_sha256"), "bundle_sha256: got nothing, expected a value (this key is required)"),
])
def test_thresholds_problems_are_one_line_with_the_fix(tmp_path: Path, edit: Callable, line: str) -> None:
    path = _thresholds(tmp_path, edit)
    with pytest.raises(ThresholdsError) as err:
        load_thresholds(path)
    assert only_line(err) == f"{path}: {line}; {THRESHOLDS_FIX}"


def test_thresholds_of_a_newer_format_say_to_upgrade(tmp_path: Path) -> None:
    path = _thresholds(tmp_path, lambda d: d.update(format_version=2, new_field=1))
    with pytest.raises(ThresholdsError) as err:
        load_thresholds(path)
    assert only_line(err).startswith(f"{path}: format_version: got 2, expected 1; written by a newer daad-calibrate: "
                                     "upgrade daad-inspect here")


def test_hand_written_thresholds_that_loaded_before_still_load(tmp_path: Path) -> None:
    """Unquoted numbers and dates, an empty provenance, numbers as text: what the hand-written reader took."""
    path = tmp_path / "thresholds.yaml"
    path.write_text("format_version: 1\nimage_threshold: '0.5'\npixel_threshold: 1\nmin_defect_area: 3.0\n"
                    f"bundle_sha256: {'b' * 64}\nbundle_name: 7\ncreated: 2026-01-05\nprovenance:\nstrategy: manual\n")
    t = load_thresholds(path)
    assert (t.image_threshold, t.pixel_threshold, t.min_defect_area) == (0.5, 1.0, 3)
    assert (t.bundle_name, t.created, t.provenance, t.strategy) == ("7", "2026-01-05", {}, "manual")


# -- bundle.yaml -------------------------------------------------------------------------------------------
@pytest.fixture()
def bundle_copy(template_bundle: Bundle, tmp_path: Path) -> Path:
    root = tmp_path / "bundle"
    shutil.copytree(template_bundle.root, root)
    return root


def _reseal(root: Path, edit: Callable[[Dict[str, Any]], None]) -> None:
    meta = yaml.safe_load((root / BUNDLE_YAML).read_text())
    edit(meta)
    write_bundle_yaml(root, meta)


@pytest.mark.parametrize("edit, line", [
    (lambda m: m.update(opset="seventeen"), "opset: got 'seventeen', expected an integer"),
    (lambda m: m["preprocess"].update(height=[64]), "preprocess.height: got a list of 1, expected an integer"),
    (lambda m: m.update(comment="mine"), "comment: got unknown key 'comment', expected one of format_version, model, "
                                         "input, preprocess, outputs, opset, graphs, score_stats, metrics, "
                                         "training_data, software, created, parity, features, taught, manifest_sha256"),
    (lambda m: m["input"].update(shape=[1, 1, 64, 64]), "input.shape: got unknown key 'shape', expected one of name, "
                                                        "dtype, layout"),
    (lambda m: m["graphs"][1].pop("batch"), "graphs[1].batch: got nothing, expected a value (this key is required)"),
    (lambda m: m.pop("preprocess"), "preprocess: got nothing, expected a value (this key is required)"),
])
def test_bundle_yaml_problems_are_one_line_with_the_fix(bundle_copy: Path, edit: Callable, line: str) -> None:
    _reseal(bundle_copy, edit)  # a tool that knows the manifest's recipe: the schema, not the digest, refuses it
    with pytest.raises(BundleError) as err:
        load_bundle(bundle_copy)
    assert only_line(err) == f"{bundle_copy / BUNDLE_YAML}: {line}; {BUNDLE_FIX}"


def test_every_key_the_writers_write_is_modelled(bundle_copy: Path) -> None:
    """export's parity and teach's taught records (free inside) load; the sections keep their values."""
    taught = {"at": "2026-01-05T00:00:00+00:00", "parent": {"name": "p", "sha256": "c" * 64, "path": "/x"},
              "frames": [{"file": "/f.png", "sha256": "d" * 64}], "anything": ["a later writer's field"]}
    _reseal(bundle_copy, lambda m: m.update(parity={"max_abs_map": 1e-6, "n_images": 2}, taught=[taught]))
    bundle = load_bundle(bundle_copy)
    assert bundle.metadata["taught"] == [taught] and bundle.metadata["parity"]["n_images"] == 2
    assert bundle.input_name == "image" and bundle.map_output == "anomaly_map" and bundle.opset == 17
