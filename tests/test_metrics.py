"""Metrics on maps and masks whose answers are known by construction."""
from __future__ import annotations

import numpy as np
import pytest

from train.metrics import (aupro, best_f1, group_bootstrap_auroc, group_bootstrap_auroc_difference, part_ranks, image_auroc, pixel_auroc,
                           pixel_auroc_breakdown)

SIZE = 16


def split_with_lifted_background(lift: float) -> tuple:
    """4 good and 4 defective maps: each defect is a 4x4 square scoring 2; a defective image's
    background scores `lift` (good images score 0 to 0.1)."""
    rng = np.random.default_rng(0)
    maps = rng.uniform(0.0, 0.1, (8, SIZE, SIZE))
    masks = np.zeros((8, SIZE, SIZE), bool)
    labels = np.array([0] * 4 + [1] * 4)
    types = ["good"] * 4 + ["crack", "crack", "uneven", "uneven"]
    for i in range(4, 8):
        maps[i] += lift
        masks[i, 4:8, 4:8] = True
        maps[i][masks[i]] = 2.0
    return masks, maps, labels, types


def test_image_auroc_orders_and_reports_nan_for_one_class() -> None:
    assert image_auroc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert image_auroc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert np.isnan(image_auroc([1, 1], [0.1, 0.2]))


def test_pixel_auroc_is_one_for_a_perfect_map_and_half_for_a_constant_one() -> None:
    masks, maps, _, _ = split_with_lifted_background(0.0)
    assert pixel_auroc(masks, maps) == 1.0
    assert pixel_auroc(masks, np.ones_like(maps)) == 0.5


def test_pixel_auroc_subsamples_large_inputs_without_bias(monkeypatch: pytest.MonkeyPatch) -> None:
    import train.metrics as metrics

    masks, maps, _, _ = split_with_lifted_background(0.0)
    noisy = maps + np.random.default_rng(1).normal(0, 0.8, maps.shape)
    exact = pixel_auroc(masks, noisy)
    monkeypatch.setattr(metrics, "PIXEL_AUROC_MAX_PIXELS", 1000)
    assert abs(pixel_auroc(masks, noisy) - exact) < 0.05


def test_breakdown_separates_lifted_backgrounds_from_localisation() -> None:
    # background lifted above every good pixel but below the defects: localisation is perfect
    masks, maps, labels, types = split_with_lifted_background(1.0)
    got = pixel_auroc_breakdown(masks, maps, labels, types)
    assert got["against_good_images"] == 1.0
    assert got["against_defective_backgrounds"] == 1.0
    assert set(got["per_type"]) == {"crack", "uneven"}
    # lifted to the defects' own level: the defects still beat good images, not their own backgrounds
    masks, maps, labels, types = split_with_lifted_background(2.0)
    got = pixel_auroc_breakdown(masks, maps, labels, types)
    assert got["against_good_images"] == 1.0
    assert got["against_defective_backgrounds"] < 0.6
    assert pixel_auroc(masks, maps) < got["against_good_images"]


def test_breakdown_per_type_uses_that_types_images_and_the_good_ones() -> None:
    masks, maps, labels, types = split_with_lifted_background(0.0)
    maps[6:8] = np.random.default_rng(2).uniform(0, 2, (2, SIZE, SIZE))  # uneven maps: noise
    got = pixel_auroc_breakdown(masks, maps, labels, types)
    assert got["per_type"]["crack"] == 1.0
    assert got["per_type"]["uneven"] < 0.9


def test_aupro_is_one_for_a_perfect_map_and_falls_for_a_missed_region() -> None:
    masks, maps, _, _ = split_with_lifted_background(0.0)
    assert aupro(masks, maps) == pytest.approx(1.0, abs=0.01)
    missed = maps.copy()
    missed[7][masks[7]] = 0.0  # one of four regions is never found
    assert aupro(masks, missed) == pytest.approx(0.75, abs=0.02)
    assert np.isnan(aupro(np.zeros_like(masks), maps))


