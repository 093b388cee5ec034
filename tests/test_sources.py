"""camera.sources and camera.loop with real files: OpenCV video (MJPG .avi), image folders, threads."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import List, Optional

import cv2
import numpy as np
import pytest

from camera import loop as cap
from camera.loop import CaptureLoop
from camera.config import CameraConfig
from camera.sources import (
    CameraSetupError,
    FolderSource,
    Frame,
    FrameSource,
    OpenCVSource,
    csi_pipeline,
    gstreamer_available,
    open_source,
    redact_uri,
    rtsp_pipeline,
)
from engine.errors import CameraError
from train.synthetic import make_good

SIZE = 64


def write_video(path: Path, n: int, fps: float = 20.0) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (SIZE, SIZE), True)
    assert writer.isOpened(), "OpenCV cannot write MJPG here"
    for i in range(n):
        frame = cv2.cvtColor(make_good(0, i, SIZE), cv2.COLOR_GRAY2BGR)
        cv2.putText(frame, str(i), (2, 12), cv2.FONT_HERSHEY_PLAIN, 1.0, (255, 255, 255))
        writer.write(frame)
    writer.release()
    return path


def read_all(source: FrameSource, limit: int = 1000) -> List[Frame]:
    frames = []
    for _ in range(limit):
        frame = source.read()
        if frame is None:
            if source.ended:
                break
            continue
        frames.append(frame)
    return frames


# -- pipeline strings (jetson.md, exactly) ---------------------------------------------------------
def test_csi_pipeline_is_the_documented_one():
    assert csi_pipeline(0, 1920, 1080, 30) == (
        "nvarguscamerasrc sensor-id=0 ! video/x-raw(memory:NVMM),width=1920,height=1080,framerate=30/1"
        " ! nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! appsink drop=true"
        " max-buffers=1 sync=false"
    )
    assert "sensor-id=1" in csi_pipeline(1, 1280, 720, 60) and "framerate=60/1" in csi_pipeline(1, 1280, 720, 60)


def test_rtsp_pipeline_is_the_documented_one():
    assert rtsp_pipeline("rtsp://10.0.0.5:554/s1", 200) == (
        "rtspsrc location=rtsp://10.0.0.5:554/s1 latency=200 protocols=tcp ! rtph264depay ! h264parse ! nvv4l2decoder"
        " ! nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! appsink drop=true"
        " max-buffers=1 sync=false"
    )


@pytest.mark.parametrize(
    "uri",
    [
        "http://cam/x",  # not RTSP
        "rtsp://cam/a b",  # a space would split the pipeline
        "rtsp://cam/x ! fakesink",  # an injected element
        "rtsp://cam/\"x\"",  # quotes
    ],
)
def test_rtsp_pipeline_refuses_unsafe_uris(uri):
    with pytest.raises(CameraSetupError, match="rtsp_pipeline: uri"):
        rtsp_pipeline(uri)


def test_csi_pipeline_refuses_bad_numbers():
    with pytest.raises(CameraSetupError, match="width"):
        csi_pipeline(0, 0, 1080, 30)


def test_uri_passwords_are_redacted():
    assert redact_uri("rtsp://admin:s3cret@10.0.0.5/live") == "rtsp://admin:***@10.0.0.5/live"
    assert redact_uri("rtsp://10.0.0.5/live") == "rtsp://10.0.0.5/live"
    source = open_source(CameraConfig.model_validate({"source": {"kind": "rtsp", "uri": "rtsp://u:pw@h/x"}}))
    assert "pw" not in source.describe()


@pytest.mark.skipif(gstreamer_available(), reason="this OpenCV has GStreamer (a Jetson)")
def test_gstreamer_without_gstreamer_says_why():
    source = open_source(CameraConfig.model_validate({"source": {"kind": "csi"}}))
    with pytest.raises(CameraSetupError, match="without GStreamer.*system-site-packages"):
        source.open()


@pytest.mark.parametrize(
    "source, kind, target",
    [
        ({"kind": "v4l2", "device": "/dev/video3"}, OpenCVSource, "/dev/video3"),  # device path
        ({"kind": "v4l2", "device": 2}, OpenCVSource, 2),  # index
        ({"kind": "gstreamer", "pipeline": "videotestsrc ! appsink"}, OpenCVSource, "videotestsrc ! appsink"),
        ({"kind": "csi", "sensor_id": 1}, OpenCVSource, csi_pipeline(1, 1920, 1080, 30)),
        ({"kind": "rtsp", "uri": "rtsp://h/x"}, OpenCVSource, rtsp_pipeline("rtsp://h/x", 200)),
    ],
)
def test_open_source_builds_the_right_source(source, kind, target):
    built = open_source(CameraConfig.model_validate({"source": source}))
    assert isinstance(built, kind) and built.target == target


def test_v4l2_missing_device_is_a_camera_error():
    source = open_source(CameraConfig.model_validate({"source": {"kind": "v4l2", "device": "/dev/video99"}}))
    with pytest.raises(CameraError, match="/dev/video99"):
        source.open()


# -- video files -----------------------------------------------------------------------------------
def test_video_frames_in_order_then_ended(tmp_path):
    path = write_video(tmp_path / "clip.avi", 5)
    source = open_source(CameraConfig.model_validate({"source": {"kind": "video", "path": str(path)}}))
    source.open()
    frames = read_all(source)
    source.close()
    assert [f.seq for f in frames] == [0, 1, 2, 3, 4] and source.ended
    f = frames[0]
    assert f.image.shape == (SIZE, SIZE, 3) and f.image.dtype == np.uint8
    assert f.timestamp.tzinfo is not None and f.timestamp.utcoffset().total_seconds() == 0
    assert f.source_id == "clip.avi" and f.grabbed > 0


def test_video_loop_reopens_and_seq_keeps_counting(tmp_path):
    path = write_video(tmp_path / "clip.avi", 3)
    source = OpenCVSource(str(path), cv2.CAP_ANY, "clip.avi", is_file=True, loop=True)
    source.open()
    frames = [source.read() for _ in range(7)]
    assert [f.seq for f in frames] == list(range(7)) and not source.ended
    os.rename(path, tmp_path / "away.avi")  # the next loop notices the file is gone
    with pytest.raises(CameraError, match="not found"):
        for _ in range(4):
            source.read()
    source.close()


def test_video_realtime_paces_at_the_file_rate(tmp_path):
    path = write_video(tmp_path / "clip.avi", 6, fps=50.0)
    source = OpenCVSource(str(path), cv2.CAP_ANY, "clip.avi", is_file=True, realtime=True)
    source.open()
    t0 = time.monotonic()
    assert len(read_all(source)) == 6
    assert time.monotonic() - t0 >= 5 / 50.0 * 0.9  # 6 frames at 50 fps span 5 periods
    source.close()


def test_missing_video_is_a_camera_error(tmp_path):
    source = OpenCVSource(str(tmp_path / "none.avi"), cv2.CAP_ANY, "none.avi", is_file=True)
    with pytest.raises(CameraError, match="none.avi: video file not found"):
        source.open()


# -- folders ---------------------------------------------------------------------------------------
def write_png(path: Path, index: int = 0) -> Path:
    cv2.imwrite(str(path), make_good(0, index, SIZE))
    return path


def test_folder_in_name_order_skipping_corrupt_and_non_images(tmp_path, caplog):
    for name in ("b.png", "a.png", "d.jpg"):
        write_png(tmp_path / name)
    (tmp_path / "c.png").write_bytes(b"definitely not a png")
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / ".partial.png").write_bytes(b"hidden: being written")
    source = FolderSource(tmp_path)
    source.open()
    frames = read_all(source)
    assert [f.source_id for f in frames] == ["a.png", "b.png", "d.jpg"]
    assert [f.seq for f in frames] == [0, 1, 2] and source.ended and source.skipped == 1
    assert "c.png" in caplog.text


def test_folder_pattern_narrows(tmp_path):
    for name in ("cam1_0.png", "cam2_0.png", "cam1_1.png"):
        write_png(tmp_path / name)
    source = FolderSource(tmp_path, pattern="cam1_*")
    source.open()
    assert [f.source_id for f in read_all(source)] == ["cam1_0.png", "cam1_1.png"]


def test_watched_folder_reads_new_files_once_they_are_stable(tmp_path):
    write_png(tmp_path / "000.png")
    source = FolderSource(tmp_path, watch=True, poll_s=0.02, settle_s=0.5)
    source.open()

    def next_frame(timeout: float = 3.0) -> Optional[Frame]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            frame = source.read()
            if frame is not None:
                return frame
        return None

    assert next_frame().source_id == "000.png"
    data = cv2.imencode(".png", make_good(0, 1, SIZE))[1].tobytes()
    chunk = len(data) // 6 + 1
    with open(tmp_path / "001.png", "wb") as fh:  # a camera writing slowly, a piece at a time
        for start in range(0, len(data), chunk):
            fh.write(data[start:start + chunk])
            fh.flush()
            assert source.read() is None  # the size keeps changing: never read half a PNG
            time.sleep(0.03)
    frame = next_frame()
    assert frame.source_id == "001.png" and frame.image.shape == (SIZE, SIZE)
    assert source.skipped == 0 and not source.ended
    source.close()


def test_missing_folder_is_a_camera_error(tmp_path):
    with pytest.raises(CameraError, match="image folder not found"):
        FolderSource(tmp_path / "nope").open()


# -- capture thread --------------------------------------------------------------------------------
def drain(capture: CaptureLoop, delay: float = 0.0, timeout: float = 10.0) -> List[Frame]:
    got = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        frame = capture.get(0.05)
        if frame is not None:
            got.append(frame)
            time.sleep(delay)
        elif capture.finished:
            break
    return got


def test_mode_every_applies_back_pressure_and_drops_nothing(tmp_path):
    path = write_video(tmp_path / "clip.avi", 12)
    source = OpenCVSource(str(path), cv2.CAP_ANY, "clip.avi", is_file=True)
    capture = CaptureLoop(source, mode="every", queue_size=2)
    capture.start()
    got = drain(capture, delay=0.01)  # a slow scorer
    capture.stop()
    assert [f.seq for f in got] == list(range(12))
    assert capture.dropped == 0 and capture.state == cap.ENDED


def test_mode_latest_keeps_the_newest_and_counts_the_rest(tmp_path):
    path = write_video(tmp_path / "clip.avi", 30)
    source = OpenCVSource(str(path), cv2.CAP_ANY, "clip.avi", is_file=True)
    capture = CaptureLoop(source, mode="latest")
    capture.start()
    got = drain(capture, delay=0.02)  # much slower than decoding
    capture.stop()
    seqs = [f.seq for f in got]
    assert seqs == sorted(seqs) and seqs[-1] == 29  # the last frame always wins
    assert capture.dropped > 0 and len(got) + capture.dropped == capture.captured == 30


class SilentCamera(FrameSource):
    """Opens, then gives frames only while `frames_left` > 0, like a camera that froze (a test double
    of the camera interface; real files are used wherever the behaviour is about files)."""

    def __init__(self, frames: int, fail_opens: int = 0) -> None:
        super().__init__("silent")
        self.frames_left = frames
        self.fail_opens = fail_opens
        self.opens = 0
        self.open_times: List[float] = []

    def open(self) -> None:
        self.open_times.append(time.monotonic())
        if self.fail_opens > 0:
            self.fail_opens -= 1
            raise CameraError("silent: cannot open")
        self.opens += 1

    def read(self) -> Optional[Frame]:
        if self.frames_left > 0:
            self.frames_left -= 1
            return self._stamp(np.zeros((8, 8), np.uint8), "silent")
        time.sleep(0.01)
        return None

    def close(self) -> None:
        pass


def test_stall_closes_and_reopens_with_backoff():
    camera = SilentCamera(frames=2)
    states: List[str] = []
    capture = CaptureLoop(camera, stall_timeout_s=0.2, reopen_min_s=0.05, reopen_max_s=0.2, on_state=states.append)
    capture.start()
    deadline = time.monotonic() + 5
    while camera.opens < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    capture.stop()
    assert camera.opens >= 3 and capture.stalls >= 2 and capture.reconnects >= 2
    assert states[:2] == [cap.STREAMING, cap.STALLED]


def test_failed_opens_back_off_exponentially_up_to_the_max():
    camera = SilentCamera(frames=1, fail_opens=4)
    states: List[str] = []
    capture = CaptureLoop(camera, stall_timeout_s=5, reopen_min_s=0.05, reopen_max_s=0.2, on_state=states.append)
    capture.start()
    deadline = time.monotonic() + 5
    while camera.opens < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    frame = capture.get(1.0)
    capture.stop()
    gaps = np.diff(camera.open_times[:5])
    assert frame is not None and camera.opens == 1
    assert gaps[0] >= 0.045 and gaps[1] >= 0.095 and gaps[2] >= 0.19 and gaps[3] < 0.4  # 0.05, 0.1, 0.2, 0.2
    # a failed first open is "reconnecting" with its cause, not a silent "connecting" (issue 36)
    assert capture.state == cap.STREAMING and states == [cap.RECONNECTING, cap.STREAMING]
    assert capture.open_failures == 4 and capture.last_error is None  # the cause is cleared by a frame


def test_setup_error_is_state_error_and_stop_is_prompt():
    class NoGstreamer(SilentCamera):
        def open(self) -> None:
            raise CameraSetupError("no GStreamer")

    capture = CaptureLoop(NoGstreamer(0), reopen_min_s=0.05, reopen_max_s=30)
    capture.start()
    deadline = time.monotonic() + 2
    while capture.state != cap.ERROR and time.monotonic() < deadline:
        time.sleep(0.01)
    t0 = time.monotonic()
    capture.stop()
    assert capture.state == cap.ERROR and time.monotonic() - t0 < 1.0  # the 30 s wait is interrupted


def test_calibration_capture_keeps_what_came_before_a_stall_and_names_a_failure_before_any():
    """calibration's camera capture reads through the same loop: it ends at the first failure (no reopen) with the
    frames it has, and a camera that never gave a frame is an error naming the cause."""
    from calibration.capture import camera_frames

    loop = CaptureLoop(SilentCamera(frames=3), mode="every", stall_timeout_s=0.2, reopen_min_s=0.5)
    loop.start()
    try:
        names = [name for name, _ in camera_frames(loop)]
    finally:
        loop.stop()
    assert names == ["silent#0", "silent#1", "silent#2"] and loop.stalls == 1 and loop.reconnects == 0

    loop = CaptureLoop(SilentCamera(frames=3, fail_opens=100), mode="every", reopen_min_s=0.5)
    loop.start()
    try:
        with pytest.raises(CameraError, match="camera silent: silent: cannot open; check the `camera` section"):
            next(camera_frames(loop))
    finally:
        loop.stop()


def test_blocked_read_is_unblocked_by_the_stall_watchdog():
    class Frozen(SilentCamera):
        """read() blocks until close(), like a driver waiting for a camera that stopped sending."""

        def __init__(self) -> None:
            super().__init__(0)
            self.released = threading.Event()

        def open(self) -> None:
            super().open()
            self.released.clear()

        def read(self) -> Optional[Frame]:
            self.released.wait(10)
            raise CameraError("frozen: released")

        def close(self) -> None:
            self.released.set()

    camera = Frozen()
    capture = CaptureLoop(camera, stall_timeout_s=0.2, reopen_min_s=0.05, reopen_max_s=0.1)
    capture.start()
    deadline = time.monotonic() + 5
    while camera.opens < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    capture.stop()
    assert camera.opens >= 2 and capture.stalls >= 1 and not capture.wedged()


def test_v4l2_failure_cause_names_the_device_and_the_fix(tmp_path):
    from camera.sources import v4l2_failure_cause

    assert v4l2_failure_cause(str(tmp_path / "video9")).startswith("does not exist (camera unplugged")
    plain = tmp_path / "video0"
    plain.write_text("")
    assert "is not a device file" in v4l2_failure_cause(str(plain))
    assert "busy in another process" in v4l2_failure_cause("/dev/null")  # a character device that is no camera
