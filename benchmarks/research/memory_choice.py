"""Which feature memory the default is (docs/research/product_model.md): block sizes, the coarse memory's weight,
the coreset budget, the image score and the map's post-processing, scored on cached frozen features of both
datasets' `val` halves beside PatchCore on the same features (a 10 % coreset, for speed). Nothing trained.

    python -m benchmarks.research.memory_choice --cache /tmp/features --split val

Step 1 caches EfficientNet-Lite0 features (1/8 and 1/32) of the training images and of the split at 256 px;
step 2 scores the variants (maps in units of the mean over 10 % of the training images held out of the memory).
JSON: benchmarks/results/memory_choice/.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.protocol import DATASETS
from engine.preprocess import PreprocessSpec
from train.backbone import EfficientNetLite0Features
from train.coreset import kcenter_greedy
from train.data import has_colour, load_images, train_samples
from train.evaluate import load_split
from train.groups import grouped_protocol, load_groups
from train.memory_model import NearestBlockMemory
from train.metrics import aupro, image_auroc, pixel_auroc
from train.model import edge_side_fill, gaussian_kernel, grey_closing, principal_components, separable_blur

SIZE = 256
RESULTS = Path(__file__).resolve().parents[1] / "results" / "memory_choice"


def cache_features(name: str, split: str, cache: Path) -> None:
    ds = DATASETS[name]
    channels = 3 if has_colour(train_samples(ds.root)) else 1
    spec = PreprocessSpec(height=SIZE, width=SIZE, channel_order="rgb" if channels == 3 else "gray",
                          mean=(0.5,) * channels, std=(0.5,) * channels)
    backbone = EfficientNetLite0Features((SIZE, SIZE), coarse=True)
    groups = load_groups(ds.groups, ds.root) if ds.groups else None

    def features(images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        parts = [backbone.forward_with_coarse(torch.from_numpy(images[i:i + 16])) for i in range(0, len(images), 16)]
        return (torch.cat([f for f, _ in parts]).half().numpy(), torch.cat([c for _, c in parts]).half().numpy())

    with torch.no_grad():
        if not (cache / f"{name}_train.npz").exists():
            train = grouped_protocol(ds.root, groups)[0] if groups else train_samples(ds.root)
            f, c = features(load_images(train, spec))
            np.savez(cache / f"{name}_train.npz", f=f, c=c)
        if not (cache / f"{name}_{split}.npz").exists():
            samples, images, masks, labels, types = load_split(ds.root, spec, split, 0, groups)
            f, c = features(images)
            np.savez(cache / f"{name}_{split}.npz", f=f, c=c, masks=masks.astype(np.uint8), labels=labels)


def standardiser(train: torch.Tensor, dims: int) -> Callable[[torch.Tensor], torch.Tensor]:
    mean = train.mean((0, 2, 3), keepdim=True)
    std = train.std((0, 2, 3), keepdim=True).clamp(min=1e-3)
    proj = principal_components(train, mean, std, dims).float()
    return lambda x: F.conv2d((x - mean) / std, proj[:, :, None, None])


def batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, n: int = 32) -> torch.Tensor:
    return torch.cat([fn(x[i:i + n]) for i in range(0, len(x), n)])


def memory_of(items: torch.Tensor, channels: int, block: int) -> NearestBlockMemory:
    memory = NearestBlockMemory(channels, block)
    memory.set_items(items)
    return memory


def smooth_up(m: torch.Tensor, sigma: float = 4.0) -> torch.Tensor:
    kernel = gaussian_kernel(sigma)
    m = F.interpolate(m, size=(SIZE, SIZE), mode="bilinear", align_corners=False) if m.shape[-1] != SIZE else m
    return separable_blur(m, kernel) / separable_blur(torch.ones(1, 1, SIZE, SIZE), kernel)


def image_scores(m: torch.Tensor, kind: str) -> np.ndarray:
    flat = m.reshape(len(m), -1)
    top = flat.topk(max(1, int(0.01 * flat.shape[1])), 1).values.mean(1)
    return {"max": flat.max(1).values, "top1%": top, "top1%-mean": top - flat.mean(1)}[kind].numpy()


def score_dataset(name: str, split: str, cache: Path) -> Dict[str, Dict[str, float]]:
    tr, ev = np.load(cache / f"{name}_train.npz"), np.load(cache / f"{name}_{split}.npz")
    ftr, ctr = torch.from_numpy(tr["f"]).float(), torch.from_numpy(tr["c"]).float()
    fev, cev = torch.from_numpy(ev["f"]).float(), torch.from_numpy(ev["c"]).float()
    labels, masks = ev["labels"], ev["masks"] > 0
    order = np.random.default_rng(1).permutation(len(ftr))
    held, kept = torch.from_numpy(np.sort(order[:max(1, len(ftr) // 10)])), torch.from_numpy(np.sort(order[len(ftr) // 10:]))
    raw_maps: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (split maps, held-back maps), unscaled

    def add(key: str, fn: Callable[[torch.Tensor], torch.Tensor], split_x: torch.Tensor, held_x: torch.Tensor) -> None:
        t0 = time.perf_counter()
        raw_maps[key] = (batched(fn, split_x), batched(fn, held_x))
        print(f"{name} {key}: {time.perf_counter() - t0:.0f} s", flush=True)

    patches = ftr[kept].permute(0, 2, 3, 1).reshape(-1, ftr.shape[1])
    peer = memory_of(patches[kcenter_greedy(patches, len(patches) // 10)], ftr.shape[1], 1)
    add("PatchCore 10%", lambda x: torch.sqrt(peer(x) * x.shape[1]), fev, ftr[held])
    fine = standardiser(ftr[kept], 64)
    zk, zev, zh = batched(fine, ftr[kept]), batched(fine, fev), batched(fine, ftr[held])
    for block in (1, 2, 4, 8):
        items = NearestBlockMemory(64, block).blocks(zk)
        budget = 0.1 if block == 1 else 1.0  # 1x1: 10 % for speed (PatchCore: lossless down to 1 %)
        if budget < 1:
            items = items[kcenter_greedy(items, int(budget * len(items)))]
        add(f"block {block}", memory_of(items, 64, block), zev, zh)
    coarse = standardiser(ctr[kept], 64)
    citems = NearestBlockMemory(64, 1).blocks(coarse(ctr[kept]))
    add("coarse", memory_of(citems, 64, 1), coarse(cev), coarse(ctr[held]))
    for budget in (0.25, 0.1, 0.01):
        items = NearestBlockMemory(64, 4).blocks(zk)
        add(f"block 4 @{budget:.0%}", memory_of(items[kcenter_greedy(items, int(budget * len(items)))], 64, 4), zev, zh)
        add(f"coarse @{budget:.0%}", memory_of(citems[kcenter_greedy(citems, int(budget * len(citems)))], 64, 1),
            coarse(cev), coarse(ctr[held]))
    scaled = {k: (a / b.mean(), b) for k, (a, b) in raw_maps.items()}
    fine_size = lambda t: F.interpolate(t, size=fev.shape[-2:], mode="bilinear", align_corners=False)  # noqa: E731
    mixes: List[Tuple[str, Dict[str, float]]] = [(k, {k: 1.0}) for k in scaled]
    for fine_key, coarse_key in (("block 4", "coarse"), ("block 2", "coarse"), ("block 1", "coarse"),
                                 ("block 8", "coarse"), ("block 4 @25%", "coarse @25%"), ("block 4 @10%", "coarse @10%"),
                                 ("block 4 @1%", "coarse @1%")):
        for delta in ((0.25, 0.5, 0.65, 0.8) if fine_key == "block 4" else (0.5,)):
            mixes.append((f"{fine_key} + {delta} {coarse_key}", {fine_key: 1 - delta, coarse_key: delta}))
    mixes.append(("block 1 + block 4", {"block 1": 0.5, "block 4": 0.5}))
    out: Dict[str, Dict[str, float]] = {}
    for label, weights in mixes:
        m = smooth_up(sum(w * fine_size(scaled[k][0]) for k, w in weights.items()))
        post = {"": m}
        if label == "block 4 @10% + 0.5 coarse @10%":
            post.update({" closed 63": grey_closing(m, 63), " + 0.5 row fill": m + 0.5 * edge_side_fill(m, SIZE),
                         " closed 63 + 0.5 row fill": grey_closing(m, 63) + 0.5 * edge_side_fill(m, SIZE)})
        for suffix, mm in post.items():
            row = {kind: image_auroc(labels, image_scores(m, kind)) for kind in ("max", "top1%", "top1%-mean")}
            row.update(pixel_auroc=pixel_auroc(masks, mm[:, 0].numpy()), aupro=aupro(masks, mm[:, 0].numpy()))
            out[label + suffix] = row
            print(f"{name} {label + suffix}: " + " ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    return out


def main(argv: List[str] = None) -> int:  # type: ignore[assignment]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, required=True, help="folder for the cached features (~1 GB)")
    parser.add_argument("--split", default="val", choices=("val", "test"))
    parser.add_argument("--datasets", nargs="+", default=sorted(DATASETS), choices=sorted(DATASETS))
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    args.cache.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.datasets:
        cache_features(name, args.split, args.cache)
        results[name] = score_dataset(name, args.split, args.cache)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"memory_choice_{args.split}_{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=2))
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
