"""daad-calibrate teach: a real fit of the product model on small synthetic parts, its real export (with the
features graph), teaching on ONNX Runtime, and the taught bundle against PyTorch with the same memory."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from calibration.cli import main as calibrate_main
from calibration.teach import drop_near_duplicates, half_sq_norms, merge_items, teach_bundle
from engine.thresholds import Thresholds, load_thresholds, save_thresholds
from engine.backend import open_backend
from engine.bundle import FEATURES_FILE, load_bundle
from engine.check import check_bundle
from engine.errors import BundleError, ThresholdsError
from engine.onnxruntime_backend import OnnxRuntimeBackend
from engine.preprocess import list_images, preprocess, preprocess_batch, read_image
from tests.bundle_factory import make_template_bundle
from train.checkpoint import load_model
from train.config import TrainConfig, preset
from train.export import PARITY_TOLERANCE, export_bundle
from train.fit import fit


# -- pure: the memory's cap ------------------------------------------------------------------------
def test_near_duplicates_go_first_and_a_close_pair_keeps_one() -> None:
    old = np.array([[0.0, 0.0], [0.0, 0.01], [5.0, 5.0], [10.0, 0.0]], dtype=np.float32)
    new = np.array([[10.0, 0.02]], dtype=np.float32)  # a taught block right beside old item 3
    drop = drop_near_duplicates(old, new, 2)
    assert drop.tolist() == [0, 3]  # one of the pair (0, 1) and the old twin of the new block; 2 is alone: kept
    items, dropped = merge_items(old, new, cap=3)
    assert dropped == 2 and items.shape == (3, 2) and np.array_equal(items[-1], new[0])  # taught blocks all kept


def test_merge_within_the_cap_keeps_everything_and_refuses_too_many_new_blocks() -> None:
    rng = np.random.default_rng(0)
    old, new = rng.normal(size=(10, 4)), rng.normal(size=(5, 4))
    items, dropped = merge_items(old, new, cap=15)
    assert dropped == 0 and np.allclose(items, np.concatenate([old, new]))
    with pytest.raises(ValueError, match="6 new blocks exceed the memory's cap of 5 items"):
        merge_items(old, rng.normal(size=(6, 4)), cap=5)
    assert np.allclose(half_sq_norms(new), 0.5 * (new ** 2).sum(axis=1), rtol=1e-6)


# -- a real bundle ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def parent(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The product model fit on the synthetic parts, exported at batch 1 and 2 (features graph included)."""
    out = tmp_path_factory.mktemp("teach_fit")
    result = fit(preset("inspect", image_size=(128, 128)), TrainConfig(data=str(dataset), out=str(out / "run"), seed=0),
                 progress=False)
    export_bundle(result.checkpoint, out / "bundle", batches=(1, 2))
    return out


