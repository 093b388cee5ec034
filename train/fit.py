"""The training loop: seeds, device choice, mixed precision on CUDA, data parallelism through
torchrun (NCCL on GPUs, gloo on CPUs), checkpoints and resume, a progress bar.

A run is a fixed number of optimiser steps so that configs compare under one budget.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from engine.errors import ConfigError
from engine.preprocess import PreprocessSpec

from .backbone import COARSE_STRIDE
from .checkpoint import is_ensemble, model_weights, read_checkpoint, save_checkpoint
from .config import ModelConfig, TrainConfig, validate_model_config
from .data import Sample, load_images
from .fit_common import CHECKPOINT_NAME, FitResult, fit_samples, summarise_scores, training_data_summary
from .fit_memory import fit_memory
from .loss import discriminator_loss, generator_loss
from .model import DAAD, RawMaps
from .preprocessing import preprocess_spec
from .runtime import distributed_context, join_process_group, leave_process_group, resolve_device, seed_everything

logger = logging.getLogger(__name__)

SCORE_BATCH = 16
MEMORY_INIT_IMAGES = 256  # training inputs that memory items are drawn from when memory_init is "data"


def augment(batch: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Flips and small shifts only: colour or blur jitter would teach the model to rebuild defects."""
    b, _, h, w = batch.shape
    if cfg.hflip:
        flip = torch.rand(b, generator=gen) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(3), batch)
    if cfg.vflip:
        flip = torch.rand(b, generator=gen) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(2), batch)
    if cfg.max_shift > 0:
        pad_h, pad_w = max(1, int(h * cfg.max_shift)), max(1, int(w * cfg.max_shift))
        padded = F.pad(batch, (pad_w, pad_w, pad_h, pad_h), mode="reflect")
        dy = torch.randint(0, 2 * pad_h + 1, (b,), generator=gen)
        dx = torch.randint(0, 2 * pad_w + 1, (b,), generator=gen)
        batch = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    return batch


@torch.no_grad()
def target_maps(model: DAAD, targets: torch.Tensor, device: torch.device,
                coarse: Optional[torch.Tensor] = None) -> Iterator[RawMaps]:
    """The raw maps of good images from their targets (model.encode of each: what the generator and the
    coarse memory rebuild, computed once by fit), a batch at a time, on the CPU."""
    model.eval()
    for start in range(0, len(targets), SCORE_BATCH):
        part = coarse[start:start + SCORE_BATCH].to(device) if coarse is not None else None
        maps = model.maps(targets[start:start + SCORE_BATCH].to(device), part)
        yield RawMaps(*(m.cpu() if m is not None else None for m in maps))


@torch.no_grad()
def image_maps(model: DAAD, images: torch.Tensor, device: torch.device) -> Iterator[RawMaps]:
    """The raw maps of good images as the graph scores them (DAAD.image_maps: with `score_hflip` the mirror
    image's too), a batch at a time, on the CPU."""
    model.eval()
    for start in range(0, len(images), SCORE_BATCH):
        maps = model.image_maps(images[start:start + SCORE_BATCH].to(device))
        yield RawMaps(*(m.cpu() if m is not None else None for m in maps))


@torch.no_grad()
def calibrate_scores(model: DAAD, batches: Iterable[RawMaps], device: torch.device) -> Dict[str, float]:
    """Set the R/L/M(/C) normalisation from good images' raw maps (`target_maps` or `image_maps`), then return
    their score statistics (for the bundle)."""
    sums = np.zeros(len(RawMaps._fields))  # R, L, M, C summed over images
    kept = []  # the raw maps (on the CPU), so that the scores need no second pass of the model
    n = 0
    for maps in batches:
        sums += [float(m.mean()) * len(m) if m is not None else 0.0 for m in maps]
        n += len(maps.rec)
        kept.append(maps)
    means = sums / max(1, n)
    model.set_score_normalisation(*(float(m) if m > 0 else 1.0 for m in means))
    scorer = model.cpu()
    scores = [scorer.image_score(scorer.smooth(scorer.combine(maps))).float().numpy() for maps in kept]
    model.to(device)
    return summarise_scores(np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32))


