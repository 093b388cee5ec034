"""The fine-scale probe starts from the checkpoint's own map, and its memory keeps a random draw of the vectors."""
from __future__ import annotations

import torch

from benchmarks.research.probe_coarse_layers import CoarseLayer
from benchmarks.research.probe_fine_scale import mixed_map, own_unsmoothed

from tests.test_probe_coarse_layers import small_model


def test_with_no_weight_on_the_new_term_the_map_is_the_models_own() -> None:
    model = small_model(128)
    torch.manual_seed(0)
    images = torch.rand(3, 1, 128, 128)
    own = own_unsmoothed(model, images)
    with torch.no_grad():
        expected = model.scored_map(images)  # the smoothed map, before `map_closing`
    assert torch.allclose(mixed_map(model, own, torch.zeros_like(own), 0.0), expected, atol=1e-6)
    # the new term moves the map by its weight
    moved = mixed_map(model, own, own + 1.0, 0.5)
    assert torch.allclose(moved, expected + 0.5, atol=1e-5)


def test_a_capped_layer_keeps_that_many_distinct_training_vectors() -> None:
    model = small_model(128)
    torch.manual_seed(0)
    train = torch.randn(4, 6, 8, 8)
    layer = CoarseLayer(train, dims=0, items=50, rng=torch.Generator().manual_seed(1))
    items = layer.memory.items
    assert items.shape == (50, 6)
    every = ((train - layer.mean) / layer.std).permute(0, 2, 3, 1).reshape(-1, 6)
    # each item is one of the standardised training vectors, none twice
    distance = torch.cdist(items, every, compute_mode="donot_use_mm_for_euclid_dist")
    assert float(distance.min(dim=1).values.max()) < 1e-5
    assert len(set(distance.argmin(dim=1).tolist())) == 50
    # the draw depends on the generator's seed, and a cap above the count keeps every vector
    other = CoarseLayer(train, dims=0, items=50, rng=torch.Generator().manual_seed(2)).memory.items
    assert not torch.equal(items, other)
    assert len(CoarseLayer(train, dims=0, items=10_000).memory.items) == 4 * 8 * 8
    # vectors it holds are rebuilt exactly, the others only approximately
    assert float(layer.error(model, train).min()) < 1e-10
