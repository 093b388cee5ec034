"""The evaluation protocol every product benchmark shares: which datasets, how each is split, intervals.

- magnetic_tile: the grouped protocol (train.groups, benchmarks/groups/magnetic_tile.csv): no tile is both
  trained on and scored; `val` and `test` halves are whole tile groups; image-AUROC intervals resample groups.
- ball_screw: the dataset's own split (train/good trains; test/ is halved per type by train.data.split_eval).
  Scans of one spindle position appear in train and test at different times (its SOURCE.md: one product imaged
  repeatedly); intervals resample images.

Settings are chosen on `val` and reported once on `test`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"


@dataclass(frozen=True)
class Dataset:
    name: str
    root: Path
    groups: Optional[Path]  # a groups CSV: the grouped protocol; None: the dataset's own split

    def fit_args(self) -> List[str]:
        """`daad-train fit`/`eval` arguments that select this protocol's data."""
        return ["--data", str(self.root)] + (["--groups", str(self.groups)] if self.groups else [])


DATASETS: Dict[str, Dataset] = {
    "magnetic_tile": Dataset("magnetic_tile", SHARED / "magnetic_tile", REPO / "benchmarks" / "groups" / "magnetic_tile.csv"),
    "ball_screw": Dataset("ball_screw", SHARED / "ball_screw", None),
}


def write_results(out: Path, prefix: str, results: Any, indent: int = 1,
                  default: Optional[Callable[[Any], Any]] = None) -> Path:
    """A benchmark's JSON summary, `<out>/<prefix><UTC time>.json`, written atomically; prints its path."""
    from engine.bundle import atomic_write_text

    path = out / f"{prefix}{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    atomic_write_text(path, json.dumps(results, indent=indent, default=default))
    print(f"wrote {path}")
    return path


def dataset(name_or_path: str) -> Dataset:
    """A protocol dataset by name, or any MVTec-layout folder (its own split)."""
    if name_or_path in DATASETS:
        return DATASETS[name_or_path]
    root = Path(name_or_path)
    known = {d.root.resolve(): d for d in DATASETS.values()}
    return known.get(root.resolve(), Dataset(root.name, root, None))


def interval_units(samples: Sequence, groups) -> List[str]:  # type: ignore[no-untyped-def]
    """What an image-AUROC bootstrap resamples: each image's group under the grouped protocol, else the image."""
    if groups is not None:
        return [groups.group(s) for s in samples]
    return [str(s.image) for s in samples]


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))
