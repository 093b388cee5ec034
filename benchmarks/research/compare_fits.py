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

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from benchmarks.research.probe_json import write_probe_rows

from engine.errors import DaadError
from train.checkpoint import load_model
from train.cli import checked_groups
from train.evaluate import compute_metrics, load_split, predict
from train.fit import preprocess_spec
from train.groups import Groups
from train.metrics import group_bootstrap_auroc_difference
from train.transplant import transplant_set


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", required=True, help="the first is the reference")
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="val", choices=("all", "val", "test"))
    parser.add_argument("--transplant", action="store_true")
    parser.add_argument("--groups", default="", help="groups CSV every checkpoint was fit with (grouped protocol)")
    parser.add_argument("--ensemble", action="store_true", help="add a row for the mean of every checkpoint's map")
    parser.add_argument("--out", default="benchmarks/results/compare_fits")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where the maps are computed (cuda: a GPU machine; the metrics stay on the CPU)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("compare_fits: error: --device cuda, but no CUDA device is visible; use --device cpu", file=sys.stderr)
        return 2
    device = torch.device(args.device)

    loaded = []
    groups: Optional[Groups] = None
    try:
        for path in args.checkpoints:
            if not Path(path).is_file():
                raise DaadError(f"{path}: no such checkpoint; pass the last.pt of a `daad-train fit` run")
            model, state = load_model(path)
            if args.groups:
                groups = checked_groups(args.groups, Path(args.data), state, path)
            loaded.append((path, model, state))
    except DaadError as err:
        print(f"compare_fits: error: {err}", file=sys.stderr)
        return 2
    spec = preprocess_spec(loaded[0][1].cfg)
    for path, model, _ in loaded[1:]:
        if preprocess_spec(model.cfg) != spec:
            print(f"compare_fits: error: {path}: preprocesses its input otherwise than {args.checkpoints[0]} "
                  "(size, channels or normalisation), so they cannot score the same images; compare fits of one "
                  "configuration", file=sys.stderr)
            return 2
        if args.ensemble and model.cfg.score_topk != loaded[0][1].cfg.score_topk:
            print(f"compare_fits: error: {path}: model.score_topk {model.cfg.score_topk:g}, {args.checkpoints[0]} "
                  f"{loaded[0][1].cfg.score_topk:g}; an ensemble's image score is one top-k of the mean map, so "
                  "ensemble fits that score alike (or drop --ensemble)", file=sys.stderr)
            return 2
    samples, images, masks, labels, types = load_split(Path(args.data), spec, args.split, 0, groups)
    parts = [groups.group(s) for s in samples] if groups is not None else []
    views = {"test/": images}
    if args.transplant:
        views["pasted"] = transplant_set(images, masks, labels)[0]

    t0 = time.perf_counter()
    rows: List[Dict[str, Any]] = []
    first_scores: Dict[str, np.ndarray] = {}
    map_sums: Dict[str, np.ndarray] = {}

    def add_row(path: str, steps: int, seed: int, view: str, scores: np.ndarray, maps: np.ndarray) -> None:
        got = compute_metrics(labels, types, scores, maps, masks)
        row: Dict[str, Any] = {"checkpoint": path, "steps": steps, "seed": seed, "view": view,
                               "image_auroc": got["image_auroc"], "pixel_auroc": got["pixel_auroc"],
                               "aupro": got["aupro"], "image_auroc_per_type": got["image_auroc_per_type"],
                               "pixel_auroc_per_type": got["pixel_auroc_breakdown"]["per_type"]}
        if view not in first_scores:
            first_scores[view] = scores
        elif parts:
            row["minus_first"] = paired_differences(labels, types, parts, first_scores[view], scores)
        rows.append(row)
        print(json.dumps(row, default=float), flush=True)

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
    type_names = sorted(set(types) - {"good"})
    header = (f"{'checkpoint':32s} {'steps':>5s} {'view':7s} {'image':>6s} {'pixel':>6s} {'AUPRO':>6s}  "
              + " ".join(f"{t:>9s}" for t in type_names))
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['checkpoint'][-32:]:32s} {r['steps']:5d} {r['view']:7s} {r['image_auroc']:6.3f} "
              f"{r['pixel_auroc']:6.3f} {r['aupro']:6.3f}  "
              + " ".join(f"{r['image_auroc_per_type'].get(t, float('nan')):9.3f}" for t in type_names))
    for r in rows:
        for name, got in r.get("minus_first", {}).items():
            print(f"{r['checkpoint'][-32:]} minus {args.checkpoints[0][-32:]}, {r['view']} {name}: "
                  f"{got['difference']:+.3f} (95 % over {got['groups']} groups: {got['low']:+.3f} to {got['high']:+.3f})")
    write_probe_rows(Path(args.out), args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
