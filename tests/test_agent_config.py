"""agent.config: every bad config is one line `file: key.path: got X, expected Y`; good ones resolve paths."""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Callable, Dict

import pytest
import yaml

from agent.config import AgentConfig, dump_example_keys, load_config
from camera.config import FolderConfig, VideoConfig
from engine.thresholds import Thresholds, save_thresholds
from engine.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "agent.yaml"


@pytest.fixture()
def files(tmp_path: Path, template_bundle) -> Path:
    """A config directory with a bundle, thresholds, a video and a folder (all relative to agent.yaml)."""
    import shutil

    shutil.copytree(template_bundle.root, tmp_path / "bundle")
    save_thresholds(tmp_path / "thresholds.yaml", Thresholds(0.5, 0.5, 4, template_bundle.sha256))
    (tmp_path / "clip.avi").write_bytes(b"")
    (tmp_path / "incoming").mkdir()
    return tmp_path


def base() -> Dict[str, Any]:
    return {
        "camera": {"name": "cam0", "source": {"kind": "folder", "path": "incoming"}, "mode": "every"},
        "model": {"bundle": "bundle", "backend": "onnxruntime"},
        "thresholds": {"path": "thresholds.yaml"},
        "mqtt": {"host": "127.0.0.1", "port": 1883, "station": "line1"},
        "spool": {"path": "state/spool.db"},
    }


def write(tmp: Path, data: Any, name: str = "agent.yaml") -> Path:
    path = tmp / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def edit(fn: Callable[[Dict[str, Any]], None]) -> Dict[str, Any]:
    data = copy.deepcopy(base())
    fn(data)
    return data


