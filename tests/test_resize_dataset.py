"""benchmarks/research/resize_dataset.py: a dataset copy at the model's input size loads exactly as the original."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from benchmarks.research import resize_dataset
from engine.preprocess import PreprocessSpec
from train.data import eval_samples, load_images, load_mask, train_samples

SIZE = 32


def write_dataset(root: Path, colour: bool) -> None:
    rng = np.random.default_rng(3)
    shapes = [(45, 37), (29, 50), (SIZE, SIZE), (61, 23)]  # shrink, grow and keep, as the crops vary
    for folder in ("train/good", "test/good", "test/crack", "ground_truth/crack"):
        (root / folder).mkdir(parents=True)
    for i, (h, w) in enumerate(shapes):
        image = rng.integers(0, 256, size=(h, w, 3) if colour else (h, w), dtype=np.uint8)
        cv2.imwrite(str(root / "train/good" / f"{i:03d}.png"), image)
        cv2.imwrite(str(root / "test/good" / f"{i:03d}.png"), image[::-1].copy())
        cv2.imwrite(str(root / "test/crack" / f"{i:03d}.png"), 255 - image)
        mask = np.zeros((h, w), np.uint8)
        mask[h // 3: h // 3 + 3, :] = 255  # a thin line: nearest-neighbour must keep it where load_mask puts it
        cv2.imwrite(str(root / "ground_truth/crack" / f"{i:03d}_mask.png"), mask)
    (root / "SOURCE.md").write_text("synthetic\n")


@pytest.mark.parametrize("colour", [False, True])
def test_the_copy_loads_as_the_original(tmp_path: Path, colour: bool) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_dataset(src, colour)
    assert resize_dataset.main([str(src), str(dst), "--size", str(SIZE)]) == 0
    spec = PreprocessSpec(height=SIZE, width=SIZE, channel_order="rgb" if colour else "gray",
                          mean=(0.5,) * (3 if colour else 1), std=(0.5,) * (3 if colour else 1))
    for listing in (train_samples, eval_samples):
        original, copy = listing(src), listing(dst)
        assert [s.image.name for s in original] == [s.image.name for s in copy]
        np.testing.assert_array_equal(load_images(original, spec), load_images(copy, spec))
    masks = [np.stack([load_mask(s, spec) for s in eval_samples(root)]) for root in (src, dst)]
    assert masks[0].any()
    np.testing.assert_array_equal(masks[0], masks[1])
    assert (dst / "SOURCE.md").read_text() == "synthetic\n"
    assert all(cv2.imread(str(p), cv2.IMREAD_UNCHANGED).shape[:2] == (SIZE, SIZE) for p in dst.rglob("*.png"))


def test_refuses_an_existing_folder_and_a_missing_dataset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_dataset(tmp_path / "src", colour=False)
    (tmp_path / "dst").mkdir()
    assert resize_dataset.main([str(tmp_path / "src"), str(tmp_path / "dst"), "--size", "32"]) == 2
    assert "exists" in capsys.readouterr().err
    assert resize_dataset.main([str(tmp_path / "none"), str(tmp_path / "new"), "--size", "32"]) == 2
    assert "no such dataset folder" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
