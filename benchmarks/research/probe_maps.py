"""Where a model's pixel AUROC is lost, and whether post-processing its map recovers it.

    python -m benchmarks.research.probe_maps --checkpoint RUN/last.pt --data ../shared/datasets/magnetic_tile \
        --split val --transplant --out benchmarks/results/probe_maps

The model's unsmoothed map (what `combine` returns; for a combination of views, `daad-train combine`, the
mean of theirs) is re-scored under variants of what follows it in the graph:
- the smoothing's sigma, and a mix of the model's sigma with a wide one (spreads an edge's signal into the
  region it bounds);
- per-image background subtraction (the map minus its own median or 25th percentile: a defective image's
  lifted background is not a defect) or division (over its median: a part whose whole map is lifted);
- the held-back good images' mean map at each pixel subtracted or divided out (where on the frame new good
  parts score high anyway);
- a self-consistency term (each feature vector's distance to its image's mean vector: a region unlike the
  rest of its part);
- a grey-level closing of the smoothed map (raises a region bounded by high scores, such as an uneven region
  inside its step, to its border's level), with squares, with rectangles (height x width: a tall one fills
  deeper between a step across the part and the frame's edge), and after other sigmas;
- the closed map with every pixel lifted by the part's image score times a share (the score's verdict moves
  whole parts against each other, the order inside a part stays);
- the closed map plus a share of its edge-side row fill (train.model.edge_side_fill: a step across the part
  lifts the strip between it and the nearer edge), or the larger of the two;
- with a coarse memory, the fine and coarse maps alone and other weights of the coarse one, open and closed;
- for a combination of two views, other weights of the second view in the closed map.
--only TEXT... scores the model's row and the variants whose name holds a TEXT. Each row gives image AUROC
(the model's image score of the variant's map), pixel AUROC, AUPRO, and the pixel AUROC against the good
images' pixels and against the defective images' own backgrounds only (train.metrics.pixel_auroc_breakdown).
Heat maps of the model's own map, a few images per defect type and view, go to --out as overlays_*.png.
Choose on `val`, report once on `test`; with --groups the split is the grouped protocol's (train.groups).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

from benchmarks.research.probe_protocol import checkpoint_split_or_exit, held_back_good, probe_parser
from benchmarks.research.probe_report import METRICS, VIEW, col, map_row, print_row, print_table, write_probe_rows

from engine.preprocess import denormalize
from train import plots
from train.data import load_images
from train.model import edge_side_fill, gaussian_kernel, grey_closing, separable_blur
from train.preprocessing import preprocess_spec
from train.views import Scorer, ViewEnsemble

BATCH = 16
OVERLAYS_PER_TYPE = 4
WIDE_SIGMAS = (32.0, 64.0)
CLOSING_SIZES = (31, 63, 127, 191, 255)
CLOSING = 63  # `inspect`'s map_closing: the size the variants below close with where the model closes nothing
SECOND_VIEW_WEIGHTS = (0.0, 0.35, 0.65, 0.8, 1.0)  # 0.5 is the combination's own mean
EDGE_FILL_SHARES = (0.5, 1.0, 2.0)  # the edge-side row fill added to the closed map, times this
SCORE_SHARES = (0.25, 0.5, 1.0, 2.0, 4.0)  # the image score added to every pixel of its map, times this
# (height, width): a step across the part closed up to half the height deep towards the frame's edge, while
# scattered highs must line up over the width to be joined; and the same turned (a step along the part)
CLOSING_RECTANGLES = ((127, 63), (191, 63), (255, 63), (255, 31), (255, 127), (63, 127), (63, 255))
COARSE_WEIGHTS = (0.4, 0.55)


@torch.no_grad()
def unsmoothed_maps(model: Scorer, images: torch.Tensor) -> Dict[str, torch.Tensor]:
    """(N, 1, H, W): the model's map before smoothing, and the self-consistency distance. For a combination of
    views the mean of theirs (smoothing is linear: the mean of smoothed maps is the smoothed mean)."""
    if isinstance(model, ViewEnsemble):
        each = [unsmoothed_maps(view, images) for view in model.views]
        mean = {k: torch.stack([m[k] for m in each]).mean(dim=0) for k in each[0]}
        return {**mean, **{f"view{i}": m["model"] for i, m in enumerate(each)}}  # and each view's own map
    maps: Dict[str, List[torch.Tensor]] = {"model": [], "self": [], "fine": [], "coarse": []}
    for start in range(0, len(images), BATCH):
        x = model.encode(images[start:start + BATCH])[0]
        terms = model.image_maps(images[start:start + BATCH])
        maps["model"].append(model.combine(terms))
        maps["fine"].append(model.combine_fine(terms))
        maps["coarse"].append(terms.coarse / model.c_scale if terms.coarse is not None else torch.zeros_like(maps["fine"][-1]))
        centre = x.mean(dim=(2, 3), keepdim=True)
        maps["self"].append(model.to_image_size(((x - centre) ** 2).mean(dim=1, keepdim=True)))
    return {k: torch.cat(v) for k, v in maps.items()}


def blur(m: torch.Tensor, sigma: float) -> torch.Tensor:
    kernel = gaussian_kernel(sigma)
    return separable_blur(m, kernel) / separable_blur(torch.ones(1, 1, *m.shape[-2:]), kernel)


def minus_quantile(m: torch.Tensor, q: float) -> torch.Tensor:
    return m - torch.quantile(m.flatten(1), q, dim=1)[:, None, None, None]


def over_quantile(m: torch.Tensor, q: float) -> torch.Tensor:
    return m / torch.quantile(m.flatten(1), q, dim=1).clamp(min=1e-8)[:, None, None, None]


def variants(model_sigma: float, coarse_weight: float, image_score: Callable[[torch.Tensor], torch.Tensor],
             closing: int = CLOSING, views: int = 1) -> Dict[str, Callable[[Dict[str, torch.Tensor]], torch.Tensor]]:
    s, c = model_sigma, closing

    def closed_with_score(m: Dict[str, torch.Tensor], share: float) -> torch.Tensor:
        # the closed map, every pixel lifted by the part's image score (taken before the closing, as the model
        # takes it) times share: the order inside a part stays, across parts the score's verdict moves them
        smoothed = blur(m["model"], s)
        return grey_closing(smoothed, c) + share * image_score(smoothed)[:, None, None, None]

    named: Dict[str, Callable[[Dict[str, torch.Tensor]], torch.Tensor]] = {
        f"sigma {s:g} (the model's)": lambda m: blur(m["model"], s)}
    for sigma in (2 * s, 4 * s):
        named[f"sigma {sigma:g}"] = lambda m, sigma=sigma: blur(m["model"], sigma)
    for wide in WIDE_SIGMAS:
        named[f"0.5 sigma {s:g} + 0.5 sigma {wide:g}"] = lambda m, wide=wide: 0.5 * blur(m["model"], s) + 0.5 * blur(m["model"], wide)
    named[f"sigma {s:g} minus its median"] = lambda m: minus_quantile(blur(m["model"], s), 0.5)
    named[f"sigma {s:g} minus its 25th percentile"] = lambda m: minus_quantile(blur(m["model"], s), 0.25)
    named[f"sigma {s:g} over its median"] = lambda m: over_quantile(blur(m["model"], s), 0.5)
    named[f"sigma {s:g} minus the good parts' mean map"] = lambda m: blur(m["model"], s) - m["position_mean"]
    named[f"sigma {s:g} over the good parts' mean map"] = lambda m: blur(m["model"], s) / m["position_mean"].clamp(min=1e-3)
    named[f"sigma {s:g} minus the good parts' mean map, closed {c} px"] = (
        lambda m: grey_closing(blur(m["model"], s) - m["position_mean"], c))
    named["0.75 model + 0.25 self-consistency"] = lambda m: blur(0.75 * m["model"] + 0.25 * m["self"], s)
    for size in CLOSING_SIZES:
        named[f"sigma {s:g}, closed {size} px"] = lambda m, size=size: grey_closing(blur(m["model"], s), size)
        named[f"0.5 sigma {s:g} + 0.5 closed {size} px"] = (
            lambda m, size=size: 0.5 * blur(m["model"], s) + 0.5 * grey_closing(blur(m["model"], s), size))
    for share in SCORE_SHARES:
        named[f"sigma {s:g}, closed {c} px, + {share:g} x the image score"] = (
            lambda m, share=share: closed_with_score(m, share))
    for height, width in CLOSING_RECTANGLES:
        named[f"sigma {s:g}, closed {height}x{width} px"] = (
            lambda m, size=(height, width): grey_closing(blur(m["model"], s), size))
    named[f"sigma {s:g}, the larger of closed 255x{c} and {c}x255 px"] = (  # a step in either direction
        lambda m: torch.maximum(grey_closing(blur(m["model"], s), (255, c)), grey_closing(blur(m["model"], s), (c, 255))))
    for sigma in (1.5 * s, 2 * s):
        named[f"sigma {sigma:g}, closed {c} px"] = lambda m, sigma=sigma: grey_closing(blur(m["model"], sigma), c)
    named[f"sigma {s:g}, closed {c} px, the larger of it and the edge-side row fill"] = (
        lambda m: (lambda b: torch.maximum(grey_closing(b, c), b.mean(dim=(2, 3), keepdim=True) + edge_side_fill(b)))(
            blur(m["model"], s)))
    for share in EDGE_FILL_SHARES:
        named[f"sigma {s:g}, closed {c} px, + {share:g} x the edge-side row fill"] = (
            lambda m, share=share: (lambda b: grey_closing(b, c) + share * edge_side_fill(b))(blur(m["model"], s)))
    if views == 2:  # a combination of two views: the second's share of the pixel map other than a half
        for weight in SECOND_VIEW_WEIGHTS:
            named[f"sigma {s:g}, the second view weighted {weight:g}, closed {c} px"] = (
                lambda m, weight=weight: grey_closing(blur((1 - weight) * m["view0"] + weight * m["view1"], s), c))
    if coarse_weight > 0:  # the coarse memory's share of the map (`coarse_memory_weight`)
        named[f"sigma {s:g}, fine map only"] = lambda m: blur(m["fine"], s)
        named[f"sigma {s:g}, coarse map only"] = lambda m: blur(m["coarse"], s)
        for delta in COARSE_WEIGHTS:
            named[f"sigma {s:g}, coarse weight {delta:g}"] = (
                lambda m, delta=delta: blur((1 - delta) * m["fine"] + delta * m["coarse"], s))
        for delta in (*COARSE_WEIGHTS, 0.1):
            named[f"sigma {s:g}, coarse weight {delta:g}, closed {c} px"] = (
                lambda m, delta=delta: grey_closing(blur((1 - delta) * m["fine"] + delta * m["coarse"], s), c))
    return named


def views_of(model: Scorer) -> int:
    return len(model.views) if isinstance(model, ViewEnsemble) else 1


def coarse_weight(model: Scorer) -> float:
    """The coarse memory's weight in the map (fit_views gives every view of a combination the same)."""
    first = model.views[0] if isinstance(model, ViewEnsemble) else model
    return float(first.cfg.coarse_memory_weight) if first.coarse_memory is not None else 0.0


