"""The grouped protocol (train.groups): no part both trained on and evaluated, halves of whole groups,
and every groups-file error named."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Dict

import pytest

from engine.errors import DatasetError
from train.cli import main as train_main
from train.data import GOOD, eval_samples, train_samples
from train.groups import (HELD_OUT_FRACTION, grouped_protocol, held_out_groups, holdout_by_group, load_groups,
                          split_by_group)
from train.synthetic import DEFECT_TYPES, write_synthetic_dataset

N_PARTS = 8  # good parts, each photographed in train/good and (some) in test/good


def _write_groups(path: Path, rows: Dict[str, str]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "group"])
        writer.writerows(sorted(rows.items()))
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 train/good images of 8 parts (3 each), 8 test/good siblings of them, 4 defective per type in 2 parts."""
    root = tmp_path_factory.mktemp("grouped")
    write_synthetic_dataset(root, n_train=3 * N_PARTS, n_test_good=N_PARTS, n_test_per_defect=4, size=32)
    rows = {f"train/good/{i:03d}.png": f"part{i % N_PARTS}" for i in range(3 * N_PARTS)}
    rows.update({f"test/good/{i:03d}.png": f"part{i}" for i in range(N_PARTS)})
    for kind in DEFECT_TYPES:
        rows.update({f"test/{kind}/{i:03d}.png": f"{kind}{i // 2}" for i in range(4)})
    _write_groups(root / "groups.csv", rows)
    return root


def test_no_part_is_both_trained_on_and_evaluated(dataset: Path) -> None:
    groups = load_groups(dataset / "groups.csv", dataset)
    train, evaluated = grouped_protocol(dataset, groups)
    trained = {groups.group(s) for s in train}
    assert trained and not trained & {groups.group(s) for s in evaluated}
    held = held_out_groups(groups, train_samples(dataset))
    assert len(held) == round(HELD_OUT_FRACTION * N_PARTS)
    # every good image of a held-out part is evaluated, from train/good and test/good alike
    good = [s for s in evaluated if s.defect_type == GOOD]
    assert {s.image for s in good} == {s.image for s in train_samples(dataset) + eval_samples(dataset)
                                       if s.defect_type == GOOD and groups.group(s) in held}
    assert any("train" in s.image.parts for s in good) and any("test" in s.image.parts for s in good)
    assert len(train) == 3 * (N_PARTS - len(held))
    assert sum(s.label for s in evaluated) == 4 * len(DEFECT_TYPES)


def test_val_and_test_halves_split_whole_groups_and_every_type(dataset: Path) -> None:
    groups = load_groups(dataset / "groups.csv", dataset)
    evaluated = grouped_protocol(dataset, groups)[1]
    val, test = split_by_group(evaluated, "val", groups), split_by_group(evaluated, "test", groups)
    assert sorted(val + test) == list(range(len(evaluated)))
    assert not {groups.group(evaluated[i]) for i in val} & {groups.group(evaluated[i]) for i in test}
    for kind in DEFECT_TYPES + (GOOD,):
        assert any(evaluated[i].defect_type == kind for i in val) and any(evaluated[i].defect_type == kind for i in test)
    assert split_by_group(evaluated, "val", groups) == val
    assert split_by_group(evaluated, "all", groups) == list(range(len(evaluated)))


def test_holdout_by_group_holds_back_whole_groups(dataset: Path) -> None:
    groups = load_groups(dataset / "groups.csv", dataset)
    samples = train_samples(dataset)
    kept, held = holdout_by_group(samples, 0.3, 1, groups)
    assert holdout_by_group(samples, 0.3, 1, groups) == (kept, held)
    assert len(held) >= 0.3 * len(samples) and kept
    assert not {groups.group(s) for s in kept} & {groups.group(s) for s in held}
    assert holdout_by_group(samples, 0.0, 1, groups) == (samples, [])
    # never everything: one group stays to train on
    assert holdout_by_group(samples, 1.0, 1, groups)[0]