BAD = [
    # each row: (what, config edit, exact error line after "agent.yaml: ")
    ("mode not a choice", edit(lambda d: d["camera"].update(mode="fast")),
     "camera.mode: got 'fast', expected 'latest' or 'every'"),
    ("unknown top-level key", edit(lambda d: d.update(cameras={})),
     "cameras: got unknown key 'cameras', expected one of version, camera, model, thresholds, mqtt, spool, frames, logging, metrics, drift"),
    ("unknown key inside a source kind", edit(lambda d: d["camera"]["source"].update(fsp=3)),
     "camera.source.fsp: got unknown key 'fsp', expected one of kind, path, watch, poll_s, pattern, settle_s"),
    ("unknown source kind", edit(lambda d: d["camera"].update(source={"kind": "usb"})),
     "camera.source.kind: got 'usb', expected one of 'v4l2', 'gstreamer', 'csi', 'rtsp', 'video', 'folder'"),
    ("source without kind", edit(lambda d: d["camera"].update(source={"path": "x"})),
     "camera.source.kind: got nothing, expected one of 'v4l2', 'gstreamer', 'csi', 'rtsp', 'video', 'folder'"),
    ("key of another kind", edit(lambda d: d["camera"].update(source={"kind": "csi", "path": "x"})),
     "camera.source.path: got unknown key 'path', expected one of kind, sensor_id, width, height, fps"),
    ("required key missing", edit(lambda d: d["mqtt"].pop("station")),
     "mqtt.station: got nothing, expected a value (this key is required)"),
    ("whole section missing", edit(lambda d: d.pop("model")),
     "model: got nothing, expected a value (this key is required)"),
    ("number out of bounds", edit(lambda d: d["camera"].update(stall_timeout_s=-1)),
     "camera.stall_timeout_s: got -1, expected a number > 0"),
    ("jpeg quality above 100", edit(lambda d: d.update(frames={"jpeg_quality": 101})),
     "frames.jpeg_quality: got 101, expected a number <= 100"),
    ("port not a number", edit(lambda d: d["mqtt"].update(port="abc")),
     "mqtt.port: got 'abc', expected an integer"),
    ("bool not a bool", edit(lambda d: d["camera"]["source"].update(watch="maybe")),
     "camera.source.watch: got 'maybe', expected true or false"),
    ("backend not a choice", edit(lambda d: d["model"].update(backend="cuda")),
     "model.backend: got 'cuda', expected 'auto', 'onnxruntime' or 'tensorrt'"),
    ("log level not a choice", edit(lambda d: d.update(logging={"level": "verbose"})),
     "logging.level: got 'verbose', expected 'DEBUG', 'INFO', 'WARNING' or 'ERROR'"),
    ("metrics port too high", edit(lambda d: d.update(metrics={"prometheus_port": 70000})),
     "metrics.prometheus_port: got 70000, expected a number <= 65535"),
    ("rtsp uri not rtsp", edit(lambda d: d["camera"].update(source={"kind": "rtsp", "uri": "http://cam/x"})),
     "camera.source.uri: got 'http://cam/x', expected a string matching ^rtsps?://"),
    ("camera name unusable in topics", edit(lambda d: d["camera"].update(name="cam 0")),
     "camera.name: got 'cam 0', expected a string matching ^[A-Za-z0-9_.-]+$"),
    ("v4l2 device neither int nor str", edit(lambda d: d["camera"].update(source={"kind": "v4l2", "device": [0]})),
     "camera.source.device: got a list of 1, expected an integer or a string"),
    ("config version unknown", edit(lambda d: d.update(version=2)),
     "version: got 2, expected 1"),
    ("mqtt cross-field rule", edit(lambda d: d["mqtt"].update(username="u", password_file="p", password_env="P")),
     "mqtt: give either password_file or password_env, not both"),
    ("mqtt field validator", edit(lambda d: d["mqtt"].update(prefix="a+b")),
     "mqtt.prefix: got 'a+b'; must not contain + # or spaces, nor start with $ (e.g. daad or plant1/daad)"),
    ("reopen bounds crossed", edit(lambda d: d["camera"].update(reopen_min_s=20, reopen_max_s=10)),
     "camera.reopen_min_s: got 20 > reopen_max_s 10, expected reopen_min_s <= reopen_max_s"),
    ("gstreamer pipeline without appsink", edit(lambda d: d["camera"].update(source={"kind": "gstreamer", "pipeline": "videotestsrc ! fakesink"})),
     "camera.source.pipeline: got 'videotestsrc ! fakesink', expected a pipeline ending in appsink"),
    ("bundle path missing", edit(lambda d: d["model"].update(bundle="nope")),
     "model.bundle: got '{dir}/nope' (a path that does not exist), expected a bundle directory written by `daad-train export`"),
    ("bundle path not a bundle", edit(lambda d: d["model"].update(bundle="incoming")),
     "model.bundle: got '{dir}/incoming' (a directory without bundle.yaml), expected a bundle directory written by `daad-train export`"),
    ("thresholds file missing", edit(lambda d: d["thresholds"].update(path="t.yaml")),
     "thresholds.path: got '{dir}/t.yaml' (not a file), expected thresholds.yaml written by `daad-calibrate fit`"),
    ("video file missing", edit(lambda d: d["camera"].update(source={"kind": "video", "path": "none.avi"})),
     "camera.source.path: got '{dir}/none.avi' (not a file), expected a video file"),
    ("folder missing", edit(lambda d: d["camera"].update(source={"kind": "folder", "path": "none"})),
     "camera.source.path: got '{dir}/none' (not a directory), expected a folder of images"),
    ("password file missing", edit(lambda d: d["mqtt"].update(username="u", password_file="secret")),
     "mqtt.password_file: got '{dir}/secret' (not a file), expected a readable file"),
    ("metrics on the network without opt-in", edit(lambda d: d.update(metrics={"prometheus_port": 9100, "bind": "0.0.0.0"})),
     "metrics.bind: got '0.0.0.0', expected a loopback address (127.0.0.1, ::1 or localhost); set metrics.allow_remote: "
     "true to serve /metrics on the network, with metrics.token_file to require a token"),
    ("metrics token file missing", edit(lambda d: d.update(metrics={"prometheus_port": 9100, "token_file": "token"})),
     "metrics.token_file: got '{dir}/token' (not a file), expected a file holding the bearer token"),
    ("environment variable unset", edit(lambda d: d["mqtt"].update(station="${DAAD_TEST_UNSET_VAR}")),
     "mqtt.station: got '${DAAD_TEST_UNSET_VAR}', expected environment variable DAAD_TEST_UNSET_VAR to be set"),
    ("drift sensitivity not above 1", edit(lambda d: d.update(drift={"detect_false_alarm_ratio": 1.0})),
     "drift.detect_false_alarm_ratio: got 1.0, expected a number > 1"),
    ("drift warnings rarer than alarms", edit(lambda d: d.update(drift={"warning_per_frames": 200_000})),
     "drift.warning_per_frames: got 200000 > drift.alarm_per_frames 100000, expected a warning at least as often as an alarm"),
    ("drift window too small", edit(lambda d: d.update(drift={"window": 10})),
     "drift.window: got 10, expected a number >= 50"),
    ("drift unknown key", edit(lambda d: d.update(drift={"level": 0.5})),
     "drift.level: got unknown key 'level', expected one of enabled, detect_false_alarm_ratio, window, interval, "
     "alarm_per_frames, warning_per_frames, baseline_frames, state_file"),
    ("top level not a mapping", ["camera"],
     "got a list of 1, expected a mapping with camera, model, thresholds, mqtt, spool"),
    ("empty file", "",
     "got null, expected a mapping with camera, model, thresholds, mqtt, spool"),
    ("YAML syntax error", "camera:\n  mode: latest\n   name: x\n",
     "line 3, column 8: not valid YAML (mapping values are not allowed here); fix the syntax"),
]


