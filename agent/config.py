"""agent.yaml: one file per agent, validated at start (design.md §6).

Pydantic models, one per concern, that forbid unknown keys; every field has a description and
bounds. `load_config` reports ALL problems at once, one line each, as
`agent.yaml: camera.mode: got 'fast', expected 'latest' or 'every'` (engine.config_file).
The camera section is camera.config's and the model section engine.model_section's: calibration
reads them too.

Strings may use `${NAME}` to take a value from the environment (e.g. a station id set by the
installer). Relative paths are resolved against the directory of the config file, so a config
and its bundle/thresholds can travel together.
"""
from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import List, Literal, Optional, Type, Union

from pydantic import BaseModel, Field

from camera.config import CameraConfig, camera_file_problems, camera_problems
from engine.bundle import BUNDLE_YAML
from engine.config_file import ConfigSection, load_yaml_model, show, walk_paths
from engine.config_file import dump_example_keys as _dump_keys
from engine.errors import ConfigError
from engine.model_section import ModelSection

from .mqtt import MqttSettings, SpoolSettings

CONFIG_VERSION = 1
DRIFT_STATE_NAME = "drift_state.json"


class ThresholdsConfig(ConfigSection):
    path: Path = Field(description="thresholds.yaml written by daad-calibrate for this bundle")
    poll_s: float = Field(2.0, ge=0, le=3600, description="seconds between checks of the file for changes; 0: SIGHUP only")


class FramesConfig(ConfigSection):
    dir: Optional[Path] = Field(None, description="save defective frames here as JPEG; None: do not save")
    max_files: int = Field(1000, ge=1, le=10_000_000, description="keep at most this many frames (oldest deleted)")
    max_bytes: int = Field(500_000_000, ge=1_000_000, description="keep at most this many bytes of frames")
    jpeg_quality: int = Field(90, ge=1, le=100, description="JPEG quality of saved frames and crops")
    crop_in_event: bool = Field(False, description="put a base64 JPEG crop of the defect regions in each event")
    crop_max_px: int = Field(256, ge=16, le=4096, description="longest side of the crop in the event")


class LoggingConfig(ConfigSection):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")
    json_lines: bool = Field(False, alias="json", description="one JSON object per line (for log shippers)")


class MetricsConfig(ConfigSection):
    prometheus_port: Optional[int] = Field(None, ge=1, le=65535, description="serve /metrics here; None: off")
    bind: str = Field("127.0.0.1", min_length=1, description="address of the metrics endpoint")
    allow_remote: bool = Field(
        False, description="required for a bind address other than loopback: /metrics is then reachable from the network"
    )
    token_file: Optional[Path] = Field(
        None, description="file holding a bearer token that /metrics then requires (Authorization: Bearer TOKEN)"
    )


# Accepted so that older configs load, ignored, left out of examples/agent.yaml; the agent says so when set.
DEPRECATED_KEYS = ("drift.interval",)


class DriftConfig(ConfigSection):
    """The drift alarm (agent/drift.py): a CUSUM of the good frames' normal scores against the calibration's."""

    enabled: bool = Field(True, description="watch the good frames' scores; off also when thresholds.yaml has no usable drift_reference")
    detect_false_alarm_ratio: float = Field(
        2.0, gt=1.0, le=10.0,
        description="detect a drift that multiplies the calibrated false-alarm rate by this (2: a doubling)",
    )
    window: int = Field(
        500, ge=50, le=100_000,
        description="good frames the published mean normal score is taken over; also how long `collecting` lasts "
                    "and how long a state holds after the CUSUM last crossed its limit",
    )
    interval: Optional[int] = Field(
        None, ge=1, description="ignored: the CUSUM is evaluated on every good frame (kept so older configs load)",
    )
    alarm_per_frames: int = Field(
        100_000, ge=1_000, le=1_000_000_000,
        description="spurious `recalibrate` alarms are at most 1 per this many unchanged frames (the CUSUM's ARL0)",
    )
    warning_per_frames: int = Field(
        10_000, ge=100, le=1_000_000_000,
        description="spurious `warning` states are at most 1 per this many unchanged frames (at most alarm_per_frames)",
    )
    baseline_frames: int = Field(
        3000, ge=0, le=1_000_000,
        description="after thresholds load, pool the calibration's reference with this many of the line's first good "
                    "frames (the line right after calibration taken as in control, as calibration does); 0: off",
    )
    state_file: Optional[Path] = Field(
        None, description="where the baseline and the pooled reference survive restarts; None: drift_state.json "
                          "beside spool.path",
    )


class AgentConfig(ConfigSection):
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

    @property
    def drift_state_file(self) -> Path:
        """drift.state_file, by default beside the spool (the agent's state folder)."""
        return self.drift.state_file or self.spool.path.parent / DRIFT_STATE_NAME


# -- loading ---------------------------------------------------------------------------------------
def load_config(path: Union[str, Path], check_files: bool = True) -> AgentConfig:
    """Read, expand, validate and resolve agent.yaml; ConfigError with every problem, one per line."""
    config = load_yaml_model(path, AgentConfig, "pass --config /etc/daad-inspect/agent.yaml")
    problems = check_rules(config, check_files=check_files)
    if problems:
        raise ConfigError("\n".join(f"{path}: {p}" for p in problems))
    return config


def check_rules(config: AgentConfig, check_files: bool = True) -> List[str]:
    """Cross-field rules and files that must exist; one `key.path: got X, expected Y` per problem."""
    problems: List[str] = camera_problems(config.camera, check_files=False)
    drift = config.drift
    if drift.warning_per_frames > drift.alarm_per_frames:
        problems.append(f"drift.warning_per_frames: got {drift.warning_per_frames} > drift.alarm_per_frames "
                        f"{drift.alarm_per_frames}, expected a warning at least as often as an alarm")
    metrics = config.metrics
    if metrics.prometheus_port is not None and not metrics.allow_remote and not is_loopback(metrics.bind):
        problems.append(
            f"metrics.bind: got {show(metrics.bind)}, expected a loopback address (127.0.0.1, ::1 or localhost); "
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
    problems += camera_file_problems(config.camera)
    token = metrics.token_file
    if metrics.prometheus_port is not None and token is not None and not token.is_file():
        problems.append(f"metrics.token_file: got '{token}' (not a file), expected a file holding the bearer token")
    for key, value in walk_paths(config.mqtt, "mqtt"):
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


def dump_example_keys(model: Type[BaseModel] = AgentConfig, prefix: str = "") -> List[str]:
    """Every key path of agent.yaml (for the documentation test of examples/agent.yaml); deprecated keys left out."""
    return [k for k in _dump_keys(model, prefix) if k not in DEPRECATED_KEYS]
