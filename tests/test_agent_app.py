"""The agent end to end with real parts: ONNX Runtime on the template bundle, Mosquitto, OpenCV video
files and image folders with synthetic parts, the daad-agent CLI in a subprocess, real signals and a
real unix datagram socket as NOTIFY_SOCKET. Each run scores a handful of frames.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import cv2
import jsonschema
import numpy as np
import paho.mqtt.client as mqtt
import pytest
import yaml

from agent.app import App, status_line
from agent.cli import JsonFormatter, main
from agent.config import load_config
from agent.metrics_http import MetricsServer, render_prometheus
from agent.payloads import load_schema
from engine.regions import bbox_overlap
from agent.sdnotify import SystemdNotifier
from agent.thresholds_watch import ThresholdsWatch
from engine.thresholds import Thresholds, save_thresholds
from engine.bundle import Bundle
from tests.bundle_factory import make_template_bundle
from engine.errors import ThresholdsError
from engine.onnxruntime_backend import OnnxRuntimeBackend
from engine.preprocess import preprocess
from tests.mqtt_broker import MosquittoBroker, broker_store, free_port
from train.synthetic import make_defective, make_good

PART_SIZE = 128  # synthetic parts; the bundle's input is 64x64
FRAME_SIZE = (192, 128)  # (w, h) of the video frames: stretched, so bboxes must be mapped back
GOOD_INDICES = list(range(100, 124))  # good parts the thresholds were calibrated on
PIT_OFFSET = 5000  # defective parts: dark pits, which the template model finds every time
STATION = "line1"
WAIT_S = 15.0  # generous upper bound for anything asynchronous; tests finish far sooner when it works


# -- parts and files -------------------------------------------------------------------------------
class Part(NamedTuple):
    image: np.ndarray  # uint8, gray
    defect_bbox: Optional[Tuple[int, int, int, int]]  # x, y, w, h of the true mask in frame pixels


def good(i: int, frame_size: Tuple[int, int] = (PART_SIZE, PART_SIZE)) -> Part:
    return Part(cv2.resize(make_good(0, GOOD_INDICES[i % len(GOOD_INDICES)], PART_SIZE), frame_size), None)


def pit(i: int, frame_size: Tuple[int, int] = (PART_SIZE, PART_SIZE)) -> Part:
    image, mask, _ = make_defective(0, PIT_OFFSET + i, PART_SIZE, kind="pit")
    image = cv2.resize(image, frame_size)
    mask = cv2.resize(mask, frame_size, interpolation=cv2.INTER_NEAREST)
    return Part(image, tuple(int(v) for v in cv2.boundingRect((mask > 0).astype(np.uint8))))


def parts(plan: str, frame_size: Tuple[int, int] = (PART_SIZE, PART_SIZE)) -> List[Part]:
    """'gdg' -> good, pit, good (each of a different index)."""
    return [pit(i, frame_size) if c == "d" else good(i, frame_size) for i, c in enumerate(plan)]


def write_video(path: Path, items: List[Part], fps: float = 10.0) -> Path:
    h, w = items[0].image.shape
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h), True)
    assert writer.isOpened()
    for p in items:
        writer.write(cv2.cvtColor(p.image, cv2.COLOR_GRAY2BGR))
    writer.release()
    return path


def drop_image(folder: Path, name: str, image: np.ndarray) -> Path:
    """Write as a camera should: a hidden temporary name, then an atomic rename."""
    tmp = folder / f".{name}.tmp"
    cv2.imwrite(str(tmp) + ".png", image)
    target = folder / name
    os.replace(str(tmp) + ".png", target)
    return target


def write_folder(folder: Path, items: List[Part]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(items):
        cv2.imwrite(str(folder / f"{i:03d}.png"), p.image)
    return folder


@pytest.fixture(scope="module")
def calibrated(template_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """thresholds.yaml for template_bundle: just above the good frames, as they arrive (PNG and MJPG video)."""
    backend = OnnxRuntimeBackend(template_bundle)
    spec = template_bundle.preprocess
    root = tmp_path_factory.mktemp("calibrated")
    frames = [p.image for p in parts("g" * len(GOOD_INDICES))]
    video = write_video(root / "goods.avi", parts("g" * len(GOOD_INDICES), FRAME_SIZE))
    cap = cv2.VideoCapture(str(video))
    ok, frame = cap.read()
    while ok:
        frames.append(frame)
        ok, frame = cap.read()
    cap.release()
    outs = [backend.infer(preprocess(f, spec)[None]) for f in frames]
    scores = np.array([float(o.score[0]) for o in outs])
    pixels = np.concatenate([o.anomaly_map.ravel() for o in outs])
    image_threshold = float(scores.max() * 1.05)
    pits = [float(backend.infer(preprocess(pit(i).image, spec)[None]).score[0]) for i in range(8)]
    assert min(pits) > image_threshold * 1.05, "test setup: pits no longer stand out from good parts"
    path = root / "thresholds.yaml"
    save_thresholds(path, Thresholds(
        image_threshold=image_threshold, pixel_threshold=float(np.quantile(pixels, 0.999)), min_defect_area=4,
        bundle_sha256=template_bundle.sha256, strategy="manual", n_frames=len(frames), bundle_name=template_bundle.name,
    ))
    return path


def write_config(tmp: Path, bundle: Bundle, thresholds_path: Path, port: int, source: Dict[str, Any],
                 **sections: Dict[str, Any]) -> Path:
    data: Dict[str, Any] = {
        "camera": {"name": "cam0", "source": source, "mode": "every", "stall_timeout_s": 5,
                   "reopen_min_s": 0.05, "reopen_max_s": 0.3},
        "model": {"bundle": str(bundle.root), "backend": "onnxruntime"},
        "thresholds": {"path": str(thresholds_path), "poll_s": 0.2},
        "mqtt": {"host": "127.0.0.1", "port": port, "station": STATION, "status_interval_s": 0.5,
                 "reconnect_min_s": 0.1, "reconnect_max_s": 0.5, "keepalive_s": 5},
        "spool": {"path": "state/spool.db", "reserve_mb": 1},  # the reserve exercised, 16 MB not written per test
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    path = tmp / "agent.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# -- MQTT subscriber -------------------------------------------------------------------------------
class Subscriber:
    """A real paho client on daad/<station>/#; resubscribes after a reconnect."""

    def __init__(self, port: int, client_id: Optional[str] = None, clean: bool = True) -> None:
        self.messages: List[Tuple[str, bytes, bool]] = []
        self.cond = threading.Condition()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"test-{uuid.uuid4().hex[:8]}",
                                  clean_session=clean, protocol=mqtt.MQTTv311)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"daad/{STATION}/#", qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.connect("127.0.0.1", port, keepalive=5)
        self.client.loop_start()
        assert self.subscribed.wait(WAIT_S), "subscriber could not subscribe"

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain)))
            self.cond.notify_all()

    def wait(self, predicate: Callable[["Subscriber"], bool], timeout: float = WAIT_S) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.1))
        return True

    def payloads(self, leaf: str) -> List[Any]:
        with self.cond:
            found = [p for t, p, _ in self.messages if t == f"daad/{STATION}/{leaf}"]
        return [p.decode() if leaf == "availability" else json.loads(p) for p in found]

    def events(self) -> Dict[str, Dict[str, Any]]:
        return {e["event_id"]: e for e in self.payloads("defects")}

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture()
def subscriber(mosquitto: MosquittoBroker):
    sub = Subscriber(mosquitto.port)
    yield sub
    sub.close()


