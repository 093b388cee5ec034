"""Training, evaluation and export end to end on synthetic parts (small and fast)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.bundle import load_bundle
from train.checkpoint import load_model, read_checkpoint
from train.config import TrainConfig, preset
from train.evaluate import evaluate
from train.export import export_bundle
from train.fit import fit
from train.synthetic import write_synthetic_dataset

SMALL = dict(image_size=(64, 64), channels=(16, 16, 32, 32, 32), disc_channels=(16, 16, 32, 32), memory_items=20,
             blocks=((4, 4, 0), (2, 2, 0), (2, 2, 0), (1, 1, 0)))
SEPARATION_AUROC = 0.9  # synthetic pits/scratches are obvious; a regression that stops separating them drops to ~0.5


@pytest.fixture(scope="module")
def trained(dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(data=str(dataset), out=str(out), steps=80, batch_size=8, lr=1e-3, checkpoint_every=40)
    return fit(preset("daad_plus", **SMALL), cfg, progress=False)


def test_short_fit_lowers_the_loss_and_separates_synthetic_defects(trained, dataset: Path) -> None:
    first = sum(h["rec"] for h in trained.history[:5]) / 5
    last = sum(h["rec"] for h in trained.history[-5:]) / 5
    assert last < 0.25 * first
    model, _ = load_model(trained.checkpoint)
    metrics = evaluate(model, dataset, plot=False)
    assert metrics["image_auroc"] >= SEPARATION_AUROC, metrics
    assert trained.score_stats["n"] == 24 and trained.score_stats["max"] >= trained.score_stats["p50"]


def test_score_statistics_are_the_models_own_scores_of_its_training_images(trained, dataset: Path) -> None:
    import numpy as np

    from train.data import load_images, train_samples
    from train.evaluate import predict
    from train.preprocessing import preprocess_spec

    model, _ = load_model(trained.checkpoint)
    images = load_images(train_samples(dataset), preprocess_spec(model.cfg))
    scores = predict(model, images, torch.device("cpu"))["scores"]
    assert trained.score_stats["mean"] == pytest.approx(float(np.mean(scores)), rel=1e-5)
    assert trained.score_stats["max"] == pytest.approx(float(np.max(scores)), rel=1e-5)


@pytest.mark.parametrize("val_fraction", [0.0, 0.25])
def test_score_statistics_of_a_mirror_scored_model_are_its_own_scores(dataset: Path, tmp_path: Path,
                                                                       val_fraction: float) -> None:
    """With score_hflip the graph scores each image and its mirror image; the bundle's statistics (and the
    map's normalisation) come from those averaged maps, of the training images or of held-back ones."""
    from train.data import load_images, train_samples
    from train.evaluate import predict
    from train.preprocessing import preprocess_spec

    cfg = TrainConfig(data=str(dataset), out=str(tmp_path), steps=10, batch_size=8, lr=1e-3, val_fraction=val_fraction)
    result = fit(preset("daad_plus", **SMALL, score_hflip=True), cfg, progress=False)
    model, state = load_model(result.checkpoint)
    assert model.cfg.score_hflip
    named = set(state["training_data"]["score_stats_images"]) or {str(s.image) for s in train_samples(dataset)}
    images = load_images([s for s in train_samples(dataset) if str(s.image) in named], preprocess_spec(model.cfg))
    scores = predict(model, images, torch.device("cpu"))["scores"]
    assert result.score_stats["n"] == len(images) == (24 if val_fraction == 0 else 6)
    assert result.score_stats["mean"] == pytest.approx(float(np.mean(scores)), rel=1e-5)
    assert result.score_stats["max"] == pytest.approx(float(np.max(scores)), rel=1e-5)


def test_checkpoint_is_self_describing_and_loads_with_weights_only(trained) -> None:
    state = torch.load(str(trained.checkpoint), weights_only=True)  # no pickled classes inside
    assert state["model_config"]["adversarial"] is True
    assert state["step"] == 80
    model, _ = load_model(trained.checkpoint)
    assert model.cfg.name == "DAAD+" and not model.training


