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

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

from benchmarks.research.probe_coarse_layers import CoarseLayer, tap_features
from benchmarks.research.probe_fine_memory import BATCH
from benchmarks.research.probe_json import write_probe_rows
from benchmarks.research.probe_protocol import checkpoint_data_or_exit

from train.checkpoint import load_model
from train.evaluate import compute_metrics
from train.fit import preprocess_spec
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="val", choices=("all", "val", "test"))
    parser.add_argument("--taps", type=int, nargs="+", default=[2])
    parser.add_argument("--items", type=int, nargs="+", default=[50000, 200000])
    parser.add_argument("--weights", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--transplant", action="store_true")
    parser.add_argument("--groups", default="", help="groups CSV the checkpoint was fit with (grouped protocol)")
    parser.add_argument("--seed", type=int, default=0, help="draw of the memory's items")
    parser.add_argument("--out", default="benchmarks/results/probe_fine_scale")
    args = parser.parse_args()
    if any(not 0 < w <= 1 for w in args.weights) or any(n < 1 for n in args.items):
        parser.error("--weights in (0, 1] (1: Q alone), --items >= 1")

    model, state = load_model(args.checkpoint)
    cfg = model.cfg
    if not cfg.backbone:
        print(f"{args.checkpoint}: needs a checkpoint with a backbone (e.g. `inspect`)", file=sys.stderr)
        return 2
    if any(t < 0 or t >= len(model.backbone._blocks) for t in args.taps):  # type: ignore[union-attr]
        parser.error(f"--taps: block indices 0..{len(model.backbone._blocks) - 1}")  # type: ignore[union-attr]
    spec = preprocess_spec(cfg)
    got_data = checkpoint_data_or_exit("probe_fine_scale", args, state, spec)
    groups, train, stats, samples, images, masks, labels, types = got_data[:8]
    model.eval()
    t0 = time.perf_counter()
    train_images, stats_images = got_data.training_tensors(spec)
    views = got_data.views(args.transplant)
    own_maps = {view: own_unsmoothed(model, x) for view, x in views.items()}
    part_of = got_data.parts()

    rows: List[Dict[str, object]] = []
    own_scores: Dict[str, object] = {}

    def add_row(tap: object, items: int, weight: float, view: str, amap: torch.Tensor) -> None:
        scores = model.image_score(amap).numpy()
        got = compute_metrics(labels, types, scores, amap[:, 0].numpy(), masks)
        b = got["pixel_auroc_breakdown"]
        rows.append({"tap": tap, "items": items, "weight": weight, "view": view, "image_auroc": got["image_auroc"],
                     "pixel_auroc": got["pixel_auroc"], "aupro": got["aupro"],
                     "pixel_against_good_images": b["against_good_images"],
                     "pixel_against_defective_backgrounds": b["against_defective_backgrounds"],
                     "image_auroc_per_type": got["image_auroc_per_type"], "pixel_auroc_per_type": b["per_type"]})
        if tap == "own":
            own_scores[view] = scores
        if groups is not None:  # the parts it ranks worst: where an AUROC is lost
            rows[-1]["lowest_parts"] = part_ranks(labels, types, scores, part_of)[:LOWEST_PARTS]
        if tap != "own" and groups is not None:
            rows[-1]["minus_own_image_auroc"] = group_bootstrap_auroc_difference(labels, own_scores[view], scores, part_of)
        print(json.dumps(rows[-1], default=float), f"{time.perf_counter() - t0:.0f} s", flush=True)

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

    print(f"\n{args.checkpoint}: split `{args.split}`{' (grouped protocol)' if groups else ''}; {len(train)} training "
          f"images, {len(stats)} held back; {time.perf_counter() - t0:.0f} s")
    type_names = sorted({t for r in rows for t in r["image_auroc_per_type"]})  # type: ignore[attr-defined]
    header = (f"{'tap':>4s} {'items':>7s} {'w':>5s} {'view':7s} {'image':>6s} {'pixel':>6s} {'AUPRO':>6s} {'vs good':>7s} "
              f"{'vs bg':>6s}  " + " ".join(f"{t:>9s}" for t in type_names))
    print(header + "\n" + "-" * len(header))
    for r in rows:
        interval = r.get("minus_own_image_auroc")
        print(f"{str(r['tap']):>4s} {r['items']:7d} {r['weight']:5.2f} {r['view']:7s} {r['image_auroc']:6.3f} "
              f"{r['pixel_auroc']:6.3f} {r['aupro']:6.3f} {r['pixel_against_good_images']:7.3f} "
              f"{r['pixel_against_defective_backgrounds']:6.3f}  "
              + " ".join(f"{r['image_auroc_per_type'].get(t, float('nan')):9.3f}" for t in type_names)  # type: ignore[attr-defined]
              + (f"  {interval['low']:+.3f}..{interval['high']:+.3f}" if isinstance(interval, dict) else ""))
    write_probe_rows(Path(args.out), args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
