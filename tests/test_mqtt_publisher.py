"""agent.mqtt: settings, and the spool-backed publisher against a real Mosquitto and a real paho subscriber.

Outage tests restart the broker with persistence on and subscribe with a persistent session, so
the subscriber misses nothing while the broker is down: what the publisher replays must arrive.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import paho.mqtt.client as mqtt
import pytest
from pydantic import ValidationError

from agent.mqtt import (
    DRIFT_BACKLOG,
    MAX_IN_FLIGHT,
    EventPublisher,
    MqttSettings,
    SpoolSettings,
    TlsSettings,
    resolve_password,
    queue_retained,
    topics,
)
from agent.payloads import AVAILABILITY_OFFLINE, AVAILABILITY_ONLINE
from agent.spool import Spool
from engine.errors import ConfigError
from tests.mqtt_broker import MosquittoBroker, broker_store
from tests.mqtt_broker import wait_for as poll
from tests.full_disk import TinyDisk
from tests.tls_pki import OPENSSL, Pki, make_pki

STATION = "st1"
REPO_ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 15.0  # generous upper bound for polling; tests finish as soon as the condition holds
CHILD_READY_S = 20.0


# -- helpers -------------------------------------------------------------------------------------
def wait_for(predicate: Callable[[], bool], timeout: float = WAIT_S) -> bool:
    return poll(predicate, timeout)


def make_settings(broker: MosquittoBroker, **overrides: Any) -> MqttSettings:
    values: Dict[str, Any] = dict(
        host="127.0.0.1", port=broker.port, station=STATION, client_id=f"pub-{uuid.uuid4().hex[:8]}",
        keepalive_s=5, reconnect_min_s=0.1, reconnect_max_s=0.5,
    )
    values.update(overrides)
    return MqttSettings(**values)


def event(n: int) -> Tuple[str, Dict[str, Any]]:
    event_id = f"ev{n:04d}"
    return event_id, {"event_id": event_id, "n": n}


def broker_scratch(stack: contextlib.ExitStack) -> Path:
    scratch = broker_store()
    stack.callback(shutil.rmtree, scratch, True)
    return scratch


def enable_persistence(broker: MosquittoBroker, stack: contextlib.ExitStack) -> None:
    """Restart the fixture's broker (same port) keeping sessions and queued messages across restarts."""
    store = broker_scratch(stack)
    stack.callback(broker.stop)  # before the store is removed
    broker.stop()
    broker.persist(store).start()


class Subscriber:
    """A real paho subscriber recording everything under <prefix>/<station>/#."""

    def __init__(self, port: int, persistent: bool = False, topic: str = f"daad/{STATION}/#") -> None:
        self.topic = topic
        self.messages: List[Tuple[str, bytes, bool, int]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"sub-{uuid.uuid4().hex[:8]}", clean_session=not persistent
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.05, 0.2)
        self.client.connect("127.0.0.1", port, keepalive=5)
        self.client.loop_start()
        if not self._subscribed.wait(WAIT_S):
            raise RuntimeError("test subscriber could not subscribe")

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        client.subscribe(self.topic, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain), msg.qos))

    def on(self, suffix: str) -> List[Tuple[bytes, bool, int]]:
        with self._lock:
            return [(p, r, q) for t, p, r, q in self.messages if t.endswith("/" + suffix)]

    def event_ids(self) -> List[str]:
        return [json.loads(p)["event_id"] for p, _, _ in self.on("defects")]

    def last(self, suffix: str) -> Optional[bytes]:
        got = self.on(suffix)
        return got[-1][0] if got else None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained(port: int, suffix: str) -> Optional[bytes]:
    """What a consumer connecting now gets as the retained message of daad/<station>/<suffix>."""
    sub = Subscriber(port, topic=f"daad/{STATION}/{suffix}")
    try:
        wait_for(lambda: bool(sub.on(suffix)), timeout=1.0)
        got = sub.on(suffix)
        return got[-1][0] if got and got[-1][1] else None
    finally:
        sub.close()


@pytest.fixture()
def stack() -> Iterator[contextlib.ExitStack]:
    """Teardown in reverse order even when an assertion fails (publishers, subscribers, spools)."""
    with contextlib.ExitStack() as s:
        yield s


