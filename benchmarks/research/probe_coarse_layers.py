"""Which backbone layer the coarse memory should hold, re-checked on parts the model never saw.

    python -m benchmarks.research.probe_coarse_layers --checkpoint RUN/last.pt --data ../shared/datasets/magnetic_tile \
        --split val --transplant --groups benchmarks/groups/magnetic_tile.csv --taps 10 14 15

`inspect`'s coarse memory holds the last block's features (block 15: 1/32, 320 channels). Each row here
rebuilds it, untrained as in `fit`, from another EfficientNet-Lite0 block's output (10: the end of the 1/16
stages, 112 channels; 14: the end of the 1/32 stage 5, 192 channels; 15: the product's), each vector averaged
with its 3x3 neighbours, standardised and projected onto `coarse_feature_dims` principal components of the
checkpoint's own training images, every vector once, read out hard by cosine. C is divided by its mean on the
checkpoint's held-back good images (as `fit` normalises it) and mixed into the checkpoint's own L and M with its
beta and delta. The first row is the checkpoint's own coarse memory; with --groups every other row's image-AUROC
difference from it gets a 95 % interval from resampling whole groups. Choose on `val`. Prints a table and
writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from benchmarks.research.probe_fine_memory import BATCH, Memory, encoded, terms
from benchmarks.research.probe_json import write_probe_rows
from benchmarks.research.probe_protocol import checkpoint_data_or_exit

from train.checkpoint import load_model
from train.evaluate import compute_metrics
from train.backbone import local_context
from train.fit import preprocess_spec
from train.metrics import group_bootstrap_auroc_difference
from train.model import DAAD, divide, principal_components


@torch.no_grad()
def tap_features(model: DAAD, images: torch.Tensor, tap: int) -> torch.Tensor:
    """(N, 1|3, H, W) images -> the backbone's block `tap` output, 3x3-averaged (N, C, h, w)."""
    backbone = model.backbone
    assert backbone is not None
    out = []
    for start in range(0, len(images), BATCH):
        x = model.normalise_input(images[start:start + BATCH])
        if x.shape[1] == 1:
            x = torch.cat([x, x, x], dim=1)
        h = F.relu6(backbone._bn0(backbone._conv_stem(x)))
        for block in backbone._blocks[:tap + 1]:
            h = block(h)
        out.append(local_context(h))
    return torch.cat(out)


