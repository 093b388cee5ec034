"""Frame sources: one small interface in front of cameras, video files and image folders.

`FrameSource.read()` returns the next `Frame`, or None when none is available yet (a watched
folder, a paced video) or the source has ended (`ended` is then True); a broken camera raises
CameraError, and the capture thread closes and reopens it. The hardware paths (V4L2, CSI and
RTSP through GStreamer) are one OpenCV call each; what can be tested here is everything around
them: the pipeline strings, files, folders, reopening.
"""
from __future__ import annotations

import fnmatch
import logging
import os
import re
import stat
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Deque, Dict, List, NamedTuple, Optional, Set, Tuple, Union

import numpy as np

from engine.errors import CameraError, ImageError
from engine.preprocess import IMAGE_SUFFIXES, read_image

logger = logging.getLogger(__name__)

FOLDER_WAIT_TICK_S = 0.05  # a watched folder's read() returns None after at most this long
_UNSAFE_IN_PIPELINE = re.compile(r"[\s!\"']")  # would break gst_parse_launch's syntax


class Frame(NamedTuple):
    seq: int  # per source, counts every frame read (gaps downstream = dropped frames)
    image: np.ndarray  # OpenCV layout: HxW gray or HxWx3 BGR, uint8/uint16
    timestamp: datetime  # UTC, when it was grabbed
    source_id: str  # file name, device or redacted URI
    grabbed: float = 0.0  # clock.monotonic() when grabbed (grab-to-publish latency)


class Clock:
    """Wall time for timestamps, monotonic time for durations; injected so tests can control both."""

    def now(self) -> datetime:
        return datetime.now(timezone.utc)

    def monotonic(self) -> float:
        return time.monotonic()


SYSTEM_CLOCK = Clock()


class CameraSetupError(CameraError):
    """The source cannot work as configured (e.g. OpenCV without GStreamer); retrying is unlikely to help."""


class FrameSource(ABC):
    """open() -> read()* -> close(); may be reopened after close()."""

    detects_stalls = True  # False where no frame for a long time is normal (a watched folder)

    def __init__(self, source_id: str, clock: Optional[Clock] = None) -> None:
        self.source_id = source_id
        self.clock = clock or SYSTEM_CLOCK
        self.ended = False
        self._seq = 0  # survives reopening: seq stays unique for the life of the process

    @abstractmethod
    def open(self) -> None:
        """Open the device/file; CameraError when it cannot."""

    @abstractmethod
    def read(self) -> Optional[Frame]:
        """Next frame; None if none yet or ended (see `ended`); CameraError when the source broke."""

    @abstractmethod
    def close(self) -> None:
        """Release the device; safe to call twice, and from another thread to unblock a read."""

    def describe(self) -> str:
        return f"{type(self).__name__}({self.source_id})"

    def _stamp(self, image: np.ndarray, source_id: str) -> Frame:
        frame = Frame(self._seq, image, self.clock.now(), source_id, self.clock.monotonic())
        self._seq += 1
        return frame


# -- GStreamer pipeline strings (jetson.md, Cameras) -------------------------------------------------
APPSINK = "appsink drop=true max-buffers=1 sync=false"
TO_BGR = "nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR"