def assert_delivered_in_order(sub: Subscriber, count: int) -> None:
    """Events 0..count-1 arrived, each once, in the order published."""
    assert wait_for(lambda: len(sub.event_ids()) >= count)
    assert sub.event_ids() == [event(n)[0] for n in range(count)]


def assert_spool_delivered_when_the_broker_is_back(stack: contextlib.ExitStack, mosquitto: MosquittoBroker,
                                                   spool: Spool, sub: Subscriber, count: int) -> None:
    """A publisher started on `spool` while the broker is down, then the broker: the spool's `count` events
    are delivered in order."""
    pub = started_publisher(stack, make_settings(mosquitto), spool)
    mosquitto.start()
    assert pub.flush(WAIT_S)
    assert_delivered_in_order(sub, count)


def started_publisher(stack: contextlib.ExitStack, settings: MqttSettings, spool: Spool) -> EventPublisher:
    pub = EventPublisher(settings, spool)
    stack.callback(pub.stop, 1.0)
    pub.start()
    return pub


def open_spool(stack: contextlib.ExitStack, path: Path) -> Spool:
    spool = Spool(path)
    stack.callback(spool.close)
    return spool


def subscriber(stack: contextlib.ExitStack, port: int, persistent: bool = False) -> Subscriber:
    sub = Subscriber(port, persistent=persistent)
    stack.callback(sub.close)
    return sub


def persistent_subscriber(stack: contextlib.ExitStack, mosquitto: MosquittoBroker) -> Subscriber:
    """A subscriber whose session the broker, restarted to persist, keeps (and queues for) across its restarts."""
    enable_persistence(mosquitto, stack)
    return subscriber(stack, mosquitto.port, persistent=True)


def child_publisher(stack: contextlib.ExitStack, settings: MqttSettings, spool_path: Path, marker: Path,
                    events: int, wait_connected: bool) -> subprocess.Popen:
    """A separate agent process: starts an EventPublisher, publishes, writes `marker`, then idles until killed."""
    script = textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        from agent.mqtt import EventPublisher, MqttSettings
        from agent.spool import Spool
        settings = MqttSettings.model_validate_json(sys.argv[1])
        pub = EventPublisher(settings, Spool(Path(sys.argv[2])))
        pub.start()
        if sys.argv[5] == "1":
            deadline = time.monotonic() + 15
            while not pub.connected and time.monotonic() < deadline:
                time.sleep(0.02)
        for n in range(int(sys.argv[4])):
            pub.publish_event("ev%04d" % n, {"event_id": "ev%04d" % n, "n": n})
        Path(sys.argv[3]).write_text("connected" if pub.connected else "ready")
        time.sleep(120)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, settings.model_dump_json(), str(spool_path), str(marker), str(events),
         "1" if wait_connected else "0"],
        cwd=str(REPO_ROOT),
    )

    def kill() -> None:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)

    stack.callback(kill)
    assert wait_for(lambda: marker.exists() or proc.poll() is not None, timeout=CHILD_READY_S)
    assert proc.poll() is None, "the child publisher exited early"
    return proc


# -- settings --------------------------------------------------------------------------------------
def test_settings_defaults_and_topics() -> None:
    s = MqttSettings(station="line-3")
    assert (s.host, s.port, s.prefix, s.keepalive_s) == ("localhost", 1883, "daad", 30)
    assert s.client_id is not None and s.client_id.startswith("daad-agent-line-3-")
    t = topics(MqttSettings(station="line-3", prefix="plant1/daad"))
    assert t == ("plant1/daad/line-3/availability", "plant1/daad/line-3/defects", "plant1/daad/line-3/status",
                 "plant1/daad/line-3/drift")
    assert SpoolSettings(path=Path("/var/lib/daad-agent/spool.db")).max_events == 10000


