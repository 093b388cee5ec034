"""A small synthetic dataset in MVTec layout with a groups file: the parts the grouped protocol splits by."""
from __future__ import annotations

import csv
from pathlib import Path

from train.cli import main as train_main
from train.synthetic import DEFECT_TYPES, write_synthetic_dataset

N_PARTS = 8


def write_grouped_dataset(data: Path) -> Path:
    """Synthetic images at 32 px under `data` and `data`/groups.csv: eight good parts of three training and one
    test image each, and every defect type on two parts of two images; returns the groups file's path."""
    write_synthetic_dataset(data, n_train=3 * N_PARTS, n_test_good=N_PARTS, n_test_per_defect=4, size=32)
    rows = {f"train/good/{i:03d}.png": f"part{i % N_PARTS}" for i in range(3 * N_PARTS)}
    rows.update({f"test/good/{i:03d}.png": f"part{i}" for i in range(N_PARTS)})
    for kind in DEFECT_TYPES:
        rows.update({f"test/{kind}/{i:03d}.png": f"{kind}{i // 2}" for i in range(4)})
    path = data / "groups.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "group"])
        writer.writerows(sorted(rows.items()))
    return path


def fit_daad(data: Path, out: Path, *extra: str, groups: bool = True) -> int:
    """`daad-train fit` of the paper's DAAD on `data` at 32 px, batch 4, into `out` (with `data`/groups.csv
    unless `groups` is False); `extra` adds flags or overrides these (the last of a flag counts). Its exit code."""
    argv = ["fit", "--data", str(data), "--model", "daad", "--size", "32", "--batch-size", "4", "--quiet",
            "--out", str(out)]
    return train_main(argv + (["--groups", str(data / "groups.csv")] if groups else []) + list(extra))
