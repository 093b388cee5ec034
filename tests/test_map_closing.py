"""train.model.grey_closing (`model.map_closing`) and edge_side_fill (`model.edge_fill_weight`), and variants of
benchmarks/research/probe_maps.py, on constructed maps."""
from __future__ import annotations

import torch

from train.model import edge_side_fill
from train.model import grey_closing as closing


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


def test_a_strip_between_a_high_line_and_the_frame_edge_is_filled_up_to_half_the_filter() -> None:
    m = torch.zeros(1, 1, 64, 48)
    m[..., 20, :] = 1.0  # a step across the frame, 20 rows below its top edge
    closed = closing(m, 41)  # half the filter: 20 rows
    assert torch.all(closed[..., :20, :] == 1.0)  # the strip between the step and the edge is raised
    assert torch.all(closed[..., 21:, :] == 0.0)  # the open side is not
    assert torch.all(closing(m, 39)[..., :10, :] == 0.0)  # a filter under twice the strip leaves it low


def test_a_combination_closes_the_mean_of_its_views_maps_and_scores_it_before() -> None:
    from train.config import preset
    from train.model import DAAD
    from train.views import ViewEnsemble

    small = dict(image_size=(32, 32), channels=(8, 8, 16, 16, 16), disc_channels=(8, 8, 16, 16), memory_items=10,
                 blocks=((4, 4, 0), (2, 2, 0), (2, 2, 0), (1, 1, 0)), score_topk=0.05, map_closing=9)
    torch.manual_seed(0)
    views = [DAAD(preset("daad_plus", **small)).eval(), DAAD(preset("daad_plus", **small)).eval()]
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        out = ViewEnsemble(views)(x)
        mean = (views[0].scored_map(x) + views[1].scored_map(x)) / 2
    assert torch.allclose(out.anomaly_map, closing(mean, 9), atol=1e-6)  # closed once, after the mean
    assert torch.allclose(out.score, views[0].image_score(mean), atol=1e-6)


def test_a_rectangle_closes_as_deep_as_half_its_height_across_a_step_and_equals_the_2d_filter() -> None:
    m = torch.zeros(1, 1, 64, 48)
    m[..., 20, :] = 1.0  # a step across the frame, 20 rows below its top edge
    assert torch.all(closing(m, (41, 9))[..., :20, :] == 1.0)  # a tall rectangle fills the strip as the 41 square does
    assert torch.all(closing(m, (41, 9))[..., 21:, :] == 0.0)  # and not the open side
    assert torch.all(closing(m, (9, 41))[..., :10, :] == 0.0)  # turned, it is only 9 rows tall: the strip stays
    r = torch.rand(2, 1, 40, 52, generator=torch.Generator().manual_seed(1))
    for height, width in ((9, 3), (3, 15), (31, 7)):
        pad = (height // 2, width // 2)
        rect = -torch.nn.functional.max_pool2d(-torch.nn.functional.max_pool2d(r, (height, width), 1, pad),
                                               (height, width), 1, pad)
        assert torch.equal(closing(r, (height, width)), rect)
    assert torch.equal(closing(r, 9), closing(r, (9, 9)))  # an int is the square


def test_a_step_across_the_part_lifts_the_strip_to_the_nearer_edge_and_nothing_beyond() -> None:
    m = torch.zeros(2, 1, 64, 48)
    m[0, :, 20, :] = 1.0  # a step across the frame in the upper half: the strip above it is the smaller side
    m[1, :, 50, :] = 1.0  # one in the lower half
    fill = edge_side_fill(m)
    assert fill.shape == (2, 1, 64, 1)  # a row profile, added along each row by broadcasting
    assert torch.all(fill[0, :, :21] == 1.0) and torch.all(fill[0, :, 21:] == 0.0)
    assert torch.all(fill[1, :, 50:] == 1.0) and torch.all(fill[1, :, :50] == 0.0)
    blob = torch.zeros(1, 1, 64, 48)
    blob[..., 30:34, 20:24] = 1.0  # a small high spot lifts its rows by its share of the width only
    assert edge_side_fill(blob).max() <= 4 / 48 + 1e-6
    lifted = torch.rand(1, 1, 64, 48, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(edge_side_fill(lifted + 3.0), edge_side_fill(lifted), atol=1e-5)  # the part's own level is taken off


def test_the_exportable_fill_equals_running_maxima_from_the_middle_less_the_median_row() -> None:
    for height, width in ((64, 48), (9, 5), (256, 256)):
        m = torch.rand(3, 1, height, width, generator=torch.Generator().manual_seed(height))
        rows = m.mean(dim=3, keepdim=True)
        half = height // 2
        top = rows[:, :, :half].flip(2).cummax(dim=2).values.flip(2)
        bottom = rows[:, :, half:].cummax(dim=2).values
        expected = torch.cat([top, bottom], dim=2) - rows.median(dim=2, keepdim=True).values
        assert torch.equal(edge_side_fill(m), expected)
