"""agent.yaml: one file per agent, validated at start (design.md §6).

Pydantic models, one per concern, that forbid unknown keys; every field has a description and
bounds. `load_config` reports ALL problems at once, one line each, as
`agent.yaml: camera.mode: got 'fast', expected 'latest' or 'every'` (engine/validation.py, the style of every
file the product reads).

Strings may use `${NAME}` to take a value from the environment (e.g. a station id set by the
installer). Relative paths are resolved against the directory of the config file, so a config
and its bundle/thresholds can travel together.
"""
from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple, Type, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from typing_extensions import Annotated  # typing.Annotated is 3.9+; typing_extensions comes with pydantic

from engine.bundle import BUNDLE_YAML
from engine.errors import ConfigError
from engine.validation import dotted as _dotted
from engine.validation import format_errors
from engine.validation import models_in as _models_in
from engine.validation import show as _show

from .mqtt import MqttSettings, SpoolSettings

CONFIG_VERSION = 1
NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"  # used in MQTT topics, event ids and file names
ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# -- camera sources (one of, chosen by `kind`) ----------------------------------------------------
class V4l2Source(_Section):
    kind: Literal["v4l2"] = Field(description="USB / V4L2 camera through OpenCV's V4L2 backend")
    device: Union[int, str] = Field(0, description="device index (0) or path (/dev/video0)")
    width: Optional[int] = Field(None, ge=16, le=16384, description="requested width; None keeps the driver's")
    height: Optional[int] = Field(None, ge=16, le=16384, description="requested height; None keeps the driver's")
    fps: Optional[float] = Field(None, gt=0, le=1000, description="requested frame rate; None keeps the driver's")


class GstreamerSource(_Section):
    kind: Literal["gstreamer"] = Field(description="any GStreamer pipeline ending in an appsink (needs JetPack's OpenCV)")
    pipeline: str = Field(min_length=1, description="pipeline string; must end with `appsink`")


class CsiSource(_Section):
    kind: Literal["csi"] = Field(description="Jetson CSI camera through nvarguscamerasrc")
    sensor_id: int = Field(0, ge=0, le=15, description="Argus sensor id")
    width: int = Field(1920, ge=16, le=16384, description="capture width in pixels")
    height: int = Field(1080, ge=16, le=16384, description="capture height in pixels")
    fps: int = Field(30, ge=1, le=1000, description="capture frame rate")


class RtspSource(_Section):
    kind: Literal["rtsp"] = Field(description="H.264 RTSP stream decoded by the Jetson's hardware decoder")
    uri: str = Field(pattern=r"^rtsps?://", description="rtsp://host:port/path")
    latency_ms: int = Field(200, ge=0, le=10000, description="rtspsrc jitter buffer")


class VideoSource(_Section):
    kind: Literal["video"] = Field(description="a video file (demo, tests, replaying a recorded line)")
    path: Path = Field(description="video file")
    loop: bool = Field(False, description="start again at the end (the file is reopened each time)")
    realtime: bool = Field(False, description="pace frames at the file's frame rate, like a camera")


class FolderSource(_Section):
    kind: Literal["folder"] = Field(description="image files in a folder, in name order")
    path: Path = Field(description="folder of images")
    watch: bool = Field(False, description="keep watching for new files instead of ending after the last one")
    poll_s: float = Field(0.5, gt=0, le=60, description="seconds between scans for new files when watching")
    pattern: str = Field("*", min_length=1, description="glob of file names to read (only image files are read)")
    settle_s: float = Field(0.2, ge=0, le=60, description="a new file is read once its size is unchanged this long")


SourceConfig = Annotated[
    Union[V4l2Source, GstreamerSource, CsiSource, RtspSource, VideoSource, FolderSource], Field(discriminator="kind")
]
SOURCE_KINDS = ("v4l2", "gstreamer", "csi", "rtsp", "video", "folder")


class CameraConfig(_Section):
    name: str = Field("cam0", min_length=1, max_length=64, pattern=NAME_PATTERN, description="camera id in events")
    source: SourceConfig = Field(description="where frames come from")
    mode: Literal["latest", "every"] = Field(
        "latest", description="latest: score the newest frame, drop stale ones (live cameras); every: score all (files)"
    )
    queue_size: int = Field(8, ge=1, le=1024, description="frames buffered between capture and scoring in mode every")
    stall_timeout_s: float = Field(20.0, gt=0, le=3600, description="no frame for this long: close and reopen")
    reopen_min_s: float = Field(1.0, gt=0, le=3600, description="first wait before reopening a failed camera")
    reopen_max_s: float = Field(10.0, gt=0, le=3600, description="the wait doubles up to this")


