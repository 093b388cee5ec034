"""`daad-train combine`: several fits of one input contract as one checkpoint whose map is their mean.

The fits must have held back the same good images (`fit` with the same --seed and --groups): each view's
map is in units of those images, none of the views has them in its memory, and the combined model's score
statistics are set on them here, on the mean map the bundle will compute.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from engine.errors import ConfigError, DatasetError, ImageError
from engine.preprocess import preprocess, read_image

from .checkpoint import CHECKPOINT_FORMAT, VIEWS_KEY, is_ensemble, model_of, read_checkpoint, write_state
from .config import ModelConfig, TrainConfig
from .fit import SCORE_BATCH, fit
from .fit_common import CHECKPOINT_NAME, FitResult, stores_training_blocks, summarise_scores
from .preprocessing import preprocess_spec
from .runtime import distributed_context, join_process_group, leave_process_group, resolve_device
from .views import ViewEnsemble, view_configs

VIEWS_DIR = "views"  # OUT/views/<name>/: each view's own fit (last.pt, log.jsonl); OUT/last.pt combines them

VIEW_KEYS = ("model_config", "model", "train_config", "step", "score_stats")  # what a view keeps of its fit


@dataclass
class CombineResult:
    checkpoint: Path
    score_stats: Dict[str, float]
    n_views: int


def check_compatible(paths: Sequence[Path], states: Sequence[Dict[str, Any]], views: Sequence[Any]) -> None:
    """One line naming the checkpoint and the field where a fit cannot join the first."""
    first_path, first, first_view = paths[0], states[0], views[0]
    first_data = first.get("training_data") or {}
    if not first_data.get("score_stats_images"):
        raise ConfigError(f"{first_path}: training_data.score_stats_images is empty (its statistics came from its "
                          "training images); combine fits whose memory stores training blocks (e.g. `inspect`), "
                          "which hold back good images for them")
    for path, state, view in zip(paths[1:], states[1:], views[1:]):
        if preprocess_spec(view.cfg) != preprocess_spec(first_view.cfg):
            raise ConfigError(f"{path}: model.image_size / in_channels {list(view.cfg.image_size)} / "
                              f"{view.cfg.in_channels}, {first_path} {list(first_view.cfg.image_size)} / "
                              f"{first_view.cfg.in_channels}; the views score one input, so fit them at one size")
        for key in ("map_closing", "edge_fill_weight"):
            if getattr(view.cfg, key) != getattr(first_view.cfg, key):
                raise ConfigError(f"{path}: model.{key} {getattr(view.cfg, key)}, {first_path} "
                                  f"{getattr(first_view.cfg, key)}; the mean map is closed and filled one way, so "
                                  "fit both alike")
        if view.cfg.score_minus_mean != first_view.cfg.score_minus_mean:
            raise ConfigError(f"{path}: model.score_minus_mean {view.cfg.score_minus_mean}, {first_path} "
                              f"{first_view.cfg.score_minus_mean}; the mean map is scored one way, so fit both alike")
        if view.cfg.score_topk != first_view.cfg.score_topk:
            raise ConfigError(f"{path}: model.score_topk {view.cfg.score_topk:g}, {first_path} "
                              f"{first_view.cfg.score_topk:g}; the mean map is scored by one top-k, so fit both alike")
        data = state.get("training_data") or {}
        if data.get("groups_sha256", "") != first_data.get("groups_sha256", ""):
            raise ConfigError(f"{path}: training_data.groups_sha256 differs from {first_path}'s; fit both with the "
                              "same --groups")
        if data.get("score_stats_images") != first_data.get("score_stats_images"):
            raise ConfigError(f"{path}: training_data.score_stats_images differs from {first_path}'s (another "
                              "--seed or data): each view may have trained on images the other holds back; fit both "
                              "with the same --data, --seed and --groups")


def held_back_images(paths: Sequence[str], spec: Any) -> np.ndarray:
    """The held-back good images, preprocessed; a missing or unreadable one is named."""
    out = []
    for p in paths:
        try:
            out.append(preprocess(read_image(Path(p)), spec))
        except ImageError as exc:
            raise DatasetError(f"{exc}; combine reads the good images the fits held back, at the paths fit saw "
                               "them: run it where the fits' --data is") from exc
    return np.stack(out).astype(np.float32)


@torch.no_grad()
def ensemble_scores(model: ViewEnsemble, images: np.ndarray) -> np.ndarray:
    scores = [model(torch.from_numpy(images[i:i + SCORE_BATCH])).score.numpy()
              for i in range(0, len(images), SCORE_BATCH)]
    return np.concatenate(scores)


def combine(checkpoints: Sequence[Path], out: Path) -> CombineResult:
    paths = [Path(p) for p in checkpoints]
    if len(paths) < 2:
        raise ConfigError(f"--checkpoints: got {len(paths)}, expected two fits or more to average")
    states = [read_checkpoint(p) for p in paths]
    for path, state in zip(paths, states):
        if is_ensemble(state):
            raise ConfigError(f"{path}: already a combination (field `{VIEWS_KEY}`); combine the fits it was made of")
    views = [model_of(state, str(path)) for path, state in zip(paths, states)]
    check_compatible(paths, states, views)
    model = ViewEnsemble(views).eval()
    data: Dict[str, Any] = dict(states[0].get("training_data") or {})
    images = held_back_images(data["score_stats_images"], preprocess_spec(model.cfg))
    score_stats = summarise_scores(ensemble_scores(model, images))
    data["score_stats_from"] = f"{len(images)} held-back good images, the mean map of {len(views)} views"
    state: Dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        VIEWS_KEY: [{k: s[k] for k in VIEW_KEYS if k in s} for s in states],
        "model_config": states[0]["model_config"],  # the input contract and image score: the first view's
        "train_config": states[0]["train_config"],
        "step": int(states[0].get("step", 0)),
        "score_stats": score_stats,
        "training_data": data,
        "combined_from": [str(p) for p in paths],
    }
    target = Path(out) / CHECKPOINT_NAME
    write_state(target, state)
    return CombineResult(target, score_stats, len(views))



@dataclass
class ViewsFitResult:
    views: List[FitResult]
    combined: Optional[CombineResult]  # None on the ranks of a torchrun other than 0


def fit_views(model_cfg: ModelConfig, train_cfg: TrainConfig, names: Sequence[str], resume: bool = False,
              progress: bool = True) -> ViewsFitResult:
    """One fit per view (same data, seed and groups, so the same held-back images) under OUT/views/<name>,
    then `combine` into OUT/last.pt."""
    configs = view_configs(model_cfg, names)
    if len(configs) > 1 and not stores_training_blocks(model_cfg):
        raise ConfigError(f"--views: {' '.join(names)} average fits in units of good images held back from a memory "
                          "of training blocks, which this model has not (memory_init data, full_skip_block); use a "
                          "backbone model such as `inspect`, or one view")
    out = Path(train_cfg.out)
    rank, _, local_rank = distributed_context()
    owns_group = join_process_group(resolve_device(train_cfg.device, local_rank))  # one group for every view
    results = [fit(cfg, dataclasses.replace(train_cfg, out=str(out / VIEWS_DIR / name)), resume=resume,
                   progress=progress) for name, cfg in configs]
    combined = combine([r.checkpoint for r in results], out) if rank == 0 else None
    leave_process_group(owns_group)
    return ViewsFitResult(results, combined)
