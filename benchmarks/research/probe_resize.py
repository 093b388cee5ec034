"""Stretch, letterbox or tile? How the crop's aspect ratio reaches the model, measured on the memory's map.

    python -m benchmarks.research.probe_resize --data ../shared/datasets/magnetic_tile --split val \
        --modes stretch reflect replicate tile --sizes 256 --transplant [--mix] [--block 4] \
        [--groups benchmarks/groups/magnetic_tile.csv]

magnetic_tile's crops range from 0.4 to 2.8 in height/width; the product stretches each one to the model's
square input (engine.preprocess, `resize: stretch`), so the texture's scale differs between crops. The
alternatives: a letterbox (the longer side resized to the input size, the aspect kept, the rest of the
square filled by mirroring the crop, `reflect`, or repeating its edge, `replicate`), or tiles (`tile`: the
crop cut along its longer side into round(long / short) near-square pieces, each stretched and scored,
their maps put back together). Each row scores `inspect`'s fine memory alone (M: 4x4 blocks of the 1/8
features, 64 principal components, every training block once, read out hard, untrained, sigma 4:
sweep_features.untrained_memory_maps) with train/ and the split preprocessed the same way; a letterboxed map is cut back to the crop, and every map is put in the
masks' stretched geometry before it is scored; the image score is the top 1 % of that crop's map. With
--transplant the split's defects are also pasted onto its good images (in the stretched geometry, then
brought back to the host's own shape and preprocessed like the rest). With --mix, each letterbox run beside
`stretch` also scores the two views together (`stretch+reflect`, ...: the mean of the two maps, each divided by
its mean over the split's maps, which needs no labels): two memories and two passes per image. --block sets
the memory's block side (4 = inspect's; at 384 px, 6 spans what 4 spans at 256). --groups: the grouped
protocol (train.groups: train on the training groups' train/good, score the split of held-out groups), and
each row's image-AUROC difference from `stretch` in the same view gets a 95 % interval from resampling whole
groups; every row keeps its per-image scores and each crop's aspect (height / width). Prints a table and
writes JSON.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.research.probe_protocol import parts_of, probe_parser
from benchmarks.research.probe_report import METRICS, VIEW, col, print_table, scored_row, write_probe_rows
from benchmarks.research.sweep_features import backbone_features, smoothed, untrained_memory_maps

from train.config import preset
from train.data import eval_samples, load_mask, read_image, split_eval, train_samples
from train.groups import grouped_protocol, load_groups, split_by_group
from train.metrics import group_bootstrap_auroc_difference
from train.preprocessing import preprocess_spec
from train.transplant import transplant_set

MODES = ("stretch", "reflect", "replicate", "tile")
BLOCK = 4  # inspect's fine memory: 4x4 blocks of the 1/8 feature map (--block)
FEATURE_DIMS = 64
SIGMA = 4.0
TOPK = 0.01
Rect = Optional[Tuple[int, int, int, int]]  # (top, left, height, width) of the crop inside the square
Piece = Tuple[np.ndarray, Rect, Tuple[float, float, float, float]]  # see pieces()


def gray(path: Path) -> np.ndarray:
    import cv2

    image = read_image(path)
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)


def to_input(u8: np.ndarray) -> np.ndarray:
    """uint8 (H, W) -> the model's (1, H, W) input in [-1, 1] (engine.preprocess's mean 0.5, std 0.5)."""
    return ((u8.astype(np.float32) / 255.0 - 0.5) / 0.5)[None]


def square(image: np.ndarray, size: int, mode: str) -> Tuple[np.ndarray, Rect]:
    """One crop -> (size, size) uint8 by `mode` (stretch or a letterbox), and where the crop lies in it
    (None: all of it)."""
    import cv2

    if mode in ("stretch", "tile"):
        return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA), None
    h, w = image.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    inner = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
    top, left = (size - nh) // 2, (size - nw) // 2
    border = cv2.BORDER_REFLECT_101 if mode == "reflect" else cv2.BORDER_REPLICATE
    return cv2.copyMakeBorder(inner, top, size - nh - top, left, size - nw - left, border), (top, left, nh, nw)


def pieces(image: np.ndarray, size: int, mode: str) -> List[Piece]:
    """One crop -> the squares the model sees, each with where its crop lies in it and which share of the
    crop (top, bottom, left, right as fractions) it is. `tile` cuts the crop along its longer side into
    round(long / short) near-square tiles, each stretched."""
    if mode != "tile":
        u8, rect = square(image, size, mode)
        return [(u8, rect, (0.0, 1.0, 0.0, 1.0))]
    h, w = image.shape
    n = max(1, round(max(h, w) / min(h, w)))
    out: List[Piece] = []
    for k in range(n):
        a, b = k / n, (k + 1) / n
        part = image[round(a * h):round(b * h)] if h >= w else image[:, round(a * w):round(b * w)]
        out.append((square(part, size, "stretch")[0], None, (a, b, 0.0, 1.0) if h >= w else (0.0, 1.0, a, b)))
    return out


def pasted_crops(crops: Sequence[np.ndarray], masks: np.ndarray, labels: np.ndarray, size: int) -> List[np.ndarray]:
    """The split's defects pasted onto its good crops (train.transplant, in the stretched geometry), each
    brought back to its host's own shape."""
    import cv2

    stretched = np.stack([to_input(square(c, size, "stretch")[0]) for c in crops])
    pasted, hosts = transplant_set(stretched, masks, labels)
    u8 = np.clip((pasted[:, 0] * 0.5 + 0.5) * 255.0, 0, 255).astype(np.uint8)
    return [cv2.resize(u8[i], (crops[h].shape[1], crops[h].shape[0]), interpolation=cv2.INTER_LINEAR)
            for i, h in enumerate(hosts)]


