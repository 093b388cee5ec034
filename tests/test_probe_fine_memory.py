"""The fine-memory probe's memories: which blocks an augmentation adds, and that a read-out finds them."""
from __future__ import annotations

import pytest
import torch

from benchmarks.research.probe_fine_memory import Memory, RowSpec, image_means, memory_items, parse_row


def test_shift_and_flip_add_the_offset_grids_and_flipped_maps() -> None:
    bank = torch.randn(2, 8, 32, 32)
    per_image = 8 * 8 + 7 * 8 + 8 * 7 + 7 * 7  # the grid, then offsets (2, 0), (0, 2), (2, 2) of 4x4 blocks
    assert memory_items(bank, 4, ()).shape == (2 * 64, 8 * 16)
    assert memory_items(bank, 4, ("shift",)).shape == (2 * per_image, 8 * 16)
    assert memory_items(bank, 4, ("flip",)).shape == (2 * 4 * 64, 8 * 16)
    assert memory_items(bank, 4, ("shift", "flip")).shape == (2 * 4 * per_image, 8 * 16)


def test_a_half_block_shift_is_rebuilt_exactly_only_from_the_shifted_memory() -> None:
    bank = torch.randn(3, 8, 32, 32)
    shifted = torch.roll(bank[:1], shifts=(-2, -2), dims=(-2, -1))[:, :, :28, :28]  # grid offset (2, 2)
    exact = Memory(memory_items(bank, 4, ("shift",)), 4).readouts(shifted.contiguous())[0]
    grid_only = Memory(memory_items(bank, 4, ()), 4).readouts(shifted.contiguous())[0]
    assert torch.allclose(exact, shifted)
    assert not torch.allclose(grid_only, shifted)
    flipped = bank[1:2].flip(-1).contiguous()
    assert torch.allclose(Memory(memory_items(bank, 4, ("flip",)), 4).readouts(flipped)[0], flipped)


def test_rows_parse_and_bad_rows_are_refused() -> None:
    assert parse_row("2+4+8") == RowSpec((2, 4, 8), (), "cosine", 1)
    assert parse_row("4:shift+flip") == RowSpec((4,), ("shift", "flip"), "cosine", 1)
    assert parse_row("4:l2+k3") == RowSpec((4,), (), "l2", 3)
    assert parse_row("4:centre") == RowSpec((4,), (), "cosine", 1, True)
    for bad in ("4:rotate", "a+4", "0", "4:k0", "4:k2+k3"):
        with pytest.raises(SystemExit, match="--rows"):
            parse_row(bad)


def test_euclidean_read_out_finds_the_least_error_item_where_cosine_picks_the_aligned_one() -> None:
    items = torch.tensor([[10.0, 0.0], [0.9, 0.5]])  # the first is aligned with the query, the second close to it
    query = torch.tensor([[1.0, 0.0]]).reshape(1, 2, 1, 1)
    by_cosine = Memory(items, 1).readouts(query)[0].flatten()
    by_distance = Memory(items, 1, "l2").readouts(query)[0].flatten()
    assert torch.equal(by_cosine, items[0]) and torch.equal(by_distance, items[1])


def test_k_nearest_read_outs_come_nearest_first() -> None:
    items = torch.tensor([[3.0], [1.2], [0.0], [1.0]])
    query = torch.tensor([[1.1]]).reshape(1, 1, 1, 1)
    got = [r.item() for r in Memory(items, 1, "l2", k=3).readouts(query)]
    assert got == pytest.approx([1.2, 1.0, 0.0])


def test_a_centred_memory_rebuilds_an_image_shifted_as_a_whole_which_the_plain_one_does_not() -> None:
    bank = torch.randn(3, 8, 16, 16)
    shifted = (bank[:1] + torch.randn(1, 8, 1, 1) * 3).contiguous()  # one offset for every position of the image
    centred = Memory(memory_items(bank - image_means(bank), 4, ()), 4, centre=True).readouts(shifted)[0]
    plain = Memory(memory_items(bank, 4, ()), 4).readouts(shifted)[0]
    assert torch.allclose(centred, shifted, atol=1e-5)
    assert not torch.allclose(plain, shifted, atol=1e-2)
    assert image_means(bank).shape == (3, 8, 1, 1)
