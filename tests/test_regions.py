"""engine.regions: components at map resolution (the agent's and calibration's), mapped back to the original frame;
the verdict."""
from __future__ import annotations

import base64

import cv2
import numpy as np
import pytest

from agent.frames_store import FramesStore, crop_box, encode_crop
from engine.regions import (Region, bbox_overlap, component_areas, count_regions, find_regions, map_bbox_to_frame,
                            union_bbox, verdict)
from engine.thresholds import Thresholds


def blank(h: int = 64, w: int = 64) -> np.ndarray:
    return np.zeros((h, w), dtype=np.float32)


def thresholds(image: float = 0.5, pixel: float = 0.5, area: int = 1) -> Thresholds:
    return Thresholds(image_threshold=image, pixel_threshold=pixel, min_defect_area=area, bundle_sha256="0" * 64)


@pytest.mark.parametrize(
    "bbox, map_size, frame_size, expected",
    [
        ((0, 0, 64, 64), (64, 64), (64, 64), (0, 0, 64, 64)),  # identity
        ((10, 20, 3, 2), (64, 64), (128, 128), (20, 40, 6, 4)),  # 2x upscale
        ((10, 20, 3, 2), (64, 64), (192, 128), (30, 40, 9, 4)),  # stretch: x by 3, y by 2
        ((1, 1, 1, 1), (64, 64), (100, 100), (1, 1, 3, 3)),  # non-integer scale: cover every touched pixel
        ((63, 63, 1, 1), (64, 64), (100, 100), (98, 98, 2, 2)),  # last cell clipped to the frame
        ((5, 5, 2, 2), (64, 64), (32, 32), (2, 2, 2, 2)),  # downscale: [2.5, 3.5) touches pixels 2 and 3
        ((5, 5, 1, 1), (64, 64), (16, 16), (1, 1, 1, 1)),  # a cell smaller than a pixel keeps one pixel
    ],
)
def test_map_bbox_to_frame(bbox, map_size, frame_size, expected):
    assert map_bbox_to_frame(bbox, map_size, frame_size) == expected


def test_one_blob_is_mapped_to_frame_pixels_with_area_and_peak():
    amap = blank()
    amap[20:23, 10:14] = 0.8  # 4 wide, 3 high at map (x=10, y=20)
    amap[21, 12] = 0.95
    regions = find_regions(amap, pixel_threshold=0.5, min_area=4, frame_size=(192, 128))
    assert len(regions) == 1
    r = regions[0]
    assert r.bbox == (30, 40, 12, 6)  # x*3, y*2 in a 192x128 frame
    assert r.area == 12 * 3 * 2  # 12 map pixels, each 3x2 frame pixels
    assert r.peak == pytest.approx(0.95)


def test_min_area_is_in_map_pixels_and_threshold_is_strict():
    amap = blank()
    amap[5:7, 5:7] = 0.9  # 4 pixels
    amap[30:32, 30] = 0.9  # 2 pixels
    amap[50, 50] = 0.5  # equal to the threshold: not above it
    regions = find_regions(amap, 0.5, min_area=3, frame_size=(640, 640))
    assert [r.bbox for r in regions] == [(50, 50, 20, 20)]
    assert len(find_regions(amap, 0.5, min_area=2, frame_size=(64, 64))) == 2


def test_diagonal_pixels_are_one_region_and_peaks_sort_regions():
    amap = blank()
    amap[10, 10] = amap[11, 11] = amap[12, 12] = 0.7  # 8-connected diagonal
    amap[40:42, 40:42] = 0.9
    regions = find_regions(amap, 0.5, min_area=1, frame_size=(64, 64))
    assert [r.bbox for r in regions] == [(40, 40, 2, 2), (10, 10, 3, 3)]
    assert regions[0].peak > regions[1].peak


def test_max_regions_keeps_the_highest_peaks():
    amap = blank()
    for i in range(10):
        amap[2 + 6 * i, 2] = 0.6 + 0.01 * i
    regions = find_regions(amap, 0.5, 1, (64, 64), max_regions=3)
    assert [round(r.peak, 2) for r in regions] == [0.69, 0.68, 0.67]


