"""benchmarks/probe_maps.py: the grey-level closing it offers as a map variant, on constructed maps."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from probe_maps import closing  # noqa: E402


def test_closing_raises_a_region_to_its_border_and_leaves_a_peak_its_width() -> None:
    m = torch.zeros(1, 1, 64, 64)
    m[..., 10:30, 10:30] = 1.0  # a ring: a high border around a low interior
    m[..., 14:26, 14:26] = 0.0
    m[..., 50, 50] = 2.0  # an isolated peak
    closed = closing(m, 13)
    assert torch.all(closed[..., 14:26, 14:26] == 1.0)  # the interior, narrower than the filter, is filled
    assert closed[..., 50, 50] == 2.0 and closed[..., 45:56, 45:56].sum() == 2.0  # the peak is not widened
    assert torch.all(closed >= m) and closed[..., :8, :].abs().sum() == 0  # never lowers; far background stays
    wide = torch.zeros(1, 1, 64, 64)
    wide[..., 10:40, 10:40] = 1.0
    wide[..., 13:37, 13:37] = 0.0  # an interior wider than the filter stays low in its middle
    assert closing(wide, 13)[..., 25, 25] == 0.0


def test_the_separable_closing_is_the_square_one() -> None:
    m = torch.rand(2, 1, 40, 52, generator=torch.Generator().manual_seed(0))
    for size in (3, 9, 31):
        pad = size // 2
        square = -torch.nn.functional.max_pool2d(-torch.nn.functional.max_pool2d(m, size, 1, pad), size, 1, pad)
        assert torch.equal(closing(m, size), square)
