"""Is a part's peak better told from its own background than from zero? The image score re-checked on fits.

    python -m benchmarks.research.probe_image_score --checkpoints runs/a/last.pt [runs/b/last.pt ...] \
        --data ../shared/datasets/magnetic_tile --split val --transplant --groups benchmarks/groups/magnetic_tile.csv

On unseen parts a whole map is lifted: a good tile the memory never saw scores above the good tiles it did,
everywhere, so its top-k competes with a defective crop's peak. Each row scores the checkpoint's own map (one
fit, or a combination of views) with the model's top-k less a level of the same map: its mean, its median,
its 25th or 10th percentile, or the 25th percentile of the map average-pooled 4x4 (what a graph can compute:
TensorRT's TopK takes k <= 3840, so the quantile of a 64x64 map, not of 65 536 pixels). The map itself, and so
pixel AUROC and AUPRO, are unchanged. With --groups every row gets its image-AUROC difference from the model's
own score, overall and per type, with a 95 % interval from resampling whole tile groups (paired). Choose on
`val`, report once on `test`. Prints a table and writes JSON.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.research.compare_fits import paired_differences, type_selections
from benchmarks.research.probe_protocol import checked_split, load_checkpoint, probe_parser, refuse
from benchmarks.research.probe_report import (IMAGE, VIEW, Column, col, interval_text, print_row, print_table,
                                              write_probe_rows)

from engine.errors import DaadError
from train.evaluate import predict
from train.metrics import image_auroc
from train.preprocessing import preprocess_spec

POOL = 4  # the pooled map's cell: 256 px -> 64 x 64 = 4 096 values


def pooled_quantile(maps: np.ndarray, q: float) -> np.ndarray:
    """Per image, the q-quantile of the (N, H, W) map average-pooled POOL x POOL."""
    pooled = F.avg_pool2d(torch.from_numpy(maps)[:, None], POOL).flatten(1)
    return torch.quantile(pooled, q, dim=1).numpy()


def levels() -> Dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Name -> the per-image level subtracted from the model's score (zero: the model's own)."""
    flat: Callable[[np.ndarray], np.ndarray] = lambda m: m.reshape(len(m), -1)
    return {
        "top-k (the model's)": lambda m: np.zeros(len(m)),
        "top-k minus the map's mean": lambda m: flat(m).mean(axis=1),
        "top-k minus its median": lambda m: np.quantile(flat(m), 0.5, axis=1),
        "top-k minus its 25th percentile": lambda m: np.quantile(flat(m), 0.25, axis=1),
        "top-k minus its 10th percentile": lambda m: np.quantile(flat(m), 0.10, axis=1),
        f"top-k minus the 25th pct, {POOL}x{POOL}-pooled": lambda m: pooled_quantile(m, 0.25),
    }


def per_type(labels: np.ndarray, types: List[str], scores: np.ndarray) -> Dict[str, float]:
    """Image AUROC of each defect type against the good images."""
    return {t: image_auroc(labels[sel], scores[sel]) for t, sel in type_selections(types).items() if t != "all"}


def main() -> int:
    args = probe_parser(__doc__, "benchmarks/results/probe_image_score", checkpoint="--checkpoints").parse_args()

    rows: List[Dict[str, Any]] = []
    t0 = time.perf_counter()
    for path in args.checkpoints:
        try:
            model, state = load_checkpoint(path)
            split = checked_split(path, state, Path(args.data), args.groups, preprocess_spec(model.cfg), args.split)
        except DaadError as err:
            refuse("probe_image_score", err)
        labels, types, parts = split.labels, split.types, split.parts()
        for view, view_images in split.views(args.transplant).items():
            pred = predict(model, view_images, torch.device("cpu"))
            own = pred["scores"].astype(np.float64)
            for name, level in levels().items():
                scores = own - level(pred["maps"].astype(np.float64))
                row: Dict[str, Any] = {"checkpoint": path, "view": view, "score": name,
                                       "image_auroc": image_auroc(labels, scores),
                                       "image_auroc_per_type": per_type(labels, types, scores)}
                if parts and rows and rows[-1]["checkpoint"] == path and rows[-1]["view"] == view:
                    row["minus_model"] = paired_differences(labels, types, parts, own, scores)
                rows.append(row)
                print_row(row)

    print(f"\nsplit `{args.split}`{' (grouped protocol)' if args.groups else ''}; {time.perf_counter() - t0:.0f} s")
    print_table(rows, [Column("checkpoint", "24s", lambda r: r["checkpoint"][-24:]), VIEW, col("score", "40s", "image score"),
                       IMAGE], type_width=8)
    for r in rows:
        for name, got in r.get("minus_model", {}).items():
            if name in ("all", "crack"):
                print(f"{r['checkpoint'][-24:]} {r['view']} {r['score']}, {name}: {interval_text(got)}")
    write_probe_rows(Path(args.out), args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
