"""Fitting the trained DAAD models (generator: true; the feature memory, generator: false, is train.fit_memory's).

`fit` is a sequence of named steps:
1. `prepare_data`: which images train and which set the statistics (train.fit_common), the training images
   loaded, this rank's shard of them.
2. `build_model`: the model, memories no larger than the data, the feature normalisation and coarse memory
   from the frozen backbone's features; `make_optimizers`; `resume_from` a checkpoint (weights, optimisers,
   RNG state); `training_bank`, what the generator rebuilds, and `init_memories_from_data` on a fresh fit.
3. `train_loop`: a fixed number of optimiser steps (so that configs compare under one budget), mixed
   precision on CUDA, data parallelism through torchrun (train.runtime), a progress bar, log.jsonl, periodic
   checkpoints, a clear error when the loss diverges.
4. `set_score_statistics`: the map's normalisation and the score statistics from good images; `fit` then
   writes the final checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

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
from .groups import Groups
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


@dataclass
class FitData:
    """The images a fit trains on and the ones that set its statistics (`fit_samples`), loaded once."""
    spec: PreprocessSpec
    samples: List[Sample]  # trained on
    held: List[Sample]  # validation images held back
    unseen: List[Sample]  # good images that set the score statistics; [] = the training images
    groups: Optional[Groups]
    images: torch.Tensor  # the training images, preprocessed: (N, C, H, W)
    shard: torch.Tensor  # the indices of `images` this rank draws its batches from


@dataclass
class BuiltModel:
    """The model with its data-fitted parts (feature normalisation, coarse memory) set."""
    model: DAAD  # its .cfg is the config as fitted to the data (memory sizes cut to what the data offers)
    raw_features: Optional[torch.Tensor]  # frozen backbone features of the training images (None: pixel model)
    coarse_bank: Optional[torch.Tensor]  # their standardised 1/32 features (None: no coarse memory)


def prepare_data(model_cfg: ModelConfig, cfg: TrainConfig, rank: int, world: int) -> FitData:
    """Samples (training, held back, statistics), the training images, and this rank's shard of them."""
    spec = preprocess_spec(model_cfg)
    samples, held, unseen, groups = fit_samples(model_cfg, cfg, rank)
    images = torch.from_numpy(load_images(samples, spec))
    shard = torch.arange(rank, len(images), world)  # each rank draws from its own shard
    if len(shard) == 0:
        raise ConfigError(f"{cfg.data}: {len(images)} training images cannot feed {world} processes")
    return FitData(spec, samples, held, unseen, groups, images, shard)


def build_model(model_cfg: ModelConfig, cfg: TrainConfig, images: torch.Tensor, device: torch.device) -> BuiltModel:
    """The model (memories no larger than the data), its feature normalisation and coarse memory from the
    training images' backbone features (both overwritten by the checkpoint on resume)."""
    model_cfg = fit_coarse_memory_to_data(fit_memory_to_data(model_cfg, len(images)), len(images))
    model = DAAD(model_cfg).to(device)
    raw_features, raw_coarse = (backbone_features(model, model.normalise_input(images), device)
                                if model.backbone is not None else (None, None))
    if raw_features is not None:
        model.set_feature_normalisation(raw_features)
    if raw_coarse is not None:
        model.set_coarse_memory(raw_coarse.to(device), torch.Generator().manual_seed(cfg.seed))
    coarse_bank = model.standardise_coarse(raw_coarse) if raw_coarse is not None else None
    return BuiltModel(model, raw_features, coarse_bank)


def make_optimizers(model: DAAD, cfg: TrainConfig) -> Dict[str, torch.optim.Optimizer]:
    """Adam for the generator, and for the discriminator where there is one (its own lr if `disc_lr`)."""
    optimizers: Dict[str, torch.optim.Optimizer] = {
        "generator": torch.optim.Adam(model.generator.parameters(), lr=cfg.lr, betas=cfg.betas,
                                      weight_decay=cfg.weight_decay)}
    if model.discriminator is not None:
        optimizers["discriminator"] = torch.optim.Adam(model.discriminator.parameters(), lr=cfg.disc_lr or cfg.lr,
                                                        betas=cfg.betas)
    return optimizers


def resume_from(ckpt_path: Path, model: DAAD, optimizers: Dict[str, torch.optim.Optimizer]) -> int:
    """Load the weights, optimiser states and torch RNG state of the checkpoint; the step it was written at."""
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
    return start_step


def training_bank(model: DAAD, images: torch.Tensor, raw_features: Optional[torch.Tensor]) -> torch.Tensor:
    """What the generator learns to rebuild. With a frozen backbone its features are computed once and
    augmented by flips/shifts in feature space (conv features of a flipped image are, to within border
    effects, the flipped features): ~20x cheaper per step than running the backbone each step."""
    if raw_features is not None:
        return torch.cat([model.standardise(f) for f in raw_features.split(SCORE_BATCH * 4)])
    return model.normalise_input(images)


def init_memories_from_data(model: DAAD, bank: torch.Tensor, seed: int, device: torch.device) -> None:
    """Memory items drawn from `MEMORY_INIT_IMAGES` training inputs (memory_init "data", a fresh fit)."""
    # same seed on every rank: DDP replicas must start identical
    draw_rng = torch.Generator().manual_seed(seed)
    subset = torch.randperm(len(bank), generator=draw_rng)[:MEMORY_INIT_IMAGES]
    model.generator.init_memories_from_data(bank[subset].to(device), draw_rng, full_x=bank.to(device))