def test_best_f1_finds_the_separating_threshold() -> None:
    got = best_f1([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
    assert got["f1"] == 1.0
    assert 0.2 < got["threshold"] <= 0.8


def clustered_scorings(groups_per_class: int = 6, per_group: int = 6) -> tuple:
    """Two scorings whose errors are shared by the images of a group (one part, several exposures)."""
    rng = np.random.default_rng(1)
    n_groups = 2 * groups_per_class
    group_labels = np.repeat([0, 1], groups_per_class)
    labels = np.repeat(group_labels, per_group)
    groups = np.repeat([f"part{g}" for g in range(n_groups)], per_group)
    a = labels + np.repeat(rng.normal(0, 0.8, n_groups), per_group) + rng.normal(0, 0.05, labels.size)
    b = labels + np.repeat(rng.normal(0, 0.8, n_groups), per_group) + rng.normal(0, 0.05, labels.size)
    return labels, a, b, groups


def test_group_bootstrap_of_identical_scorings_is_exactly_zero() -> None:
    labels, a, _, groups = clustered_scorings()
    got = group_bootstrap_auroc_difference(labels, a, a, groups, draws=200)
    assert got["difference"] == got["low"] == got["high"] == 0.0 and got["groups"] == 12 and got["draws"] == 200


def test_group_bootstrap_finds_a_clearly_better_scoring() -> None:
    labels, _, _, groups = clustered_scorings()
    chance = np.random.default_rng(2).normal(size=labels.size)
    got = group_bootstrap_auroc_difference(labels, chance, labels.astype(float), groups, draws=500)
    assert got["low"] > 0.2 and got["difference"] == pytest.approx(1.0 - image_auroc(labels, chance))


def test_group_bootstrap_is_wider_than_an_image_bootstrap_when_a_group_shares_its_errors() -> None:
    labels, a, b, groups = clustered_scorings()
    by_group = group_bootstrap_auroc_difference(labels, a, b, groups, draws=1000)
    by_image = group_bootstrap_auroc_difference(labels, a, b, [str(i) for i in range(labels.size)], draws=1000)
    assert by_group["difference"] == by_image["difference"]
    assert by_group["high"] - by_group["low"] > 1.5 * (by_image["high"] - by_image["low"]), (by_group, by_image)


def test_group_bootstrap_interval_of_one_scoring_holds_its_auroc_and_widens_with_shared_errors() -> None:
    labels, a, _, groups = clustered_scorings()
    by_group = group_bootstrap_auroc(labels, a, groups, draws=1000)
    by_image = group_bootstrap_auroc(labels, a, [str(i) for i in range(labels.size)], draws=1000)
    assert by_group["auroc"] == image_auroc(labels, a) and by_group["groups"] == 12
    assert by_group["low"] < by_group["auroc"] < by_group["high"] <= 1.0
    assert by_group["high"] - by_group["low"] > 1.5 * (by_image["high"] - by_image["low"]), (by_group, by_image)


def test_group_bootstrap_of_a_perfect_scoring_is_exactly_one() -> None:
    labels, _, _, groups = clustered_scorings()
    got = group_bootstrap_auroc(labels, labels.astype(float), groups, draws=200)
    assert got["auroc"] == got["low"] == got["high"] == 1.0


def test_group_bootstrap_keeps_the_number_of_defective_parts_in_every_draw() -> None:
    # Ten good parts and four defective ones, one of them holding a good image too: every draw holds four
    # defective parts and ten good ones (unstratified, about one draw in 40 holds a single defective part).
    from train.metrics import _group_resamples

    labels = np.repeat([0] * 10 + [1] * 4, 3)
    labels[-1] = 0
    groups = np.repeat([f"part{g:02d}" for g in range(14)], 3)
    resamples, n_groups = _group_resamples(labels, list(groups), draws=500, seed=0)
    drawn = list(resamples)
    assert n_groups == 14 and len(drawn) == 500
    for rows in drawn:
        parts = groups[rows][::3]  # each part's three rows stay together
        assert sum(p >= "part10" for p in parts) == 4 and len(parts) == 14


def test_the_bootstraps_rank_auroc_is_scikit_learns_with_ties() -> None:
    from train.metrics import _rank_auroc

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(size=200) + labels, 1)  # many ties
    assert _rank_auroc(labels, scores) == pytest.approx(image_auroc(labels, scores), abs=1e-12)


def test_part_ranks_put_the_missed_part_and_the_alarming_good_part_first() -> None:
    labels = [0, 0, 0, 0, 1, 1, 1, 1, 0]
    types = ["good"] * 4 + ["crack", "crack", "fray", "fray", "good"]
    scores = [0.1, 0.2, 0.3, 0.9, 0.05, 0.15, 1.0, 2.0, 0.2]
    parts = ["g1", "g1", "g2", "g2", "c1", "c1", "f1", "f1", "f1"]  # f1 holds a good image too
    ranked = part_ranks(labels, types, scores, parts)
    got = {r["part"]: r for r in ranked}
    assert got["c1"]["rank"] == pytest.approx((0 + 1 / 5) / 2)  # below all five good images, then above one
    assert got["f1"] == {"part": "f1", "defective": True, "types": ["fray"], "images": 2, "rank": 1.0}
    assert got["g2"]["rank"] == pytest.approx(0.5)  # 0.3 and 0.9 each below two of the four defects
    assert got["g1"]["rank"] == pytest.approx((3 / 4 + 2 / 4) / 2)
    assert [r["part"] for r in ranked] == ["c1", "g2", "g1", "f1"]
