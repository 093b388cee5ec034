"""engine.calibrator: INT8 calibration batches and the calibrator's feed, without TensorRT."""
from __future__ import annotations

from pathlib import Path
from typing import List

import cv2
import numpy as np
import pytest

from engine.calibrator import CalibrationBatches, CalibrationFeed, calibration_images, images_digest
from engine.errors import EngineBuildError, ImageError
from engine.preprocess import PreprocessSpec, preprocess, read_image
from train.synthetic import make_good

SPEC = PreprocessSpec(height=32, width=32)


@pytest.fixture()
def image_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "good"
    folder.mkdir()
    for i in range(10):
        cv2.imwrite(str(folder / f"{i:02d}.png"), make_good(3, i, 48))
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.mark.parametrize("batch, n_batches, padded", [
    (4, 3, 2),  # 10 = 4 + 4 + 2, the last one filled with 2 repeats
    (5, 2, 0),  # exact multiple: nothing repeated
    (1, 10, 0),
    (16, 1, 6),  # fewer images than one batch
])
def test_batches_shape_count_and_padding(image_dir: Path, batch: int, n_batches: int, padded: int) -> None:
    paths = calibration_images(image_dir)
    batches = CalibrationBatches(paths, SPEC, batch)
    got = list(batches)
    assert len(got) == len(batches) == n_batches and batches.padded == padded
    assert all(b.shape == (batch, 1, 32, 32) and b.dtype == np.float32 and b.flags.c_contiguous for b in got)
    assert batches.nbytes == batch * 32 * 32 * 4
    stacked = np.concatenate(got)
    expected = [preprocess(read_image(p), SPEC) for p in paths]  # the one preprocessing function, in order
    np.testing.assert_array_equal(stacked[: len(paths)], np.stack(expected))
    last = got[-1]
    real = len(paths) - (n_batches - 1) * batch
    for j in range(real, batch):  # padding repeats the last batch's own images, never zeros
        np.testing.assert_array_equal(last[j], last[(j - real) % real])


def test_batches_can_be_iterated_again(image_dir: Path) -> None:
    batches = CalibrationBatches(calibration_images(image_dir), SPEC, 4)
    first, second = list(batches), list(batches)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


def test_calibration_images_errors(tmp_path: Path) -> None:
    with pytest.raises(EngineBuildError, match="not found"):
        calibration_images(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EngineBuildError, match="no images"):
        calibration_images(tmp_path / "empty")
    with pytest.raises(EngineBuildError, match="batch must be >= 1"):
        CalibrationBatches([tmp_path / "x.png"], SPEC, 0)


def test_images_digest_follows_contents(image_dir: Path) -> None:
    paths = calibration_images(image_dir)
    before = images_digest(paths)
    assert images_digest(paths) == before
    cv2.imwrite(str(paths[0]), make_good(9, 9, 48))
    assert images_digest(paths) != before


def test_feed_serves_every_batch_then_none(image_dir: Path, tmp_path: Path) -> None:
    uploaded: List[np.ndarray] = []

    def upload(batch: np.ndarray) -> int:
        uploaded.append(batch.copy())
        return 0xBEEF

    feed = CalibrationFeed(CalibrationBatches(calibration_images(image_dir), SPEC, 4), tmp_path / "c.cache", upload)
    assert feed.read_cache() is None
    assert [feed.next_pointer() for _ in range(5)] == [0xBEEF, 0xBEEF, 0xBEEF, None, None]
    assert len(uploaded) == 3 and feed.served == 3 and feed.error is None
    feed.write_cache(b"scales")
    assert (tmp_path / "c.cache").read_bytes() == b"scales"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    assert CalibrationFeed(feed.batches, tmp_path / "c.cache", upload).read_cache() == b"scales"


def test_feed_keeps_image_error_for_after_the_build(image_dir: Path) -> None:
    (image_dir / "05.png").write_bytes(b"\x89PNG truncated")
    feed = CalibrationFeed(CalibrationBatches(calibration_images(image_dir), SPEC, 4), None, lambda b: 1)
    assert feed.next_pointer() == 1
    assert feed.next_pointer() is None  # the second batch holds 05.png: calibration stops...
    assert isinstance(feed.error, ImageError) and "05.png" in str(feed.error)  # ...and the error is kept
    assert feed.next_pointer() is None


def test_feed_keeps_device_copy_error(image_dir: Path) -> None:
    def failing_upload(batch: np.ndarray) -> int:
        raise EngineBuildError("CUDA copy of an INT8 calibration batch failed (launch failed)")

    feed = CalibrationFeed(CalibrationBatches(calibration_images(image_dir), SPEC, 4), None, failing_upload)
    assert feed.next_pointer() is None and feed.served == 0
    assert isinstance(feed.error, EngineBuildError)