@pytest.fixture(scope="module")
def taught(parent: Path, dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The parent taught the held-out good frames (test/good)."""
    out = tmp_path_factory.mktemp("taught") / "bundle"
    teach_bundle(parent / "bundle", dataset / "test" / "good", out)
    return out


def scores(bundle_dir: Path, files: list) -> np.ndarray:
    bundle = load_bundle(bundle_dir)
    with open_backend(bundle, prefer="onnxruntime") as be:
        return np.array([float(be.infer(preprocess(read_image(f), bundle.preprocess)[None]).score[0]) for f in files])


def test_features_graph_is_in_the_bundle_and_under_its_manifest(parent: Path, tmp_path: Path) -> None:
    bundle = load_bundle(parent / "bundle")
    assert bundle.features is not None and bundle.features.file == FEATURES_FILE
    assert set(bundle.features.outputs) == {"block_memory", "coarse_memory"}
    copy = tmp_path / "copy"
    shutil.copytree(parent / "bundle", copy)
    data = bytearray((copy / FEATURES_FILE).read_bytes())
    data[-10] ^= 1
    (copy / FEATURES_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="features.sha256"):
        load_bundle(copy)


def test_taught_bundle_checks_loads_and_scores_as_pytorch_with_the_same_memory(parent: Path, taught: Path,
                                                                                 dataset: Path) -> None:
    bundle = load_bundle(taught)
    assert check_bundle(bundle) == [] and bundle.batch_sizes == (1, 2)
    old, new = load_bundle(parent / "bundle"), bundle
    assert new.sha256 != old.sha256
    record = new.metadata["taught"][-1]
    assert record["parent"]["sha256"] == old.sha256 and len(record["frames"]) == len(list_images(dataset / "test" / "good"))
    # PyTorch: the checkpoint's model with the taught graph's items
    model, _ = load_model(parent / "run" / "last.pt")
    graph = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(new.onnx_path(1))).graph.initializer}
    for name in ("block_memory", "coarse_memory"):
        items_t = graph[f"{name}.items_t"]
        assert items_t.shape[1] == record["memories"][name]["after"] > record["memories"][name]["before"]
        getattr(model, name).set_items(torch.from_numpy(items_t.T.copy()))
    files = sorted((dataset / "test").rglob("*.png"))
    images = preprocess_batch([read_image(f) for f in files], new.preprocess)
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(images)).score.numpy()
    got = scores(taught, files)
    assert np.abs(got - ref).max() <= PARITY_TOLERANCE * max(1.0, np.abs(ref).max()), (got, ref)
    batch2 = OnnxRuntimeBackend(new, batch=2)  # the batch graph was taught the same items
    try:
        got2 = batch2.infer(images[:2]).score
    finally:
        batch2.close()
    assert np.abs(got2 - ref[:2]).max() <= PARITY_TOLERANCE * max(1.0, np.abs(ref).max())


def test_taught_frames_now_score_low_and_defects_still_stand_out(parent: Path, taught: Path, dataset: Path) -> None:
    good = list_images(dataset / "test" / "good")
    defects = [f for d in sorted((dataset / "test").iterdir()) if d.name != "good" for f in list_images(d)]
    before, after = scores(parent / "bundle", good), scores(taught, good)
    assert after.max() < 0.05 * before.min(), (before, after)  # their blocks are in the memory now
    assert scores(taught, defects).min() > after.max()


def test_old_thresholds_are_refused_for_the_taught_bundle(parent: Path, taught: Path, tmp_path: Path) -> None:
    old = load_bundle(parent / "bundle")
    path = save_thresholds(tmp_path / "thresholds.yaml", Thresholds(1.0, 1.0, 4, old.sha256, strategy="manual"))
    load_thresholds(path, old)
    with pytest.raises(ThresholdsError, match="made for another model"):
        load_thresholds(path, load_bundle(taught))


def test_cli_teach_prints_the_change_and_refuses_bad_inputs_in_one_line(parent: Path, taught: Path, dataset: Path,
                                                                         tmp_path: Path, capsys) -> None:
    good = dataset / "test" / "good"
    assert calibrate_main(["teach", "--bundle", str(parent / "bundle"), "--images", str(good),
                           "--out", str(tmp_path / "b2")]) == 0
    out = capsys.readouterr().out
    assert "block_memory" in out and "point the agent back at it to undo" in out
    template = make_template_bundle(tmp_path / "template", size=64)
    cases = [
        (["--bundle", str(template.root), "--images", str(good), "--out", str(tmp_path / "b3")], "no field `features`"),
        (["--bundle", str(parent / "bundle"), "--images", str(good), "--out", str(taught)], "--out exists and is not empty"),
        (["--bundle", str(parent / "bundle"), "--images", str(tmp_path / "none"), "--out", str(tmp_path / "b4")],
         "image folder not found"),
    ]
    for args, words in cases:
        assert calibrate_main(["teach", *args]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("daad-calibrate: error: ") and words in err and "\n" not in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "b3").exists() and not (tmp_path / "b4").exists()


def test_the_agent_runs_the_taught_bundle_with_its_own_thresholds(taught: Path, dataset: Path, tmp_path: Path,
                                                                  mosquitto) -> None:
    from agent.app import App
    from agent.config import load_config
    from tests.test_agent_app import quiet_notifier, write_config

    bundle = load_bundle(taught)
    thresholds = save_thresholds(tmp_path / "thresholds.yaml",
                                 Thresholds(1e6, 1e6, 4, bundle.sha256, strategy="manual", bundle_name=bundle.name))
    folder = tmp_path / "incoming"
    folder.mkdir()
    for f in list_images(dataset / "test" / "good")[:3]:
        shutil.copy2(f, folder / f.name)
    config = load_config(write_config(tmp_path, bundle, thresholds, mosquitto.port, {"kind": "folder", "path": str(folder)}))
    app = App(config, notifier=quiet_notifier())
    assert app.run() == 0 and app.frames_scored == 3 and app.defects == 0