def check_events(events: Dict[str, Dict[str, Any]], items: List[Part]) -> None:
    """One event per defective part, none for good ones; regions overlap the true defect; schema-valid."""
    schema = load_schema("defect_event")
    by_seq = {}
    for event in events.values():
        jsonschema.validate(event, schema)
        assert event["seq"] not in by_seq, f"two events for frame {event['seq']}"
        by_seq[event["seq"]] = event
    assert sorted(by_seq) == [i for i, p in enumerate(items) if p.defect_bbox is not None]
    for seq, event in by_seq.items():
        truth = items[seq].defect_bbox
        h, w = items[seq].image.shape
        assert event["frame_size"] == {"width": w, "height": h}
        assert event["image_score"] > event["image_threshold"]
        assert event["regions"], f"frame {seq}: defective but no region"
        assert bbox_overlap(event["regions"][0]["bbox"], truth) > 0, (event["regions"], truth)


# -- running the agent ---------------------------------------------------------------------------------
class InProcess:
    """App.run() in a thread (the CLI runs it in the main thread); stop() like SIGTERM would."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.rc: Optional[int] = None
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.rc = self.app.run()
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def wait(self, predicate: Callable[[], bool], timeout: float = WAIT_S) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            if self.error is not None:
                raise self.error
            time.sleep(0.02)
        return False

    def stop(self) -> int:
        self.app.request_stop("test")
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive(), "agent did not stop"
        if self.error is not None:
            raise self.error
        return self.rc


def quiet_notifier() -> SystemdNotifier:
    return SystemdNotifier(environ={})


def agent_command() -> List[str]:
    exe = shutil.which("daad-agent")
    return [exe] if exe else [sys.executable, "-m", "agent"]


class AgentProcess:
    """`daad-agent --config FILE --log-json` in a subprocess; its JSON log lines collected as they come."""

    def __init__(self, config: Path, *args: str, env: Optional[Dict[str, str]] = None) -> None:
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            agent_command() + ["--config", str(config), "--log-json", *args], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=full_env,
        )
        self.lines: List[Dict[str, Any]] = []
        self.raw: List[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._cond:
                self.raw.append(line)
                try:
                    self.lines.append(json.loads(line))
                except ValueError:
                    pass
                self._cond.notify_all()

    def logged(self, text: str) -> List[Dict[str, Any]]:
        with self._cond:
            return [r for r in self.lines if text in r["msg"]]

    def wait_log(self, text: str, count: int = 1, timeout: float = WAIT_S) -> List[Dict[str, Any]]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len([r for r in self.lines if text in r["msg"]]) < count:
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no {count}x {text!r} in the agent's log:\n{''.join(self.raw)}")
                self._cond.wait(min(left, 0.1))
        return self.logged(text)

    def finish(self, timeout: float = WAIT_S) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(2)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# -- end to end --------------------------------------------------------------------------------------
def test_video_every_defect_one_event_with_regions_in_frame_coordinates(
    tmp_path, template_bundle, calibrated, mosquitto, subscriber
):
    items = parts("gdggdgdg", FRAME_SIZE)
    video = write_video(tmp_path / "line.avi", items)
    config = load_config(write_config(
        tmp_path, template_bundle, calibrated, mosquitto.port, {"kind": "video", "path": str(video)},
        frames={"dir": "frames", "max_files": 2, "crop_in_event": True, "crop_max_px": 32},
    ))
    app = App(config, notifier=quiet_notifier())
    assert app.run() == 0  # the video ends: drained, flushed, exit 0
    assert app.frames_scored == len(items) and app.defects == 3 and app.capture.dropped == 0
    assert app.frames_channel_mismatch == 0  # MJPG decodes the gray parts as BGR with (nearly) equal channels
    assert (tmp_path / "state" / "spool.db.reserve").stat().st_size == 1_000_000  # room kept for a full disk
    assert subscriber.wait(lambda s: len(s.events()) == 3 and "offline" in s.payloads("availability"))
    events = subscriber.events()
    check_events(events, items)
    for event in events.values():
        crop = cv2.imdecode(np.frombuffer(base64.b64decode(event["crop_jpeg_b64"]), np.uint8), cv2.IMREAD_UNCHANGED)
        assert crop is not None and max(crop.shape[:2]) <= 32
    saved = sorted((tmp_path / "frames").iterdir())
    assert len(saved) == 2  # bounded folder: the oldest defective frame was deleted
    latest = max(events.values(), key=lambda e: e["seq"])
    assert latest["frame_path"] == str(saved[-1])
    # a saved frame is named after its event (daad-calibrate teach --events ID finds it)
    assert {p.name for p in saved} == {Path(e["frame_path"]).name for e in events.values() if Path(e["frame_path"]).exists()}
    for e in events.values():
        assert Path(e["frame_path"]).stem.endswith("_" + e["event_id"])
    statuses = subscriber.payloads("status")
    for status in statuses:
        jsonschema.validate(status, load_schema("status"))
    # status is latest-wins and not spooled: "starting" may be superseded before the first connect
    assert statuses[0]["state"] in ("starting", "running")
    if statuses[0]["state"] == "starting":
        assert statuses[0]["latency_ms"] == {"p50": None, "p99": None}
    scoring = [s for s in statuses if s["frames_scored"] > 0]
    assert scoring and scoring[-1]["state"] in ("running", "stopping")
    lat = scoring[-1]["latency_ms"]
    assert lat["p50"] is not None and lat["p99"] >= lat["p50"] > 0
    assert subscriber.payloads("availability")[0] == "online"


def test_cli_folder_run_exits_zero_with_json_logs(tmp_path, template_bundle, calibrated, mosquitto, subscriber):
    items = parts("dggdg")
    folder = write_folder(tmp_path / "incoming", items)
    config = write_config(tmp_path, template_bundle, calibrated, mosquitto.port, {"kind": "folder", "path": str(folder)})
    agent = AgentProcess(config)
    assert agent.finish() == 0, "".join(agent.raw)
    defects = agent.logged("defect:")
    assert sorted(r["seq"] for r in defects) == [0, 3] and all(r["event_id"] for r in defects)
    assert all(r["level"] in ("INFO", "WARNING", "DEBUG") for r in agent.lines)
    assert subscriber.wait(lambda s: len(s.events()) == 2)
    check_events(subscriber.events(), items)
    assert set(subscriber.events()) == {r["event_id"] for r in defects}


def test_max_frames_stops_early(tmp_path, template_bundle, calibrated, mosquitto):
    folder = write_folder(tmp_path / "incoming", parts("gggggg"))
    config = write_config(tmp_path, template_bundle, calibrated, mosquitto.port, {"kind": "folder", "path": str(folder)})
    agent = AgentProcess(config, "--max-frames", "2")
    assert agent.finish() == 0
    assert agent.wait_log("scored --max-frames 2") and agent.wait_log("2 frames scored")


def test_corrupt_image_is_logged_skipped_and_the_rest_scored(
    tmp_path, template_bundle, calibrated, mosquitto, subscriber, caplog
):
    items = parts("gdgd")
    folder = write_folder(tmp_path / "incoming", items)
    (folder / "001a.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # sorts between 001 and 002
    config = load_config(write_config(tmp_path, template_bundle, calibrated, mosquitto.port,
                                      {"kind": "folder", "path": str(folder)}))
    caplog.set_level("WARNING")
    app = App(config, notifier=quiet_notifier())
    assert app.run() == 0
    assert app.frames_scored == 4 and app.capture.source.skipped == 1
    assert any("001a.png" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert subscriber.wait(lambda s: len(s.events()) == 2)
    check_events(subscriber.events(), items)


def test_broker_outage_loses_no_event(tmp_path, template_bundle, calibrated):
    # the broker keeps the subscriber's session across its restart: the agent's own delivery is under test
    store = broker_store()
    broker = MosquittoBroker(tmp_path / "broker").persist(store).start()
    sub = Subscriber(broker.port, client_id="test-outage", clean=False)
    folder = tmp_path / "incoming"
    folder.mkdir()
    drop_image(folder, "000.png", good(0).image)
    config = load_config(write_config(
        tmp_path, template_bundle, calibrated, broker.port,
        {"kind": "folder", "path": str(folder), "watch": True, "poll_s": 0.05, "settle_s": 0.05},
    ))
    run = InProcess(App(config, notifier=quiet_notifier()))
    try:
        assert run.wait(lambda: run.app.ready)
        drop_image(folder, "001.png", pit(1).image)
        assert sub.wait(lambda s: len(s.events()) == 1)
        broker.stop()
        for i in (2, 3, 4):
            drop_image(folder, f"{i:03d}.png", pit(i).image)
        assert run.wait(lambda: run.app.defects == 4)
        assert run.app.publisher.stats()["spool_depth"] == 3  # waiting on disk for the broker
        broker.start()
        assert sub.wait(lambda s: len(s.events()) == 4), sub.events().keys()
        assert run.wait(lambda: run.app.publisher.stats()["spool_depth"] == 0)
        assert sorted(e["seq"] for e in sub.events().values()) == [1, 2, 3, 4]
        assert run.stop() == 0
    finally:
        if run.thread.is_alive():
            run.stop()
        sub.close()
        broker.stop()
        shutil.rmtree(store, ignore_errors=True)


def test_sigkill_then_restart_delivers_the_spooled_events(tmp_path, template_bundle, calibrated):
    port = free_port()  # no broker yet: events can only go to the spool
    folder = write_folder(tmp_path / "incoming", parts("gddgd"))
    config = write_config(tmp_path, template_bundle, calibrated, port,
                          {"kind": "folder", "path": str(folder), "watch": True, "poll_s": 0.05})
    first = AgentProcess(config)
    try:
        spooled = first.wait_log("defect:", count=3)
    finally:
        first.kill()  # SIGKILL: no flush, no goodbye
    assert first.proc.returncode == -signal.SIGKILL
    broker = MosquittoBroker(tmp_path / "broker", port=port).start()
    sub = Subscriber(port)
    empty = tmp_path / "empty"
    empty.mkdir()
    config2 = write_config(tmp_path, template_bundle, calibrated, port,
                           {"kind": "folder", "path": str(empty), "watch": True})  # same spool, nothing new
    second = AgentProcess(config2)
    try:
        assert sub.wait(lambda s: len(s.events()) == 3), "".join(second.raw)
        assert set(sub.events()) == {r["event_id"] for r in spooled}
        assert sorted(e["seq"] for e in sub.events().values()) == [1, 2, 4]
        second.proc.send_signal(signal.SIGTERM)
        assert second.finish() == 0
    finally:
        second.kill()
        sub.close()
        broker.stop()


def test_video_removed_and_put_back_reopens_and_publishes_camera_state(
    tmp_path, template_bundle, calibrated, mosquitto, subscriber
):
    video = write_video(tmp_path / "line.avi", parts("gggg"), fps=20.0)
    metrics_port = free_port()
    config = load_config(write_config(
        tmp_path, template_bundle, calibrated, mosquitto.port,
        {"kind": "video", "path": str(video), "loop": True, "realtime": True},
        camera={"mode": "latest"}, metrics={"prometheus_port": metrics_port},
    ))
    run = InProcess(App(config, notifier=quiet_notifier()))
    away = tmp_path / "away.avi"

    def camera_states(s: Subscriber) -> List[str]:
        return [p["camera_state"] for p in s.payloads("status")]

    try:
        assert run.wait(lambda: run.app.ready)
        os.rename(video, away)
        assert subscriber.wait(lambda s: "reconnecting" in camera_states(s))
        down = [p for p in subscriber.payloads("status") if p["camera_state"] == "reconnecting"]
        assert down[0]["state"] == "degraded"  # alive, but not scoring
        seen = len(camera_states(subscriber))
        os.rename(away, video)
        assert subscriber.wait(lambda s: "streaming" in camera_states(s)[seen:])
        assert run.app.capture.reconnects >= 1
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert "daad_agent_camera_reconnects_total" in body and "daad_agent_frames_scored_total" in body
        assert run.stop() == 0
    finally:
        if run.thread.is_alive():
            run.stop()


def test_stop_drains_every_grabbed_frame(tmp_path, template_bundle, calibrated, mosquitto):
    class SlowBackend(OnnxRuntimeBackend):
        """The real backend, made slow enough that frames are queued when the stop comes."""

        def infer(self, batch: np.ndarray) -> Any:
            time.sleep(0.02)
            return super().infer(batch)

    folder = write_folder(tmp_path / "incoming", parts("g" * 30))
    config = load_config(write_config(tmp_path, template_bundle, calibrated, mosquitto.port,
                                      {"kind": "folder", "path": str(folder)}, camera={"queue_size": 4}))
    run = InProcess(App(config, backend=SlowBackend(template_bundle), notifier=quiet_notifier()))
    assert run.wait(lambda: run.app.frames_scored >= 3)
    assert run.stop() == 0
    capture = run.app.capture
    assert run.app.frames_scored < 30  # stopped early...
    assert run.app.frames_scored == capture.captured - capture.dropped  # ...and nothing grabbed was lost
    assert capture.dropped <= 1  # at most the frame whose put was interrupted by the stop


def test_unwritable_state_folders_are_config_errors(tmp_path, template_bundle, calibrated):
    from engine.errors import ConfigError

    (tmp_path / "a-file").write_text("")
    folder = write_folder(tmp_path / "incoming", parts("g"))
    config = load_config(write_config(tmp_path, template_bundle, calibrated, free_port(),
                                      {"kind": "folder", "path": str(folder)}, frames={"dir": "a-file/frames"}))
    with pytest.raises(ConfigError, match=r"^agent.yaml: frames.dir: got '.*a-file/frames' \(Not a directory\), expected a folder"):
        App(config, notifier=quiet_notifier(), config_file="agent.yaml").run()
    config = load_config(write_config(tmp_path, template_bundle, calibrated, free_port(),
                                      {"kind": "folder", "path": str(folder)}, spool={"path": "a-file/spool.db"}))
    with pytest.raises(ConfigError, match=r"^spool.path: got '.*a-file/spool.db' \(File exists\)"):
        App(config, notifier=quiet_notifier()).run()


def test_agent_imports_no_torch():
    """(Python 3.8 compatibility of agent/ is checked with the other runtime packages in test_runtime_packages.)"""
    code = ("import sys, agent.app, agent.cli, agent.config, camera.sources, camera.loop, engine.scoring; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0, "agent/ imports torch"


def thresholds_for_another_bundle(tmp_path: Path, calibrated: Path) -> Path:
    other = tmp_path / "other.yaml"
    data = yaml.safe_load(calibrated.read_text())
    data["bundle_sha256"] = "f" * 64
    other.write_text(yaml.safe_dump(data))
    return other


def test_thresholds_made_for_another_bundle_are_refused(tmp_path, template_bundle, calibrated, mosquitto):
    other = thresholds_for_another_bundle(tmp_path, calibrated)
    folder = write_folder(tmp_path / "incoming", parts("g"))
    config = write_config(tmp_path, template_bundle, other, mosquitto.port, {"kind": "folder", "path": str(folder)})
    result = subprocess.run(agent_command() + ["--config", str(config), "--check-config"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 78  # EX_CONFIG: the unit does not restart it
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert f"{other}: field `bundle_sha256` is ffffffffffff..." in result.stderr
    with pytest.raises(ThresholdsError, match="made for another model"):
        App(load_config(config), notifier=quiet_notifier()).run()


def test_a_refused_start_leaves_state_error_with_its_reason_as_the_retained_status(tmp_path, template_bundle,
                                                                                    calibrated, mosquitto):
    other = thresholds_for_another_bundle(tmp_path, calibrated)
    folder = write_folder(tmp_path / "incoming", parts("g"))
    config = write_config(tmp_path, template_bundle, other, mosquitto.port, {"kind": "folder", "path": str(folder)})
    result = subprocess.run(agent_command() + ["--config", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 78, result.stderr
    late = Subscriber(mosquitto.port)  # a dashboard that connects afterwards still reads why
    try:
        assert late.wait(lambda s: bool(s.payloads("status")))
        status = late.payloads("status")[-1]
    finally:
        late.close()
    jsonschema.validate(status, load_schema("status"))
    assert status["state"] == "error" and status["station"] == STATION
    assert status["error"] == result.stderr.strip().splitlines()[-1]  # the journal's refusal line
    assert f"{other}: field `bundle_sha256` is ffffffffffff..." in status["error"]
    with pytest.raises(jsonschema.ValidationError):  # an error status without its reason is not one
        jsonschema.validate({k: v for k, v in status.items() if k != "error"}, load_schema("status"))


@pytest.fixture()
def restore_logging():
    """main() configures the root logger for the process; put pytest's handlers back afterwards."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_check_config_ok_and_usage_errors(tmp_path, template_bundle, calibrated, mosquitto, capsys, restore_logging):
    folder = write_folder(tmp_path / "incoming", parts("g"))
    config = write_config(tmp_path, template_bundle, calibrated, mosquitto.port, {"kind": "folder", "path": str(folder)})
    assert main(["--config", str(config), "--check-config"]) == 0
    out = capsys.readouterr().out
    assert "made for this bundle" in out and out.strip().endswith("OK")
    assert main(["--config", str(tmp_path / "nope.yaml")]) == 78
    assert capsys.readouterr().err.strip() == (f"daad-agent: error: {tmp_path / 'nope.yaml'}: config file not found; "
                                               "pass --config /etc/daad-inspect/agent.yaml")
    with pytest.raises(SystemExit) as info:
        main(["--config", str(config), "--max-frames", "0"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def test_check_broker_connects_once_and_names_why_a_broker_refuses(tmp_path, template_bundle, calibrated, mosquitto,
                                                                   capsys, restore_logging):
    folder = write_folder(tmp_path / "incoming", parts("g"))
    source = {"kind": "folder", "path": str(folder)}
    config = write_config(tmp_path, template_bundle, calibrated, mosquitto.port, source)
    assert main(["--config", str(config), "--check-broker"]) == 0  # implies --check-config
    out = capsys.readouterr().out
    assert f"mqtt: 127.0.0.1:{mosquitto.port} accepted the connection" in out and out.strip().endswith("OK")
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    config = write_config(tmp_path, template_bundle, calibrated, closed, source)
    assert main(["--config", str(config), "--check-broker"]) == 1  # the broker may come back: not a config error
    err = capsys.readouterr().err.strip().splitlines()  # warnings (e.g. drift monitoring off) may come before it
    refusals = [line for line in err if line.startswith("daad-agent: error: ")]
    assert refusals == err[-1:] and err[-1].startswith(f"daad-agent: error: mqtt: 127.0.0.1:{closed}: refused: "), err


def test_sighup_with_a_bad_file_keeps_the_old_thresholds(tmp_path, template_bundle, calibrated, mosquitto, subscriber):
    folder = tmp_path / "incoming"
    folder.mkdir()
    drop_image(folder, "000.png", good(0).image)
    live = tmp_path / "thresholds.yaml"
    shutil.copy(calibrated, live)
    old = yaml.safe_load(live.read_text())
    config = write_config(tmp_path, template_bundle, live, mosquitto.port,
                          {"kind": "folder", "path": str(folder), "watch": True, "poll_s": 0.05, "settle_s": 0.05},
                          thresholds={"poll_s": 0})  # SIGHUP only
    agent = AgentProcess(config)
    try:
        agent.wait_log("agent: ready")
        live.write_text("image_threshold: [oops\n")  # broken YAML
        agent.proc.send_signal(signal.SIGHUP)
        agent.wait_log("new file rejected")
        save_thresholds(live, Thresholds(0.1, 0.1, 1, "e" * 64))  # valid, but for another bundle
        agent.proc.send_signal(signal.SIGHUP)
        rejected = agent.wait_log("new file rejected", count=2)
        assert "another model" in rejected[-1]["msg"]
        drop_image(folder, "001.png", pit(1).image)  # still judged with the old thresholds
        assert subscriber.wait(lambda s: len(s.events()) == 1)
        assert list(subscriber.events().values())[0]["image_threshold"] == pytest.approx(old["image_threshold"])
        new = dict(old, image_threshold=old["image_threshold"] * 2)
        live.write_text(yaml.safe_dump(new))
        agent.proc.send_signal(signal.SIGHUP)
        agent.wait_log("thresholds: reloaded")
        assert subscriber.wait(lambda s: s.payloads("status")[-1]["image_threshold"] == pytest.approx(new["image_threshold"]))
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.finish() == 0
    finally:
        agent.kill()


def test_systemd_notify_and_sigterm(tmp_path, template_bundle, calibrated, mosquitto):
    folder = tmp_path / "incoming"
    folder.mkdir()
    drop_image(folder, "000.png", good(0).image)
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(WAIT_S)
    config = write_config(tmp_path, template_bundle, calibrated, mosquitto.port,
                          {"kind": "folder", "path": str(folder), "watch": True, "poll_s": 0.05})
    agent = AgentProcess(config, env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "400000"})
    received: List[str] = []

    def until(word: str, count: int = 1) -> None:
        while sum(m.startswith(word) for m in received) < count:
            received.append(sock.recv(4096).decode())

    try:
        until("READY=1")
        # READY only once a frame was scored; the log line is written just before the datagram but read
        # from the child's stderr by another thread, so wait for it rather than race it
        assert agent.wait_log("agent: ready")
        until("WATCHDOG=1", count=3)
        t0 = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.finish() == 0
        assert time.monotonic() - t0 < 5.0
        until("STOPPING=1")
    finally:
        agent.kill()
        sock.close()
    late = Subscriber(mosquitto.port)  # a consumer that connects later sees the retained state
    try:
        assert late.wait(lambda s: s.payloads("availability") == ["offline"])
        assert late.wait(lambda s: len(s.payloads("status")) == 1)
    finally:
        late.close()


# -- parts of the app --------------------------------------------------------------------------------
def test_thresholds_watch_reloads_on_change_and_keeps_the_last_good(tmp_path, template_bundle, calibrated):
    path = tmp_path / "t.yaml"
    shutil.copy(calibrated, path)
    clock = [0.0]
    first = Thresholds(0.5, 0.4, 3, template_bundle.sha256)
    save_thresholds(path, first)
    watch = ThresholdsWatch(path, template_bundle, first, poll_s=1.0, monotonic=lambda: clock[0])
    assert watch.poll() is None  # nothing changed
    save_thresholds(path, Thresholds(0.7, 0.6, 5, template_bundle.sha256))
    assert watch.poll() is None  # not yet time to look
    clock[0] = 1.5
    assert watch.poll().image_threshold == 0.7 and watch.current.min_defect_area == 5
    path.write_text("format_version: 1\n")  # missing fields
    clock[0] = 3.0
    assert watch.poll() is None and watch.current.image_threshold == 0.7 and watch.rejected == 1
    clock[0] = 4.5
    assert watch.poll() is None and watch.rejected == 1  # a bad file is not retried until it changes
    watch.request_reload()  # SIGHUP: retried now, whatever the clock
    assert watch.poll() is None and watch.rejected == 2 and "min_defect_area" in watch.last_error


def test_sd_notify_abstract_socket_and_watchdog_rate():
    name = f"daad-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    now = [0.0]
    notifier = SystemdNotifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "2000000"}, monotonic=lambda: now[0])
    try:
        assert notifier.enabled and notifier.watchdog_interval_s == 1.0
        assert notifier.ready("scoring")
        assert sock.recv(100) == b"READY=1\nSTATUS=scoring"
        assert notifier.watchdog() and not notifier.watchdog()  # at most once per half period
        now[0] = 1.0
        assert notifier.watchdog()
        assert [sock.recv(100), sock.recv(100)] == [b"WATCHDOG=1", b"WATCHDOG=1"]
        assert notifier.stopping()
        assert sock.recv(100) == b"STOPPING=1"
    finally:
        notifier.close()
        sock.close()
    off = SystemdNotifier({})
    assert not off.enabled and not off.ready() and not off.watchdog()
    other = SystemdNotifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert other.watchdog_interval_s is None  # meant for another process


