"""Whether a memory of the backbone's 1/4 features finds what `inspect`'s 1/8 map misses (hairline cracks).

    python -m benchmarks.research.probe_fine_scale --checkpoint RUN/last.pt --data ../shared/datasets/magnetic_tile \
        --split val --transplant --groups benchmarks/groups/magnetic_tile.csv --taps 2 --items 50000 200000 \
        --weights 0.25 0.5

`inspect` reads every backbone tap at 1/8 (the 1/4 stage average-pooled into it), so a crack one or two
pixels wide on a stretched wide crop is diluted over an 8-pixel cell. Each row adds a term Q to the
checkpoint's own map: an untrained memory of one EfficientNet-Lite0 block's output at its own resolution
(2: the end of the 1/4 stage, 24 channels; 0: the 1/2 stage, 16 channels), each vector averaged with its 3x3
neighbours, standardised on the checkpoint's training images, `--items` of those images' vectors drawn at
random (there are 4096 per image at 1/4), read out hard by cosine. Q is each vector's squared distance to its
read-out, at image size, divided by its mean on the checkpoint's held-back good images (as `fit` normalises
every term); the map is smooth((1 - w) A + w Q) with A the checkpoint's own unsmoothed map and w a
`--weights` value (1: Q alone). The first row is the checkpoint's own map; with --groups every other row's image-AUROC
difference from it gets a 95 % interval from resampling whole groups, and every row lists the five parts it
ranks worst. Choose on `val`. Prints a table and
writes JSON.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

from benchmarks.research.probe_coarse_layers import CoarseLayer, tap_features, taps_check
from benchmarks.research.probe_fine_memory import BATCH
from benchmarks.research.probe_protocol import memory_probe_or_exit, probe_parser
from benchmarks.research.probe_report import METRICS, VIEW, col, map_row, print_row, print_table, write_probe_rows

from train.metrics import group_bootstrap_auroc_difference, part_ranks
from train.model import DAAD

LOWEST_PARTS = 5


@torch.no_grad()
def own_unsmoothed(model: DAAD, images: torch.Tensor) -> torch.Tensor:
    """The checkpoint's map of images before smoothing: what `forward` smooths."""
    return torch.cat([model.combine(model.image_maps(images[i:i + BATCH])) for i in range(0, len(images), BATCH)])


def mixed_map(model: DAAD, own: torch.Tensor, extra: torch.Tensor, weight: float) -> torch.Tensor:
    """smooth((1 - weight) * own + weight * extra), batch by batch."""
    amap = (1.0 - weight) * own + weight * extra
    return torch.cat([model.smooth(part) for part in amap.split(BATCH)])


def main() -> int:
    parser = probe_parser(__doc__, "benchmarks/results/probe_fine_scale")
    parser.add_argument("--taps", type=int, nargs="+", default=[2])
    parser.add_argument("--items", type=int, nargs="+", default=[50000, 200000])
    parser.add_argument("--weights", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--seed", type=int, default=0, help="draw of the memory's items")
    args = parser.parse_args()
    if any(not 0 < w <= 1 for w in args.weights) or any(n < 1 for n in args.items):
        parser.error("--weights in (0, 1] (1: Q alone), --items >= 1")

    model, spec, got_data = memory_probe_or_exit("probe_fine_scale", args, lambda m: bool(m.cfg.backbone),
                                                 "a checkpoint with a backbone (e.g. `inspect`)",
                                                 taps_check(parser, args.taps))
    t0 = time.perf_counter()
    train_images, stats_images = got_data.training_tensors(spec)
    views = got_data.tensor_views(args.transplant)
    own_maps = {view: own_unsmoothed(model, x) for view, x in views.items()}
    labels, groups, part_of = got_data.labels, got_data.groups, got_data.parts()

    rows: List[Dict[str, object]] = []
    own_scores: Dict[str, object] = {}

    def add_row(tap: object, items: int, weight: float, view: str, amap: torch.Tensor) -> None:
        scores, row = map_row(model, amap, labels, got_data.types, got_data.masks, tap=tap, items=items, weight=weight,
                              view=view)
        rows.append(row)
        if tap == "own":
            own_scores[view] = scores
        if groups is not None:  # the parts it ranks worst: where an AUROC is lost
            row["lowest_parts"] = part_ranks(labels, got_data.types, scores, part_of)[:LOWEST_PARTS]
        if tap != "own" and groups is not None:
            row["minus_own_image_auroc"] = group_bootstrap_auroc_difference(labels, own_scores[view], scores, part_of)
        print_row(row, t0)

    for view, own in own_maps.items():
        add_row("own", 0, 0.0, view, mixed_map(model, own, own, 0.0))
    for tap in args.taps:
        train_features = tap_features(model, train_images, tap)
        stats_features = tap_features(model, stats_images, tap)
        view_features = {view: tap_features(model, x, tap) for view, x in views.items()}
        for items in args.items:
            layer = CoarseLayer(train_features, 0, items, torch.Generator().manual_seed(args.seed))
            q_scale = float(layer.error(model, stats_features).mean()) or 1.0
            for view, own in own_maps.items():
                q = layer.error(model, view_features[view]) / q_scale
                for weight in args.weights:
                    add_row(tap, len(layer.memory.items), weight, view, mixed_map(model, own, q, weight))
        del train_features, stats_features, view_features

    print(f"\n{got_data.summary(args.checkpoint, args.split)}; {time.perf_counter() - t0:.0f} s")
    print_table(rows, [col("tap", ">4"), col("items", "7d"), col("weight", "5.2f", "w"), VIEW, *METRICS],
                interval="minus_own_image_auroc")
    write_probe_rows(Path(args.out), args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