def write_overlays(path: Path, samples: list, images, amap: torch.Tensor, masks, types: List[str], spec) -> None:
    """The first few images of each defect type with their heat maps (the split's own order, not chosen)."""
    picked = [i for t in sorted(set(types) - {"good"}) for i in [j for j, ty in enumerate(types) if ty == t][:OVERLAYS_PER_TYPE]]
    maps = amap[:, 0].numpy()
    items = [plots.Case(samples[i].image.name, types[i], denormalize(images[i], spec), maps[i], masks[i], float("nan"))
             for i in picked]
    plots.plot_overlays(items, path, f"{path.stem}: the model's map", float(torch.quantile(amap.flatten()[::97], 0.999)))


def main() -> int:
    parser = probe_parser(__doc__, "benchmarks/results/probe_maps")
    parser.add_argument("--only", nargs="+", default=[], metavar="TEXT",
                        help="score only the variants whose name holds one of these (the model's row always)")
    args = parser.parse_args()

    model, state, split = checkpoint_split_or_exit("probe_maps", args)
    spec = preprocess_spec(model.cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    good = held_back_good(state, Path(args.data))
    good_maps = unsmoothed_maps(model, torch.from_numpy(load_images(good, spec)))
    self_scale = float(good_maps["self"].mean())
    # the held-back good images' mean map at each pixel (smoothed as the model smooths): where on a part new
    # good parts score high anyway (its edges, a fixed reflection)
    position_mean = blur(good_maps["model"], model.cfg.smoothing_sigma).mean(dim=0, keepdim=True)
    rows = []
    for view, view_images in split.views(args.transplant).items():
        raw = unsmoothed_maps(model, torch.from_numpy(view_images))
        raw["self"] = raw["self"] / max(self_scale, 1e-8)  # comparable with the model's map (mean ~1 on good parts)
        raw["position_mean"] = position_mean
        for k, (name, variant) in enumerate(variants(model.cfg.smoothing_sigma, coarse_weight(model), model.image_score,
                                                          model.cfg.map_closing or CLOSING, views_of(model)).items()):
            if k > 0 and args.only and not any(text in name for text in args.only):
                continue
            amap = variant(raw)
            if k == 0:  # the model's own map
                write_overlays(out / f"overlays_{args.split}_{view.strip('/')}.png", split.samples, view_images, amap,
                               split.masks, split.types, spec)
            rows.append(map_row(model, amap, split.labels, split.types, split.masks, map=name, view=view)[1])
            print_row(rows[-1])

    print(f"\n{Path(args.checkpoint)}: split `{args.split}`, image score = top {model.cfg.score_topk:g} of each "
          f"variant's map; {time.perf_counter() - t0:.0f} s")
    print_table(rows, [col("map", "40s"), VIEW, *METRICS], per_type="pixel_auroc_per_type")
    write_probe_rows(out, args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