def test_prometheus_text_and_endpoint():
    text = render_prometheus({"frames_scored_total": 12, "fps": 3.5, "latency_p50_seconds": None, "bogus": 1})
    assert "# TYPE daad_agent_frames_scored_total counter\ndaad_agent_frames_scored_total 12.0\n" in text
    assert "daad_agent_fps 3.5" in text and "latency" not in text and "bogus" not in text
    server = MetricsServer("127.0.0.1", free_port(), lambda: {"up": 1, "defects_total": 2})
    server.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as response:
            body = response.read().decode()
            assert response.headers["Content-Type"].startswith("text/plain; version=")
        assert "daad_agent_defects_total 2" in body
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/other", timeout=5)
    finally:
        server.stop()
    reason = render_prometheus({"mqtt_connect_error": 'tls-"x"', "mqtt_connect_failures_total": 3})
    assert 'daad_agent_mqtt_connect_error{reason="tls-\\"x\\""} 1.0\n' in reason
    assert "daad_agent_mqtt_connect_failures_total 3" in reason


def test_every_metric_keeps_its_name_type_and_help() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from agent.metrics_http import METRICS

    every = {name: ("reason" if name in ("mqtt_connect_error", "drift_state") else 2) for name in METRICS}
    families = {f"{f.name}_total" if f.type == "counter" else f.name: f
                for f in text_string_to_metric_families(render_prometheus(every))}
    assert {name: (f.type, f.documentation) for name, f in families.items()} == {
        f"daad_agent_{name}": kind_help for name, kind_help in METRICS.items()}
    assert [s.labels for s in families["daad_agent_drift_state"].samples] == [{"reason": "reason"}]
    assert [s.value for s in families["daad_agent_frames_scored_total"].samples] == [2.0]
    assert render_prometheus({"fps": float("nan")}) == ""  # an unknown figure is left out, not written as NaN


