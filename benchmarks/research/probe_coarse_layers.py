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
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from benchmarks.research.probe_fine_memory import BATCH, Memory, encoded, terms
from benchmarks.research.probe_protocol import memory_probe_or_exit, probe_parser
from benchmarks.research.probe_report import METRICS, VIEW, col, map_row, print_row, print_table, write_probe_rows

from train.backbone import local_context
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


def taps_check(parser: argparse.ArgumentParser, taps: Sequence[int]) -> Callable[[Any], None]:
    """A check of --taps against a model's backbone: a usage error unless each is one of its blocks."""
    def check(model: Any) -> None:
        blocks = len(model.backbone._blocks)
        if any(t < 0 or t >= blocks for t in taps):
            parser.error(f"--taps: block indices 0..{blocks - 1}")
    return check


def main() -> int:
    parser = probe_parser(__doc__, "benchmarks/results/probe_coarse_layers")
    parser.add_argument("--taps", type=int, nargs="+", default=[10, 14, 15])
    args = parser.parse_args()

    model, spec, got_data = memory_probe_or_exit(
        "probe_coarse_layers", args, lambda m: m.coarse_memory is not None and m.discriminator is not None
        and bool(m.cfg.backbone), "an `inspect` checkpoint (L, M and a coarse memory)", taps_check(parser, args.taps))
    cfg = model.cfg
    t0 = time.perf_counter()
    train_images, stats_images = got_data.training_tensors(spec)
    views = got_data.tensor_views(args.transplant)
    beta, delta = cfg.memory_score_weight, cfg.coarse_memory_weight
    own_stats = terms(model, *encoded(model, stats_images), None)
    scale = {k: float(v.mean()) or 1.0 for k, v in own_stats.items()}
    own_terms = {view: terms(model, *encoded(model, x), None) for view, x in views.items()}
    fine = f"M{model.generator.full_memory.bh}"

    def score(t: Dict[str, torch.Tensor], coarse: torch.Tensor, coarse_scale: float) -> torch.Tensor:
        amap = (1 - delta) * ((1 - beta) * t["L"] / scale["L"] + beta * t[fine] / scale[fine]) + delta * coarse / coarse_scale
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
                items = model.coarse_memory.items
            else:
                amap = score(t, layer.error(model, tap_features(model, x, tap)), float(stats_c.mean()) or 1.0)
                items = layer.memory.items
            scores, row = map_row(model, amap, got_data.labels, got_data.types, got_data.masks, tap=tap,
                                  items=items.shape[0], dims=items.shape[1], view=view)
            rows.append(row)
            if tap == "own":
                own_scores[view] = scores
            elif got_data.groups is not None:
                row["minus_own_image_auroc"] = group_bootstrap_auroc_difference(got_data.labels, own_scores[view],
                                                                                scores, got_data.parts())
            print_row(row, t0)

    print(f"\n{got_data.summary(args.checkpoint, args.split)}; beta {beta:g}, delta {delta:g}; "
          f"{time.perf_counter() - t0:.0f} s")
    print_table(rows, [col("tap", ">4"), col("items", "7d"), VIEW, *METRICS], interval="minus_own_image_auroc")
    write_probe_rows(Path(args.out), args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