def test_resume_continues_from_the_checkpoint(dataset: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(data=str(dataset), out=str(tmp_path), steps=6, batch_size=4, checkpoint_every=3)
    fit(preset("daad", **SMALL), cfg, progress=False)
    longer = TrainConfig(**{**cfg.__dict__, "steps": 9})
    result = fit(preset("daad", **SMALL), longer, resume=True, progress=False)
    assert [h["step"] for h in result.history] == [7, 8, 9]  # only the missing steps ran
    assert read_checkpoint(result.checkpoint)["step"] == 9


def test_the_discriminator_learns_at_its_own_rate(dataset: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(data=str(dataset), out=str(tmp_path), steps=2, batch_size=4, lr=1e-3, disc_lr=2.5e-4)
    state = read_checkpoint(fit(preset("daad_plus", **SMALL), cfg, progress=False).checkpoint)
    rates = {name: [group["lr"] for group in opt["param_groups"]] for name, opt in state["optimizers"].items()}
    assert rates == {"generator": [1e-3], "discriminator": [2.5e-4]}


def test_a_spectrally_normalised_discriminator_trains_resumes_and_exports(dataset: Path, tmp_path: Path) -> None:
    """disc_spectral_norm through the product's path: fit, a resumed fit (the power-iteration vectors are in the
    checkpoint), and a bundle whose graph (the discriminator's weights folded to W / sigma) matches PyTorch."""
    model_cfg = preset("daad_plus", disc_spectral_norm=True, **SMALL)
    cfg = TrainConfig(data=str(dataset), out=str(tmp_path / "run"), steps=3, batch_size=4, lr=1e-3)
    fit(model_cfg, cfg, progress=False)
    result = fit(model_cfg, TrainConfig(**{**cfg.__dict__, "steps": 5}), resume=True, progress=False)
    assert [h["step"] for h in result.history] == [4, 5]
    model, _ = load_model(result.checkpoint)
    assert model.cfg.disc_spectral_norm
    convs = [m for m in model.discriminator.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(float(torch.linalg.matrix_norm(c.weight.detach().flatten(1), ord=2)) < 1.1 for c in convs)
    images = sorted((dataset / "test").glob("*/*.png"))[::6]
    bundle = export_bundle(result.checkpoint, tmp_path / "bundle", parity_images=images)
    assert bundle.metadata["parity"]["max_abs_map"] < 1e-4


def test_fit_with_a_data_initialised_full_resolution_memory(dataset: Path, tmp_path: Path) -> None:
    model_cfg = preset("daad", full_skip_block=(2, 2, 0), full_skip_items=64, memory_init="data", **SMALL)
    result = fit(model_cfg, TrainConfig(data=str(dataset), out=str(tmp_path), steps=3, batch_size=4), progress=False)
    model, _ = load_model(result.checkpoint)
    assert model.cfg.full_skip_items == 64 and model.cfg.memory_init == "data"
    items = model.generator.full_memory.items.detach()
    assert items.shape == (64, 4)
    levels = items * 127.5 + 127.5  # back to 8-bit levels; 3 Adam steps at lr 2e-4 move an item < 0.1 level
    assert float((levels - levels.round()).abs().max()) < 0.15  # items are pixel blocks (randn items would not be)


def test_fit_scored_by_the_memory_rebuild_error_separates_synthetic_defects(dataset: Path, tmp_path: Path) -> None:
    model_cfg = preset("daad_plus", full_skip_block=(2, 2, 0), full_skip_items=2000, memory_init="data",
                       memory_readout="hard", memory_score_weight=1.0, score_topk=0.01, **SMALL)
    result = fit(model_cfg, TrainConfig(data=str(dataset), out=str(tmp_path), steps=5, batch_size=4), progress=False)
    model, _ = load_model(result.checkpoint)
    assert float(model.m_scale) != 1.0  # normalised by the held-back good images' mean rebuild error
    metrics = evaluate(model, dataset, plot=False)
    assert metrics["image_auroc"] >= SEPARATION_AUROC, metrics


@pytest.mark.parametrize("change,expected", [
    ({}, 10 * 16 * 16),  # 10 images of a 16x16 feature map in 1x1 blocks: 2560 distinct blocks, not 50 000
    ({"full_skip_block": (4, 4, 0)}, 10 * 4 * 4),
    ({"full_skip_block": (4, 4, 32)}, 10 * 4 * 4 * 2),  # blocks of half the 64 channels: two per position
    ({"full_skip_items": 100}, 100),  # fewer than the blocks: kept
    ({"memory_init": "random"}, 50000),  # random items are not blocks: kept
])
def test_a_data_drawn_memory_holds_each_training_block_at_most_once(change: dict, expected: int) -> None:
    from train.fit import fit_memory_to_data

    cfg = preset("inspect_daad_plus", **{"image_size": (128, 128), "full_skip_block": (1, 1, 0), **change})
    assert fit_memory_to_data(cfg, 10).full_skip_items == expected


def test_short_fit_of_the_inspect_model_separates_synthetic_defects(dataset: Path, tmp_path: Path) -> None:
    # the shipped configuration with its real ImageNet backbone, scaled down: 128 px (a 16x16 feature map,
    # 16 blocks of 4x4 per image); its memory asks for 50 000 items and holds each training block once: 22
    # images of the 24, two being held back for the score statistics
    cfg = preset("inspect_daad_plus", image_size=(128, 128), memory_items=50)
    result = fit(cfg, TrainConfig(data=str(dataset), out=str(tmp_path), steps=5, batch_size=4), progress=False)
    model, _ = load_model(result.checkpoint)
    assert model.cfg.feature_dims == 64 and model.cfg.full_skip_items == 22 * 16
    items = model.generator.full_memory.items.detach()
    assert tuple(items.shape) == (352, 4 * 4 * 64)
    assert torch.unique(items.round(decimals=3), dim=0).shape[0] == 352  # no block drawn twice
    # its coarse memory: a 4x4 map of 1/32 features per image at 128 px, 16 vectors of each training image, once each
    coarse = model.coarse_memory.items.detach()
    assert model.cfg.coarse_memory_items == 22 * 16 and tuple(coarse.shape) == (352, 64)
    assert torch.unique(coarse.round(decimals=3), dim=0).shape[0] == 352 and float(model.c_scale) != 1.0
    for transplant in (False, True):  # the defects as generated, and pasted onto other good parts
        metrics = evaluate(model, dataset, plot=False, transplant=transplant)
        assert metrics["image_auroc"] >= SEPARATION_AUROC, (transplant, metrics)
    # The memory rebuilds the images it was drawn from exactly, so their scores say nothing about a new good
    # part: the statistics (and the map's normalisation) come from the held-back images, which score like
    # the unseen test/good images, where the training images score near zero.
    state = read_checkpoint(result.checkpoint)
    assert result.score_stats["n"] == 2 and state["training_data"]["score_stats_from"] == "2 held-back good images"
    from train.data import eval_samples, load_images, train_samples
    from train.evaluate import predict
    from train.preprocessing import preprocess_spec

    spec = preprocess_spec(model.cfg)
    unseen = set(state["training_data"]["score_stats_images"])
    assert len(unseen) == 2
    trained_on = load_images([s for s in train_samples(dataset) if str(s.image) not in unseen], spec)
    good = load_images([s for s in eval_samples(dataset) if s.label == 0], spec)
    train_median = float(np.median(predict(model, trained_on, torch.device("cpu"))["scores"]))
    good_median = float(np.median(predict(model, good, torch.device("cpu"))["scores"]))
    assert 0.3 < result.score_stats["p50"] / good_median < 3, (result.score_stats, good_median)
    assert train_median < 0.1 * good_median, (train_median, good_median)
    # and the shipped graph: ONNX Runtime matches PyTorch, and TensorRT's static checks pass
    from engine.check import check_graph

    bundle = export_bundle(result.checkpoint, tmp_path / "bundle", batches=(1,),
                           parity_images=sorted((dataset / "test").glob("*/*.png"))[::6])
    assert bundle.metadata["parity"]["max_abs_map"] < 1e-4 * max(1.0, bundle.metadata["parity"]["max_abs_reference"])
    assert check_graph(bundle.onnx_path(1)) == []


def test_eval_on_defects_pasted_onto_good_parts(trained, dataset: Path) -> None:
    model, _ = load_model(trained.checkpoint)
    plain = evaluate(model, dataset, plot=False)
    pasted = evaluate(model, dataset, plot=False, transplant=True)
    assert pasted["transplant"] is True and plain["transplant"] is False
    assert pasted["n_defective"] == plain["n_defective"] and pasted["n_good"] == plain["n_good"]
    assert pasted["image_auroc"] >= SEPARATION_AUROC, pasted  # the synthetic defects are still found on other parts


def test_eval_writes_metrics_plots_and_the_report(trained, dataset: Path, tmp_path: Path) -> None:
    import re

    from train.plots import Threshold

    model, _ = load_model(trained.checkpoint)
    calibrated = Threshold(7.25, "calibrated threshold 7.25 (the agent's, thresholds.yaml)", calibrated=True)
    metrics = evaluate(model, dataset, tmp_path / "eval", calibrated=calibrated)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["image_auroc"] == pytest.approx(metrics["image_auroc"])
    for key in ("pixel_auroc", "aupro", "best_f1", "image_auroc_per_type"):
        assert key in saved
    assert set(saved["pixel_auroc_breakdown"]["per_type"]) == set(saved["image_auroc_per_type"])
    for name in ("roc.png", "scores.png", "overlays_best.png", "overlays_worst.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 5000
    # one page beside them: the metrics, a row per defect type and every figure
    page = (tmp_path / "eval" / "report.html").read_text()
    assert saved["plots"]["report"] == str(tmp_path / "eval" / "report.html")
    assert sorted(re.findall(r'<img src="([^"]+)"', page)) == ["overlays_best.png", "overlays_worst.png", "roc.png",
                                                               "scores.png"]
    for kind in saved["image_auroc_per_type"]:
        assert f"<tr><th>{kind}</th>" in page
    assert f"{saved['image_auroc']:.3f}" in page and "calibrated threshold 7.25" in page


def test_export_bundle_matches_pytorch_on_real_files(trained, dataset: Path, tmp_path: Path) -> None:
    images = sorted((dataset / "test").glob("*/*.png"))[::4]
    bundle = export_bundle(trained.checkpoint, tmp_path / "bundle", batches=(1, 2), parity_images=images)
    reloaded = load_bundle(tmp_path / "bundle")
    assert reloaded.sha256 == bundle.sha256 and reloaded.batch_sizes == (1, 2)
    assert bundle.metadata["parity"]["max_abs_map"] < 1e-4
    assert bundle.metadata["parity"]["max_abs_score"] < 1e-4
    assert bundle.score_stats["n"] == 24
    # every graph of the bundle passes the static TensorRT 8.5/8.6/10 check (ops, opset, static shapes)
    from engine.check import check_graph

    for batch in bundle.batch_sizes:
        assert check_graph(bundle.onnx_path(batch)) == []


def test_a_failed_export_leaves_the_bundle_directory_as_it_was(trained, dataset: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import train.export
    from train.export import ExportError

    out = tmp_path / "bundle"
    images = sorted((dataset / "test").glob("*/*.png"))[:2]
    before = export_bundle(trained.checkpoint, out, batches=(1, 2), parity_images=images)
    files = {f.name: f.read_bytes() for f in out.iterdir()}
    monkeypatch.setattr(train.export, "PARITY_TOLERANCE", -1.0)  # any difference at all is too much
    with pytest.raises(ExportError, match="nothing was written"):
        export_bundle(trained.checkpoint, out, batches=(1, 4), parity_images=images)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == files  # no model_b4.onnx, the old bundle.yaml
    assert load_bundle(out).sha256 == before.sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # the staging directory is gone
    monkeypatch.undo()
    after = export_bundle(trained.checkpoint, out, batches=(1,), parity_images=images)
    assert sorted(f.name for f in out.iterdir()) == ["bundle.yaml", "model.onnx"]  # model_b2.onnx went with the old one
    assert after.batch_sizes == (1,)


@pytest.mark.parametrize("result,ok", [
    ({"max_abs_map": 5e-5, "max_abs_score": 1e-6, "max_abs_reference": 0.5}, True),
    ({"max_abs_map": 2e-4, "max_abs_score": 1e-6, "max_abs_reference": 0.5}, False),
    ({"max_abs_map": 0.02, "max_abs_score": 0.007, "max_abs_reference": 3e4}, True),  # float32 at 30 000
    ({"max_abs_map": 0.02, "max_abs_score": 0.007, "max_abs_reference": 30.0}, False),
])
def test_parity_tolerance_is_relative_to_the_maps_scale(result: dict, ok: bool) -> None:
    from train.export import parity_ok

    assert parity_ok(result) is ok


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,expected", [
    (["fit", "--data", "/nonexistent/ds"], "dataset directory not found"),
    (["fit", "--data", ".", "--model", "daad_plus", "--size", "40"], "multiples of 16"),
    (["fit", "--data", ".", "--size", "200"], "multiples of 32"),  # the default `inspect` reads the 1/32 features
    (["fit", "--data", ".", "--model", "inspect_daad_plus", "--size", "200"], "multiples of 128"),  # 1/8 feature map
    (["fit", "--data", ".", "--lr=-1e-3"], "--lr: got -0.001; a learning rate is positive"),
    (["fit", "--data", ".", "--disc-lr", "-1"], "--disc-lr: got -1; a learning rate is positive"),
    (["eval", "--checkpoint", "/nonexistent.pt", "--data", ".", "--out", "/tmp/x"], "checkpoint not found"),
    (["eval", "--checkpoint", "/nonexistent.pt", "--data", ".", "--out", "/tmp/x", "--thresholds", "/none.yaml"],
     "daad-train: error: /none.yaml: thresholds file not found"),  # checked before the model is loaded
    (["export", "--checkpoint", "/nonexistent.pt", "--out", "/tmp/x"], "checkpoint not found"),
])
def test_cli_errors_are_one_line_without_traceback(args: list, expected: str) -> None:
    proc = _cli(*args)
    assert proc.returncode == 1
    assert expected in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("color,flags,expected", [(True, [], 3), (False, [], 1), (True, ["--channels-in", "1"], 1)])
def test_cli_fit_reads_colour_data_in_colour_unless_told(tmp_path: Path, color: bool, flags: list, expected: int) -> None:
    data = tmp_path / "data"
    write_synthetic_dataset(data, n_train=8, n_test_good=2, n_test_per_defect=1, size=48, color=color)
    out = tmp_path / "run"
    proc = _cli("fit", "--data", str(data), "--model", "ae", "--size", "32", "--steps", "2", "--batch-size", "4",
                "--checkpoint-every", "2", "--out", str(out), "--quiet", *flags)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_checkpoint(out / "last.pt")["model_config"]["in_channels"] == expected
    if not flags:
        assert f"model.in_channels {expected}" in proc.stdout
    else:  # told to read colour as gray: fit says what that loses
        assert "in colour" in proc.stderr and "--channels-in 3" in proc.stderr


@pytest.mark.parametrize("flags,expected", [
    (["--model", "inspect_daad_plus"], (300, 1e-3)),  # the trained option: the schedule its figures were measured with
    (["--model", "daad_plus"], (2000, 2e-4)),  # the paper columns: TrainConfig's
    (["--model", "inspect_daad_plus", "--steps", "5"], (5, 1e-3)),
    (["--model", "ae", "--lr", "0.01"], (2000, 0.01)),
])
def test_cli_fit_defaults_to_each_models_measured_schedule(flags: list, expected: tuple) -> None:
    from train.cli import _schedule_for, build_parser

    assert _schedule_for(build_parser().parse_args(["fit", "--data", "x", *flags])) == expected


def test_cli_refuses_a_corrupt_checkpoint(tmp_path: Path) -> None:
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    proc = _cli("export", "--checkpoint", str(bad), "--out", str(tmp_path / "b"))
    assert proc.returncode == 1 and "not a readable checkpoint" in proc.stderr


def test_torchrun_data_parallel_on_two_cpu_processes(dataset: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "train", "fit",
           "--data", str(dataset), "--model", "daad", "--size", "32", "--steps", "4", "--batch-size", "4",
           "--device", "cpu", "--out", str(tmp_path), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = read_checkpoint(tmp_path / "last.pt")
    assert state["step"] == 4
    # both ranks contributed: throughput counts world_size * batch per step
    assert state["images_per_s"] > 0
