"""The fine-memory probe's memories: which blocks an augmentation adds, and that a read-out finds them."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from probe_fine_memory import Memory, memory_items, parse_row  # noqa: E402


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
    exact = Memory(memory_items(bank, 4, ("shift",)), 4).readout(shifted.contiguous())
    grid_only = Memory(memory_items(bank, 4, ()), 4).readout(shifted.contiguous())
    assert torch.allclose(exact, shifted)
    assert not torch.allclose(grid_only, shifted)
    flipped = bank[1:2].flip(-1).contiguous()
    assert torch.allclose(Memory(memory_items(bank, 4, ("flip",)), 4).readout(flipped), flipped)


def test_rows_parse_and_bad_rows_are_refused() -> None:
    assert parse_row("2+4+8") == ((2, 4, 8), ())
    assert parse_row("4:shift+flip") == ((4,), ("shift", "flip"))
    for bad in ("4:rotate", "a+4", "0"):
        with pytest.raises(SystemExit, match="--rows"):
            parse_row(bad)
