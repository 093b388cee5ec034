"""Defects pasted onto good images: the background is the host's, the defect is the donor's."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from train.transplant import transplant, transplant_set


def texture(seed: int, shape=(1, 64, 64), offset: float = 0.0, gain: float = 1.0) -> np.ndarray:
    return (offset + gain * np.random.default_rng(seed).normal(0, 0.2, shape)).astype(np.float32)


def far_from(mask: np.ndarray, px: int = 12) -> np.ndarray:
    """Pixels more than `px` away from the mask in every direction (the blur's support is a square)."""
    return ~ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool), iterations=px)


def square_mask(y: int, x: int, side: int, size: int = 64) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[y:y + side, x:x + side] = True
    return mask


def test_far_from_the_mask_the_result_is_the_host_exactly() -> None:
    host, donor, mask = texture(0), texture(1), square_mask(20, 20, 10)
    out = transplant(host, donor, mask)
    far = far_from(mask)
    assert np.array_equal(out[0][far], host[0][far])
    assert not np.allclose(out[0][mask], host[0][mask])


def test_the_defect_keeps_its_structure_at_the_hosts_grey_levels() -> None:
    host = texture(0)
    base = texture(1)
    donor = base * 3.0 + 0.7  # another photo's exposure and contrast
    mask = square_mask(10, 10, 30)
    out = transplant(host, donor, mask)
    pasted = out[0][mask]
    expected = (base[0][mask] - base.mean()) * (host.std() / base.std()) + host.mean()
    np.testing.assert_allclose(pasted, expected, atol=1e-5)  # gain-matched: the structure of base, host's levels
    assert abs(pasted.mean() - host.mean()) < 0.1


def test_transplant_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="must agree"):
        transplant(texture(0), texture(1, shape=(1, 32, 32)), square_mask(0, 0, 4))


def test_transplant_set_pastes_every_defect_onto_a_good_image_of_the_set() -> None:
    good = [texture(s) for s in range(4)]
    defective = [texture(10 + s, offset=1.0) for s in range(10)]
    images = np.stack(good + defective)
    labels = np.array([0] * 4 + [1] * 10)
    masks = np.stack([np.zeros((64, 64), bool)] * 4 + [square_mask(5 + 3 * s, 5, 8) for s in range(10)])
    out, hosts = transplant_set(images, masks, labels, seed=3)
    assert np.array_equal(out[:4], images[:4]) and list(hosts[:4]) == [0, 1, 2, 3]  # good images untouched
    for i in range(4, 14):
        assert labels[hosts[i]] == 0
        far = far_from(masks[i])
        assert np.array_equal(out[i][0][far], images[hosts[i]][0][far])  # the background is the host's
    counts = np.bincount(hosts[4:], minlength=4)
    assert counts.max() - counts.min() <= 1  # hosts used evenly
    again, hosts_again = transplant_set(images, masks, labels, seed=3)
    assert np.array_equal(again, out) and np.array_equal(hosts_again, hosts)  # deterministic


def test_transplant_set_needs_good_images() -> None:
    images = np.stack([texture(0), texture(1)])
    with pytest.raises(ValueError, match="no good images"):
        transplant_set(images, np.zeros((2, 64, 64), bool), np.array([1, 1]))