def get_metrics(port: int, token: Optional[str] = None) -> Tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("WWW-Authenticate", "")


def test_metrics_on_the_network_with_a_bearer_token(tmp_path, template_bundle, calibrated, mosquitto, caplog):
    from engine.errors import ConfigError

    caplog.set_level("INFO")
    folder = tmp_path / "incoming"
    folder.mkdir()
    token_file = tmp_path / "metrics-token"
    token_file.write_text("s3cr3t-token\n")
    port = free_port()
    metrics = {"prometheus_port": port, "bind": "0.0.0.0", "allow_remote": True, "token_file": str(token_file)}
    source = {"kind": "folder", "path": str(folder), "watch": True}
    config = load_config(write_config(tmp_path, template_bundle, calibrated, mosquitto.port, source, metrics=metrics))
    run = InProcess(App(config, notifier=quiet_notifier()))
    try:
        assert run.wait(lambda: "metrics" in run.app._started)
        assert get_metrics(port) == (401, 'Bearer realm="daad-agent"')
        assert get_metrics(port, "wrong")[0] == 401
        status, body = get_metrics(port, "s3cr3t-token")
        assert status == 200 and "daad_agent_up 1" in body
        assert run.stop() == 0
    finally:
        if run.thread.is_alive():
            run.stop()
    assert "s3cr3t" not in caplog.text and "(bearer token required)" in caplog.text
    token_file.write_text("\n")  # an empty token is refused at start, in one line naming the key
    with pytest.raises(ConfigError, match=r"^agent.yaml: metrics.token_file: got '.*' \(empty"):
        App(load_config(write_config(tmp_path, template_bundle, calibrated, mosquitto.port, source, metrics=metrics)),
            notifier=quiet_notifier(), config_file="agent.yaml").run()


