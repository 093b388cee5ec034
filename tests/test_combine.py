"""`daad-train combine`: two fits (plain and illumination-normalised) as one model scoring their mean map,
checked against the fits themselves, exported as one graph, and refused where the fits do not match."""
from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.errors import ConfigError, DatasetError
from train.checkpoint import load_model, read_checkpoint
from train.cli import build_parser, fit_view_names, main as train_main
from train.combine import check_compatible, held_back_images
from train.config import TrainConfig, preset
from train.data import eval_samples, load_images
from train.evaluate import evaluate, predict
from train.export import export_bundle
from train.fit import fit
from train.fit_common import summarise_scores
from train.model import DAAD, edge_side_fill, grey_closing
from train.preprocessing import preprocess_spec
from train.views import ViewEnsemble

SEPARATION_AUROC = 0.9
CPU = torch.device("cpu")


def small_inspect(**overrides):
    # the shipped configuration scaled down as in test_fit: 128 px, every training block in the memory
    return preset("inspect_daad_plus", image_size=(128, 128), memory_items=50, **overrides)


@pytest.fixture(scope="module")
def fits(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`daad-train fit` of `inspect` as shipped (both views, combined), scaled down; and one view of another seed."""
    runs = tmp_path_factory.mktemp("runs")
    small = runs / "small.yaml"
    small.write_text("model: {memory_items: 50}\n")
    common = ["fit", "--data", str(dataset), "--model", "inspect_daad_plus", "--size", "128", "--steps", "5",
              "--batch-size", "4", "--quiet",
              "--config", str(small)]
    assert train_main([*common, "--out", str(runs / "both")]) == 0
    assert train_main([*common, "--out", str(runs / "seed1"), "--views", "plain", "--seed", "1"]) == 0
    views = runs / "both" / "views"
    return {"both": runs / "both" / "last.pt", "plain": views / "plain" / "last.pt",
            "illum": views / "illumination" / "last.pt", "seed1": runs / "seed1" / "last.pt"}


def closed_mean(plain: DAAD, illum: DAAD, images: np.ndarray) -> tuple:
    """(map, score) of two views' mean as the combination computes it: the mean of their smoothed maps, scored,
    then closed with `map_closing` and its edge-side row fill added (`edge_fill_weight`)."""
    with torch.no_grad():
        x = torch.from_numpy(images)
        mean = (plain.scored_map(x) + illum.scored_map(x)) / 2
        amap = grey_closing(mean, plain.cfg.map_closing) + plain.cfg.edge_fill_weight * edge_side_fill(mean)
        return amap[:, 0].numpy(), plain.image_score(mean).numpy()


def test_the_combined_model_scores_the_mean_of_its_fits_maps(fits: dict, dataset: Path) -> None:
    both, state = load_model(fits["both"])
    assert state["combined_from"] == [str(fits["plain"]), str(fits["illum"])]
    assert isinstance(load_model(fits["seed1"])[0], DAAD) and not (fits["seed1"].parent / "views").exists()
    plain, _ = load_model(fits["plain"])
    illum, _ = load_model(fits["illum"])
    assert isinstance(both, ViewEnsemble) and [v.cfg.illumination_norm for v in both.views] == [False, True]
    images = load_images(eval_samples(dataset), preprocess_spec(plain.cfg))
    got, a, b = (predict(m, images, CPU) for m in (both, plain, illum))
    mean_map, mean_score = closed_mean(plain, illum, images)
    assert plain.cfg.map_closing == 63 and plain.cfg.edge_fill_weight == 0.5  # as shipped: the mean, closed once
    assert np.abs(got["maps"] - mean_map).max() < 1e-5
    assert not np.allclose(a["maps"], b["maps"], atol=1e-3)  # two different views, not one twice
    assert np.abs(got["scores"] - mean_score).max() < 1e-5
    # its statistics: its own scores of the good images both fits held back, on the mean map
    held = state["training_data"]["score_stats_images"]
    assert held == read_checkpoint(fits["illum"])["training_data"]["score_stats_images"] and len(held) == 2
    scores = predict(both, held_back_images(held, preprocess_spec(both.cfg)), CPU)["scores"]
    assert state["score_stats"] == pytest.approx(summarise_scores(scores), rel=1e-5)
    assert "mean map of 2 views" in state["training_data"]["score_stats_from"]
    metrics = evaluate(both, dataset, plot=False)
    assert metrics["image_auroc"] >= SEPARATION_AUROC and metrics["model"] == "DAAD+@efficientnet_lite0-2views"


def test_the_combined_model_exports_one_graph_that_matches_pytorch(fits: dict, dataset: Path, tmp_path: Path) -> None:
    from engine.check import check_graph
    from engine.onnxruntime_backend import OnnxRuntimeBackend

    bundle = export_bundle(fits["both"], tmp_path / "bundle", batches=(1,),
                           parity_images=sorted((dataset / "test").glob("*/*.png"))[::6])
    parity = bundle.metadata["parity"]
    assert parity["max_abs_map"] < 1e-4 * max(1.0, parity["max_abs_reference"]) and parity["n_images"] >= 3
    assert check_graph(bundle.onnx_path(1)) == []
    views = bundle.metadata["model"]["config"]["views"]
    assert [v["illumination_norm"] for v in views] == [False, True]
    assert bundle.metadata["score_stats"] == read_checkpoint(fits["both"])["score_stats"]
    # the graph is both views: the same frame scored by the bundle and by the two fits' own mean
    plain, _ = load_model(fits["plain"])
    illum, _ = load_model(fits["illum"])
    x = load_images(eval_samples(dataset)[-1:], preprocess_spec(plain.cfg))
    backend = OnnxRuntimeBackend(bundle, batch=1)
    try:
        got = backend.infer(x)
    finally:
        backend.close()
    mean_map = closed_mean(plain, illum, x)[0]
    assert np.abs(got.anomaly_map[:, 0] - mean_map).max() < 1e-4 * max(1.0, float(np.abs(mean_map).max()))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("which,expected", [
    (("plain", "seed1"), "training_data.score_stats_images differs"),  # another seed held back other images
    (("both", "plain"), "already a combination"),
    (("plain",), "expected two fits or more"),
])
def test_combine_refuses_fits_that_cannot_be_averaged(fits: dict, tmp_path: Path, which: tuple, expected: str) -> None:
    proc = _cli("combine", "--checkpoints", *(str(fits[w]) for w in which), "--out", str(tmp_path / "c"))
    assert proc.returncode == 1 and expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "c" / "last.pt").exists()


def test_a_combined_checkpoint_is_not_resumed(fits: dict, dataset: Path) -> None:
    train = TrainConfig(data=str(dataset), out=str(fits["both"].parent), steps=6, batch_size=4)
    with pytest.raises(ConfigError, match="a combination of fits"):
        fit(small_inspect(), train, resume=True, progress=False)


def test_views_of_another_size_or_image_score_are_refused() -> None:
    base = small_inspect(full_skip_items=64)
    state = {"training_data": {"score_stats_images": ["a.png"], "groups_sha256": ""}}
    paths = [Path("a/last.pt"), Path("b/last.pt")]
    for change, field in ((dict(image_size=(256, 256)), "image_size"), (dict(score_topk=0.05), "score_topk"),
                          (dict(score_minus_mean=False), "score_minus_mean"), (dict(map_closing=0), "map_closing"),
                          (dict(edge_fill_weight=0.0), "edge_fill_weight")):
        views = [DAAD(base, load_backbone=False), DAAD(dataclasses.replace(base, **change), load_backbone=False)]
        with pytest.raises(ConfigError, match=f"b/last.pt: model.{field}"):
            check_compatible(paths, [state, state], views)
    grouped = {"training_data": {"score_stats_images": ["a.png"], "groups_sha256": "ab12"}}
    views = [DAAD(base, load_backbone=False)] * 2
    with pytest.raises(ConfigError, match="same --groups"):
        check_compatible(paths, [state, grouped], views)
    with pytest.raises(ConfigError, match="score_stats_images is empty"):
        check_compatible(paths, [{"training_data": {}}, state], views)


def test_a_missing_held_back_image_is_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=f"{tmp_path / 'gone.png'}: no such image file.*where the fits' --data is"):
        held_back_images([str(tmp_path / "gone.png")], preprocess_spec(small_inspect()))


@pytest.mark.parametrize("argv,illumination_norm,expected", [
    (["--model", "inspect_daad_plus"], False, ["plain", "illumination"]),  # the trained option: both views
    (["--model", "inspect_daad_plus"], True, []),  # a config that normalises: that one model, as configured
    ([], False, []),  # `inspect`: one view
    (["--views", "plain"], False, ["plain"]),
    (["--model", "daad_plus"], False, []),  # the paper columns: one model, as configured
])
def test_which_views_fit_fits(argv: list, illumination_norm: bool, expected: list) -> None:
    args = build_parser().parse_args(["fit", "--data", "d", *argv])
    assert fit_view_names(args, small_inspect(illumination_norm=illumination_norm)) == expected


@pytest.mark.parametrize("argv,expected", [
    (["--views", "plain", "plain"], "--views: got plain plain, expected distinct names"),
    (["--model", "daad", "--size", "32", "--views", "plain", "illumination"], "which this model has not"),
    (["--config", "{illum}", "--views", "plain", "illumination"], "model.illumination_norm: set by the views"),
])
def test_fit_refuses_views_it_cannot_average_before_training(dataset: Path, tmp_path: Path, argv: list,
                                                               expected: str) -> None:
    illum = tmp_path / "illum.yaml"
    illum.write_text("model: {illumination_norm: true}\n")
    argv = [a.replace("{illum}", str(illum)) for a in argv]
    proc = _cli("fit", "--data", str(dataset), "--out", str(tmp_path / "run"), "--quiet", *argv)
    assert proc.returncode == 1 and expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_torchrun_fits_both_views_and_rank_0_combines_them(dataset: Path, tmp_path: Path) -> None:
    # torchrun re-initialises the process group for the second view (fit() tears it down after the first)
    (tmp_path / "small.yaml").write_text("model: {memory_items: 50}\n")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "train", "fit",
           "--data", str(dataset), "--model", "inspect_daad_plus", "--size", "128", "--steps", "4", "--batch-size", "4",
           "--device", "cpu",
           "--config", str(tmp_path / "small.yaml"), "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # rank 0 alone reports (once, not once per process) and combines
    assert [line.split(":")[0] for line in proc.stdout.splitlines()] == [
        "model.in_channels 1", "view plain", "view illumination", "checkpoint"]
    views = [out / "views" / name / "last.pt" for name in ("plain", "illumination")]
    assert all(read_checkpoint(v)["step"] == 4 for v in views)
    state = read_checkpoint(out / "last.pt")
    assert state["combined_from"] == [str(v) for v in views]
    # the same statistics a single-process combine of the two fits gives
    proc = _cli("combine", "--checkpoints", *map(str, views), "--out", str(tmp_path / "again"))
    assert proc.returncode == 0, proc.stderr
    assert state["score_stats"] == pytest.approx(read_checkpoint(tmp_path / "again" / "last.pt")["score_stats"],
                                                rel=1e-4, abs=1e-6)  # other thread counts: float noise


def test_fit_resume_continues_each_view_and_combines_again(dataset: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "small.yaml").write_text("model: {memory_items: 50}\n")
    common = ["fit", "--data", str(dataset), "--model", "inspect_daad_plus", "--size", "128", "--batch-size", "4",
              "--quiet",
              "--config", str(tmp_path / "small.yaml"), "--out", str(tmp_path / "run")]
    assert train_main([*common, "--steps", "3"]) == 0
    first = read_checkpoint(tmp_path / "run" / "last.pt")
    views = [tmp_path / "run" / "views" / name / "last.pt" for name in ("plain", "illumination")]
    with caplog.at_level(logging.INFO, logger="train.fit"):
        assert train_main([*common, "--steps", "5", "--resume"]) == 0
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("resumed")] == [
        f"resumed from {v} at step 3" for v in views]
    assert [read_checkpoint(v)["step"] for v in views] == [5, 5]
    state = read_checkpoint(tmp_path / "run" / "last.pt")
    assert state["combined_from"] == [str(v) for v in views]
    # the combination was made again from the longer fits, not kept from the first
    assert state["score_stats"] != first["score_stats"]
    assert first["training_data"]["score_stats_images"] == state["training_data"]["score_stats_images"]


def test_probe_maps_scores_a_combination_by_the_mean_of_its_views_unsmoothed_maps(fits: dict, dataset: Path) -> None:
    from benchmarks.research.probe_maps import blur, coarse_weight, unsmoothed_maps

    both, _ = load_model(fits["both"])
    images = torch.from_numpy(load_images(eval_samples(dataset)[:6], preprocess_spec(both.cfg)))
    raw = unsmoothed_maps(both, images)
    with torch.no_grad():
        smoothed = blur(raw["model"], both.cfg.smoothing_sigma)
        assert (both.views[0].pixel_map(smoothed) - both(images).anomaly_map).abs().max() < 1e-5
    plain = unsmoothed_maps(both.views[0], images)["model"]
    assert (raw["model"] - plain).abs().max() > 1e-3  # the mean of two views, not the first
    # its fine and coarse terms, mixed at the model's own weight, are the model's map
    delta = coarse_weight(both)
    assert delta == both.views[0].cfg.coarse_memory_weight > 0
    assert ((1 - delta) * raw["fine"] + delta * raw["coarse"] - raw["model"]).abs().max() < 1e-5
    assert (raw["coarse"] - raw["fine"]).abs().max() > 1e-3


def test_probe_maps_rows_weigh_a_combinations_views_and_lift_parts_by_their_score(fits: dict, dataset: Path) -> None:
    from benchmarks.research.probe_maps import blur, coarse_weight, unsmoothed_maps, variants, views_of

    both, _ = load_model(fits["both"])
    images = torch.from_numpy(load_images(eval_samples(dataset)[:6], preprocess_spec(both.cfg)))
    raw = unsmoothed_maps(both, images)
    sigma, closing = both.cfg.smoothing_sigma, both.cfg.map_closing
    named = variants(sigma, coarse_weight(both), both.image_score, closing, views_of(both))
    with torch.no_grad():
        shipped = both(images).anomaly_map
        first_alone = grey_closing(blur(unsmoothed_maps(both.views[0], images)["model"], sigma), closing)
        second_alone = grey_closing(blur(unsmoothed_maps(both.views[1], images)["model"], sigma), closing)
        closed = named[f"sigma {sigma:g}, closed {closing} px"](raw)
        filled = named[f"sigma {sigma:g}, closed {closing} px, + {both.cfg.edge_fill_weight:g} x the edge-side row fill"](raw)
        lifted = named[f"sigma {sigma:g}, closed {closing} px, + 1 x the image score"](raw)
        weighted = {w: named[f"sigma {sigma:g}, the second view weighted {w:g}, closed {closing} px"](raw) for w in (0, 1)}
    assert (filled - shipped).abs().max() < 1e-5  # the model's own map: closed, plus its share of the row fill
    fill = both.cfg.edge_fill_weight * edge_side_fill(blur(raw["model"], sigma))
    assert (filled - closed - fill).abs().max() < 1e-5 and fill.abs().max() > 0  # its fill, from the map before closing
    assert (weighted[0] - first_alone).abs().max() < 1e-5 and (weighted[1] - second_alone).abs().max() < 1e-5
    assert (weighted[0] - weighted[1]).abs().max() > 1e-3  # two views that differ
    # every pixel of a part lifted by that part's image score, taken before the closing as the model takes it
    lift = (lifted - closed).flatten(1)
    assert torch.allclose(lift, both(images).score[:, None].expand_as(lift), atol=1e-4)