def csi_pipeline(sensor_id: int = 0, width: int = 1920, height: int = 1080, fps: int = 30) -> str:
    """Argus CSI camera -> BGR appsink that keeps only the newest buffer."""
    for name, value in (("sensor_id", sensor_id), ("width", width), ("height", height), ("fps", fps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "sensor_id" else 1):
            raise CameraSetupError(f"csi_pipeline: {name}: got {value!r}, expected a positive integer")
    return (
        f"nvarguscamerasrc sensor-id={sensor_id} ! "
        f"video/x-raw(memory:NVMM),width={width},height={height},framerate={fps}/1 ! {TO_BGR} ! {APPSINK}"
    )


def rtsp_pipeline(uri: str, latency_ms: int = 200) -> str:
    """H.264 over RTSP (TCP) -> hardware decoder -> BGR appsink that keeps only the newest buffer."""
    if not isinstance(uri, str) or not re.match(r"^rtsps?://\S+$", uri) or _UNSAFE_IN_PIPELINE.search(uri):
        raise CameraSetupError(
            f"rtsp_pipeline: uri: got {redact_uri(str(uri))!r}, expected rtsp://host[:port]/path without spaces, quotes or '!'"
        )
    if isinstance(latency_ms, bool) or not isinstance(latency_ms, int) or latency_ms < 0:
        raise CameraSetupError(f"rtsp_pipeline: latency_ms: got {latency_ms!r}, expected an integer >= 0")
    return (
        f"rtspsrc location={uri} latency={latency_ms} protocols=tcp ! rtph264depay ! h264parse ! "
        f"nvv4l2decoder ! {TO_BGR} ! {APPSINK}"
    )


def redact_uri(uri: str) -> str:
    """rtsp://user:secret@host/x -> rtsp://user:***@host/x (never log a password)."""
    return re.sub(r"^([a-z]+://[^:/@\s]+):[^@/\s]*@", r"\1:***@", uri)


def gstreamer_available() -> bool:
    """Whether this OpenCV was built with GStreamer (JetPack's is; pip's is not)."""
    import cv2

    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return "YES" in line.upper()
    return False


def v4l2_failure_cause(device: str) -> str:
    """Why OpenCV could not open a V4L2 device, as far as the file system tells (OpenCV only warns)."""
    path = Path(device)
    if not path.exists():
        return ("does not exist (camera unplugged, or another number: see `ls /dev/video*` and set "
                "camera.source.device)")
    if not stat.S_ISCHR(path.stat().st_mode):
        return "is not a device file; set camera.source.device to a /dev/videoN capture node"
    if not os.access(str(path), os.R_OK | os.W_OK):
        return ("permission denied for this user; add the service user to group video "
                "(SupplementaryGroups=video in the unit, DeviceAllow=/dev/video* rw)")
    return ("exists but could not be opened: busy in another process (`fuser " + device + "`), or not a "
            "capture node (USB cameras also create metadata nodes; try the other /dev/videoN)")


# -- OpenCV: V4L2 devices, video files, GStreamer pipelines -----------------------------------------
class OpenCVSource(FrameSource):
    """cv2.VideoCapture behind the FrameSource interface."""

    def __init__(
        self,
        target: Union[int, str],
        api: int,
        source_id: str,
        *,
        is_file: bool = False,
        loop: bool = False,
        realtime: bool = False,
        props: Optional[Dict[int, float]] = None,
        clock: Optional[Clock] = None,
    ) -> None:
        super().__init__(source_id, clock)
        self.target = target
        self.api = api
        self.is_file = is_file
        self.loop = loop
        self.realtime = realtime
        self.props = dict(props or {})
        self._cap: Any = None
        self._period_s = 0.0  # realtime pacing of files
        self._next_due = 0.0

    def open(self) -> None:
        import cv2

        self.ended = False
        if self.api == cv2.CAP_GSTREAMER and not gstreamer_available():
            raise CameraSetupError(
                f"{self.source_id}: OpenCV {cv2.__version__} was built without GStreamer, so it cannot open a "
                "GStreamer pipeline; on a Jetson use JetPack's OpenCV (a venv made with --system-site-packages)"
            )
        if self.is_file and not Path(str(self.target)).is_file():
            raise CameraError(f"{self.target}: video file not found")
        cap = cv2.VideoCapture(self.target, self.api)
        if not cap.isOpened():
            cap.release()
            if self.api == cv2.CAP_V4L2:
                raise CameraError(f"{self.source_id}: {v4l2_failure_cause(self.source_id)}")
            raise CameraError(f"{self.source_id}: cannot open (device busy, unplugged, or not a readable stream)")
        for prop, value in self.props.items():
            if not cap.set(prop, value):
                logger.warning("camera %s: property %d=%s not accepted by the driver", self.source_id, prop, value)
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self._period_s = 1.0 / fps if (self.realtime and fps > 0) else 0.0
        self._next_due = self.clock.monotonic()
        self._cap = cap
        logger.debug("camera %s: opened", self.source_id)

    def read(self) -> Optional[Frame]:
        cap = self._cap
        if cap is None:
            raise CameraError(f"{self.source_id}: read from a closed source")
        ok, image = cap.read()
        if not ok or image is None:
            if not self.is_file:
                raise CameraError(f"{self.source_id}: no frame from the device (disconnected or stream ended)")
            if not self.loop:
                self.ended = True
                return None
            # Looping reopens the file, so a file replaced (or removed) on disk is noticed.
            self.close()
            self.open()
            cap = self._cap
            ok, image = cap.read()
            if not ok or image is None:
                raise CameraError(f"{self.source_id}: the video file has no readable frame")
        if self._period_s:
            self._pace()
        return self._stamp(image, self.source_id)

    def _pace(self) -> None:
        now = self.clock.monotonic()
        if self._next_due > now:
            time.sleep(self._next_due - now)
        # a reader that fell behind does not burst to catch up
        self._next_due = max(self._next_due, now) + self._period_s

    def close(self) -> None:
        cap, self._cap = self._cap, None
        if cap is not None:
            cap.release()


# -- image folders ---------------------------------------------------------------------------------
class FolderSource(FrameSource):
    """Images in name order; optionally watch for new ones. Corrupt files are logged and skipped;
    a file still being written (size or mtime changing) is read once it has been stable settle_s."""

    def __init__(
        self,
        path: Union[str, Path],
        *,
        watch: bool = False,
        poll_s: float = 0.5,
        pattern: str = "*",
        settle_s: float = 0.2,
        clock: Optional[Clock] = None,
    ) -> None:
        super().__init__(str(path), clock)
        self.path = Path(path)
        self.watch = watch
        self.poll_s = poll_s
        self.pattern = pattern
        self.settle_s = settle_s
        self.detects_stalls = not watch
        self.skipped = 0  # unreadable files
        self._pending: Deque[Path] = deque()
        self._seen: Set[str] = set()
        self._observed: Dict[str, Tuple[Tuple[int, int], float]] = {}  # name -> ((size, mtime_ns), since)
        self._last_scan = float("-inf")
        self._opened = False
        self._wake = threading.Event()  # set by close() to end a wait early

    def open(self) -> None:
        if not self.path.is_dir():
            raise CameraError(f"{self.path}: image folder not found")
        self.ended = False
        self._opened = True
        self._wake.clear()
        self._pending.clear()
        self._observed.clear()
        self._scan()

    def _scan(self) -> None:
        try:
            names = sorted(
                e.name
                for e in self.path.iterdir()
                if not e.name.startswith(".")
                and e.suffix.lower() in IMAGE_SUFFIXES
                and fnmatch.fnmatchcase(e.name, self.pattern)
                and e.is_file()
            )
        except OSError as exc:
            raise CameraError(f"{self.path}: cannot list the image folder ({exc.strerror or exc})") from None
        present = set(names)
        self._seen &= present  # forget deleted files: memory stays bounded by the folder's size
        queued = {p.name for p in self._pending}
        self._pending.extend(self.path / n for n in names if n not in self._seen and n not in queued)
        self._last_scan = self.clock.monotonic()

    def _ready(self, path: Path) -> bool:
        """A watched file is ready once its (size, mtime) has not changed for settle_s."""
        if not self.watch:
            return True
        try:
            st = path.stat()
        except FileNotFoundError:
            return True  # gone: read_image reports it and it is skipped
        key = (st.st_size, st.st_mtime_ns)
        now = self.clock.monotonic()
        seen = self._observed.get(path.name)
        if seen is None or seen[0] != key:
            self._observed[path.name] = (key, now)
            return self.settle_s == 0 and st.st_size > 0
        return now - seen[1] >= self.settle_s

    def _next_ready(self) -> Optional[Frame]:
        while self._pending:
            path = self._pending[0]
            if not self._ready(path):
                return None
            self._pending.popleft()
            self._seen.add(path.name)
            self._observed.pop(path.name, None)
            try:
                image = read_image(path)
            except ImageError as exc:
                self.skipped += 1
                logger.warning("camera %s: skipped %s: %s", self.source_id, path.name, exc)
                continue
            return self._stamp(image, path.name)
        return None

    def read(self) -> Optional[Frame]:
        if not self._opened:
            raise CameraError(f"{self.path}: read from a closed source")
        frame = self._next_ready()
        if frame is not None:
            return frame
        if not self.watch:
            self.ended = True
            return None
        if self.clock.monotonic() - self._last_scan >= self.poll_s:
            self._scan()
            frame = self._next_ready()
            if frame is not None:
                return frame
        self._wake.wait(min(FOLDER_WAIT_TICK_S, self.poll_s))
        return None

    def close(self) -> None:
        self._opened = False
        self._wake.set()


# -- from config -----------------------------------------------------------------------------------
def open_source(camera: Any, clock: Optional[Clock] = None) -> FrameSource:
    """The FrameSource for a CameraConfig (or one of its source configs); not opened yet."""
    import cv2

    src = getattr(camera, "source", camera)
    kind = getattr(src, "kind", None)
    if kind == "v4l2":
        props: Dict[int, float] = {}
        if src.width:
            props[cv2.CAP_PROP_FRAME_WIDTH] = src.width
        if src.height:
            props[cv2.CAP_PROP_FRAME_HEIGHT] = src.height
        if src.fps:
            props[cv2.CAP_PROP_FPS] = src.fps
        device = src.device
        if isinstance(device, str) and device.isdigit():
            device = int(device)
        source_id = f"/dev/video{device}" if isinstance(device, int) else str(device)
        return OpenCVSource(device, cv2.CAP_V4L2, source_id, props=props, clock=clock)
    if kind == "gstreamer":
        return OpenCVSource(src.pipeline, cv2.CAP_GSTREAMER, "gstreamer", clock=clock)
    if kind == "csi":
        pipeline = csi_pipeline(src.sensor_id, src.width, src.height, src.fps)
        return OpenCVSource(pipeline, cv2.CAP_GSTREAMER, f"csi{src.sensor_id}", clock=clock)
    if kind == "rtsp":
        return OpenCVSource(rtsp_pipeline(src.uri, src.latency_ms), cv2.CAP_GSTREAMER, redact_uri(src.uri), clock=clock)
    if kind == "video":
        return OpenCVSource(
            str(src.path), cv2.CAP_ANY, Path(src.path).name, is_file=True, loop=src.loop, realtime=src.realtime, clock=clock
        )
    if kind == "folder":
        return FolderSource(
            src.path, watch=src.watch, poll_s=src.poll_s, pattern=src.pattern, settle_s=src.settle_s, clock=clock
        )
    raise CameraSetupError(f"camera.source.kind: got {kind!r}, expected one of v4l2, gstreamer, csi, rtsp, video, folder")


__all__: List[str] = [
    "Frame", "Clock", "SYSTEM_CLOCK", "FrameSource", "OpenCVSource", "FolderSource", "CameraSetupError",
    "csi_pipeline", "rtsp_pipeline", "redact_uri", "gstreamer_available", "open_source", "v4l2_failure_cause",
]
