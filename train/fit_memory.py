"""Fitting the feature-memory model (train.memory_model): no gradient step, three named steps.

1. `extract_features`: the frozen backbone's features of every training image, a batch at a time (float16 on
   the CPU: 5 000 images at 256 px are 1.8 GB). Under torchrun each rank extracts its shard and rank 0 gathers
   them in the images' order (`gather_features`), so a distributed fit builds the same memory as one process.
2. `build_memories`: per-channel standardisation and principal components, then every training block into the
   memories, each cut to its budget by greedy k-centre selection (train.coreset; on the GPU where there is one).
3. `set_score_statistics`: the maps of good images held back from the memory set the terms' scales and the
   score statistics the bundle carries (images in the memory rebuild themselves exactly and score ~0).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from engine.preprocess import PreprocessSpec

from .checkpoint import save_checkpoint
from .config import ModelConfig, TrainConfig
from .coreset import coreset_size, kcenter_greedy
from .data import Sample, load_images
from .fit_common import CHECKPOINT_NAME, FitResult, fit_samples, summarise_scores, training_data_summary
from .memory_model import BlockMemoryModel
from .preprocessing import preprocess_spec
from .runtime import distributed_context, join_process_group, leave_process_group, resolve_device, seed_everything

logger = logging.getLogger(__name__)

EXTRACT_BATCH = 32  # images loaded and run through the backbone at once
Features = Tuple[torch.Tensor, Optional[torch.Tensor]]  # raw 1/8 features, raw 1/32 features or None


@torch.no_grad()
def extract_features(model: BlockMemoryModel, samples: List[Sample], spec: PreprocessSpec, device: torch.device,
                     progress: bool = False) -> Features:
    """Raw backbone features of `samples` (N, 176, h, w) and, with a coarse memory, (N, 320, h/4, w/4), float16
    on the CPU."""
    starts = range(0, len(samples), EXTRACT_BATCH)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="features", unit="batch", dynamic_ncols=True)
    fine, coarse = [], []
    for start in starts:
        images = torch.from_numpy(load_images(samples[start:start + EXTRACT_BATCH], spec)).to(device)
        f, c = model.features(images)
        fine.append(f.half().cpu())
        if c is not None and model.has_coarse:
            coarse.append(c.half().cpu())
    return torch.cat(fine), (torch.cat(coarse) if coarse else None)


def gather_features(mine: Features, world: int) -> Features:
    """Every rank's shard (rank r holds images r, r + world, ...) on every rank, back in the images' order."""
    shards: List[Any] = [None] * world
    dist.all_gather_object(shards, mine)
    n = sum(len(s[0]) for s in shards)
    order = torch.tensor([i for r in range(world) for i in range(r, n, world)])  # position of each gathered row
    def merge(k: int) -> Optional[torch.Tensor]:
        if shards[0][k] is None:
            return None
        stacked = torch.cat([s[k] for s in shards])
        out = torch.empty_like(stacked)
        out[order] = stacked
        return out
    return merge(0), merge(1)  # type: ignore[return-value]


@torch.no_grad()
def build_memories(model: BlockMemoryModel, features: Features, seed: int, device: torch.device) -> Dict[str, int]:
    """Normalisation from the training features, then each memory: every training block, cut to the budget."""
    raw, raw_coarse = features
    model.set_normalisation(raw, raw_coarse)
    cfg = model.cfg
    offered = {}
    memories = [("block", model.block_memory, False, cfg.memory_items)]
    if model.coarse_memory is not None:
        memories.append(("coarse", model.coarse_memory, True, cfg.coarse_memory_items))
    for name, memory, coarse, cap in memories:
        items = model.memory_items(raw_coarse if coarse else raw, coarse=coarse)
        size = min(cap, coreset_size(len(items), cfg.memory_budget) if cfg.memory_budget > 0 else len(items))
        chosen = kcenter_greedy(items.to(device), size, seed=seed).cpu()
        memory.set_items(items[chosen])
        offered[name] = len(items)
        logger.info("%s memory: %d of %d training blocks (%d values each)", name, size, len(items), items.shape[1])
    return offered


@torch.no_grad()
def set_score_statistics(model: BlockMemoryModel, features: Features, device: torch.device) -> Dict[str, float]:
    """Scales of the map's terms from good images' features (their mean values), then those images' scores."""
    raw, raw_coarse = features
    model.to(device)
    m_maps, c_maps = [], []
    for start in range(0, len(raw), EXTRACT_BATCH):
        part = raw_coarse[start:start + EXTRACT_BATCH].float().to(device) if raw_coarse is not None else None
        m, c = model.raw_maps(raw[start:start + EXTRACT_BATCH].float().to(device), part)
        m_maps.append(m.cpu())
        c_maps.append(c.cpu() if c is not None else None)
    if not m_maps:
        return summarise_scores(np.zeros(0, dtype=np.float32))
    m_mean = float(torch.cat(m_maps).mean())
    c_mean = float(torch.cat(c_maps).mean()) if c_maps[0] is not None else 1.0  # type: ignore[arg-type]
    model.set_score_normalisation(m_mean, c_mean)
    model.cpu()
    scores = [model.image_score(model.smooth(model.combine(m, c))) for m, c in zip(m_maps, c_maps)]
    return summarise_scores(torch.cat(scores).numpy())


def fit_memory(model_cfg: ModelConfig, cfg: TrainConfig, progress: bool = True) -> FitResult:
    """Fit `model_cfg` (generator: false) on `cfg.data`: features, memories, statistics; saves the checkpoint."""
    rank, world, local_rank = distributed_context()
    device = resolve_device(cfg.device, local_rank)
    owns_group = join_process_group(device)
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    spec = preprocess_spec(model_cfg)
    samples, held, unseen, groups = fit_samples(model_cfg, cfg, rank)
    model = BlockMemoryModel(model_cfg).to(device).eval()
    features = extract_features(model, samples[rank::world], spec, device, progress and rank == 0)
    if world > 1:
        features = gather_features(features, world)
    images_per_s = len(samples) / max(time.perf_counter() - t0, 1e-9)
    checkpoint = Path(cfg.out) / CHECKPOINT_NAME
    score_stats: Dict[str, float] = {}
    if rank == 0:
        model.cpu()
        offered = build_memories(model, features, cfg.seed, device)
        del features
        stats_samples = unseen or samples
        stats_features = extract_features(model.to(device), stats_samples, spec, device)
        score_stats = set_score_statistics(model, stats_features, device)
        fit_seconds = time.perf_counter() - t0
        extra = {"score_stats": score_stats, "images_per_s": images_per_s, "fit_seconds": fit_seconds,
                 "memory": {**model.memory_sizes(), **{f"{k}_offered": v for k, v in offered.items()}},
                 "training_data": training_data_summary(cfg, samples, held, unseen, groups)}
        save_checkpoint(checkpoint, model.cpu(), cfg, 0, {}, extra)
        logger.info("fit in %.1f s: %s", fit_seconds, model.memory_sizes())
    leave_process_group(owns_group)
    return FitResult(checkpoint, 0, images_per_s, [], score_stats)