def test_json_log_lines_carry_event_fields_and_no_secrets(tmp_path, template_bundle, calibrated):
    import logging

    record = logging.LogRecord("agent.app", logging.INFO, __file__, 1, "defect: %s", ("x",), None)
    record.event_id = "abc"
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "defect: x" and line["event_id"] == "abc" and line["level"] == "INFO"
    # the broker password (from a file) never reaches the log
    secret = tmp_path / "password"
    secret.write_text("hunter2-secret\n")
    folder = write_folder(tmp_path / "incoming", parts("gd"))
    config = write_config(tmp_path, template_bundle, calibrated, free_port(), {"kind": "folder", "path": str(folder)},
                          mqtt={"username": "agent", "password_file": str(secret)})
    agent = AgentProcess(config, env={"DAAD_UNUSED": "1"})
    assert agent.finish() == 0
    assert "hunter2" not in "".join(agent.raw) and agent.logged("defect:")


# -- the camera and the frames, named when they do not fit ------------------------------------------
def test_v4l2_device_missing_at_start_is_named_once_and_in_status(
    tmp_path, template_bundle, calibrated, mosquitto, subscriber, caplog
):
    caplog.set_level("INFO")
    device = "/dev/video77"
    assert not Path(device).exists()
    config = load_config(write_config(tmp_path, template_bundle, calibrated, mosquitto.port,
                                      {"kind": "v4l2", "device": device}, camera={"mode": "latest"}))
    run = InProcess(App(config, notifier=quiet_notifier()))
    try:
        assert run.wait(lambda: run.app.capture is not None and run.app.capture.open_failures >= 4)  # retried, failing
        assert subscriber.wait(lambda s: any(p["camera_error"] for p in s.payloads("status")))
        assert run.stop() == 0
    finally:
        if run.thread.is_alive():
            run.stop()
    named = [r for r in caplog.records if r.name == "camera.loop" and device in r.getMessage()]
    assert len(named) == 1 and named[0].levelname == "WARNING", [r.getMessage() for r in named]
    assert "does not exist" in named[0].getMessage() and "camera.source.device" in named[0].getMessage()
    status = next(p for p in subscriber.payloads("status") if p["camera_error"])
    jsonschema.validate(status, load_schema("status"))
    assert status["camera_state"] == "reconnecting" and status["state"] == "degraded"
    assert status["camera_error"].startswith(f"{device}: does not exist")


