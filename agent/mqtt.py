"""MQTT settings and the durable event publisher (design.md §5).

Every defect event is written to the on-disk spool first, then published QoS 1; it leaves the spool
only when the broker acknowledges it. paho keeps its own unacknowledged messages in memory only,
so the spool is what carries events across broker outages and agent restarts.

Threads: paho's network thread runs the callbacks; one pump thread of ours publishes from the
spool, so the frame loop never touches the network. Our lock is never held while calling into paho:
paho calls `on_publish` while holding its own message lock, and `publish()` takes that same lock.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import ssl
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Set, Tuple, TypeVar

import paho.mqtt.client as mqtt
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.errors import ConfigError

from .mqtt_errors import ConnectProblem, from_connack, from_exception, from_socket_error
from .payloads import AVAILABILITY_OFFLINE, AVAILABILITY_ONLINE
from .spool import DEFAULT_MAX_EVENTS, DEFAULT_RESERVE_MB, Spool, SpoolError

logger = logging.getLogger(__name__)

CONFIG_KEY = "mqtt"  # where these settings live in the agent's YAML; used to name keys in errors
QOS = 1  # at least once: consumers de-duplicate on event_id
MAX_IN_FLIGHT = 20  # events published but not yet acknowledged; bounds paho's in-memory queue
PUMP_IDLE_S = 0.5  # the pump wakes at least this often, even if nobody notifies it
# After a reconnect paho resends its unacknowledged messages itself; new events wait for the first
# acknowledgement (which comes after those resends) so the order is kept. Bound that wait.
RESEND_HOLD_MAX_S = 2.0
DRIFT_BACKLOG = 100  # drift changes kept while they cannot be sent (they are minutes apart on a line)
FLUSH_POLL_S = 0.05
ERROR_LOG_INTERVAL_S = 30.0  # repeated pump errors (and memory drops) are logged at most this often
SPOOL_RETRY_S = 0.5  # a full disk is retried this often (not on every event: each try costs an fsync)
# paho 2.2 logs this at ERROR when its loop thread runs once more after our own clean disconnect.
PAHO_BENIGN_ERRORS = ("Client is not connected",)
# paho logs these at ERROR on every attempt; we log their reason once per change (mqtt_errors).
PAHO_REPORTED_BY_US = ("failed to receive on socket",)
SOCKET_ERROR_PREFIX = "failed to receive on socket: "
_ENV_NAME_RE = r"^[A-Za-z_][A-Za-z0-9_]*$"
_TOPIC_FORBIDDEN_RE = re.compile(r"[+#\s\x00]")


# -- settings ------------------------------------------------------------------------------------
class TlsSettings(BaseModel):
    """TLS towards the broker; without ca_file the system's CA store is used."""

    model_config = ConfigDict(extra="forbid")

    ca_file: Optional[Path] = Field(None, description="PEM CA bundle that signed the broker's certificate")
    cert_file: Optional[Path] = Field(None, description="PEM client certificate, for brokers that require one")
    key_file: Optional[Path] = Field(None, description="PEM private key of cert_file (keep it mode 0600)")
    insecure: bool = Field(False, description="skip the broker host name check; for tests only")

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> "TlsSettings":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: give both for a client certificate, or neither")
        return self