def assemble(maps: torch.Tensor, owners: Sequence[int], placed: Sequence[Piece], count: int, size: int) -> torch.Tensor:
    """Each square's map cut to its crop and put where its share of the crop lies in the masks' (stretched)
    geometry -> (count, 1, size, size)."""
    out = torch.zeros(count, 1, size, size)
    for m, owner, (_, rect, (a, b, c, d)) in zip(maps, owners, placed):
        if rect is not None:
            t, l, h, w = rect
            m = m[:, t:t + h, l:l + w]
        r0, r1, c0, c1 = round(a * size), round(b * size), round(c * size), round(d * size)
        out[owner, :, r0:r1, c0:c1] = F.interpolate(m[None], size=(r1 - r0, c1 - c0), mode="bilinear",
                                                    align_corners=False)[0]
    return out


def split_all(crops: Sequence[np.ndarray], size: int, mode: str) -> Tuple[List[Piece], List[int]]:
    placed, owners = [], []
    for i, crop in enumerate(crops):
        for piece in pieces(crop, size, mode):
            placed.append(piece)
            owners.append(i)
    return placed, owners


def memory_maps(train: Sequence[np.ndarray], test: Sequence[np.ndarray], size: int, mode: str,
                block: int = BLOCK) -> torch.Tensor:
    train_pieces, _ = split_all(train, size, mode)
    raw_train = torch.from_numpy(backbone_features(np.stack([to_input(u8) for u8, _, _ in train_pieces]), size))
    placed, owners = split_all(test, size, mode)
    raw_test = torch.from_numpy(backbone_features(np.stack([to_input(u8) for u8, _, _ in placed]), size))
    h, w = raw_train.shape[-2:]
    items = len(raw_train) * (h // block) * (w // block)  # every training block once
    maps = untrained_memory_maps(raw_train, raw_test, items, 0, size, block=block, feature_dims=FEATURE_DIMS)
    return assemble(smoothed(maps, SIGMA), owners, placed, len(test), size)


def mixed(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Two views' maps of one split, each scaled by its own mean over the split (no labels), averaged."""
    return 0.5 * first / first.mean() + 0.5 * second / second.mean()


def score_row(maps: torch.Tensor, labels: np.ndarray, types: List[str], masks: np.ndarray,
              **keys: object) -> Dict[str, object]:
    flat = maps.reshape(len(maps), -1)
    scores = flat.topk(max(1, int(flat.shape[1] * TOPK)), dim=1).values.mean(dim=1).numpy()
    return {**scored_row(labels, types, masks, scores, maps[:, 0].numpy(), **keys), "scores": [float(v) for v in scores]}


def report(row: Dict[str, object], t0: float) -> Dict[str, object]:
    row["seconds"] = time.perf_counter() - t0
    print(f"{row['mode']} {row['size']} {row['view']}: image {row['image_auroc']:.3f} pixel {row['pixel_auroc']:.3f} "
          f"AUPRO {row['aupro']:.3f} ({row['seconds']:.0f} s)", flush=True)
    return row


def main() -> int:
    parser = probe_parser(__doc__, "benchmarks/results/probe_resize", checkpoint="")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256])
    parser.add_argument("--mix", action="store_true", help="also score stretch and each letterbox together")
    parser.add_argument("--block", type=int, default=BLOCK, help="block side of the memory, in 1/8 feature cells")
    args = parser.parse_args()
    if any(size % 128 for size in args.sizes):
        parser.error(f"--sizes {args.sizes}: each must be a multiple of 128 (the generator's four 2x downsamplings "
                     "act on the 1/8 feature map)")
    if args.block < 1 or any((size // 8) % args.block for size in args.sizes):
        parser.error(f"--block {args.block}: must divide each size's 1/8 feature map ({[s // 8 for s in args.sizes]} cells)")
    if args.mix and ("stretch" not in args.modes or not {"reflect", "replicate"} & set(args.modes)):
        parser.error("--mix needs `stretch` and a letterbox (reflect or replicate) in --modes")

    data = Path(args.data)
    groups = load_groups(Path(args.groups), data) if args.groups else None
    if groups is not None:
        training, evaluated = grouped_protocol(data, groups)
        samples = [evaluated[i] for i in split_by_group(evaluated, args.split, groups, 0)]
    else:
        training, samples = train_samples(data), eval_samples(data)
        samples = [samples[i] for i in split_eval(samples, args.split, 0)]
    train = [gray(s.image) for s in training]
    crops = [gray(s.image) for s in samples]
    part_of = parts_of(groups, samples)
    labels = np.array([s.label for s in samples])
    types = [s.defect_type for s in samples]
    t0 = time.perf_counter()
    rows = []
    for size in args.sizes:
        spec = preprocess_spec(preset("daad", image_size=(size, size), backbone="efficientnet_lite0"))
        masks = np.stack([load_mask(s, spec) for s in samples])
        views: Dict[str, Sequence[np.ndarray]] = {"test/": crops}
        if args.transplant:
            views["pasted"] = pasted_crops(crops, masks, labels, size)
        for view, test in views.items():
            view_maps: Dict[str, torch.Tensor] = {}
            for mode in args.modes:
                maps = view_maps[mode] = memory_maps(train, test, size, mode, args.block)
                rows.append(report(score_row(maps, labels, types, masks, mode=mode, size=size, view=view), t0))
                rows[-1]["aspect"] = [c.shape[0] / c.shape[1] for c in crops]
                stretch = next((r for r in rows if r["mode"] == "stretch" and r["size"] == size and r["view"] == view), None)
                if groups is not None and stretch is not None and mode != "stretch":
                    rows[-1]["minus_stretch_image_auroc"] = group_bootstrap_auroc_difference(
                        labels, stretch["scores"], rows[-1]["scores"], part_of)
                    print(f"  minus stretch: {rows[-1]['minus_stretch_image_auroc']}", flush=True)
            if args.mix:
                for mode in ("reflect", "replicate"):
                    if mode in view_maps:
                        maps = mixed(view_maps["stretch"], view_maps[mode])
                        rows.append(report(score_row(maps, labels, types, masks, mode=f"stretch+{mode}", size=size,
                                                     view=view), t0))

    print(f"\nsplit `{args.split}`, M alone ({args.block}x{args.block} blocks, {FEATURE_DIMS} dims, sigma {SIGMA:g}, "
          f"top 1 %); {time.perf_counter() - t0:.0f} s")
    print_table(rows, [col("mode", "17s"), col("size", "4d"), VIEW, *METRICS])
    write_probe_rows(Path(args.out), args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
