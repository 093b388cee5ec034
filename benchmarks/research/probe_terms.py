"""How `inspect`'s map weighs its terms, re-chosen on one checkpoint: every (beta, delta) pair at once.

    python -m benchmarks.research.probe_terms --checkpoint RUN/last.pt --data ../shared/datasets/magnetic_tile \
        --split val --transplant --groups benchmarks/groups/magnetic_tile.csv \
        --betas 0 0.25 0.5 0.75 1 --deltas 0 0.25 0.5 [--sigmas 2 4 8 --topks 0.005 0.01 0.02]

The model's map is A = (1 - delta) [(1 - beta) L + beta M] + delta C (L the discriminator-feature distance,
M the fine memory's rebuild error, C the coarse memory's, each divided by its mean on the held-back good
images: DAAD.combine). The raw terms are computed once per view and recombined for every pair, smoothed and
scored as the graph does (DAAD.smooth, DAAD.image_score), so the table costs one pass of the model.
--sigmas and --topks also vary the smoothing's sigma and the image score's top fraction (default: the
checkpoint's own), for every (beta, delta) pair. The
checkpoint needs all three terms (gamma 0, a discriminator, a fine and a coarse memory). Choose on `val`,
report once on `test`; with --groups the split is the grouped protocol's (train.groups), and each row's
image-AUROC difference from the fitted (beta, delta, sigma, topk) gets a 95 % interval from resampling whole
groups (train.metrics.group_bootstrap_auroc_difference; last column). Prints a table and writes JSON.
"""
from __future__ import annotations

import dataclasses
import itertools
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

from benchmarks.research.probe_protocol import checkpoint_split_or_exit, probe_parser, refuse
from benchmarks.research.probe_report import METRICS, VIEW, col, print_row, print_table, scored_row, write_probe_rows

from train.metrics import group_bootstrap_auroc_difference
from train.model import DAAD, RawMaps, gaussian_kernel, separable_blur

BATCH = 16


@torch.no_grad()
def raw_terms(model: DAAD, images: torch.Tensor) -> RawMaps:
    parts: List[RawMaps] = []
    for start in range(0, len(images), BATCH):
        parts.append(model.image_maps(images[start:start + BATCH]))  # as the graph: both views with score_hflip
    return RawMaps(*(torch.cat([getattr(p, f) for p in parts]) if getattr(parts[0], f) is not None else None
                     for f in RawMaps._fields))


def smoothing(sigma: float, shape: Tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """DAAD.smooth at another sigma: the separable Gaussian, its zero-padded borders divided out."""
    kernel = gaussian_kernel(sigma)
    norm = separable_blur(torch.ones(1, 1, *shape), kernel)
    return lambda m: separable_blur(m, kernel) / norm


def top_fraction_score(amap: torch.Tensor, fraction: float) -> torch.Tensor:
    flat = amap.reshape(amap.shape[0], -1)
    return torch.topk(flat, max(1, int(round(fraction * flat.shape[1]))), dim=1).values.mean(dim=1)


@torch.no_grad()
def scored(model: DAAD, raw: RawMaps, beta: float, delta: float, sigma: float, topk: float) -> Dict[str, torch.Tensor]:
    own = model.cfg
    model.cfg = dataclasses.replace(own, memory_score_weight=beta, coarse_memory_weight=delta)
    smooth = model.smooth if sigma == own.smoothing_sigma else smoothing(sigma, tuple(raw.rec.shape[-2:]))
    try:
        amap = torch.cat([smooth(model.combine(RawMaps(*(t[i:i + BATCH] if t is not None else None for t in raw))))
                          for i in range(0, len(raw.rec), BATCH)])
    finally:
        model.cfg = own
    score = model.image_score(amap) if topk == own.score_topk else top_fraction_score(amap, topk)
    return {"map": amap, "score": score}


def main() -> int:
    parser = probe_parser(__doc__, "benchmarks/results/probe_terms")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--deltas", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    parser.add_argument("--sigmas", type=float, nargs="+", help="smoothing sigmas (default: the checkpoint's)")
    parser.add_argument("--topks", type=float, nargs="+", help="image score's top fractions (default: the checkpoint's)")
    args = parser.parse_args()
    if any(t <= 0 or t >= 1 for t in args.topks or []) or any(v <= 0 for v in args.sigmas or []):
        parser.error("--topks must lie in (0, 1) and --sigmas be > 0")

    model, state, split = checkpoint_split_or_exit("probe_terms", args)
    cfg = model.cfg
    if not (cfg.gamma <= 0 and model.discriminator is not None and cfg.memory_score_weight > 0
            and model.coarse_memory is not None):
        refuse("probe_terms", f"{args.checkpoint}: needs L, M and C (gamma 0, a discriminator, memory_score_weight "
               "> 0, a coarse memory): an `inspect` checkpoint")
    sigmas, topks = args.sigmas or [cfg.smoothing_sigma], args.topks or [cfg.score_topk]
    model.eval()
    t0 = time.perf_counter()
    rows = []
    own_row = (cfg.memory_score_weight, cfg.coarse_memory_weight, cfg.smoothing_sigma, cfg.score_topk)
    for view, view_images in split.views(args.transplant).items():
        raw = raw_terms(model, torch.from_numpy(view_images))
        own_scores = scored(model, raw, *own_row)["score"].numpy() if split.groups is not None else None
        for beta, delta, sigma, topk in itertools.product(args.betas, args.deltas, sigmas, topks):
            got_maps = scored(model, raw, beta, delta, sigma, topk)
            scores = got_maps["score"].numpy()
            rows.append(scored_row(split.labels, split.types, split.masks, scores, got_maps["map"][:, 0].numpy(),
                                   beta=beta, delta=delta, sigma=sigma, topk=topk, view=view))
            if own_scores is not None:  # how sure this row's image-AUROC difference from the fitted one is
                rows[-1]["minus_fitted_image_auroc"] = group_bootstrap_auroc_difference(
                    split.labels, own_scores, scores, split.parts())
            print_row(rows[-1])

    print(f"\n{args.checkpoint}: split `{args.split}`{' (grouped protocol)' if split.groups else ''}; fitted with beta "
          f"{cfg.memory_score_weight:g}, delta {cfg.coarse_memory_weight:g}; {time.perf_counter() - t0:.0f} s")
    print_table(rows, [col("beta", "4.2f"), col("delta", "5.2f"), col("sigma", "5g"), col("topk", "5g"), VIEW,
                       *METRICS], interval="minus_fitted_image_auroc")
    write_probe_rows(Path(args.out), args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