@torch.no_grad()
def backbone_features(model: DAAD, images: torch.Tensor,
                      device: torch.device) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Frozen backbone features of every training image, computed once, on the CPU: (B, C, h, w), and the
    raw 1/32 features (B, 320, h/4, w/4) where the model has a coarse memory (else None)."""
    backbone = model.backbone
    if backbone is None:
        return images, None
    parts = [backbone.forward_with_coarse(images[i:i + SCORE_BATCH].to(device)) for i in range(0, len(images), SCORE_BATCH)]
    features = torch.cat([f.cpu() for f, _ in parts])
    if model.coarse_memory is None:
        return features, None
    return features, torch.cat([c.cpu() for _, c in parts])


def statistics_targets(model: DAAD, samples: List[Sample], spec: PreprocessSpec,
                       device: torch.device) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """What the generator (and the coarse memory) rebuild for held-back good images (the training bank's transform)."""
    inputs = model.normalise_input(torch.from_numpy(load_images(samples, spec)))
    if model.backbone is None:
        return inputs, None
    model.eval()
    features, coarse = backbone_features(model, inputs, device)
    return model.standardise(features), (model.standardise_coarse(coarse) if coarse is not None else None)


def training_blocks(model_cfg: ModelConfig, n_images: int) -> int:
    """How many distinct blocks the full-resolution memory can draw from `n_images` training images."""
    bh, bw, bc = model_cfg.full_skip_block
    h, w = model_cfg.target_size
    groups = model_cfg.target_channels // bc if bc else 1
    return n_images * (h // bh) * (w // bw) * groups


def fit_memory_to_data(model_cfg: ModelConfig, n_images: int) -> ModelConfig:
    """A data-drawn full-resolution memory holds at most one item per training block: `full_skip_items`
    is an upper bound (more items would only repeat blocks, at the cost of memory and search time)."""
    if model_cfg.memory_init != "data" or model_cfg.full_skip_block[0] < 1 or not model_cfg.memory:
        return model_cfg
    available = training_blocks(model_cfg, n_images)
    if model_cfg.full_skip_items <= available:
        return model_cfg
    logger.info("full_skip_items %d > %d training blocks: the memory holds each block once", model_cfg.full_skip_items, available)
    return dataclasses.replace(model_cfg, full_skip_items=available)


def fit_coarse_memory_to_data(model_cfg: ModelConfig, n_images: int) -> ModelConfig:
    """The coarse memory holds at most each training image's 1/32 feature vectors once."""
    if not (model_cfg.backbone and model_cfg.coarse_memory_weight > 0):
        return model_cfg
    h, w = model_cfg.image_size
    available = n_images * (h // COARSE_STRIDE) * (w // COARSE_STRIDE)
    if model_cfg.coarse_memory_items <= available:
        return model_cfg
    logger.info("coarse_memory_items %d > %d training vectors: the memory holds each once", model_cfg.coarse_memory_items, available)
    return dataclasses.replace(model_cfg, coarse_memory_items=available)


def fit(model_cfg: ModelConfig, cfg: TrainConfig, resume: bool = False, progress: bool = True) -> FitResult:
    problems = validate_model_config(model_cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    if not model_cfg.generator:  # nothing to train: features, memories and statistics
        return fit_memory(model_cfg, cfg, progress=progress)
    rank, world, local_rank = distributed_context()
    device = resolve_device(cfg.device, local_rank)
    owns_group = join_process_group(device)
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT_NAME

    spec = preprocess_spec(model_cfg)
    samples, held, unseen, groups = fit_samples(model_cfg, cfg, rank)
    images = torch.from_numpy(load_images(samples, spec))
    shard = torch.arange(rank, len(images), world)  # each rank draws from its own shard
    if len(shard) == 0:
        raise ConfigError(f"{cfg.data}: {len(images)} training images cannot feed {world} processes")

    model_cfg = fit_coarse_memory_to_data(fit_memory_to_data(model_cfg, len(images)), len(images))
    model = DAAD(model_cfg).to(device)
    raw_features, raw_coarse = (backbone_features(model, model.normalise_input(images), device)
                                if model.backbone is not None else (None, None))
    if raw_features is not None:
        model.set_feature_normalisation(raw_features)  # overwritten by the checkpoint on resume
    if raw_coarse is not None:
        model.set_coarse_memory(raw_coarse.to(device), torch.Generator().manual_seed(cfg.seed))  # likewise
    coarse_bank = model.standardise_coarse(raw_coarse) if raw_coarse is not None else None
    params_g = list(model.generator.parameters())
    opt_g = torch.optim.Adam(params_g, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    optimizers: Dict[str, Any] = {"generator": opt_g}
    if model.discriminator is not None:
        optimizers["discriminator"] = torch.optim.Adam(model.discriminator.parameters(), lr=cfg.disc_lr or cfg.lr,
                                                        betas=cfg.betas)
    start_step = 0
    if resume and ckpt_path.is_file():
        state = read_checkpoint(ckpt_path)
        if is_ensemble(state):
            raise ConfigError(f"{ckpt_path}: a combination of fits (`daad-train combine`), which does not train; "
                              "resume one of the fits it was made of, then combine again")
        model.load_state_dict(model_weights(state))
        for name, opt in optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        start_step = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
        logger.info("resumed from %s at step %d", ckpt_path, start_step)

    # What the generator learns to rebuild. With a frozen backbone its features are computed once and
    # augmented by flips/shifts in feature space (conv features of a flipped image are, to within
    # border effects, the flipped features): ~20x cheaper per step than running the backbone each step.
    if raw_features is not None:
        bank = torch.cat([model.standardise(f) for f in raw_features.split(SCORE_BATCH * 4)])
    else:
        bank = model.normalise_input(images)
    if model_cfg.memory_init == "data" and start_step == 0:
        # same seed on every rank: DDP replicas must start identical
        draw_rng = torch.Generator().manual_seed(cfg.seed)
        subset = torch.randperm(len(bank), generator=draw_rng)[:MEMORY_INIT_IMAGES]
        model.generator.init_memories_from_data(bank[subset].to(device), draw_rng, full_x=bank.to(device))
    generator: torch.nn.Module = model.generator
    disc: Optional[torch.nn.Module] = model.discriminator
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        generator = DistributedDataParallel(model.generator, device_ids=ids)
        if disc is not None:
            disc = DistributedDataParallel(disc, device_ids=ids)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank + start_step)

    history: List[Dict[str, float]] = []
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start_step, desc=f"fit {model_cfg.name}", unit="step", dynamic_ncols=True)
    model.train()
    t0, seen = time.perf_counter(), 0
    log_path = out / "log.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    for step in range(start_step, cfg.steps):
        idx = shard[torch.randint(0, len(shard), (min(cfg.batch_size, len(shard)),), generator=gen)]
        x = augment(bank[idx], cfg, gen).to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            recon = generator(x)
            loss_g, logs = generator_loss(x, recon.float(), disc, cfg.loss)
        opt_g.zero_grad(set_to_none=True)
        scaler.scale(loss_g).backward()
        scaler.step(opt_g)
        if disc is not None:
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                loss_d, logs_d = discriminator_loss(x, recon.float(), disc)
            opt_d = optimizers["discriminator"]
            opt_d.zero_grad(set_to_none=True)
            scaler.scale(loss_d).backward()
            scaler.step(opt_d)
            logs.update(logs_d)
        scaler.update()
        if not math.isfinite(float(loss_g.detach())):
            raise ConfigError(f"training diverged at step {step} (loss {float(loss_g.detach())}); lower --lr or the adversarial weight")
        seen += len(x) * world
        if rank == 0:
            logs["step"] = step + 1
            history.append(logs)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(rec=f"{logs['rec']:.4f}")
            if (step + 1) % cfg.log_every == 0:
                with open(log_path, "a") as fh:
                    fh.write(json.dumps(logs) + "\n")
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                save_checkpoint(ckpt_path, model, cfg, step + 1, optimizers, {})
    elapsed = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    images_per_s = seen / elapsed if elapsed > 0 and seen else 0.0

    score_stats: Dict[str, float] = {}
    if rank == 0:
        if model_cfg.score_hflip:  # the graph scores the mirror image too: so do its statistics
            stats_images = torch.from_numpy(load_images(unseen, spec)) if unseen else images
            batches = image_maps(model, stats_images, device)
        else:
            targets, coarse = statistics_targets(model, unseen, spec, device) if unseen else (bank, coarse_bank)
            batches = target_maps(model, targets, device, coarse)
        score_stats = calibrate_scores(model, batches, device)
        extra = {"score_stats": score_stats, "images_per_s": images_per_s,
                 "training_data": training_data_summary(cfg, samples, held, unseen, groups)}
        save_checkpoint(ckpt_path, model.cpu(), cfg, cfg.steps, optimizers, extra)
    leave_process_group(owns_group)
    return FitResult(ckpt_path, cfg.steps, images_per_s, history, score_stats)
