"""Defect regions and the verdict: pure functions of an anomaly map, a score and the thresholds.

One definition for the agent (what it publishes) and calibration (what it fits and checks): a region
is an 8-connected component (pixels touching by a corner belong to one region) of anomaly-map pixels
strictly above the pixel threshold, whose area in map pixels is at least the minimum defect area; a
frame is defective when its image score is strictly above the image threshold.

The anomaly map is at the model's input resolution (bundle.preprocess height x width). Components
are found there and `min_area` is in map pixels (as engine/thresholds.py defines it); each
region is then mapped back to the ORIGINAL frame by the inverse of the stretch resize that
engine.preprocess applied: map pixel (i, j) covers frame pixels [j*sx, (j+1)*sx) x [i*sy, (i+1)*sy).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

MAX_REGIONS = 32  # a mis-set pixel threshold turns noise into hundreds of regions: keep the largest peaks
CONNECTIVITY = 8  # the agent's and calibration's, both (calibration used 8 too before they were one)


class Region(NamedTuple):
    bbox: Tuple[int, int, int, int]  # x, y, w, h in original frame pixels
    area: int  # component area in frame pixels
    peak: float  # highest anomaly-map value inside the component

    def to_dict(self) -> Dict[str, Any]:
        return {"bbox": [int(v) for v in self.bbox], "area": int(self.area), "peak": float(self.peak)}


class Verdict(NamedTuple):
    defective: bool  # image score > image threshold
    score: float
    image_threshold: float
    regions: List[Region]


def map_bbox_to_frame(
    bbox: Tuple[int, int, int, int], map_size: Tuple[int, int], frame_size: Tuple[int, int]
) -> Tuple[int, int, int, int]:
    """(x, y, w, h) in map pixels -> the frame pixels those map pixels cover; sizes are (w, h)."""
    x, y, w, h = bbox
    sx = frame_size[0] / map_size[0]
    sy = frame_size[1] / map_size[1]
    x0 = max(0, int(math.floor(x * sx)))
    y0 = max(0, int(math.floor(y * sy)))
    x1 = min(frame_size[0], int(math.ceil((x + w) * sx)))
    y1 = min(frame_size[1], int(math.ceil((y + h) * sy)))
    return (x0, y0, max(1, x1 - x0), max(1, y1 - y0))


def _components(amap: np.ndarray, pixel_threshold: float) -> Optional[Tuple[int, np.ndarray, np.ndarray]]:
    """(count, labels, stats) of cv2.connectedComponentsWithStats on map > pixel_threshold; None when no pixel is
    above it. Label 0 is the background."""
    import cv2

    mask = (amap > pixel_threshold).astype(np.uint8)
    if not mask.any():
        return None
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=CONNECTIVITY)
    return int(count), labels, stats


def _map_2d(anomaly_map: np.ndarray) -> np.ndarray:
    """(H, W), also from the backend's (1, 1, H, W) or (1, H, W); ValueError otherwise."""
    amap = np.asarray(anomaly_map)
    if amap.ndim == 4 and amap.shape[:2] == (1, 1):
        amap = amap[0, 0]
    elif amap.ndim == 3 and amap.shape[0] == 1:
        amap = amap[0]
    if amap.ndim != 2:
        raise ValueError(f"anomaly_map must be 2D (H, W), got shape {tuple(np.asarray(anomaly_map).shape)}")
    return amap


def component_areas(anomaly_map: np.ndarray, pixel_threshold: float) -> np.ndarray:
    """Areas (map pixels) of every component of map > pixel_threshold, whatever their size."""
    found = _components(_map_2d(anomaly_map), pixel_threshold)
    if found is None:
        return np.zeros(0, dtype=np.int64)
    count, _, stats = found
    return stats[1:count, 4].astype(np.int64)  # stats' columns: x, y, w, h, area (as find_regions reads them)


def count_regions(anomaly_map: np.ndarray, pixel_threshold: float, min_area: int) -> int:
    """Regions the agent would report (before MAX_REGIONS): components of at least min_area map pixels."""
    return int(np.sum(component_areas(anomaly_map, pixel_threshold) >= min_area))


def find_regions(
    anomaly_map: np.ndarray,
    pixel_threshold: float,
    min_area: int,
    frame_size: Tuple[int, int],
    max_regions: int = MAX_REGIONS,
) -> List[Region]:
    """Components of map > pixel_threshold with at least min_area map pixels,
    in frame coordinates, highest peak first. frame_size is (width, height)."""
    amap = _map_2d(anomaly_map)
    fw, fh = int(frame_size[0]), int(frame_size[1])
    if fw < 1 or fh < 1:
        raise ValueError(f"frame_size must be positive (width, height), got {frame_size!r}")
    found_components = _components(amap, pixel_threshold)
    if found_components is None:
        return []
    count, labels, stats = found_components
    mh, mw = amap.shape
    cell_area = (fw / mw) * (fh / mh)
    found: List[Region] = []
    for label in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[label])
        if area < min_area:
            continue
        window = amap[y : y + h, x : x + w]
        peak = float(window[labels[y : y + h, x : x + w] == label].max())
        bbox = map_bbox_to_frame((x, y, w, h), (mw, mh), (fw, fh))
        found.append(Region(bbox=bbox, area=max(1, int(round(area * cell_area))), peak=peak))
    found.sort(key=lambda r: r.peak, reverse=True)
    return found[:max_regions]


def verdict(score: float, regions: Sequence[Region], thresholds: Any) -> Verdict:
    """Defective when the image score is above the image threshold (equal is good)."""
    threshold = float(thresholds.image_threshold)
    score = float(score)
    return Verdict(defective=score > threshold, score=score, image_threshold=threshold, regions=list(regions))


def union_bbox(regions: Sequence[Region]) -> Optional[Tuple[int, int, int, int]]:
    """The smallest (x, y, w, h) holding every region; None when there are none."""
    if not regions:
        return None
    x0 = min(r.bbox[0] for r in regions)
    y0 = min(r.bbox[1] for r in regions)
    x1 = max(r.bbox[0] + r.bbox[2] for r in regions)
    y1 = max(r.bbox[1] + r.bbox[3] for r in regions)
    return (x0, y0, x1 - x0, y1 - y0)


def bbox_overlap(a: Sequence[int], b: Sequence[int]) -> int:
    """Intersection area of two (x, y, w, h) boxes."""
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(0, w) * max(0, h)