def train_step(generator: torch.nn.Module, disc: Optional[torch.nn.Module],
               optimizers: Dict[str, torch.optim.Optimizer], x: torch.Tensor, cfg: TrainConfig,
               scaler: torch.amp.GradScaler, use_amp: bool) -> Tuple[float, Dict[str, float]]:
    """One optimiser step of the generator, then of the discriminator where there is one: (generator loss, logs)."""
    device_type = x.device.type
    with torch.autocast(device_type=device_type, dtype=torch.float16, enabled=use_amp):
        recon = generator(x)
        loss_g, logs = generator_loss(x, recon.float(), disc, cfg.loss)
    opt_g = optimizers["generator"]
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(loss_g).backward()
    scaler.step(opt_g)
    if disc is not None:
        with torch.autocast(device_type=device_type, dtype=torch.float16, enabled=use_amp):
            loss_d, logs_d = discriminator_loss(x, recon.float(), disc)
        opt_d = optimizers["discriminator"]
        opt_d.zero_grad(set_to_none=True)
        scaler.scale(loss_d).backward()
        scaler.step(opt_d)
        logs.update(logs_d)
    scaler.update()
    return float(loss_g.detach()), logs


def train_loop(model: DAAD, optimizers: Dict[str, torch.optim.Optimizer], bank: torch.Tensor, shard: torch.Tensor,
               cfg: TrainConfig, device: torch.device, start_step: int, progress: bool) -> Tuple[List[Dict[str, float]], float]:
    """Steps `start_step` .. `cfg.steps` on batches drawn from this rank's shard of `bank` (DDP across ranks):
    a progress bar, log.jsonl every `log_every` steps and a checkpoint every `checkpoint_every` (rank 0), a
    clear error on a non-finite loss. Returns (rank 0's per-step logs, images per second over all ranks)."""
    rank, world, _ = distributed_context()
    out = Path(cfg.out)
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

        bar = tqdm(total=cfg.steps, initial=start_step, desc=f"fit {model.cfg.name}", unit="step", dynamic_ncols=True)
    model.train()
    t0, seen = time.perf_counter(), 0
    out.mkdir(parents=True, exist_ok=True)
    for step in range(start_step, cfg.steps):
        idx = shard[torch.randint(0, len(shard), (min(cfg.batch_size, len(shard)),), generator=gen)]
        x = augment(bank[idx], cfg, gen).to(device, non_blocking=True)
        loss_g, logs = train_step(generator, disc, optimizers, x, cfg, scaler, use_amp)
        if not math.isfinite(loss_g):
            raise ConfigError(f"training diverged at step {step} (loss {loss_g}); lower --lr or the adversarial weight")
        seen += len(x) * world
        if rank == 0:
            logs["step"] = step + 1
            history.append(logs)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(rec=f"{logs['rec']:.4f}")
            if (step + 1) % cfg.log_every == 0:
                with open(out / "log.jsonl", "a") as fh:
                    fh.write(json.dumps(logs) + "\n")
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                save_checkpoint(out / CHECKPOINT_NAME, model, cfg, step + 1, optimizers, {})
    elapsed = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    return history, (seen / elapsed if elapsed > 0 and seen else 0.0)


def set_score_statistics(model: DAAD, data: FitData, bank: torch.Tensor, coarse_bank: Optional[torch.Tensor],
                         device: torch.device) -> Dict[str, float]:
    """The map's normalisation and the score statistics from good images: the held-back ones where there are
    any, else the training images (their bank, already computed); mirror images too where the graph scores them."""
    if model.cfg.score_hflip:  # the graph scores the mirror image too: so do its statistics
        stats_images = torch.from_numpy(load_images(data.unseen, data.spec)) if data.unseen else data.images
        batches = image_maps(model, stats_images, device)
    else:
        targets, coarse = (statistics_targets(model, data.unseen, data.spec, device) if data.unseen
                           else (bank, coarse_bank))
        batches = target_maps(model, targets, device, coarse)
    return calibrate_scores(model, batches, device)


def fit(model_cfg: ModelConfig, cfg: TrainConfig, resume: bool = False, progress: bool = True) -> FitResult:
    """Fit `model_cfg` on `cfg.data` and save the checkpoint: the trained DAAD models' step loop, or for a
    model with nothing to train (generator: false) train.fit_memory's features and memories."""
    problems = validate_model_config(model_cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    if not model_cfg.generator:  # nothing to train: features, memories and statistics
        return fit_memory(model_cfg, cfg, progress=progress)
    rank, world, local_rank = distributed_context()
    device = resolve_device(cfg.device, local_rank)
    owns_group = join_process_group(device)
    seed_everything(cfg.seed)
    ckpt_path = Path(cfg.out) / CHECKPOINT_NAME

    data = prepare_data(model_cfg, cfg, rank, world)
    built = build_model(model_cfg, cfg, data.images, device)
    model = built.model
    optimizers = make_optimizers(model, cfg)
    start_step = resume_from(ckpt_path, model, optimizers) if resume and ckpt_path.is_file() else 0
    bank = training_bank(model, data.images, built.raw_features)
    if model.cfg.memory_init == "data" and start_step == 0:
        init_memories_from_data(model, bank, cfg.seed, device)
    history, images_per_s = train_loop(model, optimizers, bank, data.shard, cfg, device, start_step, progress)

    score_stats: Dict[str, float] = {}
    if rank == 0:
        score_stats = set_score_statistics(model, data, bank, built.coarse_bank, device)
        extra = {"score_stats": score_stats, "images_per_s": images_per_s,
                 "training_data": training_data_summary(cfg, data.samples, data.held, data.unseen, data.groups)}
        save_checkpoint(ckpt_path, model.cpu(), cfg, cfg.steps, optimizers, extra)
    leave_process_group(owns_group)
    return FitResult(ckpt_path, cfg.steps, images_per_s, history, score_stats)
