"""The coarse-layer probe reads the backbone the product's way, and its memory holds every training vector."""
from __future__ import annotations

import torch

from benchmarks.research.probe_coarse_layers import CoarseLayer, tap_features

from train.backbone import COARSE_TAP
from train.config import preset
from train.model import DAAD


def small_model(size: int = 64) -> DAAD:
    """An untrained `inspect` DAAD of small memories at `size` px (the probes' tests share it)."""
    cfg = preset("inspect", image_size=(size, size), full_skip_items=16, feature_dims=8, coarse_memory_items=4,
                 coarse_feature_dims=4)
    return DAAD(cfg, load_backbone=False).eval()


def test_the_product_tap_gives_the_models_own_coarse_features() -> None:
    model = small_model()
    images = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        _, coarse = model.backbone.forward_with_coarse(model.normalise_input(images))  # type: ignore[union-attr]
    assert torch.allclose(tap_features(model, images, COARSE_TAP), coarse, atol=1e-6)


def test_a_coarse_layer_rebuilds_its_training_images_exactly_and_new_ones_not() -> None:
    model = small_model()
    torch.manual_seed(0)
    train = torch.randn(4, 12, 2, 2)
    layer = CoarseLayer(train, dims=4)
    assert len(layer.memory.items) == 4 * 2 * 2
    assert float(layer.error(model, train).max()) < 1e-10
    assert float(layer.error(model, torch.randn(2, 12, 2, 2)).mean()) > 1e-3