@pytest.mark.parametrize("what, data, line", BAD, ids=[row[0] for row in BAD])
def test_bad_config_is_one_clear_line(files, monkeypatch, what, data, line):
    monkeypatch.delenv("DAAD_TEST_UNSET_VAR", raising=False)
    path = write(files, data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message == f"{path}: " + line.replace("{dir}", str(files)), message
    assert "Traceback" not in message and "\n" not in message


def test_every_error_is_reported_at_once(files):
    data = edit(lambda d: (d["camera"].update(mode="fast", stall_timeout_s=0), d["mqtt"].update(port=0)))
    path = write(files, data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = str(info.value).splitlines()
    assert len(lines) == 3 and all(line.startswith(f"{path}: ") for line in lines)
    assert {re.split(r":", line[len(str(path)) + 2:])[0] for line in lines} == {
        "camera.mode", "camera.stall_timeout_s", "mqtt.port"}


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"agent.yaml: config file not found"):
        load_config(tmp_path / "agent.yaml")


def test_relative_paths_resolve_against_the_config_directory(files, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path.parent)  # not the config's directory
    monkeypatch.setenv("DAAD_TEST_STATION", "line7")
    data = edit(lambda d: d["mqtt"].update(station="${DAAD_TEST_STATION}"))
    config = load_config(write(files, data))
    assert config.model.bundle == files / "bundle"
    assert config.thresholds.path == files / "thresholds.yaml"
    assert config.spool.path == files / "state" / "spool.db"
    assert isinstance(config.camera.source, FolderConfig) and config.camera.source.path == files / "incoming"
    assert config.mqtt.station == "line7"
    assert config.frames.dir is None and config.logging.json_lines is False  # defaults


def test_video_source_and_json_alias(files):
    data = edit(lambda d: (d["camera"].update(source={"kind": "video", "path": "clip.avi", "loop": True}),
                           d.update(logging={"json": True}, frames={"dir": "frames"})))
    config = load_config(write(files, data))
    assert isinstance(config.camera.source, VideoConfig) and config.camera.source.loop
    assert config.logging.json_lines is True and config.frames.dir == files / "frames"


def test_example_config_is_valid_and_documents_every_key(monkeypatch):
    monkeypatch.setenv("DAAD_STATION", "line1")
    config = load_config(EXAMPLE, check_files=False)
    assert config.camera.source.kind == "csi" and config.model.bundle.is_absolute()
    text = EXAMPLE.read_text()
    lines = text.splitlines()
    keys_in_file = set()
    stack = []  # (indent, key)
    for i, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z_]+):", line)
        if not m:
            continue
        indent, key = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        keys_in_file.add(".".join(k for _, k in stack))
        previous = lines[i - 1].strip() if i else ""
        assert previous.startswith("#") or "#" in line, f"examples/agent.yaml line {i + 1}: `{key}` has no comment"
    documented = keys_in_file | {k for k in dump_example_keys() if k.startswith("camera.source.")}
    documented |= {f"mqtt.tls.{k}" for k in ("ca_file", "cert_file", "key_file", "insecure")}  # shown commented out
    missing = [k for k in dump_example_keys() if k not in documented]
    assert not missing, f"keys missing from examples/agent.yaml: {missing}"
    for kind in ("v4l2", "rtsp", "gstreamer", "video", "folder"):
        assert f"kind: {kind}" in text  # each other source kind shown with its keys


def test_model_fields_all_have_descriptions():
    from engine.config_file import models_in

    seen = set()

    def walk(model):
        if model in seen:
            return
        seen.add(model)
        for name, info in model.model_fields.items():
            if model is not AgentConfig:
                assert info.description, f"{model.__name__}.{name} has no description"
            for sub in models_in(info.annotation):
                walk(sub)

    walk(AgentConfig)


@pytest.mark.parametrize("metrics", [
    {"prometheus_port": 9100, "bind": "::1"},  # loopback needs no opt-in
    {"prometheus_port": 9100, "bind": "localhost"},
    {"prometheus_port": 9100, "bind": "0.0.0.0", "allow_remote": True},  # the explicit opt-in
    {"bind": "0.0.0.0"},  # metrics off: the address is not used
])
def test_metrics_bind_accepted(files, metrics):
    config = load_config(write(files, edit(lambda d: d.update(metrics=metrics))))
    assert config.metrics.bind == metrics["bind"]
