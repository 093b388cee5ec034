"""Defective frames saved as JPEG in a bounded folder, and the optional crop sent in an event.

The folder never grows past max_files or max_bytes: after each save the oldest files go. Names
(engine.saved_frames) start with the UTC time, so name order is age order, also across restarts, and end with
the frame's defect event id, so `daad-calibrate teach --events ID` finds a false alarm's frame by the id its
event carried. A failed write (disk full, read-only) is logged and counted; it never
stops scoring.
"""
from __future__ import annotations

import base64
import logging
import os
import tempfile
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import Deque, Optional, Sequence, Tuple, Union

import numpy as np

from engine.regions import Region, union_bbox
from engine.saved_frames import SUFFIX, frame_file_name

logger = logging.getLogger(__name__)

CROP_MARGIN = 0.15  # context around the defect, as a fraction of the union box


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    import cv2

    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)  # JPEG is 8-bit
    ok, buf = cv2.imencode(SUFFIX, image, [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise ValueError(f"OpenCV could not encode a {image.shape} {image.dtype} frame as JPEG")
    return buf.tobytes()


def crop_box(regions: Sequence[Region], frame_size: Tuple[int, int], margin: float = CROP_MARGIN) -> Optional[Tuple[int, int, int, int]]:
    """Union of the regions plus a margin, clipped to the frame; (x, y, w, h) or None."""
    box = union_bbox(regions)
    if box is None:
        return None
    x, y, w, h = box
    mx, my = int(round(w * margin)) + 1, int(round(h * margin)) + 1
    x0, y0 = max(0, x - mx), max(0, y - my)
    x1, y1 = min(frame_size[0], x + w + mx), min(frame_size[1], y + h + my)
    return (x0, y0, x1 - x0, y1 - y0)


def encode_crop(image: np.ndarray, regions: Sequence[Region], max_px: int, quality: int) -> Optional[str]:
    """Base64 JPEG of the regions' union (with a margin), longest side at most max_px; None without regions."""
    import cv2

    box = crop_box(regions, (int(image.shape[1]), int(image.shape[0])))
    if box is None:
        return None
    x, y, w, h = box
    crop = image[y : y + h, x : x + w]
    longest = max(w, h)
    if longest > max_px:
        scale = max_px / longest
        crop = cv2.resize(crop, (max(1, int(w * scale)), max(1, int(h * scale))), interpolation=cv2.INTER_AREA)
    return base64.b64encode(encode_jpeg(crop, quality)).decode("ascii")


class FramesStore:
    """A folder of at most max_files JPEGs and max_bytes bytes; the oldest go first."""

    def __init__(self, folder: Union[str, Path], max_files: int, max_bytes: int, jpeg_quality: int = 90) -> None:
        self.folder = Path(folder)
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.jpeg_quality = jpeg_quality
        self.saved = 0
        self.deleted = 0
        self.failed = 0
        self._files: Deque[Tuple[Path, int]] = deque()  # oldest first
        self._bytes = 0

    def open(self) -> None:
        """Create the folder and take stock of what an earlier run left (then enforce the bounds)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        existing = sorted(p for p in self.folder.iterdir() if p.suffix == SUFFIX and p.is_file())
        for p in existing:
            size = p.stat().st_size
            self._files.append((p, size))
            self._bytes += size
        self._evict()

    @property
    def count(self) -> int:
        return len(self._files)

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def save(self, image: np.ndarray, timestamp: datetime, camera: str, seq: int,
             event_id: Optional[str] = None) -> Optional[Path]:
        """Write one frame (named after its defect event where given); its path, or None when it could not be
        written (logged)."""
        path = self.folder / frame_file_name(timestamp, camera, seq, event_id)
        try:
            data = encode_jpeg(image, self.jpeg_quality)
            fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=str(self.folder))
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
        except (OSError, ValueError) as exc:
            self.failed += 1
            logger.warning("frames: could not save %s: %s", path.name, exc)
            return None
        self._files.append((path, len(data)))
        self._bytes += len(data)
        self.saved += 1
        self._evict()
        return path

    def _evict(self) -> None:
        while self._files and (len(self._files) > self.max_files or self._bytes > self.max_bytes):
            path, size = self._files.popleft()
            self._bytes -= size
            try:
                path.unlink()
                self.deleted += 1
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.warning("frames: could not delete %s: %s", path.name, exc)
