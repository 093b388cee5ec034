"""The model's input contract (size, channel order, normalisation), derived from its config: written into the
checkpoint's config and the bundle, and used wherever images are loaded for a model (fit, evaluate, export)."""
from __future__ import annotations

from engine.preprocess import PreprocessSpec

from .config import ModelConfig


def preprocess_spec(cfg: ModelConfig) -> PreprocessSpec:
    """The model's input contract; stored in the checkpoint's config and in the bundle."""
    h, w = cfg.image_size
    order = "gray" if cfg.in_channels == 1 else "rgb"
    return PreprocessSpec(height=h, width=w, channel_order=order, mean=(0.5,) * cfg.in_channels, std=(0.5,) * cfg.in_channels)
