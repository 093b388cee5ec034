"""The `camera` section of agent.yaml: which source, and how the capture loop keeps it alive.

Read by the agent (agent.config, as part of agent.yaml) and by calibration (`daad-calibrate capture --config`,
which opens the same camera); the source models are named *Config so they never read as the FrameSource
classes of camera.sources that they configure.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Literal, Optional, Union

from pydantic import Field

from typing_extensions import Annotated  # typing.Annotated is 3.9+; typing_extensions comes with pydantic

from engine.config_file import ConfigSection, show

NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"  # used in MQTT topics, event ids and file names


# -- camera sources (one of, chosen by `kind`) ----------------------------------------------------
class V4l2Config(ConfigSection):
    kind: Literal["v4l2"] = Field(description="USB / V4L2 camera through OpenCV's V4L2 backend")
    device: Union[int, str] = Field(0, description="device index (0) or path (/dev/video0)")
    width: Optional[int] = Field(None, ge=16, le=16384, description="requested width; None keeps the driver's")
    height: Optional[int] = Field(None, ge=16, le=16384, description="requested height; None keeps the driver's")
    fps: Optional[float] = Field(None, gt=0, le=1000, description="requested frame rate; None keeps the driver's")


class GstreamerConfig(ConfigSection):
    kind: Literal["gstreamer"] = Field(description="any GStreamer pipeline ending in an appsink (needs JetPack's OpenCV)")
    pipeline: str = Field(min_length=1, description="pipeline string; must end with `appsink`")


class CsiConfig(ConfigSection):
    kind: Literal["csi"] = Field(description="Jetson CSI camera through nvarguscamerasrc")
    sensor_id: int = Field(0, ge=0, le=15, description="Argus sensor id")
    width: int = Field(1920, ge=16, le=16384, description="capture width in pixels")
    height: int = Field(1080, ge=16, le=16384, description="capture height in pixels")
    fps: int = Field(30, ge=1, le=1000, description="capture frame rate")


class RtspConfig(ConfigSection):
    kind: Literal["rtsp"] = Field(description="H.264 RTSP stream decoded by the Jetson's hardware decoder")
    uri: str = Field(pattern=r"^rtsps?://", description="rtsp://host:port/path")
    latency_ms: int = Field(200, ge=0, le=10000, description="rtspsrc jitter buffer")


class VideoConfig(ConfigSection):
    kind: Literal["video"] = Field(description="a video file (demo, tests, replaying a recorded line)")
    path: Path = Field(description="video file")
    loop: bool = Field(False, description="start again at the end (the file is reopened each time)")
    realtime: bool = Field(False, description="pace frames at the file's frame rate, like a camera")


class FolderConfig(ConfigSection):
    kind: Literal["folder"] = Field(description="image files in a folder, in name order")
    path: Path = Field(description="folder of images")
    watch: bool = Field(False, description="keep watching for new files instead of ending after the last one")
    poll_s: float = Field(0.5, gt=0, le=60, description="seconds between scans for new files when watching")
    pattern: str = Field("*", min_length=1, description="glob of file names to read (only image files are read)")
    settle_s: float = Field(0.2, ge=0, le=60, description="a new file is read once its size is unchanged this long")


SourceConfig = Annotated[
    Union[V4l2Config, GstreamerConfig, CsiConfig, RtspConfig, VideoConfig, FolderConfig], Field(discriminator="kind")
]
SOURCE_KINDS = ("v4l2", "gstreamer", "csi", "rtsp", "video", "folder")


class CameraConfig(ConfigSection):
    name: str = Field("cam0", min_length=1, max_length=64, pattern=NAME_PATTERN, description="camera id in events")
    source: SourceConfig = Field(description="where frames come from")
    mode: Literal["latest", "every"] = Field(
        "latest", description="latest: score the newest frame, drop stale ones (live cameras); every: score all (files)"
    )
    queue_size: int = Field(8, ge=1, le=1024, description="frames buffered between capture and scoring in mode every")
    stall_timeout_s: float = Field(20.0, gt=0, le=3600, description="no frame for this long: close and reopen")
    reopen_min_s: float = Field(1.0, gt=0, le=3600, description="first wait before reopening a failed camera")
    reopen_max_s: float = Field(10.0, gt=0, le=3600, description="the wait doubles up to this")


def camera_problems(camera: CameraConfig, check_files: bool = True) -> List[str]:
    """Cross-field rules and the files a source needs; one `camera.key.path: got X, expected Y` per problem."""
    problems: List[str] = []
    if camera.reopen_min_s > camera.reopen_max_s:
        problems.append(
            f"camera.reopen_min_s: got {camera.reopen_min_s:g} > reopen_max_s {camera.reopen_max_s:g}, "
            "expected reopen_min_s <= reopen_max_s"
        )
    src = camera.source
    if isinstance(src, GstreamerConfig) and "appsink" not in src.pipeline:
        problems.append(f"camera.source.pipeline: got {show(src.pipeline)}, expected a pipeline ending in appsink")
    if check_files:
        problems += camera_file_problems(camera)
    return problems


def camera_file_problems(camera: CameraConfig) -> List[str]:
    """A video file or image folder source that is not there."""
    src = camera.source
    if isinstance(src, VideoConfig) and not src.path.is_file():
        return [f"camera.source.path: got '{src.path}' (not a file), expected a video file"]
    if isinstance(src, FolderConfig) and not src.path.is_dir():
        return [f"camera.source.path: got '{src.path}' (not a directory), expected a folder of images"]
    return []
