"""Several fits of one configuration on the same split, each against the first: is a fit (longer training,
another seed) better, and can the split tell?

    python -m benchmarks.research.compare_fits --checkpoints runs/a/last.pt runs/b/last.pt \
        --data ../shared/datasets/magnetic_tile --split val --transplant \
        [--groups benchmarks/groups/magnetic_tile.csv]

Every checkpoint is scored as `daad-train eval` scores it (its own map, normalisation and image score) on
the same images: image, pixel AUROC, AUPRO and per-type image AUROC per view. With --groups (every
checkpoint fit with that file) each row after the first gets its image-AUROC difference from the first, for
all defects and per type, with a 95 % interval from resampling whole tile groups, paired: both fits see each
draw (train.metrics.group_bootstrap_auroc_difference). With --ensemble a last row scores the mean of every
checkpoint's map (image score as the first checkpoint's: top-k of the mean map), against the first the same
way: does averaging fits beat one fit by more than fits differ? Choose on `val`, report once on `test`. Prints
a table and writes JSON.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from benchmarks.research.probe_protocol import Split, load_checkpoint, probe_parser, refuse
from benchmarks.research.probe_report import (METRICS, VIEW, Column, col, interval_text, print_row, print_table,
                                              scored_row, write_probe_rows)

from engine.errors import DaadError
from train.cli import checked_groups
from train.evaluate import load_split, predict
from train.groups import Groups
from train.metrics import group_bootstrap_auroc_difference
from train.preprocessing import preprocess_spec


def type_selections(types: List[str]) -> Dict[str, np.ndarray]:
    """Rows per comparison: every image ("all"), and each defect type with the good images (as per-type AUROC)."""
    out = {"all": np.ones(len(types), dtype=bool)}
    for t in sorted(set(types) - {"good"}):
        out[t] = np.array([ty in ("good", t) for ty in types])
    return out


def paired_differences(labels: np.ndarray, types: List[str], parts: List[str], first: np.ndarray,
                       other: np.ndarray) -> Dict[str, Dict[str, float]]:
    """Image AUROC of `other` minus `first`, overall and per type, each with its group-bootstrap interval."""
    out = {}
    for name, sel in type_selections(types).items():
        out[name] = group_bootstrap_auroc_difference(labels[sel], first[sel], other[sel],
                                                     [p for p, keep in zip(parts, sel) if keep])
    return out


@torch.no_grad()
def ensemble_scores(model: torch.nn.Module, mean_map: np.ndarray) -> np.ndarray:
    """Image scores of a mean map (N, H, W), as `model` scores its own map (its top-k)."""
    return model.image_score(torch.from_numpy(mean_map)[:, None]).numpy()


def main() -> int:
    parser = probe_parser(__doc__, "benchmarks/results/compare_fits", checkpoint="--checkpoints")
    parser.add_argument("--ensemble", action="store_true", help="add a row for the mean of every checkpoint's map")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where the maps are computed (cuda: a GPU machine; the metrics stay on the CPU)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        refuse("compare_fits", "--device cuda, but no CUDA device is visible; use --device cpu")
    device = torch.device(args.device)

    loaded = []
    groups: Optional[Groups] = None
    try:
        for path in args.checkpoints:
            model, state = load_checkpoint(path)
            if args.groups:
                groups = checked_groups(args.groups, Path(args.data), state, path)
            loaded.append((path, model, state))
    except DaadError as err:
        refuse("compare_fits", err)
    first = loaded[0][1].cfg
    spec = preprocess_spec(first)
    for path, model, _ in loaded[1:]:
        if preprocess_spec(model.cfg) != spec:
            refuse("compare_fits", f"{path}: preprocesses its input otherwise than {args.checkpoints[0]} (size, "
                   "channels or normalisation), so they cannot score the same images; compare fits of one configuration")
        if args.ensemble and model.cfg.score_topk != first.score_topk:
            refuse("compare_fits", f"{path}: model.score_topk {model.cfg.score_topk:g}, {args.checkpoints[0]} "
                   f"{first.score_topk:g}; an ensemble's image score is one top-k of the mean map, so ensemble fits "
                   "that score alike (or drop --ensemble)")
    split = Split(groups, *load_split(Path(args.data), spec, args.split, 0, groups))
    labels, types, parts = split.labels, split.types, split.parts()
    views = split.views(args.transplant)

    t0 = time.perf_counter()
    rows: List[Dict[str, Any]] = []
    first_scores: Dict[str, np.ndarray] = {}
    map_sums: Dict[str, np.ndarray] = {}

    def add_row(path: str, steps: int, seed: int, view: str, scores: np.ndarray, maps: np.ndarray) -> None:
        row = scored_row(labels, types, split.masks, scores, maps, checkpoint=path, steps=steps, seed=seed, view=view)
        if view not in first_scores:
            first_scores[view] = scores
        elif parts:
            row["minus_first"] = paired_differences(labels, types, parts, first_scores[view], scores)
        rows.append(row)
        print_row(row)

    for path, model, state in loaded:
        for view, view_images in views.items():
            pred = predict(model, view_images, device)
            add_row(path, int(state.get("step", 0)), int((state.get("train_config") or {}).get("seed", -1)), view,
                    pred["scores"], pred["maps"])
            if args.ensemble:
                map_sums[view] = map_sums.get(view, 0.0) + pred["maps"]
    for view, total in map_sums.items():
        mean_map = total / len(loaded)
        add_row(f"ensemble of {len(loaded)}", -1, -1, view, ensemble_scores(loaded[0][1], mean_map), mean_map)

    print(f"\nsplit `{args.split}`{' (grouped protocol)' if groups else ''}; {time.perf_counter() - t0:.0f} s")
    print_table(rows, [Column("checkpoint", "32s", lambda r: r["checkpoint"][-32:]), col("steps", "5d"), VIEW,
                       *METRICS[:3]])
    for r in rows:
        for name, got in r.get("minus_first", {}).items():
            print(f"{r['checkpoint'][-32:]} minus {args.checkpoints[0][-32:]}, {r['view']} {name}: {interval_text(got)}")
    write_probe_rows(Path(args.out), args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
