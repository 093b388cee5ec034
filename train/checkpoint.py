"""Checkpoints that describe themselves: weights, optimiser state and both configs, stored as plain
tensors and dicts so they load with torch.load(weights_only=True) (no pickled classes)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import torch

from engine.errors import DaadError

from .config import ModelConfig, TrainConfig, from_dict, to_dict, validate_model_config
from .memory_model import BlockMemoryModel
from .model import DAAD
from .views import ViewEnsemble

CHECKPOINT_FORMAT = 1
VIEWS_KEY = "views"  # a combined checkpoint: one state (config + weights) per view, no optimisers
DERIVED_BUFFERS = ("smooth_kernel", "smooth_norm")  # rebuilt from the config, dropped from older checkpoints


class CheckpointError(DaadError):
    """A checkpoint is missing, corrupt or from an incompatible version."""


def save_checkpoint(path: Union[str, Path], model: DAAD, train_cfg: TrainConfig, step: int,
                    optimizers: Dict[str, Any], extra: Dict[str, Any]) -> Path:
    """Atomic write: a crash mid-save never leaves a truncated checkpoint behind."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "model_config": to_dict(model.cfg),
        "train_config": to_dict(train_cfg),
        "model": model.state_dict(),
        "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
        "step": int(step),
        "torch_rng": torch.get_rng_state(),
        **extra,
    }
    return write_state(Path(path), state)


def write_state(path: Path, state: Dict[str, Any]) -> Path:
    """torch.save through a temporary file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; train one with `daad-train fit`")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated/foreign files
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc.__class__.__name__}: {str(exc)[:120]})") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: field `format` is {state.get('format') if isinstance(state, dict) else '?'}, expected {CHECKPOINT_FORMAT}")
    return state


def load_model(path: Union[str, Path]) -> Tuple[Union[DAAD, BlockMemoryModel, ViewEnsemble], Dict[str, Any]]:
    """Rebuild the model from a checkpoint (config inside), in eval mode on the CPU: a DAAD, or for a
    checkpoint of `daad-train combine` the ensemble of its views."""
    state = read_checkpoint(path)
    if VIEWS_KEY in state:
        views = [model_of(view, f"{path}: {VIEWS_KEY}[{i}]") for i, view in enumerate(state[VIEWS_KEY])]
        return ViewEnsemble(views).eval(), state
    return model_of(state, str(path)), state


def model_of(state: Dict[str, Any], where: str) -> Union[DAAD, BlockMemoryModel]:
    """The DAAD a checkpoint's (or an ensemble's view's) `model_config` and `model` weights describe."""
    cfg = from_dict(ModelConfig, state["model_config"], f"{where}: model_config")
    problems = validate_model_config(cfg)
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems))
    model = build_model(cfg, load_backbone=False)  # backbone weights are in the checkpoint
    model.load_state_dict(model_weights(state))
    return model.eval()


def build_model(cfg: ModelConfig, load_backbone: bool = True) -> Union[DAAD, BlockMemoryModel]:
    """The model a config describes: the paper's generator (DAAD) or the feature memories alone."""
    return DAAD(cfg, load_backbone=load_backbone) if cfg.generator else BlockMemoryModel(cfg, load_backbone=load_backbone)


def is_ensemble(state: Dict[str, Any]) -> bool:
    return VIEWS_KEY in state


def model_weights(state: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The model's state dict from a checkpoint, without buffers the model derives from its config
    (checkpoints before 2026-12 stored the smoothing kernel in 2-D)."""
    return {k: v for k, v in state["model"].items() if k not in DERIVED_BUFFERS}


def train_config_of(state: Dict[str, Any]) -> TrainConfig:
    return from_dict(TrainConfig, state["train_config"], "checkpoint train_config")


def score_stats_images(state: Dict[str, Any]) -> List[Path]:
    """The good images fit() held back from a memory that stores its training blocks and set the score
    statistics on (empty for models that kept every image): the ones a probe should normalise maps on."""
    return [Path(p) for p in (state.get("training_data") or {}).get("score_stats_images") or []]
