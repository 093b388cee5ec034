"""What a probe writes: its rows' metric fields, the table it prints and the JSON of the run.

Every probe scores a split as `train.evaluate` does and keeps the same fields per row (image, pixel AUROC,
AUPRO, the pixel AUROC against good images and against defective backgrounds, per type), so rows of different
probes read alike; the leading columns (what a row varies) are the probe's own."""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from engine.bundle import atomic_write_text
from train.evaluate import compute_metrics

Row = Dict[str, Any]


class Column(NamedTuple):
    title: str
    spec: str  # format spec of the value; a string spec (`7s`) aligns its title the same way, a number's right
    value: Callable[[Row], Any]


def col(name: str, spec: str, title: str = "") -> Column:
    """A column showing the row's `name`."""
    return Column(title or name, spec, lambda r: r[name])


VIEW = col("view", "7s")
IMAGE = col("image_auroc", "6.3f", "image")
# the figures every probe's row holds after its own columns (metric_fields), as `train.evaluate` reports them
METRICS = (IMAGE, col("pixel_auroc", "6.3f", "pixel"), col("aupro", "6.3f", "AUPRO"),
           col("pixel_against_good_images", "7.3f", "vs good"),
           col("pixel_against_defective_backgrounds", "6.3f", "vs bg"))


def metric_fields(got: Dict[str, Any]) -> Row:
    """A row's figures from `compute_metrics` (or `evaluate`)."""
    b = got["pixel_auroc_breakdown"]
    return {"image_auroc": got["image_auroc"], "pixel_auroc": got["pixel_auroc"], "aupro": got["aupro"],
            "pixel_against_good_images": b["against_good_images"],
            "pixel_against_defective_backgrounds": b["against_defective_backgrounds"],
            "image_auroc_per_type": got["image_auroc_per_type"], "pixel_auroc_per_type": b["per_type"]}


def scored_row(labels: np.ndarray, types: List[str], masks: np.ndarray, scores: np.ndarray, maps: np.ndarray,
               **keys: Any) -> Row:
    """`keys` (what the row varies) and the metric fields of image scores and (N, H, W) maps."""
    return {**keys, **metric_fields(compute_metrics(labels, types, scores, maps, masks))}


@torch.no_grad()
def map_row(model: Any, amap: torch.Tensor, labels: np.ndarray, types: List[str], masks: np.ndarray,
            **keys: Any) -> Tuple[np.ndarray, Row]:
    """(image scores, row) of an (N, 1, H, W) map scored as `model` scores its own (its image score)."""
    scores = model.image_score(amap).numpy()
    return scores, scored_row(labels, types, masks, scores, amap[:, 0].numpy(), **keys)


def print_row(row: Row, t0: Optional[float] = None) -> None:
    """A row as one JSON line while the probe runs (with the seconds since t0)."""
    line = json.dumps(row, default=float)
    print(line if t0 is None else f"{line} {time.perf_counter() - t0:.0f} s", flush=True)


def interval_text(got: Dict[str, Any]) -> str:
    """A paired group-bootstrap difference (train.metrics.group_bootstrap_auroc_difference) in words."""
    return f"{got['difference']:+.3f} (95 % over {got['groups']} groups: {got['low']:+.3f} to {got['high']:+.3f})"


def _title(column: Column) -> str:
    if column.spec.endswith("s"):
        return f"{column.title:{column.spec}}"
    width = re.match(r"[<>^=]?(\d*)", column.spec).group(1)  # type: ignore[union-attr]
    return f"{column.title:>{width}s}"


def print_table(rows: Sequence[Row], columns: Sequence[Column], per_type: str = "image_auroc_per_type",
                type_width: int = 9, interval: str = "") -> None:
    """Header and one line per row: `columns`, then the per-type figures under `per_type` (a column per type),
    then, where a row has it, the 95 % interval under `interval` as low..high."""
    types = sorted({t for r in rows for t in r.get(per_type, {})})
    header = " ".join(_title(c) for c in columns) + "  " + " ".join(f"{t:>{type_width}s}" for t in types)
    print(header + "\n" + "-" * len(header))
    for r in rows:
        got = r.get(interval) if interval else None
        print(" ".join(f"{c.value(r):{c.spec}}" for c in columns) + "  "
              + " ".join(f"{r.get(per_type, {}).get(t, float('nan')):{type_width}.3f}" for t in types)
              + (f"  {got['low']:+.3f}..{got['high']:+.3f}" if isinstance(got, dict) else ""))


def write_probe_rows(out: Path, args: argparse.Namespace, rows: List[Row], stem: str = "") -> Path:
    """`out`/probe_<split>_<unix time>.json (or `stem`_<unix time>.json) with the run's arguments and rows;
    prints and returns its path."""
    path = out / f"{stem or 'probe_' + args.split}_{int(time.time())}.json"
    atomic_write_text(path, json.dumps({"args": vars(args), "rows": rows}, indent=2, default=float))
    print(f"\nJSON: {path}")
    return path