@pytest.mark.parametrize(
    "values, key",
    [
        ({"station": "a/b"}, "station"),  # would add a topic level
        ({"station": "a+"}, "station"),  # wildcard
        ({"station": ""}, "station"),
        ({}, "station"),  # required
        ({"station": "s", "prefix": "daad/"}, "prefix"),
        ({"station": "s", "prefix": "da#ad"}, "prefix"),
        ({"station": "s", "port": 0}, "port"),
        ({"station": "s", "keepalive_s": 1}, "keepalive_s"),
        ({"station": "s", "hots": "x"}, "hots"),  # unknown key (typo) is refused
        ({"station": "s", "password_env": "MQTT_PW"}, "username"),  # password without a user
        ({"station": "s", "username": "u", "password_env": "A", "password_file": "/f"}, "not both"),
        ({"station": "s", "password_env": "1BAD"}, "password_env"),
        ({"station": "s", "reconnect_min_s": 5, "reconnect_max_s": 1}, "reconnect_min_s"),
        ({"station": "s", "tls": {"cert_file": "/c.pem"}}, "key_file"),
        ({"station": "s", "tls": {"verify": False}}, "verify"),
    ],
)
def test_invalid_settings_name_the_key(values: Dict[str, Any], key: str) -> None:
    with pytest.raises(ValidationError) as info:
        MqttSettings(**values)
    assert key in str(info.value)


def test_spool_settings_bounds() -> None:
    with pytest.raises(ValidationError, match="max_events"):
        SpoolSettings(path=Path("x.db"), max_events=0)


def test_missing_password_file_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "mqtt-password"
    settings = MqttSettings(station="s", username="agent", password_file=missing)
    with pytest.raises(ConfigError) as info:
        EventPublisher(settings, Spool(tmp_path / "spool.db"))
    assert "mqtt.password_file" in str(info.value) and str(missing) in str(info.value)


def test_password_from_file_or_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pw_file = tmp_path / "pw"
    pw_file.write_text("s3cret\n")  # `echo s3cret > pw` adds a newline that is not part of it
    assert resolve_password(MqttSettings(station="s", username="u", password_file=pw_file)) == "s3cret"
    pw_file.write_text("\n")
    with pytest.raises(ConfigError, match="mqtt.password_file: .* is empty"):
        resolve_password(MqttSettings(station="s", username="u", password_file=pw_file))
    monkeypatch.delenv("DAAD_TEST_MQTT_PW", raising=False)
    env_settings = MqttSettings(station="s", username="u", password_env="DAAD_TEST_MQTT_PW")
    with pytest.raises(ConfigError, match="mqtt.password_env: environment variable DAAD_TEST_MQTT_PW"):
        resolve_password(env_settings)
    monkeypatch.setenv("DAAD_TEST_MQTT_PW", "from-env")
    assert resolve_password(env_settings) == "from-env"
    assert resolve_password(MqttSettings(station="s")) is None