class MqttSettings(BaseModel):
    """Connection to the broker; topics are <prefix>/<station>/{availability,defects,status}."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("localhost", min_length=1, max_length=253, description="broker host name or address")
    port: int = Field(1883, ge=1, le=65535, description="broker port (8883 is the usual TLS port)")
    prefix: str = Field("daad", min_length=1, max_length=128, description="first topic level(s), e.g. daad or plant1/daad")
    station: str = Field(
        ..., min_length=1, max_length=64, pattern=r"^[^+#/\s\x00]+$",
        description="station id: one topic level, unique per agent (no + # / or spaces)",
    )
    client_id: Optional[str] = Field(
        None, min_length=1, max_length=128,
        description="MQTT client id, unique per device (duplicates make the broker kick the older client); "
                    "default daad-agent-<station>-<hostname>",
    )
    username: Optional[str] = Field(None, min_length=1, max_length=256, description="broker user name")
    password_file: Optional[Path] = Field(
        None, description="file holding the broker password (e.g. a systemd credential); never in the YAML itself"
    )
    password_env: Optional[str] = Field(
        None, pattern=_ENV_NAME_RE, description="name of the environment variable holding the broker password"
    )
    tls: Optional[TlsSettings] = Field(None, description="TLS settings; absent means plain TCP")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keepalive; a dead link is noticed after 1.5x this")
    status_interval_s: float = Field(10.0, ge=0.5, le=3600.0, description="period of the retained status message")
    reconnect_min_s: float = Field(0.5, gt=0.0, le=60.0, description="first delay before reconnecting; doubles per failure")
    reconnect_max_s: float = Field(30.0, gt=0.0, le=3600.0, description="longest delay between reconnect attempts")

    @field_validator("prefix")
    @classmethod
    def _prefix_is_topic_safe(cls, value: str) -> str:
        if _TOPIC_FORBIDDEN_RE.search(value) or value.startswith("$"):
            raise ValueError("must not contain + # or spaces, nor start with $ (e.g. daad or plant1/daad)")
        if any(level == "" for level in value.split("/")):
            raise ValueError("must not start or end with / nor contain // (e.g. daad or plant1/daad)")
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> "MqttSettings":
        if self.password_file is not None and self.password_env is not None:
            raise ValueError("give either password_file or password_env, not both")
        if (self.password_file is not None or self.password_env is not None) and self.username is None:
            raise ValueError("a password needs a username: set username as well")
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError(
                f"reconnect_min_s ({self.reconnect_min_s}) must not exceed reconnect_max_s ({self.reconnect_max_s})"
            )
        if self.client_id is None:
            self.client_id = f"daad-agent-{self.station}-{socket.gethostname()}"
        return self


class SpoolSettings(BaseModel):
    """The on-disk spool of events not yet acknowledged by the broker."""

    model_config = ConfigDict(extra="forbid")

    path: Path = Field(..., description="SQLite file, e.g. /var/lib/daad-agent/spool.db (StateDirectory=)")
    max_events: int = Field(
        DEFAULT_MAX_EVENTS, ge=1, le=10_000_000,
        description="bound of the spool; when full the oldest event is dropped and counted",
    )
    reserve_mb: float = Field(
        DEFAULT_RESERVE_MB, ge=0, le=100_000,
        description="disk held back beside the spool and released when the disk fills, so events stay durable "
                    "a while longer (16 MB held 11 488 events of 1 KB in a test); 0: none",
    )


class Topics(NamedTuple):
    availability: str
    defects: str
    status: str
    drift: str


def queue_retained(waiting: List[Tuple[str, bytes]], message: Tuple[str, bytes, bool]) -> List[Tuple[str, bytes]]:
    """`waiting` with (topic, payload, every) added last: a topic sent `every` time keeps its earlier payloads (its
    DRIFT_BACKLOG latest), any other keeps only this one (the latest status is all a consumer needs)."""
    topic, data, every = message
    kept = [m for m in waiting if every or m[0] != topic] + [(topic, data)]
    mine = [m for m in kept if m[0] == topic]
    if len(mine) > DRIFT_BACKLOG:  # one message is added at a time: at most the oldest goes
        kept.remove(mine[0])
    return kept


def topics(settings: MqttSettings) -> Topics:
    base = f"{settings.prefix}/{settings.station}"
    return Topics(availability=f"{base}/availability", defects=f"{base}/defects", status=f"{base}/status",
                  drift=f"{base}/drift")


def resolve_password(settings: MqttSettings) -> Optional[str]:
    """The broker password from password_file or password_env; ConfigError naming the key if unusable."""
    if settings.password_file is not None:
        path = settings.password_file
        key = f"{CONFIG_KEY}.password_file"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(
                f"{key}: {path} does not exist; create it (mode 0600) holding the broker password, "
                f"or use {CONFIG_KEY}.password_env"
            ) from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{key}: cannot read {path} ({err}); check its permissions for the service user") from None
        password = text.rstrip("\r\n")  # files written by `echo` end with a newline that is not part of it
        if not password:
            raise ConfigError(f"{key}: {path} is empty; write the broker password into it")
        return password
    if settings.password_env is not None:
        value = os.environ.get(settings.password_env)
        if not value:
            raise ConfigError(
                f"{CONFIG_KEY}.password_env: environment variable {settings.password_env} is not set or empty; "
                "set it in the unit (Environment= / EnvironmentFile=) or use password_file"
            )
        return value
    return None


def _configure_tls(client: mqtt.Client, tls: TlsSettings) -> None:
    for name in ("ca_file", "cert_file", "key_file"):
        path = getattr(tls, name)
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{CONFIG_KEY}.tls.{name}: {path} does not exist or is not a file")
    try:
        client.tls_set(
            ca_certs=None if tls.ca_file is None else str(tls.ca_file),
            certfile=None if tls.cert_file is None else str(tls.cert_file),
            keyfile=None if tls.key_file is None else str(tls.key_file),
            cert_reqs=ssl.CERT_REQUIRED,
        )
    except (ssl.SSLError, OSError, ValueError) as err:
        raise ConfigError(
            f"{CONFIG_KEY}.tls: cannot load the certificates ({err}); check that ca_file, cert_file and key_file are PEM"
        ) from None
    if tls.insecure:
        logger.warning("MQTT: TLS host name check disabled (%s.tls.insecure); use only for tests", CONFIG_KEY)
        client.tls_insecure_set(True)


def make_client(settings: MqttSettings, client_id: Optional[str] = None) -> mqtt.Client:
    """A paho client with the settings' identity, credentials and TLS (ConfigError for unreadable ones)."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or settings.client_id,
                         protocol=mqtt.MQTTv311)
    client.enable_logger(_PAHO_LOGGER)
    password = resolve_password(settings)
    if settings.username is not None:
        client.username_pw_set(settings.username, password)
    if settings.tls is not None:
        _configure_tls(client, settings.tls)
    return client


