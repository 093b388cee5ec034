"""Dataset reading: MVTec layout, plain folders, colour/gray/varying sizes, and every layout error."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from engine.errors import DatasetError
from engine.preprocess import PreprocessSpec
from train.data import eval_samples, has_colour, load_images, load_mask, split_holdout, train_samples
from train.synthetic import DEFECT_TYPES, make_defective, make_good, write_synthetic_dataset

SPEC = PreprocessSpec(height=32, width=32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mvtec")
    write_synthetic_dataset(root, n_train=6, n_test_good=3, n_test_per_defect=2, size=64)
    return root


def test_synthetic_generator_is_deterministic() -> None:
    assert np.array_equal(make_good(3, 7), make_good(3, 7))
    a, mask_a, kind_a = make_defective(3, 7)
    b, mask_b, kind_b = make_defective(3, 7)
    assert np.array_equal(a, b) and np.array_equal(mask_a, mask_b) and kind_a == kind_b
    assert not np.array_equal(make_good(3, 7), make_good(3, 8))


@pytest.mark.parametrize("kind", DEFECT_TYPES)
def test_synthetic_defects_change_exactly_the_masked_pixels(kind: str) -> None:
    good = make_good(1, 2)
    bad, mask, got = make_defective(1, 2, kind=kind)
    assert got == kind and mask.any()
    assert np.array_equal(bad[mask == 0], good[mask == 0])


def test_mvtec_layout_is_read(dataset: Path) -> None:
    assert len(train_samples(dataset)) == 6
    samples = eval_samples(dataset)
    assert sum(s.label for s in samples) == 2 * len(DEFECT_TYPES)
    defect = next(s for s in samples if s.label)
    assert load_mask(defect, SPEC).any()
    assert load_images(samples[:3], SPEC).shape == (3, 1, 32, 32)


def test_a_plain_folder_of_mixed_gray_rgb_and_sizes_is_read(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "a.png"), make_good(0, 0, 64))
    cv2.imwrite(str(tmp_path / "b.png"), make_good(0, 1, 96, color=True))
    cv2.imwrite(str(tmp_path / "c.jpg"), cv2.resize(make_good(0, 2, 64), (80, 50)))
    images = load_images(train_samples(tmp_path), SPEC)
    assert images.shape == (3, 1, 32, 32)
    rgb = load_images(train_samples(tmp_path), PreprocessSpec(32, 32, "rgb", (0.5,) * 3, (0.5,) * 3))
    assert rgb.shape == (3, 3, 32, 32)


def _folder(root: Path, images: dict) -> list:
    root.mkdir()
    for name, image in images.items():
        cv2.imwrite(str(root / name), image, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return train_samples(root)


def test_colour_data_is_told_from_gray_parts_saved_in_three_channels(tmp_path: Path) -> None:
    gray = [make_good(0, i, 64) for i in range(3)]
    assert not has_colour(_folder(tmp_path / "gray", {f"{i}.png": g for i, g in enumerate(gray)}))
    as_bgr = {f"{i}.png": cv2.cvtColor(g, cv2.COLOR_GRAY2BGR) for i, g in enumerate(gray)}
    assert not has_colour(_folder(tmp_path / "bgr", as_bgr))
    as_jpeg = {f"{i}.jpg": cv2.cvtColor(g, cv2.COLOR_GRAY2BGR) for i, g in enumerate(gray)}  # chroma noise only
    assert not has_colour(_folder(tmp_path / "jpeg", as_jpeg))
    tinted = {f"{i}.png": make_good(0, i, 64, color=True) for i in range(3)}
    assert has_colour(_folder(tmp_path / "colour", tinted))
    wide = {"0.png": (make_good(0, 0, 64, color=True).astype(np.uint16) * 257)}  # 16-bit colour camera
    assert has_colour(_folder(tmp_path / "wide", wide))


def test_holdout_split_is_deterministic_and_disjoint(dataset: Path) -> None:
    samples = train_samples(dataset)
    keep, hold = split_holdout(samples, 0.34, seed=1)
    assert split_holdout(samples, 0.34, seed=1) == (keep, hold)
    assert len(hold) == 2 and not set(keep) & set(hold)


def _break(root: Path, how: str) -> Path:
    write_synthetic_dataset(root, n_train=2, n_test_good=1, n_test_per_defect=1, size=32)
    if how == "no_train":
        for f in (root / "train" / "good").iterdir():
            f.unlink()
        (root / "train" / "good").rmdir()
        (root / "train").rmdir()
        return root
    if how == "empty_train":
        for f in (root / "train" / "good").iterdir():
            f.unlink()
        return root / "train" / "good"
    if how == "missing_mask":
        (root / "ground_truth" / "pit" / "000_mask.png").unlink()
    if how == "wrong_mask_size":
        cv2.imwrite(str(root / "ground_truth" / "pit" / "000_mask.png"), np.zeros((10, 12), np.uint8))
    if how == "corrupt_image":
        (root / "train" / "good" / "000.png").write_bytes(b"\x89PNG not really")
    return root


@pytest.mark.parametrize("how,expected", [
    ("no_train", "not an MVTec AD layout"),  # neither train/good nor images at the top
    ("empty_train", "no images"),  # a folder that exists but holds nothing
    ("missing_mask", "ground-truth mask missing"),
    ("wrong_mask_size", "masks must have the image's size"),
    ("corrupt_image", "not a readable image"),
])
def test_bad_datasets_name_the_path(tmp_path: Path, how: str, expected: str) -> None:
    root = _break(tmp_path / "ds", how)
    with pytest.raises(DatasetError) as err:
        samples = eval_samples(root) if how in ("missing_mask", "wrong_mask_size") else train_samples(root)
        for s in samples:
            load_mask(s, SPEC)
        load_images(samples, SPEC)
    assert expected in str(err.value)
    assert str(tmp_path) in str(err.value)


def test_missing_dataset_directory(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        train_samples(tmp_path / "nope")