def test_missing_tls_file_is_a_clear_error(tmp_path: Path) -> None:
    settings = MqttSettings(station="s", tls=TlsSettings(ca_file=tmp_path / "ca.pem"))
    with pytest.raises(ConfigError, match="mqtt.tls.ca_file: .*ca.pem does not exist"):
        EventPublisher(settings, Spool(tmp_path / "spool.db"))
    (tmp_path / "ca.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match="mqtt.tls: cannot load"):
        EventPublisher(settings, Spool(tmp_path / "spool.db"))


# -- delivery with the broker up ------------------------------------------------------------------
def test_delivers_events_in_order_and_empties_the_spool(
    mosquitto: MosquittoBroker, tmp_path: Path, stack: contextlib.ExitStack
) -> None:
    n_events = 120
    sub = subscriber(stack, mosquitto.port)
    spool = open_spool(stack, tmp_path / "spool.db")
    pub = started_publisher(stack, make_settings(mosquitto), spool)
    assert wait_for(lambda: pub.connected)
    most_in_flight = 0
    for n in range(n_events):
        pub.publish_event(*event(n))
        most_in_flight = max(most_in_flight, pub.stats()["in_flight"])
    assert pub.flush(WAIT_S)
    assert wait_for(lambda: len(sub.on("defects")) >= n_events)
    assert sub.event_ids() == [event(n)[0] for n in range(n_events)]
    assert {qos for _, _, qos in sub.on("defects")} == {1}
    assert most_in_flight <= MAX_IN_FLIGHT
    stats = pub.stats()
    assert stats["published"] == n_events and stats["acked"] == n_events
    assert stats["spool_depth"] == 0 and stats["in_flight"] == 0 and stats["connected"] is True
    assert spool.depth() == 0


def test_events_leave_the_spool_only_when_the_broker_acknowledges(
    mosquitto: MosquittoBroker, tmp_path: Path, stack: contextlib.ExitStack
) -> None:
    n_events = MAX_IN_FLIGHT + 15
    sub = subscriber(stack, mosquitto.port)
    spool = open_spool(stack, tmp_path / "spool.db")
    pub = started_publisher(stack, make_settings(mosquitto), spool)
    assert wait_for(lambda: pub.connected)
    assert mosquitto.proc is not None
    broker_pid = mosquitto.proc.pid
    os.kill(broker_pid, signal.SIGSTOP)  # connection stays up, but no PUBACK can come
    stack.callback(os.kill, broker_pid, signal.SIGCONT)
    try:
        for n in range(n_events):
            pub.publish_event(*event(n))
        assert wait_for(lambda: pub.stats()["in_flight"] == MAX_IN_FLIGHT)
        time.sleep(0.2)  # give a wrong implementation time to overfill the window or ack early
        stats = pub.stats()
        assert stats["in_flight"] == MAX_IN_FLIGHT and stats["published"] == MAX_IN_FLIGHT
        assert stats["acked"] == 0 and spool.depth() == n_events
    finally:
        os.kill(broker_pid, signal.SIGCONT)
    assert pub.flush(WAIT_S)
    assert wait_for(lambda: len(sub.on("defects")) >= n_events)
    assert sub.event_ids() == [event(n)[0] for n in range(n_events)]


def test_online_retained_after_connect_and_offline_on_stop(
    mosquitto: MosquittoBroker, tmp_path: Path, stack: contextlib.ExitStack
) -> None:
    spool = open_spool(stack, tmp_path / "spool.db")
    pub = EventPublisher(make_settings(mosquitto), spool)
    pub.start()
    assert wait_for(lambda: pub.connected)
    assert wait_for(lambda: retained(mosquitto.port, "availability") == AVAILABILITY_ONLINE.encode())
    pub.publish_status({"state": "stopping"})
    pub.stop()  # sends the last status before going offline
    assert not pub.connected
    assert retained(mosquitto.port, "availability") == AVAILABILITY_OFFLINE.encode()
    assert retained(mosquitto.port, "status") == b'{"state":"stopping"}'


def test_status_is_retained_latest_wins_and_not_spooled(
    mosquitto: MosquittoBroker, tmp_path: Path, stack: contextlib.ExitStack
) -> None:
    sub = subscriber(stack, mosquitto.port)
    spool = open_spool(stack, tmp_path / "spool.db")
    pub = started_publisher(stack, make_settings(mosquitto), spool)
    assert wait_for(lambda: pub.connected)
    pub.publish_status({"n": 1})
    pub.publish_status({"n": 2})
    assert spool.depth() == 0
    assert wait_for(lambda: sub.last("status") == b'{"n":2}')
    assert {qos for _, _, qos in sub.on("status")} == {1}
    assert retained(mosquitto.port, "status") == b'{"n":2}'


def test_queued_retained_keeps_the_latest_status_and_every_drift_change_in_order() -> None:
    waiting: List[Tuple[str, bytes]] = []
    for message in [("s", b"1", False), ("d", b"a", True), ("s", b"2", False), ("d", b"b", True)]:
        waiting = queue_retained(waiting, message)
    assert waiting == [("d", b"a"), ("s", b"2"), ("d", b"b")]
    for n in range(DRIFT_BACKLOG + 5):
        waiting = queue_retained(waiting, ("d", str(n).encode(), True))
    drift = [data for topic, data in waiting if topic == "d"]
    assert len(drift) == DRIFT_BACKLOG and drift[-1] == str(DRIFT_BACKLOG + 4).encode()  # the oldest gave way
    assert ("s", b"2") in waiting


def test_every_drift_change_made_while_the_broker_is_away_arrives_in_order(
    mosquitto: MosquittoBroker, tmp_path: Path, stack: contextlib.ExitStack
) -> None:
    """A consumer may log each warning: drift changes are not merged into the latest, unlike the status."""
    sub = persistent_subscriber(stack, mosquitto)
    mosquitto.stop()
    pub = started_publisher(stack, make_settings(mosquitto), open_spool(stack, tmp_path / "spool.db"))
    states = ["collecting", "warning", "recalibrate", "warning", "ok"]
    for n, state in enumerate(states):
        pub.publish_drift({"state": state})
        pub.publish_status({"n": n})
    mosquitto.start()
    assert wait_for(lambda: len(sub.on("drift")) >= len(states) and sub.last("status") == b'{"n":4}')
    assert [json.loads(p)["state"] for p, _, _ in sub.on("drift")] == states
    assert [p for p, _, _ in sub.on("status")] == [b'{"n":4}']
    assert retained(mosquitto.port, "drift") == b'{"state":"ok"}'


# -- outages and restarts -------------------------------------------------------------------------
def test_broker_outage_mid_run_loses_nothing(
    mosquitto: MosquittoBroker, tmp_path: Path, stack: contextlib.ExitStack
) -> None:
    sub = persistent_subscriber(stack, mosquitto)
    spool = open_spool(stack, tmp_path / "spool.db")
    pub = started_publisher(stack, make_settings(mosquitto), spool)
    assert wait_for(lambda: pub.connected)
    for n in range(30):  # not flushed: some are still in flight when the broker goes
        pub.publish_event(*event(n))
    mosquitto.stop()
    assert wait_for(lambda: not pub.connected)
    began = time.monotonic()
    for n in range(30, 60):
        pub.publish_event(*event(n))
    assert time.monotonic() - began < 2.0, "publish_event blocked while the broker was down"
    assert pub.stats()["spool_depth"] >= 30
    assert not pub.flush(0.2)
    mosquitto.start()
    assert pub.flush(WAIT_S)
    expected = {event(n)[0] for n in range(60)}
    assert wait_for(lambda: set(sub.event_ids()) >= expected)
    assert set(sub.event_ids()) == expected  # every event at least once, nothing else
    assert spool.depth() == 0
    assert pub.stats()["reconnects"] >= 1


def test_starts_without_broker_and_delivers_once_it_appears(
    mosquitto: MosquittoBroker, tmp_path: Path, stack: contextlib.ExitStack
) -> None:
    sub = persistent_subscriber(stack, mosquitto)
    mosquitto.stop()
    spool = open_spool(stack, tmp_path / "spool.db")
    began = time.monotonic()
    pub = started_publisher(stack, make_settings(mosquitto), spool)
    for n in range(5):
        pub.publish_event(*event(n))
    pub.publish_status({"n": 1})
    assert time.monotonic() - began < 2.0, "start/publish blocked without a broker"
    time.sleep(0.3)  # several failed connection attempts
    assert not pub.connected and pub.stats()["connected"] is False
    assert spool.depth() == 5
    mosquitto.start()
    assert pub.flush(WAIT_S)
    assert_delivered_in_order(sub, 5)
    assert wait_for(lambda: sub.last("status") == b'{"n":1}')


def test_stopped_publisher_spool_is_delivered_by_the_next_one(
    mosquitto: MosquittoBroker, tmp_path: Path, stack: contextlib.ExitStack
) -> None:
    sub = persistent_subscriber(stack, mosquitto)
    mosquitto.stop()
    path = tmp_path / "spool.db"
    spool_a = Spool(path)
    pub_a = EventPublisher(make_settings(mosquitto), spool_a)
    pub_a.start()
    for n in range(8):
        pub_a.publish_event(*event(n))
    pub_a.stop(timeout_s=0.5)  # no broker: nothing acknowledged
    spool_a.close()

    spool_b = open_spool(stack, path)
    assert spool_b.depth() == 8
    assert_spool_delivered_when_the_broker_is_back(stack, mosquitto, spool_b, sub, 8)  # replayed in order


def test_killed_agent_spool_is_delivered_by_the_next_one(
    mosquitto: MosquittoBroker, tmp_path: Path, stack: contextlib.ExitStack
) -> None:
    sub = persistent_subscriber(stack, mosquitto)
    mosquitto.stop()
    path = tmp_path / "spool.db"
    proc = child_publisher(stack, make_settings(mosquitto), path, tmp_path / "ready", events=6, wait_connected=False)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)

    spool = open_spool(stack, path)
    assert spool.depth() == 6
    assert_spool_delivered_when_the_broker_is_back(stack, mosquitto, spool, sub, 6)


