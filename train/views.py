"""Several fits of one input contract scored as one model: the mean of their anomaly maps.

On magnetic_tile's unseen tiles the default `inspect` fit and one fit with `illumination_norm` see different
things (README, "Two views"): the mean of their maps, each in its own held-back good images' units, scores
higher pixel AUROC than either. `ViewEnsemble` is that mean as one module, so it is one ONNX graph and one
bundle: every view's backbone, memories and scoring head run on the same input, their smoothed maps are
averaged, and the image score is the first view's top-k of the mean map.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Dict, List, Sequence, Tuple, Union

import torch
from torch import nn

from .config import ModelConfig
from .memory_model import BlockMemoryModel
from .model import DAAD, AnomalyOutput


# What each view named on `daad-train fit --views` changes in the model config. "plain" pins the
# normalisation off, so the two views differ in it whatever the YAML says.
VIEWS: Dict[str, Dict[str, Any]] = {
    "plain": {"illumination_norm": False, "illumination_std": 1.0},
    "illumination": {"illumination_norm": True},
}

# `inspect`'s default: its map and an illumination-normalised fit's, averaged (README, "Two views")
DEFAULT_VIEWS: Tuple[str, ...] = ("plain", "illumination")


def view_configs(cfg: ModelConfig, names: Sequence[str]) -> List[Tuple[str, ModelConfig]]:
    """(name, config) per view: the base config with the view's overrides. ConfigError for an unknown or
    repeated view, or a config that sets what the views set."""
    from engine.errors import ConfigError

    unknown = [n for n in names if n not in VIEWS]
    if unknown or len(set(names)) != len(names) or not names:
        raise ConfigError(f"--views: got {' '.join(names) or 'none'}, expected distinct names of {sorted(VIEWS)}")
    if len(names) > 1 and cfg.illumination_norm:
        raise ConfigError("model.illumination_norm: set by the views (plain: off, illumination: on); drop it from "
                          "the config, or pass --views illumination for that view alone")
    return [(n, dataclasses.replace(cfg, **VIEWS[n])) for n in names]


class ViewEnsemble(nn.Module):
    """The mean map of `views` (DAAD models of one input size and channels), scored by the first's top-k."""

    def __init__(self, views: Sequence[DAAD]) -> None:
        super().__init__()
        if len(views) < 2:
            raise ValueError("an ensemble needs at least two views")
        self.views = nn.ModuleList(views)

    @property
    def cfg(self) -> ModelConfig:
        """The first view's config: the input contract (size, channels) and the image score every view shares."""
        return self.views[0].cfg

    @property
    def name(self) -> str:
        return f"{self.cfg.name}-{len(self.views)}views"

    @property
    def view_configs(self) -> List[ModelConfig]:
        return [v.cfg for v in self.views]

    def image_score(self, amap: torch.Tensor) -> torch.Tensor:
        return self.views[0].image_score(amap)

    def forward(self, x: torch.Tensor) -> AnomalyOutput:
        # each view's map is already smoothed and in its own held-back units; the mean of smoothed maps is the
        # smoothed mean, so no second blur. The closing (not linear) closes the mean map, as one model's
        amap = self.views[0].scored_map(x)
        for view in self.views[1:]:
            amap = amap + view.scored_map(x)
        amap = amap / len(self.views)
        return AnomalyOutput(anomaly_map=self.views[0].pixel_map(amap), score=self.image_score(amap))

    def with_plain_weights(self) -> "ViewEnsemble":
        """A shallow copy whose views have plain discriminators (for the ONNX exporter; see export.py)."""
        from .export import with_plain_weights

        plain = copy.copy(self)
        plain._modules = dict(self._modules)
        plain.views = nn.ModuleList([with_plain_weights(v) for v in self.views])
        return plain


Scorer = Union[DAAD, BlockMemoryModel, ViewEnsemble]  # what eval and export take: one fit, or the mean map of several