@pytest.mark.parametrize("content, message", [
    (None, "groups file not found"),
    ("name,label\na,b\n", "expected a header with columns image, group"),
    ("image,group\ntrain/good/000.png,\n", "line 2: `image` and `group` must both be set"),
    ("image,group\ntrain/good/000.png,a\ntrain/good/000.png,b\n", "line 3: image 'train/good/000.png' is listed in two groups"),
])
def test_a_bad_groups_file_is_named_with_its_fault(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "groups.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DatasetError, match=message.replace("(", r"\(")) as err:
        load_groups(path, tmp_path)
    assert str(path) in str(err.value)


def test_an_image_without_a_group_is_named(dataset: Path, tmp_path: Path) -> None:
    partial = _write_groups(tmp_path / "partial.csv", {"train/good/000.png": "part0"})
    groups = load_groups(partial, dataset)
    with pytest.raises(DatasetError, match=r"no row for image 'train/good/001.png'") as err:
        grouped_protocol(dataset, groups)
    assert str(partial) in str(err.value)


def test_eval_refuses_groups_the_checkpoint_was_not_fit_with(dataset: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    groups = str(dataset / "groups.csv")
    common = ["--data", str(dataset), "--model", "ae", "--size", "32", "--steps", "2", "--batch-size", "4", "--quiet"]
    assert train_main(["fit", *common, "--out", str(tmp_path / "grouped"), "--groups", groups]) == 0
    assert train_main(["fit", *common, "--out", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    evaluate = ["--data", str(dataset), "--groups", groups, "--split", "val", "--no-plots", "--quiet"]
    assert train_main(["eval", "--checkpoint", str(tmp_path / "grouped" / "last.pt"), *evaluate,
                       "--out", str(tmp_path / "e1")]) == 0
    metrics = json.loads((tmp_path / "e1" / "metrics.json").read_text())
    assert metrics["groups"] == groups
    intervals = metrics["image_auroc_group_intervals"]  # whole parts resampled, overall and per type
    assert set(intervals) == {"all", *metrics["image_auroc_per_type"]}
    assert intervals["all"]["auroc"] == metrics["image_auroc"]
    assert all(i["low"] <= i["auroc"] <= i["high"] for i in intervals.values()), intervals
    parts = metrics["parts"]  # every held-out part of the half, worst first
    assert [p["rank"] for p in parts] == sorted(p["rank"] for p in parts)
    assert sum(p["images"] for p in parts) == metrics["n_good"] + metrics["n_defective"]
    out = capsys.readouterr().out
    assert "parts resampled" in out and f"  {parts[0]['part']}: " in out
    assert train_main(["eval", "--checkpoint", str(tmp_path / "plain" / "last.pt"), *evaluate,
                       "--out", str(tmp_path / "e2")]) == 1
    err = capsys.readouterr().err
    assert "fit without a groups file" in err and f"daad-train fit --groups {groups}" in err
    assert "Traceback" not in err


def test_fit_holds_back_whole_groups_for_the_score_statistics(dataset: Path) -> None:
    from train.config import preset
    from train.fit_common import stores_training_blocks, statistics_split

    cfg = preset("daad", image_size=(32, 32), memory_init="data", full_skip_block=(4, 4, 0))
    assert stores_training_blocks(cfg)
    groups = load_groups(dataset / "groups.csv", dataset)
    train = grouped_protocol(dataset, groups)[0]
    kept, held = statistics_split(cfg, train, [], seed=0, groups=groups)
    assert held and kept and len(kept) + len(held) == len(train)
    assert not {groups.group(s) for s in kept} & {groups.group(s) for s in held}


def test_calibration_benchmark_calibrates_and_measures_on_different_held_out_parts(dataset: Path) -> None:
    from benchmarks.bench_calibration import grouped_good

    groups = load_groups(dataset / "groups.csv", dataset)
    calibrate, held_out = grouped_good(dataset, dataset / "groups.csv")
    of = {s.image: groups.group(s) for s in train_samples(dataset) + eval_samples(dataset)}
    assert calibrate and held_out and not {of[p] for p in calibrate} & {of[p] for p in held_out}
    trained = {groups.group(s) for s in grouped_protocol(dataset, groups)[0]}
    assert not ({of[p] for p in calibrate} | {of[p] for p in held_out}) & trained