def test_last_will_offline_when_the_agent_is_killed(
    mosquitto: MosquittoBroker, tmp_path: Path, stack: contextlib.ExitStack
) -> None:
    sub = subscriber(stack, mosquitto.port)
    marker = tmp_path / "ready"
    proc = child_publisher(stack, make_settings(mosquitto), tmp_path / "spool.db", marker, events=0,
                           wait_connected=True)
    assert marker.read_text() == "connected"
    assert wait_for(lambda: sub.last("availability") == AVAILABILITY_ONLINE.encode())
    proc.send_signal(signal.SIGKILL)  # no DISCONNECT packet: the broker publishes the will
    proc.wait(10)
    assert wait_for(lambda: sub.last("availability") == AVAILABILITY_OFFLINE.encode())
    assert retained(mosquitto.port, "availability") == AVAILABILITY_OFFLINE.encode()


# -- authentication --------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd not installed")
def test_refused_connection_is_not_connected_and_password_file_works(
    mosquitto: MosquittoBroker, tmp_path: Path, stack: contextlib.ExitStack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = f"pw-{uuid.uuid4().hex}"
    passwd = broker_scratch(stack) / "passwd"
    stack.callback(mosquitto.stop)  # before the password file is removed
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "agent", secret], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.chmod(passwd, 0o644)  # readable by the user mosquitto drops to
    mosquitto.stop()
    with open(mosquitto.conf, "a") as fh:
        fh.write(f"allow_anonymous false\npassword_file {passwd}\n")
    mosquitto.start()

    anonymous = EventPublisher(make_settings(mosquitto), open_spool(stack, tmp_path / "a.db"))
    stack.callback(anonymous.stop, 1.0)
    seen_connected = []
    sampling = threading.Event()

    def sample() -> None:  # a refused CONNACK must never count as connected, not even briefly
        while not sampling.is_set():
            if anonymous.connected:
                seen_connected.append(True)
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    anonymous.start()
    anonymous.publish_event(*event(0))
    refusals = lambda: [r for r in caplog.records if "refused the connection" in r.getMessage()]  # noqa: E731
    assert wait_for(lambda: len(refusals()) >= 3)  # paho keeps retrying; each try is refused
    sampling.set()
    sampler.join()
    assert not seen_connected and not anonymous.connected
    stats = anonymous.stats()
    assert stats["connected"] is False and stats["published"] == 0 and stats["reconnects"] == 0
    assert stats["spool_depth"] == 1
    # named once at WARNING (the key to fix included), then only at DEBUG while the reason stays
    assert [r.levelname for r in refusals()][:3] == ["WARNING", "DEBUG", "DEBUG"]
    assert "does not accept anonymous clients; set mqtt.username" in refusals()[0].getMessage()
    assert stats["connect_error"] == "auth-not-authorised" and stats["connect_failures"] >= 3

    pw_file = tmp_path / "mqtt-password"
    pw_file.write_text(secret + "\n")
    spool = open_spool(stack, tmp_path / "b.db")
    authed = started_publisher(stack, make_settings(mosquitto, username="agent", password_file=pw_file), spool)
    authed.publish_event(*event(1))
    assert authed.flush(WAIT_S)
    assert authed.connected
    assert secret not in caplog.text


