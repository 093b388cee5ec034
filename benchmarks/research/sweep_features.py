"""Fast ablations of DAAD on frozen EfficientNet-Lite0 features, with a kNN reference, on one dataset.

    python -m benchmarks.research.sweep_features --data ../shared/datasets/magnetic_tile --split val \
        --configs daad_plus daad_plus:memory_items=500 --out benchmarks/results/sweep_features

The backbone is frozen, so its features are computed once per dataset and size (cached in --out) and
every variant trains on them: minutes per variant on 2 CPU cores instead of tens. The training step is
fit()'s (same augmentation, losses and optimisers); a chosen variant is then confirmed end to end with
`bench_models.py` (which runs the real `fit` and `evaluate`). Every variant is scored with four image
score functions on one trained model (max, mean of the top 1 % and 10 % of the map, whole-map mean),
so the score function is an ablation too. The kNN reference is the distance of each feature patch to
the nearest of --knn-bank random training patches (PatchCore without coreset), scored the same ways.
--memory-sizes scores the model's own full-resolution memory (M; --memory-readouts hard, soft) drawn
from training blocks without training, for several sizes, --memory-blocks block sizes and --feature-dims
projections, each smoothed with every --sigmas; --betas rescores a trained model with other mixes of its
map's terms (R, L and M).

Two views of every row besides the usual metrics: `far`, the image AUROC of the map's mean over pixels
more than FAR_PX (at 256 px) from any defect, which measures how much of an image score comes from the
defective crop's background rather than its defect; and with --transplant, every figure on the split's
defects pasted onto its good images (train.transplant: good and defective images share backgrounds).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from benchmarks.research.bench_models import parse_variant
from benchmarks.research.probe_report import print_row, write_probe_rows
from train.backbone import EfficientNetLite0Features
from train.config import TrainConfig, preset
from train.data import eval_samples, load_images, load_mask, split_eval, train_samples
from train.fit import augment
from train.loss import discriminator_loss, generator_loss
from train.metrics import aupro, image_auroc, pixel_auroc
from train.model import DAAD, RawMaps
from train.preprocessing import preprocess_spec
from train.transplant import transplant_set

SCORES = ("max", "top1%", "top10%", "mean")
BATCH = 32
FAR_PX = 32  # at 256 px: beyond the reach of the 4x4-block memory's blocks and of the smoothing


def image_scores(maps: torch.Tensor) -> Dict[str, np.ndarray]:
    """(B, 1, H, W) anomaly maps -> each score function's (B,) image scores."""
    flat = maps.reshape(len(maps), -1)
    top = lambda frac: flat.topk(max(1, int(flat.shape[1] * frac)), dim=1).values.mean(dim=1)  # noqa: E731
    return {"max": flat.max(dim=1).values.numpy(), "top1%": top(0.01).numpy(), "top10%": top(0.10).numpy(),
            "mean": flat.mean(dim=1).numpy()}


def backbone_features(images: np.ndarray, size: int) -> np.ndarray:
    backbone = EfficientNetLite0Features((size, size))
    t = torch.from_numpy(images)
    with torch.no_grad():
        return torch.cat([backbone(t[i:i + BATCH]) for i in range(0, len(t), BATCH)]).numpy()


def cached_features(data: Path, size: int, out: Path) -> Dict[str, np.ndarray]:
    """float32 backbone features of train/ and test/ (float16 features, an earlier cache, changed what
    models trained on them learned: README)."""
    path = out / "cache" / f"features32_{data.name}_{size}.npz"  # ~1 GB at 256 px: never committed
    if path.is_file():
        return dict(np.load(path))
    spec = preprocess_spec(preset("daad", image_size=(size, size), backbone="efficientnet_lite0"))
    arrays: Dict[str, np.ndarray] = {}
    for name, samples in (("train", train_samples(data)), ("test", eval_samples(data))):
        arrays[name] = backbone_features(load_images(samples, spec), size)
        if name == "test":
            arrays["labels"] = np.array([s.label for s in samples])
            arrays["types"] = np.array([s.defect_type for s in samples])
            arrays["masks"] = np.stack([load_mask(s, spec) for s in samples])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays


def transplanted_features(data: Path, size: int, out: Path, split: str, idx: np.ndarray, masks: np.ndarray,
                          labels: np.ndarray) -> np.ndarray:
    """Backbone features of the split's defects pasted onto its good images (cached)."""
    path = out / "cache" / f"transplant32_{data.name}_{size}_{split}.npy"
    if path.is_file():
        return np.load(path)
    spec = preprocess_spec(preset("daad", image_size=(size, size), backbone="efficientnet_lite0"))
    samples = eval_samples(data)
    images, _ = transplant_set(load_images([samples[i] for i in idx], spec), masks, labels)
    feats = backbone_features(images, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, feats)
    return feats


def metrics(labels: np.ndarray, types: np.ndarray, masks: np.ndarray, maps: torch.Tensor) -> Dict[str, Any]:
    scores = image_scores(maps)
    defect_types = sorted(set(types.tolist()) - {"good"})
    per_type = {s: {t: image_auroc(labels[np.isin(types, ["good", t])], v[np.isin(types, ["good", t])])
                    for t in defect_types} for s, v in scores.items()}
    up = torch.nn.functional.interpolate(maps, size=masks.shape[-2:], mode="bilinear", align_corners=False)[:, 0].numpy()
    return {"image_auroc": {s: image_auroc(labels, v) for s, v in scores.items()}, "per_type": per_type,
            "pixel_auroc": pixel_auroc(masks, up), "aupro": aupro(masks, up), "far": far_auroc(labels, masks, up)}


def far_auroc(labels: np.ndarray, masks: np.ndarray, maps: np.ndarray) -> float:
    """Image AUROC of each map's mean over the pixels more than FAR_PX from any of its defects."""
    from scipy import ndimage

    reach = max(1, round(FAR_PX * masks.shape[-1] / 256))
    square = np.ones((3, 3), bool)
    far = np.stack([~ndimage.binary_dilation(m, square, iterations=reach) if m.any() else np.ones_like(m) for m in masks])
    keep = far.reshape(len(far), -1).any(axis=1)
    scores = np.array([m[f].mean() if f.any() else np.nan for m, f in zip(maps, far)])
    return image_auroc(labels[keep], scores[keep])


def knn_maps(train: torch.Tensor, test: torch.Tensor, bank_size: int, seed: int, size: int) -> torch.Tensor:
    patches = train.permute(0, 2, 3, 1).reshape(-1, train.shape[1])
    bank = patches[torch.randperm(len(patches), generator=torch.Generator().manual_seed(seed))[:bank_size]]
    h, w = test.shape[-2:]
    rows = [torch.cdist(q.permute(1, 2, 0).reshape(-1, q.shape[0]), bank).min(dim=1).values.reshape(1, 1, h, w)
            for q in test]
    return torch.nn.functional.interpolate(torch.cat(rows), size=(size, size), mode="bilinear", align_corners=False)


@torch.no_grad()
def untrained_memory_maps(raw_train: torch.Tensor, raw_test: torch.Tensor, items: int, seed: int, size: int,
                          readout: str = "hard", block: int = 1, feature_dims: int = 0) -> torch.Tensor:
    """M maps of a DAAD whose full-resolution memory is freshly drawn from the training blocks (no training).

    Training moves these items little (the memory is drawn from data and read out hard), so this
    measures how the memory's size, block size and features set M, in a minute instead of a
    20-minute run per setting. The maps are unsmoothed (smoothed() applies each sigma).
    """
    cfg = preset("daad", image_size=(size, size), backbone="efficientnet_lite0", full_skip_block=(block, block, 0),
                 full_skip_items=items, memory_init="data", memory_readout=readout, memory_score_weight=1.0,
                 feature_dims=feature_dims, smoothing_sigma=0.0)  # unsmoothed: see smoothed()
    model = DAAD(cfg, load_backbone=False)
    model.set_feature_normalisation(raw_train)
    bank = model.standardise(raw_train)
    gen = torch.Generator().manual_seed(seed)
    model.generator.init_memories_from_data(bank[:1], gen, full_x=bank)
    return daad_maps(model.eval(), bank, model.standardise(raw_test))[1.0]


