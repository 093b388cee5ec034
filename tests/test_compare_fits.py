"""benchmarks/research/compare_fits.py: fits of one configuration scored on the same split, each against the first with a
paired group-bootstrap interval, and a one-line refusal of what cannot be compared."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch

from benchmarks.research import compare_fits

from train.synthetic import DEFECT_TYPES

from tests.grouped_dataset import fit_daad, write_grouped_dataset


@pytest.fixture(scope="module")
def two_fits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A grouped fit of 2 steps, and the same fit resumed to 6 (a longer schedule)."""
    root = tmp_path_factory.mktemp("compare_fits")
    data = root / "data"
    write_grouped_dataset(data)
    assert fit_daad(data, root / "short", "--steps", "2") == 0
    shutil.copytree(root / "short", root / "long")
    assert fit_daad(data, root / "long", "--steps", "6", "--resume") == 0
    return root


def run(monkeypatch: pytest.MonkeyPatch, argv: List[str]) -> int:
    monkeypatch.setattr(sys, "argv", ["compare_fits.py", *argv])
    try:
        return compare_fits.main()
    except SystemExit as exit_info:  # a refusal: one error line, then exit 2
        return int(exit_info.code)


def test_each_fit_is_compared_with_the_first_on_the_same_images(two_fits: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, out = two_fits / "data", two_fits / "out"
    short, long = str(two_fits / "short" / "last.pt"), str(two_fits / "long" / "last.pt")
    assert run(monkeypatch, ["--checkpoints", short, long, short, "--data", str(data), "--split", "val",
                             "--transplant", "--groups", str(data / "groups.csv"), "--out", str(out)]) == 0
    rows = json.loads(next(out.glob("probe_val_*.json")).read_text())["rows"]
    assert [(r["steps"], r["view"]) for r in rows] == [(2, "test/"), (2, "pasted"), (6, "test/"), (6, "pasted"),
                                                       (2, "test/"), (2, "pasted")]
    assert "minus_first" not in rows[0] and "minus_first" not in rows[1]
    for first, other in ((rows[0], rows[2]), (rows[1], rows[3])):
        got = other["minus_first"]
        assert set(got) == {"all", *DEFECT_TYPES}
        assert got["all"]["difference"] == pytest.approx(other["image_auroc"] - first["image_auroc"])
        for kind in DEFECT_TYPES:
            want = other["image_auroc_per_type"][kind] - first["image_auroc_per_type"][kind]
            assert got[kind]["difference"] == pytest.approx(want)
            assert got[kind]["low"] <= got[kind]["high"] and got[kind]["draws"] > 0
    # a fit against itself: every paired draw differs by exactly nothing
    for name, got in rows[4]["minus_first"].items():
        assert (got["difference"], got["low"], got["high"]) == (0.0, 0.0, 0.0), name


def test_an_ensemble_scores_the_mean_of_the_fits_maps(two_fits: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = two_fits / "data"
    short, long = str(two_fits / "short" / "last.pt"), str(two_fits / "long" / "last.pt")
    common = ["--data", str(data), "--split", "val", "--groups", str(data / "groups.csv"), "--ensemble"]
    # a fit with itself: the mean map is its own map, so the ensemble row is the fit's row
    assert run(monkeypatch, ["--checkpoints", short, short, *common, "--out", str(two_fits / "self")]) == 0
    rows = json.loads(next((two_fits / "self").glob("probe_val_*.json")).read_text())["rows"]
    assert [r["checkpoint"] for r in rows] == [short, short, "ensemble of 2"]
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert rows[2][key] == pytest.approx(rows[0][key], abs=1e-9), key
    assert rows[2]["minus_first"]["all"]["difference"] == pytest.approx(0.0, abs=1e-9)
    # two fits: the mean map scores as that map does, which is neither fit's map
    assert run(monkeypatch, ["--checkpoints", short, long, *common, "--out", str(two_fits / "pair")]) == 0
    rows = json.loads(next((two_fits / "pair").glob("probe_val_*.json")).read_text())["rows"]
    assert rows[2]["checkpoint"] == "ensemble of 2"
    assert rows[2]["minus_first"]["all"]["difference"] == pytest.approx(rows[2]["image_auroc"] - rows[0]["image_auroc"])
    assert (rows[2]["pixel_auroc"], rows[2]["aupro"]) != (rows[0]["pixel_auroc"], rows[0]["aupro"])
    assert (rows[2]["pixel_auroc"], rows[2]["aupro"]) != (rows[1]["pixel_auroc"], rows[1]["aupro"])


def test_the_mean_map_is_scored_by_the_models_top_k() -> None:
    from train.config import ModelConfig
    from train.model import DAAD

    model = DAAD(ModelConfig(image_size=(32, 32), score_topk=2 / (32 * 32)))
    mean_map = np.zeros((2, 32, 32), dtype=np.float32)
    mean_map[0, 0, :3] = [4.0, 2.0, 1.0]
    mean_map[1, 5, 5] = 6.0
    assert compare_fits.ensemble_scores(model, mean_map).tolist() == pytest.approx([3.0, 3.0])


def test_the_per_type_rows_hold_that_type_and_the_good_images() -> None:
    types = ["good", "crack", "good", "uneven", "crack"]
    got = compare_fits.type_selections(types)
    assert set(got) == {"all", "crack", "uneven"}
    assert got["all"].all()
    assert got["crack"].tolist() == [True, True, True, False, True]
    assert got["uneven"].tolist() == [True, False, True, True, False]
    labels = np.array([0, 1, 0, 1, 1])
    parts = ["a", "b", "c", "d", "b"]
    better = compare_fits.paired_differences(labels, types, parts, np.array([0.5, 0.1, 0.2, 0.9, 0.3]),
                                             np.array([0.1, 0.8, 0.2, 0.9, 0.7]))
    assert better["crack"]["difference"] == pytest.approx(1.0 - 0.25)  # one of four pairs ranked right, then all


def test_what_cannot_be_compared_is_refused_in_one_line(two_fits: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    data, short = two_fits / "data", str(two_fits / "short" / "last.pt")
    assert run(monkeypatch, ["--checkpoints", short, str(two_fits / "nowhere.pt"), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere.pt: no such checkpoint" in err
    # scored without the groups file the fit used would be refused the other way round: with one it did not use
    other = two_fits / "other.csv"
    other.write_text((data / "groups.csv").read_text().replace(",part0", ",partX"))
    assert run(monkeypatch, ["--checkpoints", short, "--data", str(data), "--groups", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refit with `daad-train fit --groups" in err
    # a fit at another input size scores other images
    assert fit_daad(data, two_fits / "wide", "--size", "48", "--steps", "1", groups=False) == 0
    assert run(monkeypatch, ["--checkpoints", short, str(two_fits / "wide" / "last.pt"), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "preprocesses its input otherwise" in err
    # an ensemble of fits that take their image score from different top fractions has no one score
    (two_fits / "topk.yaml").write_text("model: {score_topk: 0.05}\n")
    assert fit_daad(data, two_fits / "topk", "--steps", "1", "--config", str(two_fits / "topk.yaml"), groups=False) == 0
    assert run(monkeypatch, ["--checkpoints", short, str(two_fits / "topk" / "last.pt"), "--data", str(data),
                             "--ensemble"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.score_topk 0.05" in err and "drop --ensemble" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no GPU is visible")
def test_cuda_without_a_gpu_is_refused_in_one_line(two_fits: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    short = str(two_fits / "short" / "last.pt")
    assert run(monkeypatch, ["--checkpoints", short, "--data", str(two_fits / "data"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA device is visible; use --device cpu" in err