# -- connection failures named with their reason ----------------------------------------------------
def connect_warnings(caplog: pytest.LogCaptureFixture) -> List[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "agent.mqtt" and "cannot connect" in r.getMessage()]


def paho_errors(caplog: pytest.LogCaptureFixture) -> List[str]:
    return [r.getMessage() for r in caplog.records if r.name.endswith(".paho") and r.levelno >= logging.ERROR]


@pytest.fixture(scope="module")
def pki() -> Iterator[Pki]:
    if OPENSSL is None:
        pytest.skip("openssl CLI not installed")
    store = broker_store()  # mosquitto's own user must read the broker's key and certificates
    try:
        yield make_pki(store / "pki")
    finally:
        shutil.rmtree(store, ignore_errors=True)


@pytest.mark.parametrize(
    "case, reason, words",
    [
        ("unknown-ca", "tls-unknown-ca", "not signed by a CA in mqtt.tls.ca_file"),  # agent trusts another CA
        ("wrong-host", "tls-host-name", "not valid for '127.0.0.1'"),  # certificate names another host
        ("expired", "tls-expired", "has expired"),
        ("no-client-cert", "tls-client-cert-required", "set mqtt.tls.cert_file and mqtt.tls.key_file"),
        ("foreign-client-cert", "tls-client-cert-refused", "the broker refused this device's certificate"),
    ],
)
def test_tls_failures_are_named_once_per_reason(
    case: str, reason: str, words: str, pki: Pki, tmp_path: Path, stack: contextlib.ExitStack,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    cert = {"wrong-host": pki.wrong_host_cert, "expired": pki.expired_cert}.get(case, pki.server_cert)
    broker = MosquittoBroker(tmp_path / "broker").tls(cert, pki.server_key, pki.ca,
                                                      require_certificate=case.endswith("client-cert"))
    stack.callback(broker.stop)
    broker.start()
    tls = TlsSettings(ca_file=pki.other_ca if case == "unknown-ca" else pki.ca)
    if case == "foreign-client-cert":  # signed by a CA the broker does not trust
        tls = TlsSettings(ca_file=pki.ca, cert_file=pki.foreign_client_cert, key_file=pki.client_key)
    spool = open_spool(stack, tmp_path / "spool.db")
    pub = started_publisher(stack, make_settings(broker, tls=tls), spool)
    pub.publish_event(*event(0))
    # TLS 1.3 may show a refused client certificate as an EOF now and then: a second reason, warned once too
    of_reason = lambda: [r for r in connect_warnings(caplog) if r.reason == reason]  # noqa: E731
    assert wait_for(lambda: len(of_reason()) >= 3), [r.getMessage() for r in connect_warnings(caplog)]
    assert [r.levelname for r in of_reason()][:3] == ["WARNING", "DEBUG", "DEBUG"]
    assert words in of_reason()[0].getMessage()
    warned = [r.reason for r in connect_warnings(caplog) if r.levelname == "WARNING"]
    assert len(warned) == len(set(warned)) and set(warned) <= {reason, "tls-closed"}, warned
    stats = pub.stats()
    assert stats["last_connect_error"] in (reason, "tls-closed") and stats["connect_failures"] >= 3
    assert not pub.connected and stats["spool_depth"] == 1
    assert not paho_errors(caplog), "paho's raw errors reached the log"


def test_tls_with_client_certificate_delivers_and_clears_the_reason(
    pki: Pki, tmp_path: Path, stack: contextlib.ExitStack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    broker = MosquittoBroker(tmp_path / "broker").tls(pki.server_cert, pki.server_key, pki.ca, require_certificate=True)
    stack.callback(broker.stop)
    port = broker.port
    spool = open_spool(stack, tmp_path / "spool.db")
    tls = TlsSettings(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key)
    pub = started_publisher(stack, make_settings(broker, tls=tls), spool)
    pub.publish_event(*event(0))
    assert wait_for(lambda: pub.stats()["connect_error"] == "refused")  # the broker is not up yet
    broker.start()
    assert pub.flush(WAIT_S) and pub.connected
    stats = pub.stats()
    assert stats["connect_error"] is None and stats["last_connect_error"] == "refused"
    assert "the connection works again (after refused" in caplog.text and broker.port == port


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd not installed")
def test_wrong_password_is_named_after_the_outage_that_came_first(
    mosquitto: MosquittoBroker, tmp_path: Path, stack: contextlib.ExitStack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    passwd = broker_scratch(stack) / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "agent", "right"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.chmod(passwd, 0o644)
    mosquitto.stop()
    mosquitto.password_file(passwd)
    pw_file = tmp_path / "pw"
    pw_file.write_text("wrong\n")
    pub = started_publisher(stack, make_settings(mosquitto, username="agent", password_file=pw_file),
                            open_spool(stack, tmp_path / "spool.db"))
    assert wait_for(lambda: pub.stats()["connect_failures"] >= 2)  # broker down: one reason
    stack.callback(mosquitto.stop)
    mosquitto.start()
    assert wait_for(lambda: pub.stats()["connect_error"] == "auth-not-authorised")
    assert wait_for(lambda: len([r for r in connect_warnings(caplog) if r.reason == "auth-not-authorised"]) >= 3)
    warned = [(r.reason, r.getMessage()) for r in connect_warnings(caplog) if r.levelno == logging.WARNING]
    assert [reason for reason, _ in warned] == ["refused", "auth-not-authorised"]  # once per change of reason
    assert "for user 'agent': wrong password" in warned[1][1] and "mqtt.password_file" in warned[1][1]
    assert "wrong" not in warned[1][1].replace("wrong password", "")  # the secret itself is never logged


# -- a full disk ------------------------------------------------------------------------------------
@pytest.fixture()
def tiny_disk(tmp_path: Path) -> Iterator[TinyDisk]:
    disk = TinyDisk(tmp_path / "disk", size_kb=512)
    why = disk.mount()
    if why is not None:
        pytest.skip(why)
    try:
        yield disk
    finally:
        disk.umount()


def memory_errors(caplog: pytest.LogCaptureFixture) -> List[str]:
    return [r.getMessage() for r in caplog.records if "kept in memory" in r.getMessage()]


def test_disk_full_events_wait_in_memory_and_reach_the_spool_when_space_returns(
    mosquitto: MosquittoBroker, tiny_disk: TinyDisk, stack: contextlib.ExitStack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    sub = persistent_subscriber(stack, mosquitto)
    mosquitto.stop()  # nothing can leave: each event is on the disk or in memory
    path = tiny_disk.path / "spool.db"
    spool = Spool(path)
    pub = EventPublisher(make_settings(mosquitto), spool)
    pub.start()
    for n in range(3):
        pub.publish_event(*event(n))
    tiny_disk.fill()
    for n in range(3, 10):
        pub.publish_event(*event(n))
    time.sleep(0.7)  # the pump retries the disk meanwhile
    stats = pub.stats()
    assert (stats["spool_errors"], stats["unspooled"], spool.depth()) == (7, 7, 3)
    assert len(memory_errors(caplog)) == 1  # said once, not per event
    tiny_disk.free()
    # the pump empties memory event by event and logs the move after the last one
    assert wait_for(lambda: pub.stats()["unspooled"] == 0 and "moved from memory" in caplog.text)
    assert spool.depth() == 10
    pub.stop(0.5)  # a restart now loses nothing
    spool.close()

    again = open_spool(stack, path)
    assert [e.event_id for e in again.peek(20)] == [event(n)[0] for n in range(10)]  # in order
    assert_spool_delivered_when_the_broker_is_back(stack, mosquitto, again, sub, 10)


def test_disk_full_with_the_broker_up_delivers_from_memory(
    mosquitto: MosquittoBroker, tiny_disk: TinyDisk, stack: contextlib.ExitStack
) -> None:
    sub = subscriber(stack, mosquitto.port)
    spool = open_spool(stack, tiny_disk.path / "spool.db")
    pub = started_publisher(stack, make_settings(mosquitto), spool)
    assert wait_for(lambda: pub.connected)
    tiny_disk.fill()
    for n in range(30):
        pub.publish_event(*event(n))
    assert pub.flush(WAIT_S)  # acknowledged: nothing left to write once space returns
    assert_delivered_in_order(sub, 30)
    stats = pub.stats()
    assert stats["spool_errors"] == 30 and stats["unspooled"] == 0 and spool.depth() == 0


def test_a_stop_while_the_disk_is_full_names_the_events_it_loses(
    mosquitto: MosquittoBroker, tiny_disk: TinyDisk, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mosquitto.stop()
    path = tiny_disk.path / "spool.db"
    spool = Spool(path)
    pub = EventPublisher(make_settings(mosquitto), spool)
    pub.start()
    pub.publish_event(*event(0))
    tiny_disk.fill()
    for n in range(1, 5):
        pub.publish_event(*event(n))
    pub.stop(0.5)
    spool.close()
    lost = [r.getMessage() for r in caplog.records if "are lost with this stop" in r.getMessage()]
    assert len(lost) == 1 and lost[0].startswith("MQTT: 4 event(s)") and event(4)[0] in lost[0]
    tiny_disk.free()
    with Spool(path) as after:
        assert [e.event_id for e in after.peek(10)] == [event(0)[0]]


def test_events_held_in_memory_are_bounded_like_the_spool(
    mosquitto: MosquittoBroker, tiny_disk: TinyDisk, caplog: pytest.LogCaptureFixture
) -> None:
    mosquitto.stop()
    spool = Spool(tiny_disk.path / "spool.db", max_events=3)
    pub = EventPublisher(make_settings(mosquitto), spool)
    pub.start()
    try:
        tiny_disk.fill()
        for n in range(6):
            pub.publish_event(*event(n))
        stats = pub.stats()
        assert (stats["unspooled"], stats["unspooled_dropped"]) == (3, 3)
        dropped = [r.getMessage() for r in caplog.records if "dropped the oldest" in r.getMessage()]
        assert len(dropped) == 1 and event(0)[0] in dropped[0]  # said once, not per drop
    finally:
        pub.stop(0.5)
        spool.close()