def probe_broker(settings: MqttSettings, timeout_s: float = 10.0) -> Optional[ConnectProblem]:
    """Connect once, as the agent would (TLS, credentials), and disconnect: None when the broker accepted us,
    else why not. Uses its own client id (`<client_id>-check`) so a running agent is not kicked off."""
    client = make_client(settings, client_id=f"{settings.client_id}-check")
    answer: List[Optional[ConnectProblem]] = []
    socket_error: List[str] = []

    def on_connect(c: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        answer.append(from_connack(reason_code, settings) if reason_code.is_failure else None)

    def on_log(c: mqtt.Client, userdata: Any, level: int, buf: str) -> None:
        if level == mqtt.MQTT_LOG_ERR and buf.startswith(SOCKET_ERROR_PREFIX):
            socket_error.append(buf[len(SOCKET_ERROR_PREFIX):])

    client.on_connect, client.on_log = on_connect, on_log
    try:
        client.connect(settings.host, settings.port, keepalive=settings.keepalive_s)
    except (OSError, ssl.SSLError) as exc:
        return from_exception(exc, settings)
    deadline = time.monotonic() + timeout_s
    while not answer and time.monotonic() < deadline:
        if client.loop(timeout=0.2) != mqtt.MQTT_ERR_SUCCESS and not answer:
            return from_socket_error(socket_error[-1] if socket_error else None, settings)
    client.disconnect()
    if not answer:
        return ConnectProblem("timeout", f"no CONNACK from {settings.host}:{settings.port} within {timeout_s:g} s")
    return answer[0]


def publish_retained_once(settings: MqttSettings, topic: str, payload: bytes, timeout_s: float = 5.0) -> bool:
    """Connect, publish one retained QoS 1 message, wait for its acknowledgement, disconnect: True if the broker
    took it. For an agent that is about to exit and has no publisher running; never raises for the broker."""
    try:
        client = make_client(settings, client_id=f"{settings.client_id}-exit")
        client.connect(settings.host, settings.port, keepalive=settings.keepalive_s)
    except (ConfigError, OSError, ssl.SSLError):
        return False
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=QOS, retain=True)
        info.wait_for_publish(timeout=timeout_s)
        return info.is_published()
    except (RuntimeError, ValueError):
        return False
    finally:
        client.disconnect()
        client.loop_stop()


