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
from engine.saved_frames import event_id_of, frame_file_name
from tests.bundle_factory import make_template_bundle
from train.checkpoint import load_model
from train.config import TrainConfig, preset
from train.export import PARITY_TOLERANCE, export_bundle
from train.fit import fit


# -- pure: the memory's cap ------------------------------------------------------------------------
def test_a_saved_frame_name_gives_back_its_event_id_and_only_that() -> None:
    from datetime import datetime, timezone
    import uuid

    eid = str(uuid.uuid4())
    when = datetime(2026, 12, 7, 11, 0, 0, 123456, tzinfo=timezone.utc)
    name = frame_file_name(when, "cam0", 42, eid)
    assert name.startswith("20261207T110000.123456Z_cam0_00000042_") and event_id_of(Path(name)) == eid
    assert event_id_of(Path(name.upper().replace(".JPG", ".jpg"))) == eid  # ids compare in lower case
    assert event_id_of(Path(frame_file_name(when, "cam0", 42))) is None  # saved before names carried the id
    assert event_id_of(Path(name[:-4] + ".png")) is None and event_id_of(Path("x" + eid + ".jpg")) is None


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


# -- teach by event id: the agent's own saved frames -------------------------------------------------
def test_a_false_alarm_is_taught_by_its_event_id_from_the_agents_saved_frames(parent: Path, dataset: Path,
                                                                              tmp_path: Path, mosquitto,
                                                                              capsys) -> None:
    from agent.app import App
    from agent.config import load_config
    from tests.test_agent_app import Subscriber, quiet_notifier, write_config

    bundle = load_bundle(parent / "bundle")
    # thresholds below every score: each good frame is a false alarm, saved under frames.dir with its event
    thresholds = save_thresholds(tmp_path / "thresholds.yaml",
                                 Thresholds(-1e6, -1e6, 1, bundle.sha256, strategy="manual", bundle_name=bundle.name))
    folder = tmp_path / "incoming"
    folder.mkdir()
    for f in list_images(dataset / "test" / "good")[:3]:
        shutil.copy2(f, folder / f.name)
    sub = Subscriber(mosquitto.port)
    try:
        config = load_config(write_config(tmp_path, bundle, thresholds, mosquitto.port,
                                          {"kind": "folder", "path": str(folder)}, frames={"dir": "frames"}))
        app = App(config, notifier=quiet_notifier())
        assert app.run() == 0 and app.defects == 3
        assert sub.wait(lambda s: len(s.events()) == 3)
        events = sub.events()
    finally:
        sub.close()
    ids = sorted(events, key=lambda e: events[e]["seq"])[:2]
    frames = tmp_path / "frames"
    out = tmp_path / "taught-by-id"
    assert calibrate_main(["teach", "--bundle", str(parent / "bundle"), "--events", *ids, "--frames-dir", str(frames),
                           "--out", str(out)]) == 0
    assert "taught 2 frame(s)" in capsys.readouterr().out
    record = load_bundle(out).metadata["taught"][-1]
    assert record["events"] == ids
    assert [Path(f["file"]).name for f in record["frames"]] == [Path(events[e]["frame_path"]).name for e in ids]
    # the taught false alarms now score low with the taught bundle
    assert scores(out, [events[e]["frame_path"] for e in ids]).max() < scores(parent / "bundle", [
        events[e]["frame_path"] for e in ids]).min()
    missing = "0b5e0d8c-0000-5000-8000-000000000000"
    cases = [
        (["--events", ids[0], missing, "--frames-dir", str(frames)], "no saved frame for 1 of 2 event id(s) (" + missing),
        (["--events", "seq-7", "--frames-dir", str(frames)], "seq-7: not an event id"),
        (["--events", ids[0]], "--events needs --frames-dir"),
        (["--events", ids[0], "--frames-dir", str(tmp_path / "nowhere")], "--frames-dir is not a folder"),
        (["--images", str(frames), "--frames-dir", str(frames)], "--frames-dir goes with --events"),
    ]
    for args, words in cases:
        assert calibrate_main(["teach", "--bundle", str(parent / "bundle"), *args, "--out", str(tmp_path / "b5")]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("daad-calibrate: error: ") and words in err and "\n" not in err, err
    assert not (tmp_path / "b5").exists()


# -- undo ----------------------------------------------------------------------------------------------
AGENT_YAML = """# the site's agent config: comments and layout must survive an undo
version: 1
camera:
  name: cam0
  source: {{kind: folder, path: {incoming}}}
model:
  # taught on 2026-12-07 (the new lamp)
  bundle: {bundle}   # keep this comment
  backend: onnxruntime
thresholds:
  path: {thresholds}
mqtt:
  host: 127.0.0.1
  port: 1883
  station: line1
spool:
  path: state/spool.db
"""


def test_undo_names_the_parent_and_points_the_agent_config_back_keeping_its_other_lines(
        parent: Path, taught: Path, tmp_path: Path, capsys) -> None:
    from agent.config import load_config

    old = load_bundle(parent / "bundle")
    assert calibrate_main(["undo", "--bundle", str(taught)]) == 0
    out = capsys.readouterr().out
    assert str(old.root) in out and old.sha256[:12] in out and "--config" in out
    # the parent's own thresholds are still there: the agent can run it again at once
    thresholds = save_thresholds(tmp_path / "thresholds.yaml",
                                 Thresholds(1.0, 1.0, 4, old.sha256, strategy="manual", bundle_name=old.name))
    (tmp_path / "incoming").mkdir()
    config = tmp_path / "agent.yaml"
    text = AGENT_YAML.format(incoming=tmp_path / "incoming", bundle=taught, thresholds=thresholds)
    config.write_text(text)
    config.chmod(0o640)
    assert load_config(config).model.bundle == taught
    assert calibrate_main(["undo", "--bundle", str(taught), "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"model.bundle {taught} -> {old.root}" in out and "are made for" in out
    new = config.read_text()
    changed = [(a, b) for a, b in zip(text.splitlines(), new.splitlines()) if a != b]
    assert len(new.splitlines()) == len(text.splitlines()) and len(changed) == 1
    assert changed[0][1] == f"  bundle: {old.root}   # keep this comment"
    assert (config.stat().st_mode & 0o777) == 0o640
    assert load_config(config).model.bundle == old.root  # the agent reads it back
    # run again: the config already points at the parent
    assert calibrate_main(["undo", "--bundle", str(taught), "--config", str(config)]) == 1
    assert "already points at the bundle taught from" in capsys.readouterr().err
    # thresholds made for the taught bundle: said that they must be put back or recalibrated
    config.write_text(AGENT_YAML.format(incoming=tmp_path / "incoming", bundle=taught,
                                        thresholds=save_thresholds(tmp_path / "t2.yaml", Thresholds(
                                            1.0, 1.0, 4, load_bundle(taught).sha256, strategy="manual"))))
    assert calibrate_main(["undo", "--bundle", str(taught), "--config", str(config)]) == 0
    assert "made for the taught bundle" in capsys.readouterr().out


def test_undo_refuses_in_one_line_what_it_cannot_go_back_to(parent: Path, taught: Path, dataset: Path,
                                                            tmp_path: Path, capsys) -> None:
    # a parent that moved, and one replaced by another bundle
    moved = tmp_path / "moved"
    shutil.copytree(parent / "bundle", moved)
    child = tmp_path / "child"
    teach_bundle(moved, list_images(dataset / "test" / "good")[:1], child)
    other = tmp_path / "other"
    config = tmp_path / "agent.yaml"
    config.write_text(AGENT_YAML.format(incoming=tmp_path, bundle=other, thresholds=tmp_path / "t.yaml"))
    cases = [
        (["--bundle", str(parent / "bundle")], "no field `taught`"),
        (["--bundle", str(taught), "--config", str(config)], "not the taught bundle"),
        (["--bundle", str(taught), "--config", str(tmp_path / "none.yaml")], "no such agent config"),
    ]
    for args, words in cases:
        assert calibrate_main(["undo", *args]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("daad-calibrate: error: ") and words in err and "\n" not in err, err
    assert str(other) in config.read_text()  # left unchanged
    shutil.rmtree(moved)
    shutil.copytree(taught, moved)  # another bundle where the parent was
    assert calibrate_main(["undo", "--bundle", str(child)]) == 1
    err = capsys.readouterr().err
    assert "was replaced or changed since" in err and "\n" not in err.strip()
    shutil.rmtree(moved)
    assert calibrate_main(["undo", "--bundle", str(child)]) == 1
    assert "is not there any more" in capsys.readouterr().err
