"""Bundle integrity: the manifest over bundle.yaml and every graph, the graph checked against bundle.yaml at
load, and thresholds bound to the manifest (engine.bundle, engine.onnx_io, engine.thresholds)."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable

import onnx
import pytest
import yaml

from engine.thresholds import Thresholds, load_thresholds, save_thresholds
from engine.bundle import BUNDLE_YAML, MANIFEST_FIELD, Bundle, load_bundle, sha256_file, write_bundle_yaml
from engine.errors import BundleError, ThresholdsError
from engine.onnx_io import read_graph_io
from tests.bundle_factory import make_product_bundle, product_graph


@pytest.fixture()
def bundle_copy(template_bundle: Bundle, tmp_path: Path) -> Path:
    root = tmp_path / "bundle"
    shutil.copytree(template_bundle.root, root)
    return root


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_written_bundle_carries_its_manifest(template_bundle: Bundle) -> None:
    text = (template_bundle.root / BUNDLE_YAML).read_text()
    assert text.splitlines()[-1] == f"{MANIFEST_FIELD}: {template_bundle.manifest_sha256}"
    assert len(template_bundle.manifest_sha256) == 64
    assert template_bundle.sha256 == template_bundle.manifest_sha256 != template_bundle.graph_sha256
    assert template_bundle.graph_sha256 == sha256_file(template_bundle.onnx_path(1))


@pytest.mark.parametrize("old, new", [
    ("- 0.5\n", "- 0.2\n"),  # preprocessing mean 0.5 -> 0.2: the agent flagged 40 of 40 frames
    ("height: 64", "height: 32"),  # input height: --check-config passed, the agent died with a traceback
    ("name: template-test", "name: template-tesT"),
    ("format_version: 1\n", "format_version: 1\n# a comment\n"),  # even a comment is a changed byte
    ("format_version: 1\n", "format_version:  1\n"),
])
def test_edited_bundle_yaml_is_refused(bundle_copy: Path, old: str, new: str) -> None:
    path = bundle_copy / BUNDLE_YAML
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(BundleError) as err:
        load_bundle(bundle_copy)
    line = one_line(err)
    assert line.startswith(f"{path}: field `{MANIFEST_FIELD}`") and "re-export the bundle" in line


def test_every_changed_byte_is_refused(bundle_copy: Path) -> None:
    """Flip each byte of bundle.yaml in turn, and bytes across the graph: every copy is refused at load."""
    path = bundle_copy / BUNDLE_YAML
    original = path.read_bytes()
    for i in range(len(original)):
        data = bytearray(original)
        data[i] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(BundleError):
            load_bundle(bundle_copy)
    path.write_bytes(original)
    graph = bundle_copy / "model.onnx"
    raw = graph.read_bytes()
    for i in range(0, len(raw), max(1, len(raw) // 97)):
        data = bytearray(raw)
        data[i] ^= 0x01
        graph.write_bytes(bytes(data))
        with pytest.raises(BundleError, match="model.onnx: SHA-256 .* does not match"):
            load_bundle(bundle_copy)
    graph.write_bytes(raw)
    assert load_bundle(bundle_copy).sha256  # the restored copy loads again: the refusals were the edits


def test_other_graph_with_its_hash_written_in_is_refused(bundle_copy: Path, tmp_path: Path) -> None:
    """A random model.onnx whose hash was pasted into bundle.yaml: the manifest no longer matches."""
    onnx.save(product_graph(1, size=64), str(bundle_copy / "model.onnx"))
    meta_text = (bundle_copy / BUNDLE_YAML).read_text()
    meta = yaml.safe_load(meta_text)
    old_sha = meta["graphs"][0]["sha256"]
    (bundle_copy / BUNDLE_YAML).write_text(meta_text.replace(old_sha, sha256_file(bundle_copy / "model.onnx")))
    with pytest.raises(BundleError, match=f"field `{MANIFEST_FIELD}`"):
        load_bundle(bundle_copy)


def _reseal(root: Path, edit: Callable[[dict], None]) -> None:
    """Edit bundle.yaml and write it with a fresh manifest, as a tool that knows the recipe would."""
    meta = yaml.safe_load((root / BUNDLE_YAML).read_text())
    edit(meta)
    write_bundle_yaml(root, meta)


@pytest.mark.parametrize("edit, fragment", [
    (lambda m: m["preprocess"].update(height=32), "field `preprocess` (gray, 32x64, batch 1: 1x1x32x64) does not "
                                                  "match model.onnx, whose input 'image' is 1x1x64x64"),
    (lambda m: m["preprocess"].update(channel_order="rgb", mean=[0.5] * 3, std=[0.5] * 3),
     "field `preprocess` (rgb, 64x64, batch 1: 1x3x64x64) does not match model.onnx"),
    (lambda m: m["outputs"].update(score="image_score"), "field `outputs.score` is 'image_score' but model.onnx has "
                                                         "outputs ['anomaly_map', 'score']"),
    (lambda m: m["input"].update(name="frame"), "field `input.name` is 'frame' but model.onnx has inputs ['image']"),
])
def test_metadata_that_disagrees_with_the_graph_is_refused(bundle_copy: Path, edit: Callable, fragment: str) -> None:
    _reseal(bundle_copy, edit)
    with pytest.raises(BundleError) as err:
        load_bundle(bundle_copy)
    line = one_line(err)
    assert line.startswith(str(bundle_copy / BUNDLE_YAML)) and fragment in line and "re-export" in line


def test_batch_graph_disagreeing_is_refused_too(bundle_copy: Path) -> None:
    _reseal(bundle_copy, lambda m: m["graphs"][1].update(batch=8))  # model_b4.onnx listed as batch 8
    with pytest.raises(BundleError, match=r"batch 8: 8x1x64x64\) does not match model_b4.onnx, whose input 'image' is 4x1x64x64"):
        load_bundle(bundle_copy)


def test_resealed_consistent_edit_loads_with_a_new_identity(bundle_copy: Path, template_bundle: Bundle) -> None:
    _reseal(bundle_copy, lambda m: m["score_stats"].update(p99=1.0))
    bundle = load_bundle(bundle_copy)
    assert bundle.sha256 != template_bundle.sha256 and bundle.graph_sha256 == template_bundle.graph_sha256


def test_bundle_without_manifest_loads_with_a_warning(bundle_copy: Path, template_bundle: Bundle,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    path = bundle_copy / BUNDLE_YAML
    path.write_text("".join(line for line in path.read_text().splitlines(True) if not line.startswith(MANIFEST_FIELD)))
    with caplog.at_level(logging.WARNING, logger="engine.bundle"):
        bundle = load_bundle(bundle_copy)
    assert bundle.manifest_sha256 == "" and bundle.sha256 == template_bundle.graph_sha256
    assert "no field `manifest_sha256`" in caplog.text and "re-export" in caplog.text


def test_manifest_field_that_is_not_its_own_line_is_refused(bundle_copy: Path) -> None:
    path = bundle_copy / BUNDLE_YAML
    text = path.read_text()
    path.write_text(text.replace(f"{MANIFEST_FIELD}: ", f"{MANIFEST_FIELD}: x"))
    with pytest.raises(BundleError, match=f"field `{MANIFEST_FIELD}`"):
        load_bundle(bundle_copy)


# -- thresholds bind to the manifest ---------------------------------------------------------------------
def test_thresholds_bind_to_the_manifest(bundle_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bundle = load_bundle(bundle_copy)
    path = save_thresholds(tmp_path / "t.yaml", Thresholds(0.5, 0.4, 3, bundle.sha256))
    assert load_thresholds(path, bundle).bundle_sha256 == bundle.manifest_sha256
    # same graph, another bundle.yaml (e.g. another preprocessing, resealed): refused
    _reseal(bundle_copy, lambda m: m["preprocess"].update(mean=[0.2], std=[0.5]))
    with pytest.raises(ThresholdsError) as err:
        load_thresholds(path, load_bundle(bundle_copy))
    assert "made for another model (or another bundle.yaml): recalibrate with `daad-calibrate fit`" in one_line(err)


def test_thresholds_from_before_manifests_still_load(bundle_copy: Path, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    bundle = load_bundle(bundle_copy)
    legacy = save_thresholds(tmp_path / "legacy.yaml", Thresholds(0.5, 0.4, 3, bundle.graph_sha256))
    with caplog.at_level(logging.WARNING, logger="engine.thresholds"):
        assert load_thresholds(legacy, bundle).image_threshold == 0.5
    assert "names the bundle's graph only" in caplog.text and "recalibrate" in caplog.text
    other = save_thresholds(tmp_path / "other.yaml", Thresholds(0.5, 0.4, 3, "e" * 64))
    with pytest.raises(ThresholdsError, match="made for another model"):
        load_thresholds(other, bundle)


def test_stripping_the_manifest_does_not_get_past_bound_thresholds(bundle_copy: Path, tmp_path: Path) -> None:
    """Removing the manifest line makes a bundle look pre-manifest; thresholds bound to the manifest refuse it."""
    bundle = load_bundle(bundle_copy)
    path = save_thresholds(tmp_path / "t.yaml", Thresholds(0.5, 0.4, 3, bundle.sha256))
    yaml_path = bundle_copy / BUNDLE_YAML
    text = yaml_path.read_text().replace("- 0.5\n", "- 0.2\n", 1)
    yaml_path.write_text("".join(line for line in text.splitlines(True) if not line.startswith(MANIFEST_FIELD)))
    with pytest.raises(ThresholdsError, match="made for another model"):
        load_thresholds(path, load_bundle(bundle_copy))


# -- the graph's inputs and outputs, read without the onnx package ---------------------------------------
def test_graph_io_reader_agrees_with_onnx(tmp_path: Path) -> None:
    bundle = make_product_bundle(tmp_path / "p", batches=(1, 2))
    for batch in (1, 2):
        path = bundle.onnx_path(batch)
        io = read_graph_io(path)
        model = onnx.load(str(path))
        assert [t.name for t in io.inputs] == [i.name for i in model.graph.input]
        assert [t.name for t in io.outputs] == [o.name for o in model.graph.output]
        assert io.input("image").shape == (batch, 1, 32, 32) and io.input("image").dtype == "float32"
        assert io.output("anomaly_map").shape == (batch, 1, 32, 32) and io.output("score").shape == (batch,)


def test_graph_io_reader_refuses_a_truncated_file(tmp_path: Path) -> None:
    bundle = make_product_bundle(tmp_path / "p")
    raw = bundle.onnx_path().read_bytes()
    for cut in (0, 3, len(raw) // 2, len(raw) - 1):
        (tmp_path / "cut.onnx").write_bytes(raw[:cut])
        with pytest.raises(ValueError):
            read_graph_io(tmp_path / "cut.onnx")
