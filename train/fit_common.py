"""What every fit shares (the trained DAAD's, train.fit; the feature memory's, train.fit_memory; the views',
train.combine): which images train and which set the score statistics, what the checkpoint says of them, the
statistics' summary, the checkpoint's name and the result."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .config import ModelConfig, TrainConfig
from .data import Sample, has_colour, split_holdout, train_samples
from .groups import Groups, grouped_protocol, holdout_by_group, load_groups

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
# Good images held back from a data-drawn full-resolution memory to set the map normalisation and the score
# statistics: that memory holds every block of the images it was drawn from, so those images rebuild
# themselves exactly and score ~0, far below any new good image.
STATISTICS_FRACTION = 0.1


@dataclass
class FitResult:
    checkpoint: Path
    steps: int
    images_per_s: float
    history: List[Dict[str, float]]
    score_stats: Dict[str, float]


def summarise_scores(scores: np.ndarray) -> Dict[str, float]:
    if scores.size == 0:
        return {"n": 0}
    q = np.quantile(scores, [0.5, 0.95, 0.99])
    return {"n": int(scores.size), "mean": float(scores.mean()), "std": float(scores.std()), "min": float(scores.min()),
            "p50": float(q[0]), "p95": float(q[1]), "p99": float(q[2]), "max": float(scores.max())}


def stores_training_blocks(model_cfg: ModelConfig) -> bool:
    """Whether the model keeps training blocks verbatim (a data-drawn full-resolution memory, or the feature memory)."""
    if not model_cfg.generator:
        return True
    return model_cfg.memory and model_cfg.memory_init == "data" and model_cfg.full_skip_block[0] >= 1


def statistics_split(model_cfg: ModelConfig, samples: List[Sample], held: List[Sample],
                     seed: int, groups: Optional[Groups] = None) -> Tuple[List[Sample], List[Sample]]:
    """(images to train on, good images that set the score normalisation and statistics). The held-back
    validation images where there are any; else, for a model that stores its training blocks, a fraction
    of train/good held back from training; else the training images themselves (the paper's choice)."""
    if held:
        return samples, held
    if stores_training_blocks(model_cfg) and len(samples) > 1:
        return (holdout_by_group(samples, STATISTICS_FRACTION, seed + 1, groups) if groups is not None
                else split_holdout(samples, STATISTICS_FRACTION, seed + 1))
    return samples, []


def fit_samples(model_cfg: ModelConfig, cfg: TrainConfig,
                rank: int) -> Tuple[List[Sample], List[Sample], List[Sample], Optional[Groups]]:
    """(images to train on, validation images held back, good images that set the score statistics, the groups or
    None) of `cfg.data`, under the grouped protocol where `cfg.groups` names a groups file."""
    groups = load_groups(Path(cfg.groups), Path(cfg.data)) if cfg.groups else None
    every = grouped_protocol(Path(cfg.data), groups)[0] if groups is not None else train_samples(Path(cfg.data))
    if model_cfg.in_channels == 1 and rank == 0 and has_colour(every):
        logger.warning("%s: the training images are in colour and this model reads them as gray (in_channels 1): "
                       "colour-only defects will be missed; in_channels 3 (daad-train fit --channels-in 3) keeps colour",
                       cfg.data)
    samples, held = (holdout_by_group(every, cfg.val_fraction, cfg.seed, groups) if groups is not None
                     else split_holdout(every, cfg.val_fraction, cfg.seed))
    samples, unseen = statistics_split(model_cfg, samples, held, cfg.seed, groups)
    return samples, held, unseen, groups


def training_data_summary(cfg: TrainConfig, samples: List[Sample], held: List[Sample], unseen: List[Sample],
                          groups: Optional[Groups]) -> Dict[str, Any]:
    """What the checkpoint (and the bundle, without the lists) says of the data a fit saw."""
    return {"root": str(cfg.data), "n_images": len(samples), "n_held_back": len(held),
            "held_back": [str(s.image) for s in held],
            "score_stats_from": f"{len(unseen)} held-back good images" if unseen else "the training images",
            "score_stats_images": [str(s.image) for s in unseen],
            "groups_sha256": groups.sha256 if groups is not None else ""}