class CoarseLayer:
    """An untrained coarse memory of one block's features: standardise, project, nearest item by cosine.

    items: keep that many of the training vectors, drawn at random with `rng` (0: every one)."""

    def __init__(self, train: torch.Tensor, dims: int, items: int = 0, rng: Optional[torch.Generator] = None) -> None:
        self.mean = train.mean(dim=(0, 2, 3), keepdim=True)
        self.std = train.std(dim=(0, 2, 3), keepdim=True).clamp(min=1e-3)
        self.proj = principal_components(train, self.mean, self.std, dims).to(train.dtype) if dims else None
        z = self.standardise(train)
        vectors = divide(z.contiguous(), 1, 1, z.shape[1])
        if 0 < items < len(vectors):
            vectors = vectors[torch.randperm(len(vectors), generator=rng)[:items]]
        self.memory = Memory(vectors, 1)

    def standardise(self, raw: torch.Tensor) -> torch.Tensor:
        z = (raw - self.mean) / self.std
        return z if self.proj is None else F.conv2d(z, self.proj[:, :, None, None])

    def error(self, model: DAAD, raw: torch.Tensor) -> torch.Tensor:
        z = self.standardise(raw)
        parts = [((q - self.memory.readouts(q.contiguous())[0]) ** 2).mean(dim=1, keepdim=True) for q in z.split(BATCH)]
        return model.to_image_size(torch.cat(parts))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="val", choices=("all", "val", "test"))
    parser.add_argument("--taps", type=int, nargs="+", default=[10, 14, 15])
    parser.add_argument("--transplant", action="store_true")
    parser.add_argument("--groups", default="", help="groups CSV the checkpoint was fit with (grouped protocol)")
    parser.add_argument("--out", default="benchmarks/results/probe_coarse_layers")
    args = parser.parse_args()

    model, state = load_model(args.checkpoint)
    cfg = model.cfg
    if model.coarse_memory is None or model.discriminator is None or not cfg.backbone:
        print(f"{args.checkpoint}: needs an `inspect` checkpoint (L, M and a coarse memory)", file=sys.stderr)
        return 2
    if any(t < 0 or t >= len(model.backbone._blocks) for t in args.taps):  # type: ignore[union-attr]
        parser.error(f"--taps: block indices 0..{len(model.backbone._blocks) - 1}")  # type: ignore[union-attr]
    spec = preprocess_spec(cfg)
    got_data = checkpoint_data_or_exit("probe_coarse_layers", args, state, spec)
    groups, train, stats, samples, images, masks, labels, types = got_data[:8]
    model.eval()
    t0 = time.perf_counter()
    train_images, stats_images = got_data.training_tensors(spec)
    views = got_data.views(args.transplant)
    beta, delta = cfg.memory_score_weight, cfg.coarse_memory_weight
    own_stats = terms(model, *encoded(model, stats_images), None)
    scale = {k: float(v.mean()) or 1.0 for k, v in own_stats.items()}
    own_terms = {view: terms(model, *encoded(model, x), None) for view, x in views.items()}
    part_of = got_data.parts()

    def score(t: Dict[str, torch.Tensor], coarse: torch.Tensor, coarse_scale: float) -> torch.Tensor:
        fine = (1 - beta) * t["L"] / scale["L"] + beta * t[f"M{model.generator.full_memory.bh}"] / scale[  # type: ignore[union-attr]
            f"M{model.generator.full_memory.bh}"]  # type: ignore[union-attr]
        amap = (1 - delta) * fine + delta * coarse / coarse_scale
        return torch.cat([model.smooth(part) for part in amap.split(BATCH)])

    rows: List[Dict[str, object]] = []
    own_scores: Dict[str, object] = {}
    for tap in ["own"] + args.taps:
        layer = None
        if tap != "own":
            layer = CoarseLayer(tap_features(model, train_images, tap), cfg.coarse_feature_dims)
            stats_c = layer.error(model, tap_features(model, stats_images, tap))
        for view, x in views.items():
            t = own_terms[view]
            if layer is None:
                amap = score(t, t["C"], scale["C"])
                channels, items = model.coarse_memory.items.shape[1], model.coarse_memory.items.shape[0]
            else:
                amap = score(t, layer.error(model, tap_features(model, x, tap)), float(stats_c.mean()) or 1.0)
                channels, items = layer.memory.items.shape[1], layer.memory.items.shape[0]
            scores = model.image_score(amap).numpy()
            got = compute_metrics(labels, types, scores, amap[:, 0].numpy(), masks)
            b = got["pixel_auroc_breakdown"]
            rows.append({"tap": tap, "items": items, "dims": channels, "view": view, "image_auroc": got["image_auroc"],
                         "pixel_auroc": got["pixel_auroc"], "aupro": got["aupro"],
                         "pixel_against_good_images": b["against_good_images"],
                         "pixel_against_defective_backgrounds": b["against_defective_backgrounds"],
                         "image_auroc_per_type": got["image_auroc_per_type"], "pixel_auroc_per_type": b["per_type"]})
            if tap == "own":
                own_scores[view] = scores
            elif groups is not None:
                rows[-1]["minus_own_image_auroc"] = group_bootstrap_auroc_difference(labels, own_scores[view], scores,
                                                                                     part_of)
            print(json.dumps(rows[-1], default=float), f"{time.perf_counter() - t0:.0f} s", flush=True)

    print(f"\n{args.checkpoint}: split `{args.split}`{' (grouped protocol)' if groups else ''}; {len(train)} training "
          f"images, {len(stats)} held back; beta {beta:g}, delta {delta:g}; {time.perf_counter() - t0:.0f} s")
    type_names = sorted({t for r in rows for t in r["image_auroc_per_type"]})  # type: ignore[attr-defined]
    header = (f"{'tap':>4s} {'items':>7s} {'view':7s} {'image':>6s} {'pixel':>6s} {'AUPRO':>6s} {'vs good':>7s} {'vs bg':>6s}  "
              + " ".join(f"{t:>9s}" for t in type_names))
    print(header + "\n" + "-" * len(header))
    for r in rows:
        interval = r.get("minus_own_image_auroc")
        print(f"{str(r['tap']):>4s} {r['items']:7d} {r['view']:7s} {r['image_auroc']:6.3f} {r['pixel_auroc']:6.3f} "
              f"{r['aupro']:6.3f} {r['pixel_against_good_images']:7.3f} {r['pixel_against_defective_backgrounds']:6.3f}  "
              + " ".join(f"{r['image_auroc_per_type'].get(t, float('nan')):9.3f}" for t in type_names)  # type: ignore[attr-defined]
              + (f"  {interval['low']:+.3f}..{interval['high']:+.3f}" if isinstance(interval, dict) else ""))
    write_probe_rows(Path(args.out), args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