def colour(image: np.ndarray) -> np.ndarray:
    """A BGR frame whose channels really differ (a colour camera), from a gray part."""
    return cv2.merge([image, (image // 2).astype(np.uint8), (255 - image).astype(np.uint8)])


@pytest.mark.parametrize("model_colour", [False, True], ids=["colour-into-gray-model", "gray-into-colour-model"])
def test_frames_with_other_channels_than_the_model_are_warned_once_and_counted(
    model_colour, tmp_path, template_bundle, calibrated, mosquitto, subscriber, caplog
):
    caplog.set_level("WARNING")
    bundle, thresholds = template_bundle, calibrated
    if model_colour:
        bundle = make_template_bundle(tmp_path / "colour-bundle", size=64, color=True)
        thresholds = tmp_path / "colour-thresholds.yaml"
        save_thresholds(thresholds, Thresholds(1e6, 1e6, 4, bundle.sha256, strategy="manual", bundle_name=bundle.name))
    folder = tmp_path / "incoming"
    folder.mkdir()
    for i, part in enumerate(parts("gggg")):
        cv2.imwrite(str(folder / f"{i:03d}.png"), part.image if model_colour else colour(part.image))
    config = load_config(write_config(tmp_path, bundle, thresholds, mosquitto.port, {"kind": "folder", "path": str(folder)}))
    app = App(config, notifier=quiet_notifier())
    assert app.run() == 0
    assert app.frames_scored == 4 and app.frames_channel_mismatch == 4  # scored all the same
    warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("camera cam0: ")]  # not the tmp path
    expected = "gray frames into a colour model" if model_colour else "colour frames into a gray model"
    assert len(warned) == 1 and expected in warned[0], warned
    assert subscriber.wait(lambda s: any(p["frames_channel_mismatch"] == 4 for p in s.payloads("status")))


def test_systemctl_status_line_names_what_is_wrong():
    ok = {"camera_state": "streaming", "spool_depth": 0, "camera_error": None, "events_unspooled": 0}
    assert status_line("running", 9.96, 10, 1, ok, {"connect_error": None}) == (
        "running: 10.0 fps, 10 scored, 1 defects, camera streaming, spool 0")
    bad = dict(ok, camera_state="reconnecting", camera_error="/dev/video0: does not exist", events_unspooled=3)
    line = status_line("degraded", 0.0, 10, 1, bad, {"connect_error": "tls-unknown-ca"})
    assert line.endswith("; camera: /dev/video0: does not exist; mqtt: tls-unknown-ca; 3 event(s) not on disk "
                         "(spool not writable)")
