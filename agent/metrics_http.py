"""Optional Prometheus endpoint: http.server in a daemon thread, GET /metrics.

The app passes a function that returns a snapshot of its counters; prometheus-client writes the exposition
format from it (a registry of the agent's own, read at each scrape: no process or platform collectors).
Bound to 127.0.0.1 by default: another address needs metrics.allow_remote, and metrics.token_file
makes every request show `Authorization: Bearer TOKEN` (compared in constant time).
"""
from __future__ import annotations

import hmac
import logging
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.errors import ConfigError

logger = logging.getLogger(__name__)

Snapshot = Callable[[], Dict[str, Any]]
PREFIX = "daad_agent_"

# name -> (type, help); the app's snapshot uses these names without the prefix
METRICS: Dict[str, Tuple[str, str]] = {
    "up": ("gauge", "1 while the agent runs"),
    "frames_scored_total": ("counter", "frames scored since start"),
    "frames_dropped_total": ("counter", "frames replaced before scoring (mode latest) or refused at stop"),
    "defects_total": ("counter", "defective frames"),
    "fps": ("gauge", "frames scored per second over the last status interval"),
    "latency_p50_seconds": ("gauge", "grab-to-publish latency, median of recent frames"),
    "latency_p99_seconds": ("gauge", "grab-to-publish latency, 99th percentile of recent frames"),
    "camera_reconnects_total": ("counter", "times the camera was reopened"),
    "camera_streaming": ("gauge", "1 while frames arrive"),
    "spool_depth": ("gauge", "events on disk waiting for the broker's acknowledgement"),
    "spool_dropped_total": ("counter", "events dropped because the spool was full"),
    "mqtt_connected": ("gauge", "1 while connected to the broker"),
    "mqtt_connect_failures_total": ("counter", "failed connection attempts to the broker"),
    "mqtt_connect_error": ("gauge", "1, labelled with the reason, while connecting to the broker fails"),
    "frames_channel_mismatch_total": ("counter", "frames whose channels differ from the model's (scored converted)"),
    "events_unspooled": ("gauge", "events held in memory only because the spool could not be written"),
    "spool_write_failures_total": ("counter", "failed writes of events to the spool (disk full)"),
    "image_threshold": ("gauge", "image score threshold in force"),
    "pixel_threshold": ("gauge", "anomaly-map pixel threshold in force"),
    "thresholds_reloads_total": ("counter", "successful thresholds reloads"),
    "thresholds_rejected_total": ("counter", "thresholds files rejected on reload"),
    "uptime_seconds": ("gauge", "seconds since start"),
    "drift_state": ("gauge", "1, labelled with the drift state (off, collecting, ok, warning, recalibrate)"),
    "drift_cusum": ("gauge", "the drift alarm's CUSUM of good frames' normal scores (recalibrate above drift_cusum_limit)"),
    "drift_cusum_limit": ("gauge", "the CUSUM's limit h (set for the configured spurious-alarm rate)"),
    "drift_mean_z": ("gauge", "mean normal score of the drift window's good frames (0 as at calibration)"),
    "drift_reference_frames": ("gauge", "good frames in the drift alarm's reference (calibration, + the line's baseline once pooled)"),
    "drift_baseline_frames": ("gauge", "the line's good frames collected towards the drift reference (absent when off or pooled)"),
    "drift_changes_total": ("counter", "drift state changes (each published on the drift topic)"),
    "drift_warnings_total": ("counter", "entries into the drift state warning"),
    "drift_alarms_total": ("counter", "entries into the drift state recalibrate"),
}


class SnapshotCollector(Collector):
    """A prometheus-client collector over the app's snapshot: each scrape reads it once. Unknown names are
    skipped; None and NaN are omitted; a string is a reason, one sample labelled `reason` with value 1 (as
    Prometheus' info-style gauges do)."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        values = self.snapshot()
        for name, (kind, help_text) in METRICS.items():
            value = values.get(name)
            if value is None:
                continue
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            if isinstance(value, str):
                labelled = family(PREFIX + name, help_text, labels=["reason"])
                labelled.add_metric([value], 1)
                yield labelled
            elif not math.isnan(float(value)):
                yield family(PREFIX + name, help_text, value=float(value))


def registry_of(snapshot: Snapshot) -> CollectorRegistry:
    """The agent's own registry: its snapshot's metrics only."""
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(snapshot))
    return registry


def render_prometheus(values: Dict[str, Any]) -> str:
    """Snapshot -> Prometheus text exposition format."""
    return generate_latest(registry_of(lambda: values)).decode("utf-8")


def read_token(path: Path) -> str:
    """The bearer token in metrics.token_file; ConfigError naming the key when unusable."""
    key = "metrics.token_file"
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ConfigError(f"{key}: got '{path}' (does not exist), expected a file holding the bearer token") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{key}: got '{path}' ({exc}), expected a file the service user can read") from None
    if not token or any(c.isspace() for c in token):
        raise ConfigError(f"{key}: got '{path}' (empty, or the token has spaces), expected one token on one line, "
                          "e.g. from `openssl rand -hex 32`")
    return token


class MetricsServer:
    def __init__(self, bind: str, port: int, snapshot: Snapshot, token: Optional[str] = None) -> None:
        self.bind = bind
        self.port = port
        self.registry = registry_of(snapshot)
        self._expected = None if token is None else f"Bearer {token}".encode("utf-8")
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        registry = self.registry
        expected = self._expected

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if expected is not None:
                    given = self.headers.get("Authorization", "").encode("utf-8", "replace")
                    if not hmac.compare_digest(given, expected):
                        self.send_response(401)
                        self.send_header("WWW-Authenticate", 'Bearer realm="daad-agent"')
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404, "only /metrics here")
                    return
                try:
                    body = generate_latest(registry)
                except Exception:
                    logger.exception("metrics: snapshot failed")
                    self.send_error(500)
                    return
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: Any) -> None:
                logger.debug("metrics: " + fmt, *args)

        try:
            self._server = ThreadingHTTPServer((self.bind, self.port), Handler)
        except OSError as exc:
            raise ConfigError(
                f"metrics.prometheus_port: got {self.port} on {self.bind} ({exc.strerror or exc}), "
                "expected a free port on a local address"
            ) from None
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        logger.info("metrics: Prometheus endpoint on http://%s:%d/metrics%s", self.bind, self.port,
                    "" if expected is None else " (bearer token required)")

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None
