"""benchmarks/research/probe_image_score.py: the levels each image score subtracts, on constructed maps."""
from __future__ import annotations

import numpy as np

from benchmarks.research import probe_image_score


def test_each_level_is_the_named_statistic_of_its_own_map() -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((3, 16, 16))
    maps[1] += 5.0  # a map lifted as a whole
    got = {name: level(maps) for name, level in probe_image_score.levels().items()}
    assert np.all(got["top-k (the model's)"] == 0)
    assert np.allclose(got["top-k minus the map's mean"], maps.mean(axis=(1, 2)))
    assert np.allclose(got["top-k minus its median"], np.median(maps.reshape(3, -1), axis=1))
    assert np.allclose(got["top-k minus its 25th percentile"], np.quantile(maps.reshape(3, -1), 0.25, axis=1))
    pooled = maps.reshape(3, 4, 4, 4, 4).mean(axis=(2, 4)).reshape(3, -1)  # 4x4 cells of a 16x16 map
    assert np.allclose(got["top-k minus the 25th pct, 4x4-pooled"], np.quantile(pooled, 0.25, axis=1), atol=1e-6)
    # every level follows a lifted map up: the lift is what it takes away
    for name, level in got.items():
        if name != "top-k (the model's)":
            assert level[1] > level[0] + 4.0 and level[1] > level[2] + 4.0, name


def test_per_type_auroc_ranks_each_type_against_the_good_images() -> None:
    labels = np.array([0, 0, 1, 1, 1, 1])
    types = ["good", "good", "crack", "crack", "fray", "fray"]
    scores = np.array([0.2, 0.4, 0.9, 0.8, 0.3, 0.1])  # cracks above every good image, frays below most
    got = probe_image_score.per_type(labels, types, scores)
    assert got == {"crack": 1.0, "fray": 0.25}