class ModelSection(_Section):
    bundle: Path = Field(description="bundle directory (bundle.yaml + model.onnx)")
    backend: Literal["auto", "onnxruntime", "tensorrt"] = Field(
        "auto", description="auto: TensorRT where available, else ONNX Runtime"
    )
    precision: Literal["fp32", "fp16"] = Field("fp32", description="TensorRT precision (recalibrate after changing)")
    plan_cache: Optional[Path] = Field(None, description="TensorRT plan cache directory; None: engine's default")
    public_key: Optional[Path] = Field(
        None, description="Ed25519 public key (PEM) of the release key: the bundle must carry a bundle.sig made "
                          "with it (`daad-engine sign`); None: signatures are not checked"
    )


class ThresholdsConfig(_Section):
    path: Path = Field(description="thresholds.yaml written by daad-calibrate for this bundle")
    poll_s: float = Field(2.0, ge=0, le=3600, description="seconds between checks of the file for changes; 0: SIGHUP only")


class FramesConfig(_Section):
    dir: Optional[Path] = Field(None, description="save defective frames here as JPEG; None: do not save")
    max_files: int = Field(1000, ge=1, le=10_000_000, description="keep at most this many frames (oldest deleted)")
    max_bytes: int = Field(500_000_000, ge=1_000_000, description="keep at most this many bytes of frames")
    jpeg_quality: int = Field(90, ge=1, le=100, description="JPEG quality of saved frames and crops")
    crop_in_event: bool = Field(False, description="put a base64 JPEG crop of the defect regions in each event")
    crop_max_px: int = Field(256, ge=16, le=4096, description="longest side of the crop in the event")


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")
    json_lines: bool = Field(False, alias="json", description="one JSON object per line (for log shippers)")


class MetricsConfig(_Section):
    prometheus_port: Optional[int] = Field(None, ge=1, le=65535, description="serve /metrics here; None: off")
    bind: str = Field("127.0.0.1", min_length=1, description="address of the metrics endpoint")
    allow_remote: bool = Field(
        False, description="required for a bind address other than loopback: /metrics is then reachable from the network"
    )
    token_file: Optional[Path] = Field(
        None, description="file holding a bearer token that /metrics then requires (Authorization: Bearer TOKEN)"
    )


class DriftConfig(_Section):
    """The drift alarm (agent/drift.py): good frames' scores against the calibration's."""

    enabled: bool = Field(True, description="watch the good frames' scores; off also when thresholds.yaml has no drift_reference")
    window: int = Field(500, ge=50, le=100_000, description="good frames in the window the test counts")
    interval: int = Field(50, ge=1, le=100_000, description="test every this many good frames (at most window)")
    alarm_per_frames: int = Field(
        100_000, ge=1_000, le=1_000_000_000,
        description="spurious `recalibrate` alarms are at most 1 per this many unchanged frames (Bonferroni)",
    )
    warning_per_frames: int = Field(
        10_000, ge=100, le=1_000_000_000,
        description="spurious `warning` states are at most 1 per this many unchanged frames (at most alarm_per_frames)",
    )


class AgentConfig(_Section):
    version: Literal[1] = Field(CONFIG_VERSION, description="config format version")
    camera: CameraConfig
    model: ModelSection
    thresholds: ThresholdsConfig
    mqtt: MqttSettings
    spool: SpoolSettings
    frames: FramesConfig = Field(default_factory=FramesConfig)  # type: ignore[arg-type]
    logging: LoggingConfig = Field(default_factory=LoggingConfig)  # type: ignore[arg-type]
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)  # type: ignore[arg-type]
    drift: DriftConfig = Field(default_factory=DriftConfig)  # type: ignore[arg-type]