def test_nothing_above_threshold_and_model_shaped_maps():
    assert find_regions(blank(), 0.1, 1, (64, 64)) == []
    amap = blank()[None, None]
    amap[0, 0, 3, 3] = 1.0
    assert len(find_regions(amap, 0.5, 1, (64, 64))) == 1  # (1, 1, H, W) straight from the backend
    with pytest.raises(ValueError, match="2D"):
        find_regions(np.zeros((2, 8, 8), np.float32), 0.5, 1, (8, 8))
    with pytest.raises(ValueError, match="frame_size"):
        find_regions(blank(), 0.5, 1, (0, 10))


@pytest.mark.parametrize(
    "score, image_threshold, defective",
    [
        (0.51, 0.5, True),  # above
        (0.5, 0.5, False),  # equal is good
        (0.2, 0.5, False),  # below
    ],
)
def test_verdict(score, image_threshold, defective):
    regions = [Region((1, 2, 3, 4), 12, 0.9)]
    v = verdict(score, regions, thresholds(image=image_threshold))
    assert v.defective is defective
    assert v.image_threshold == image_threshold and v.regions == regions


def test_union_overlap_and_region_dict():
    regions = [Region((10, 10, 5, 5), 25, 0.9), Region((30, 2, 4, 20), 80, 0.7)]
    assert union_bbox(regions) == (10, 2, 24, 20)
    assert union_bbox([]) is None
    assert bbox_overlap((0, 0, 10, 10), (5, 5, 10, 10)) == 25
    assert bbox_overlap((0, 0, 10, 10), (10, 0, 5, 5)) == 0
    d = regions[0].to_dict()
    assert d == {"bbox": [10, 10, 5, 5], "area": 25, "peak": 0.9} and type(d["bbox"][0]) is int


def test_crop_is_the_regions_union_with_margin_and_bounded_size():
    image = np.zeros((400, 600, 3), np.uint8)
    image[100:200, 300:500] = 255
    regions = [Region((300, 100, 200, 100), 20000, 1.0)]
    x, y, w, h = crop_box(regions, (600, 400))
    assert x < 300 and y < 100 and x + w > 500 and y + h > 200  # margin around the union
    data = base64.b64decode(encode_crop(image, regions, max_px=64, quality=80))
    crop = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert max(crop.shape[:2]) <= 64 and crop.mean() > 100  # mostly the bright defect
    assert encode_crop(image, [], 64, 80) is None


def test_frames_store_keeps_its_bounds_and_takes_stock_after_restart(tmp_path):
    from datetime import datetime, timedelta, timezone

    rng = np.random.default_rng(0)
    t0 = datetime(2024, 5, 1, tzinfo=timezone.utc)
    store = FramesStore(tmp_path / "frames", max_files=3, max_bytes=10_000_000, jpeg_quality=90)
    store.open()
    paths = [store.save(rng.integers(0, 255, (64, 64), dtype=np.uint8), t0 + timedelta(seconds=i), "cam0", i)
             for i in range(5)]
    left = sorted(p.name for p in (tmp_path / "frames").iterdir())
    assert left == sorted(p.name for p in paths[2:])  # the oldest two were deleted
    assert store.deleted == 2 and store.count == 3
    size = sum(p.stat().st_size for p in paths[2:])
    assert store.total_bytes == size
    # a restart with a smaller byte bound deletes the oldest until it fits
    again = FramesStore(tmp_path / "frames", max_files=100, max_bytes=size - 1, jpeg_quality=90)
    again.open()
    assert again.count == 2 and not paths[2].exists() and paths[4].exists()


def test_count_regions_uses_strict_threshold_min_area_and_8_connectivity() -> None:
    m = np.zeros((20, 20), np.float32)
    m[2:4, 2:5] = 1.0  # 6 pixels
    m[10:14, 10:13] = 1.0  # 12 pixels
    m[14, 13] = 1.0  # touches the 12-pixel blob by a corner only: same region with 8-connectivity
    m[18, 18] = 0.5  # exactly at the threshold: not above it
    assert sorted(component_areas(m, 0.5).tolist()) == [6, 13]
    assert count_regions(m, 0.5, min_area=7) == 1
    assert count_regions(m, 0.5, min_area=6) == 2
    assert count_regions(m, 0.49, min_area=1) == 3
    # what calibration counts is what the agent reports
    assert len(find_regions(m, 0.5, min_area=6, frame_size=(20, 20))) == count_regions(m, 0.5, min_area=6)