def smoothed(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """The model's own smoothing (train.model.DAAD.smooth) of (B, 1, H, W) maps with another sigma."""
    if sigma <= 0:
        return maps
    h, w = maps.shape[-2:]
    model = DAAD(preset("daad", image_size=(h, w), smoothing_sigma=sigma), load_backbone=False)
    return torch.cat([model.smooth(m) for m in maps.split(BATCH)])


def train_variant(cfg: Any, bank: torch.Tensor, tcfg: TrainConfig) -> DAAD:
    torch.manual_seed(tcfg.seed)
    model = DAAD(cfg, load_backbone=False)
    gen = torch.Generator().manual_seed(tcfg.seed)
    if cfg.memory_init == "data":
        model.generator.init_memories_from_data(bank[torch.randperm(len(bank), generator=gen)[:256]], gen, full_x=bank)
    opt_g = torch.optim.Adam(model.generator.parameters(), lr=tcfg.lr, betas=tcfg.betas)
    opt_d = torch.optim.Adam(model.discriminator.parameters(), lr=tcfg.lr, betas=tcfg.betas) if model.discriminator else None
    model.train()
    for _ in range(tcfg.steps):
        x = augment(bank[torch.randint(0, len(bank), (tcfg.batch_size,), generator=gen)], tcfg, gen)
        recon = model.generator(x)
        loss_g, _ = generator_loss(x, recon, model.discriminator, tcfg.loss)
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        if opt_d is not None:
            loss_d, _ = discriminator_loss(x, recon, model.discriminator)
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()
    return model.eval()


@torch.no_grad()
def daad_maps(model: DAAD, train: torch.Tensor, test: torch.Tensor, betas: Sequence[float] = ()) -> Dict[float, torch.Tensor]:
    """Smoothed anomaly maps of `test`, keyed by memory_score_weight: the model's own, and each of `betas`
    (the terms are computed once; only their mix changes)."""
    def raw(t: torch.Tensor) -> RawMaps:
        parts = [model.maps(t[i:i + BATCH]) for i in range(0, len(t), BATCH)]
        return RawMaps(*(torch.cat(list(ms)) if ms[0] is not None else None for ms in zip(*parts)))
    train_maps = raw(train[::4])  # score normalisation from training images, as fit() does
    model.set_score_normalisation(*(float(m.mean()) if m is not None else 1.0 for m in train_maps))
    test_maps = raw(test)
    own = model.cfg
    out = {}
    for beta in [own.memory_score_weight, *betas]:
        model.cfg = dataclasses.replace(own, memory_score_weight=beta)
        out[beta] = model.smooth(model.combine(test_maps))
    model.cfg = own
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--configs", nargs="*", default=["daad_plus"], help="presets with :key=value overrides")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="val", choices=("all", "val", "test"))
    parser.add_argument("--knn-bank", type=int, default=30000, help="kNN reference bank size (0: skip)")
    parser.add_argument("--memory-sizes", type=int, nargs="*", default=[],
                        help="also score untrained full-resolution memories of these sizes (M alone, hard read-out)")
    parser.add_argument("--betas", type=float, nargs="*", default=[0.0, 0.5, 0.9],
                        help="for configs with memory_score_weight > 0: also score these mixes of the same model")
    parser.add_argument("--memory-readouts", nargs="*", default=["hard"], choices=("hard", "soft"))
    parser.add_argument("--memory-blocks", type=int, nargs="*", default=[1],
                        help="block sizes b (b x b x all channels) of the untrained full-resolution memories")
    parser.add_argument("--feature-dims", type=int, nargs="*", default=[0],
                        help="principal components kept for the untrained memories (0: all 176 channels)")
    parser.add_argument("--sigmas", type=float, nargs="*", default=[2.0], help="map smoothing of the untrained memories (px)")
    parser.add_argument("--transplant", action="store_true",
                        help="also score every row on the split's defects pasted onto its good images")
    parser.add_argument("--out", default="benchmarks/results/sweep_features")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    data, out = Path(args.data), Path(args.out)
    arrays = cached_features(data, args.size, out)
    labels, types = arrays["labels"], arrays["types"]
    idx = np.array(split_eval(list(eval_samples(data)), args.split))  # the fixed halves (seed 0), whatever --seed is
    labels, types, masks = labels[idx], types[idx], arrays["masks"][idx]
    raw_train = torch.from_numpy(arrays["train"])
    raw_test = torch.from_numpy(arrays["test"][idx])
    views = {"test/": raw_test}  # the split as it is, and with --transplant its defects on its good images
    if args.transplant:
        views["transplant"] = torch.from_numpy(transplanted_features(data, args.size, out, args.split, idx, masks, labels))
    rows: List[Dict[str, Any]] = []

    def add(config: str, view: str, maps: torch.Tensor, **extra: Any) -> None:
        rows.append({"config": config, "view": view, **metrics(labels, types, masks, maps), **extra})
        print_row(rows[-1])

    for view, raw in views.items():
        if args.knn_bank:
            t0 = time.perf_counter()
            maps = knn_maps(raw_train, raw, args.knn_bank, args.seed, args.size)
            add(f"kNN reference (bank {args.knn_bank})", view, maps, train_s=0.0, score_s=time.perf_counter() - t0)
        for items, block, dims, readout in itertools.product(args.memory_sizes, args.memory_blocks, args.feature_dims,
                                                              args.memory_readouts):
            h, w = raw_train.shape[-2:]
            items = min(items, len(raw_train) * (h // block) * (w // block))  # no more items than distinct blocks
            t0 = time.perf_counter()
            raw_maps = untrained_memory_maps(raw_train, raw, items, args.seed, args.size, readout, block, dims)
            score_s = time.perf_counter() - t0
            for sigma in args.sigmas:
                add(f"memory M: {items} items, {block}x{block} blocks, {dims or 176} dims, {readout}, sigma {sigma:g}",
                    view, smoothed(raw_maps, sigma), train_s=0.0, score_s=score_s)
    for text in args.configs:
        variant = parse_variant(text)
        cfg = preset(variant["preset"], image_size=(args.size, args.size), backbone="efficientnet_lite0",
                     **variant["overrides"])
        tcfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
        probe = DAAD(cfg, load_backbone=False)
        probe.set_feature_normalisation(raw_train)
        bank = probe.standardise(raw_train)
        t0 = time.perf_counter()
        model = train_variant(cfg, bank, tcfg)
        model.load_state_dict({**model.state_dict(), **{k: v for k, v in probe.state_dict().items() if k.startswith("feat_")}})
        train_s = time.perf_counter() - t0
        betas = args.betas if cfg.memory_score_weight > 0 else []  # the map's mix of R, L and M, same trained model
        for view, raw in views.items():
            t0 = time.perf_counter()
            all_maps = daad_maps(model, bank, probe.standardise(raw), betas)
            score_s = time.perf_counter() - t0
            for beta, maps in all_maps.items():
                label = text if beta == cfg.memory_score_weight else f"{text} [memory_score_weight={beta}]"
                add(label, view, maps, train_s=train_s, score_s=score_s)

    print(f"\n{data.name}: {args.size}px, {args.steps} steps x batch {args.batch_size}, lr {args.lr}, seed {args.seed}, "
          f"split `{args.split}` ({len(idx)} images); image AUROC per score function")
    header = (f"{'config':72s} {'view':10s} " + " ".join(f"{s:>7s}" for s in SCORES)
              + f" {'far':>6s} {'pixel':>6s} {'AUPRO':>6s} {'train s':>7s}")
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['config']:72s} {r['view']:10s} " + " ".join(f"{r['image_auroc'][s]:7.3f}" for s in SCORES)
              + f" {r['far']:6.3f} {r['pixel_auroc']:6.3f} {r['aupro']:6.3f} {r['train_s']:7.0f}")
    write_probe_rows(out, args, rows, stem=f"results_{args.split}_{args.size}_{args.steps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