class _DemoteBenignPahoErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and str(record.msg).startswith(PAHO_BENIGN_ERRORS + PAHO_REPORTED_BY_US):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


_PAHO_LOGGER = logging.getLogger(f"{__name__}.paho")
_PAHO_LOGGER.addFilter(_DemoteBenignPahoErrors())

_Callback = TypeVar("_Callback", bound=Callable[..., None])


def _never_raises(method: _Callback) -> _Callback:
    """paho re-raises callback exceptions in its network thread, which ends reconnecting for good."""

    def guarded(*args: Any, **kwargs: Any) -> None:
        try:
            method(*args, **kwargs)
        except Exception:
            logger.exception("MQTT: error in %s", method.__name__)

    guarded.__name__ = method.__name__
    guarded.__doc__ = method.__doc__
    return guarded  # type: ignore[return-value]


# -- publisher -----------------------------------------------------------------------------------
class EventPublisher:
    """Spool-backed QoS 1 publisher of defect events, plus retained availability and status."""

    def __init__(self, settings: MqttSettings, spool: Spool) -> None:
        self.settings = settings
        self.spool = spool
        self.topics = topics(settings)
        self._cv = threading.Condition()
        # Everything below is guarded by self._cv.
        self._connected = False  # true only between a successful CONNACK and the next disconnect
        self._ever_connected = False
        self._hold = False  # see RESEND_HOLD_MAX_S
        self._hold_since = 0.0
        self._pending: Dict[int, Optional[str]] = {}  # paho mid -> event_id (None: availability/status)
        self._early_acks: Set[int] = set()  # acks that arrived before publish() returned their mid
        self._acked: List[str] = []  # acknowledged event ids not yet removed from the spool
        # Retained messages not yet sent, oldest first: the latest status only, every drift change (see queue_retained).
        self._retained_waiting: List[Tuple[str, bytes]] = []
        self._wake = False
        self._stopping = False
        self._problem: Optional[ConnectProblem] = None  # why the attempts fail now; None once connected
        self._last_problem: Optional[ConnectProblem] = None  # the latest failure, kept after recovering
        self._connect_failures = 0
        self._reasons_seen: Set[str] = set()  # since the last good connection: each is warned once
        self._socket_error: Optional[str] = None  # what paho read from the socket before it closed
        self._attempt_reported = False  # this attempt's failure was already reported (refused CONNACK)
        self._published = 0
        self._acked_total = 0
        self._reconnects = 0
        self._spool_errors = 0  # events whose write to the spool failed (disk full)
        # Those events, oldest first, until the spool takes them: sent from here meanwhile, and written
        # by the pump as soon as the disk allows. Bounded like the spool; only these die with the process.
        self._unspooled: "OrderedDict[str, Tuple[str, bytes]]" = OrderedDict()
        self._unspooled_dropped = 0
        self._last_drop_log = float("-inf")
        self._next_spool_retry = float("-inf")  # pump thread only
        self._spool_failing = False  # between a failed write and the next good one: said once
        self._started = False
        self._pump: Optional[threading.Thread] = None
        self._last_error_log = float("-inf")
        self._client = self._make_client()

    def _make_client(self) -> mqtt.Client:
        s = self.settings
        client = make_client(s)
        client.will_set(self.topics.availability, AVAILABILITY_OFFLINE, qos=QOS, retain=True)
        client.reconnect_delay_set(min_delay=s.reconnect_min_s, max_delay=s.reconnect_max_s)  # type: ignore[arg-type]
        # Unlimited in paho: MAX_IN_FLIGHT bounds our events, and paho's "queued" state would only
        # reorder the resends after a reconnect.
        client.max_inflight_messages_set(0)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_log = self._on_log
        return client

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background; returns at once, even when the broker is down."""
        if self._started:
            return
        self._started = True
        with self._cv:
            self._stopping = False
        s = self.settings
        self._pump = threading.Thread(target=self._pump_loop, name="daad-mqtt-pump", daemon=True)
        self._pump.start()
        self._client.connect_async(s.host, s.port, keepalive=s.keepalive_s)
        self._client.loop_start()
        logger.info(
            "MQTT: connecting to %s:%d as %s; events on %s, %d waiting in the spool",
            s.host, s.port, s.client_id, self.topics.defects, self.spool.depth(),
        )

    def stop(self, timeout_s: float = 3.0) -> None:
        """Flush what the broker can take within timeout_s, publish retained `offline`, disconnect."""
        if not self._started:
            return
        deadline = time.monotonic() + timeout_s
        if self.connected:
            self.flush(max(0.0, deadline - time.monotonic()))
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._pump is not None:
            self._pump.join(max(0.1, deadline - time.monotonic()))
        if self.connected:
            self._send_latest_status()  # e.g. the "stopping" status published just before stop()
            info = self._send(self.topics.availability, AVAILABILITY_OFFLINE.encode(), retain=True, event_id=None)
            if info is not None:
                try:
                    info.wait_for_publish(max(0.1, deadline - time.monotonic()))
                except (RuntimeError, ValueError) as err:
                    logger.warning("MQTT: could not publish offline before disconnecting (%s)", err)
        self._client.disconnect()
        self._client.loop_stop()
        with self._cv:
            self._connected = False
            acked, self._acked = self._acked, []
        try:
            self._remove_acked(acked)
            self._write_unspooled(force=True)
            left = self.spool.depth()
        except SpoolError as err:
            logger.warning("MQTT: %s", err)
            left = -1
        with self._cv:
            lost = list(self._unspooled)
        if lost:
            logger.error("MQTT: %d event(s) neither written to the spool (disk full) nor acknowledged by the broker "
                         "are lost with this stop: %s", len(lost), ", ".join(lost))
        self._started = False
        logger.info("MQTT: stopped; %d event(s) left in the spool for the next start", left)

    # -- API used by the agent -----------------------------------------------------------------
    def publish_event(self, event_id: str, payload: Dict[str, Any]) -> None:
        """Spool durably, then publish in the background. Never blocks on the network.

        Raises TypeError/ValueError only for a payload that is not strict JSON (a caller bug).
        """
        data = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode("utf-8")
        with self._cv:
            behind = bool(self._unspooled)  # then this one waits behind them, keeping the order
        if not behind:
            try:
                self.spool.put(event_id, self.topics.defects, data)
                self._spool_writable()
                self._notify()
                return
            except SpoolError as err:
                with self._cv:
                    first, self._spool_failing = not self._spool_failing, True
                logger.log(
                    logging.ERROR if first else logging.DEBUG,
                    "MQTT: %s; events are kept in memory, sent from there, and written to the spool as soon as "
                    "the disk allows (a restart before then loses those not yet delivered); free space on %s",
                    err, self.spool.path.parent,
                )
        self._keep_in_memory(event_id, self.topics.defects, data)
        self._notify()

    def _spool_writable(self) -> None:
        with self._cv:
            was, self._spool_failing = self._spool_failing, False
        if was:
            logger.info("MQTT: the spool %s takes events again", self.spool.path)

    def _keep_in_memory(self, event_id: str, topic: str, data: bytes) -> None:
        with self._cv:
            self._spool_errors += 1
            self._unspooled[event_id] = (topic, data)
            if len(self._unspooled) <= self.spool.max_events:
                return
            dropped, _ = self._unspooled.popitem(last=False)
            self._unspooled_dropped += 1
            total = self._unspooled_dropped
            now = time.monotonic()
            if total > 1 and now - self._last_drop_log < ERROR_LOG_INTERVAL_S:
                return
            self._last_drop_log = now
        logger.error("MQTT: %d event(s) held in memory (spool.max_events), none writable: dropped the oldest, %s "
                     "(%d dropped so far); free disk space", self.spool.max_events, dropped, total)

    def publish_status(self, payload: Dict[str, Any]) -> None:
        """Retained, QoS 1, not spooled: only the latest status is kept and sent once connected."""
        self._publish_retained(self.topics.status, payload)

    def publish_drift(self, payload: Dict[str, Any]) -> None:
        """Retained, QoS 1, not spooled: every change is sent, in order (a consumer may log each warning), even when
        changes come faster than the pump sends or while the broker is away; beyond DRIFT_BACKLOG the oldest go."""
        self._publish_retained(self.topics.drift, payload)

    def _publish_retained(self, topic: str, payload: Dict[str, Any]) -> None:
        data = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode("utf-8")
        with self._cv:
            self._queue_retained(topic, data)
            self._wake = True
            self._cv.notify_all()

    def _queue_retained(self, topic: str, data: bytes) -> None:
        """Queue a retained message (the caller holds self._cv): every drift change, the latest status only."""
        self._retained_waiting = queue_retained(self._retained_waiting, (topic, data, topic == self.topics.drift))

    def flush(self, timeout_s: float) -> bool:
        """Wait until every spooled event is acknowledged; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while True:
                if self.spool.depth() == 0 and not self._acked and not self._unspooled:
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cv.wait(min(remaining, FLUSH_POLL_S))

    @property
    def connected(self) -> bool:
        with self._cv:
            return self._connected

    def stats(self) -> Dict[str, Any]:
        with self._cv:
            in_flight = sum(1 for eid in self._pending.values() if eid is not None)
            out = {
                "connected": self._connected,
                "connect_error": None if self._problem is None else self._problem.reason,
                "last_connect_error": None if self._last_problem is None else self._last_problem.reason,
                "connect_failures": self._connect_failures,
                "published": self._published,
                "acked": self._acked_total,
                "reconnects": self._reconnects,
                "in_flight": in_flight,
                "spool_errors": self._spool_errors,
                "unspooled": len(self._unspooled),
                "unspooled_dropped": self._unspooled_dropped,
            }
        out["spool_depth"] = self.spool.depth()
        out["spool_dropped"] = self.spool.dropped
        return out

    # -- paho callbacks (network thread) ----------------------------------------------------------
    @_never_raises
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        s = self.settings
        if reason_code.is_failure:
            with self._cv:
                self._connected = False
                self._attempt_reported = True  # the disconnect that follows is not another reason
            self._report_problem(from_connack(reason_code, s))
            return
        with self._cv:
            recovered, self._problem = self._problem, None
            self._reasons_seen.clear()
            failures = self._connect_failures
            self._socket_error = None
            if self._ever_connected:
                self._reconnects += 1
            self._ever_connected = True
            self._connected = True
            self._unreachable_logged = False
            self._hold = True
            self._hold_since = time.monotonic()
            depth = self.spool.depth()
        logger.info("MQTT: connected to %s:%d; %d event(s) to deliver from the spool", s.host, s.port, depth)
        if recovered is not None:
            logger.info("MQTT: the connection works again (after %s; %d failed attempt(s) since start)",
                        recovered.reason, failures)
        self._send(self.topics.availability, AVAILABILITY_ONLINE.encode(), retain=True, event_id=None)
        self._notify()

    @_never_raises
    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this from inside its `except OSError:` around connect: the exception is still
        # the one being handled, and paho passes it nowhere else.
        self._report_problem(from_exception(sys.exc_info()[1], self.settings))

    @_never_raises
    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, buf: str) -> None:
        if level == mqtt.MQTT_LOG_ERR and buf.startswith(SOCKET_ERROR_PREFIX):
            with self._cv:
                self._socket_error = buf[len(SOCKET_ERROR_PREFIX):]

    @_never_raises
    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        with self._cv:
            was_connected = self._connected
            self._connected = False
            stopping = self._stopping
            socket_error, self._socket_error = self._socket_error, None
            reported, self._attempt_reported = self._attempt_reported, False
        if stopping:
            return
        if was_connected:
            logger.warning("MQTT: disconnected (%s); events wait in the spool, reconnecting",
                           socket_error or reason_code)
        elif not reported:  # closed between the TLS handshake and the CONNACK
            self._report_problem(from_socket_error(socket_error, self.settings))

    def _report_problem(self, problem: ConnectProblem) -> None:
        """Log a failed attempt: at WARNING the first time its reason comes up in this outage, else DEBUG
        (a set, not the previous reason only: some failures alternate, e.g. TLS alert / EOF)."""
        with self._cv:
            self._connect_failures += 1
            changed = problem.reason not in self._reasons_seen
            self._reasons_seen.add(problem.reason)
            self._problem = self._last_problem = problem
        s = self.settings
        logger.log(logging.WARNING if changed else logging.DEBUG,
                   "MQTT: cannot connect to %s:%d: %s; retrying (up to every %gs), events wait in the spool",
                   s.host, s.port, problem.text, s.reconnect_max_s, extra={"reason": problem.reason})

    @_never_raises
    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        with self._cv:
            if mid in self._pending:
                event_id = self._pending.pop(mid)
                if event_id is not None:
                    if getattr(reason_code, "is_failure", False):
                        # MQTT 5 only: the broker refused it; resending would block the queue forever.
                        logger.error("MQTT: broker refused event %s (%s); removed from the spool", event_id, reason_code)
                    self._acked.append(event_id)
                    self._acked_total += 1
            else:
                self._early_acks.add(mid)
            self._hold = False
            self._wake = True
            self._cv.notify_all()

    # -- internals ----------------------------------------------------------------------------
    def _notify(self) -> None:
        with self._cv:
            self._wake = True
            self._cv.notify_all()

    def _send(self, topic: str, payload: bytes, retain: bool, event_id: Optional[str]) -> Optional[mqtt.MQTTMessageInfo]:
        """Publish QoS 1 and remember mid -> event_id; None if paho did not queue it."""
        try:
            info = self._client.publish(topic, payload, qos=QOS, retain=retain)
        except (ValueError, RuntimeError) as err:
            logger.error("MQTT: cannot publish on %s (%s)", topic, err)
            return None
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            return None
        with self._cv:
            if info.mid in self._early_acks:
                self._early_acks.discard(info.mid)
                if event_id is not None:
                    self._acked.append(event_id)
                    self._acked_total += 1
                    self._wake = True
                    self._cv.notify_all()
            else:
                self._pending[info.mid] = event_id
        return info

    def _pump_loop(self) -> None:
        while True:
            with self._cv:
                if not self._wake and not self._stopping:
                    self._cv.wait(PUMP_IDLE_S)
                self._wake = False
                acked, self._acked = self._acked, []
                if self._hold and time.monotonic() - self._hold_since > RESEND_HOLD_MAX_S:
                    self._hold = False
                stopping = self._stopping
                can_send = self._connected and not self._hold and not stopping
            try:
                self._remove_acked(acked)
                self._write_unspooled()
                if not self._unspooled:
                    self.spool.restore_reserve()  # rate-limited inside; a no-op while it is there
                if can_send:
                    self._fill_window()
                    self._send_latest_status()
            except Exception as err:  # the pump must outlive a bad moment (disk full, spool closed)
                now = time.monotonic()
                if now - self._last_error_log >= ERROR_LOG_INTERVAL_S:
                    self._last_error_log = now
                    logger.error("MQTT: event pump: %s", err, exc_info=not isinstance(err, SpoolError))
                with self._cv:
                    if not self._stopping:
                        self._cv.wait(PUMP_IDLE_S)
            if stopping:
                return

    def _remove_acked(self, acked: List[str]) -> None:
        if not acked:
            return
        with self._cv:
            for event_id in acked:
                self._unspooled.pop(event_id, None)  # delivered from memory: no need to write it any more
        try:
            self.spool.ack_many(acked)
        except SpoolError:
            # A full disk can refuse even a delete (WAL). Keep them "acknowledged, not yet removed", so
            # they count as busy and are not sent again; retried on the next turn.
            with self._cv:
                self._acked[:0] = acked
            raise
        with self._cv:
            self._cv.notify_all()  # flush() waits on this

    def _write_unspooled(self, force: bool = False) -> None:
        """Move the events held in memory to the spool, oldest first, as far as the disk allows."""
        with self._cv:
            waiting = list(self._unspooled.items())
        now = time.monotonic()
        if not waiting or (now < self._next_spool_retry and not force):
            return
        written = 0
        for event_id, (topic, data) in waiting:
            try:
                self.spool.put(event_id, topic, data)
            except SpoolError:
                self._next_spool_retry = now + SPOOL_RETRY_S
                break
            with self._cv:
                self._unspooled.pop(event_id, None)
            written += 1
        if written == len(waiting):
            self._spool_writable()
        if written:
            with self._cv:
                left = len(self._unspooled)
                self._cv.notify_all()
            logger.info("MQTT: spool writable again: %d event(s) moved from memory to %s, %d still in memory",
                        written, self.spool.path, left)

    def _fill_window(self) -> None:
        """Publish the oldest spooled events that are not in flight, up to MAX_IN_FLIGHT."""
        with self._cv:
            pending_events = [eid for eid in self._pending.values() if eid is not None]
            busy = set(pending_events)
            busy.update(self._acked)  # acknowledged, not yet removed from the spool
        free = MAX_IN_FLIGHT - len(pending_events)
        if free <= 0:
            return
        spooled = [(e.event_id, e.topic, e.payload) for e in self.spool.peek(len(busy) + free)]
        with self._cv:  # after the spooled ones: they are older
            in_memory = [(eid, topic, data) for eid, (topic, data) in self._unspooled.items()][: len(busy) + free]
        for event_id, topic, payload in spooled + in_memory:
            if event_id in busy:
                continue
            if free <= 0 or not self.connected:
                return
            if self._send(topic, payload, retain=False, event_id=event_id) is None:
                return
            busy.add(event_id)  # just moved from memory to the spool: listed twice
            free -= 1
            with self._cv:
                self._published += 1

    def _send_latest_status(self) -> None:
        """The waiting status and drift messages (retained), in order; from the first that cannot be sent on, they
        wait for the next try, still in order and before any queued meanwhile."""
        with self._cv:
            waiting, self._retained_waiting = self._retained_waiting, []
        for i, (topic, data) in enumerate(waiting):
            if self._send(topic, data, retain=True, event_id=None) is None:
                with self._cv:
                    queued_meanwhile, self._retained_waiting = self._retained_waiting, []
                    for topic_, data_ in waiting[i:] + queued_meanwhile:
                        self._queue_retained(topic_, data_)
                return