# -- loading ---------------------------------------------------------------------------------------
def load_config(path: Union[str, Path], check_files: bool = True) -> AgentConfig:
    """Read, expand, validate and resolve agent.yaml; ConfigError with every problem, one per line."""
    path = Path(path)
    name = str(path)
    if not path.is_file():
        raise ConfigError(f"{name}: config file not found; pass --config /etc/daad-inspect/agent.yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"
        raise ConfigError(f"{name}: {where}: not valid YAML ({exc.problem}); fix the syntax") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{name}: not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: got {_show(raw)}, expected a mapping with camera, model, thresholds, mqtt, spool")
    errors: List[str] = []
    data = _expand_env(raw, (), errors)
    if errors:
        raise ConfigError("\n".join(f"{name}: {e}" for e in errors))
    try:
        config = AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("\n".join(f"{name}: {line}" for line in format_errors(exc, data, AgentConfig))) from None
    config = _resolve_paths(config, path.resolve().parent)
    problems = check_rules(config, check_files=check_files)
    if problems:
        raise ConfigError("\n".join(f"{name}: {p}" for p in problems))
    return config


def check_rules(config: AgentConfig, check_files: bool = True) -> List[str]:
    """Cross-field rules and files that must exist; one `key.path: got X, expected Y` per problem."""
    problems: List[str] = []
    cam = config.camera
    if cam.reopen_min_s > cam.reopen_max_s:
        problems.append(
            f"camera.reopen_min_s: got {cam.reopen_min_s:g} > reopen_max_s {cam.reopen_max_s:g}, "
            "expected reopen_min_s <= reopen_max_s"
        )
    drift = config.drift
    if drift.interval > drift.window:
        problems.append(f"drift.interval: got {drift.interval} > drift.window {drift.window}, expected interval <= window")
    if drift.warning_per_frames > drift.alarm_per_frames:
        problems.append(f"drift.warning_per_frames: got {drift.warning_per_frames} > drift.alarm_per_frames "
                        f"{drift.alarm_per_frames}, expected a warning at least as often as an alarm")
    if drift.interval > drift.warning_per_frames:
        problems.append(f"drift.interval: got {drift.interval} > drift.warning_per_frames {drift.warning_per_frames}, "
                        "expected interval <= warning_per_frames")
    src = cam.source
    if isinstance(src, GstreamerSource) and "appsink" not in src.pipeline:
        problems.append(f"camera.source.pipeline: got {_show(src.pipeline)}, expected a pipeline ending in appsink")
    metrics = config.metrics
    if metrics.prometheus_port is not None and not metrics.allow_remote and not is_loopback(metrics.bind):
        problems.append(
            f"metrics.bind: got {_show(metrics.bind)}, expected a loopback address (127.0.0.1, ::1 or localhost); "
            "set metrics.allow_remote: true to serve /metrics on the network, with metrics.token_file to require a token"
        )
    if not check_files:
        return problems
    bundle = config.model.bundle
    if not (bundle / BUNDLE_YAML).is_file():
        what = "a directory without bundle.yaml" if bundle.is_dir() else "a path that does not exist"
        problems.append(
            f"model.bundle: got '{bundle}' ({what}), expected a bundle directory written by `daad-train export`"
        )
    key = config.model.public_key
    if key is not None and not key.is_file():
        problems.append(f"model.public_key: got '{key}' (not a file), expected the release key's public half (PEM)")
    if not config.thresholds.path.is_file():
        problems.append(
            f"thresholds.path: got '{config.thresholds.path}' (not a file), expected thresholds.yaml "
            "written by `daad-calibrate fit`"
        )
    if isinstance(src, VideoSource) and not src.path.is_file():
        problems.append(f"camera.source.path: got '{src.path}' (not a file), expected a video file")
    if isinstance(src, FolderSource) and not src.path.is_dir():
        problems.append(f"camera.source.path: got '{src.path}' (not a directory), expected a folder of images")
    token = metrics.token_file
    if metrics.prometheus_port is not None and token is not None and not token.is_file():
        problems.append(f"metrics.token_file: got '{token}' (not a file), expected a file holding the bearer token")
    for key, value in _walk_paths(config.mqtt, "mqtt"):
        if key.endswith("_file") or ".tls." in f".{key}.":
            if not value.is_file():
                problems.append(f"{key}: got '{value}' (not a file), expected a readable file")
    return problems


def is_loopback(address: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: reachable from this device only."""
    if address.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to any interface


def _expand_env(value: Any, loc: Tuple[Any, ...], errors: List[str]) -> Any:
    """${NAME} in strings -> the environment's value; an unset variable is an error naming the key."""
    if isinstance(value, dict):
        return {k: _expand_env(v, loc + (k,), errors) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, loc + (i,), errors) for i, v in enumerate(value)]
    if isinstance(value, str) and "${" in value:

        def sub(match: "re.Match[str]") -> str:
            var = match.group(1)
            if var not in os.environ:
                errors.append(f"{_dotted(loc)}: got {_show(value)}, expected environment variable {var} to be set")
                return match.group(0)
            return os.environ[var]

        return ENV_PATTERN.sub(sub, value)
    return value


def _resolve_paths(model: BaseModel, base: Path) -> Any:
    """Every relative Path field -> absolute against the config file's directory (~ expanded)."""
    updates: Dict[str, Any] = {}
    for field_name in type(model).model_fields:
        value = getattr(model, field_name)
        if isinstance(value, Path):
            value = value.expanduser()
            updates[field_name] = value if value.is_absolute() else (base / value)
        elif isinstance(value, BaseModel):
            updates[field_name] = _resolve_paths(value, base)
    return model.model_copy(update=updates)


def _walk_paths(model: BaseModel, prefix: str) -> List[Tuple[str, Path]]:
    found: List[Tuple[str, Path]] = []
    for field_name, info in type(model).model_fields.items():
        key = f"{prefix}.{info.alias or field_name}"
        value = getattr(model, field_name)
        if isinstance(value, Path):
            found.append((key, value))
        elif isinstance(value, BaseModel):
            found.extend(_walk_paths(value, key))
    return found


def dump_example_keys(model: Type[BaseModel] = AgentConfig, prefix: str = "") -> List[str]:
    """Every key path of the config (for the documentation test of examples/agent.yaml)."""
    keys: List[str] = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{info.alias or name}"
        keys.append(key)
        for sub in _models_in(info.annotation):
            if sub is not model:
                keys.extend(k for k in dump_example_keys(sub, key + ".") if k not in keys)
    return keys
