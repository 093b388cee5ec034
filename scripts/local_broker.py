"""A local MQTT broker for the demo: Mosquitto where installed, else amqtt (pure Python) in a thread."""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional

from tests.mqtt_broker import MosquittoBroker, find_mosquitto, free_port

EMBEDDED_START_TIMEOUT_S = 10.0


class LocalBroker(NamedTuple):
    host: str
    port: int
    kind: str  # "mosquitto" or "amqtt (embedded)"
    stop: Callable[[], None]


def _wait_listening(port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def start_embedded(port: int) -> LocalBroker:
    try:
        from amqtt.broker import Broker
    except ImportError as exc:
        raise RuntimeError("no MQTT broker: install Mosquitto (apt-get install mosquitto) or pip install amqtt") from exc
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    loop = asyncio.new_event_loop()
    holder: dict = {}

    def serve() -> None:
        asyncio.set_event_loop(loop)
        holder["broker"] = Broker(config, loop=loop)
        loop.run_until_complete(holder["broker"].start())
        loop.run_forever()

    thread = threading.Thread(target=serve, name="amqtt-broker", daemon=True)
    thread.start()
    if not _wait_listening(port, EMBEDDED_START_TIMEOUT_S):
        raise RuntimeError(f"embedded broker did not listen on {port}")

    def stop() -> None:
        broker = holder.get("broker")
        if broker is not None:
            asyncio.run_coroutine_threadsafe(broker.shutdown(), loop).result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)

    return LocalBroker("127.0.0.1", port, "amqtt (embedded)", stop)


def start_local_broker(workdir: Path, prefer: Optional[str] = None) -> LocalBroker:
    """prefer: None (Mosquitto where installed), "mosquitto" or "embedded"."""
    if prefer != "embedded" and find_mosquitto():
        broker = MosquittoBroker(workdir / "mosquitto").start()
        return LocalBroker("127.0.0.1", broker.port, "mosquitto", broker.stop)
    if prefer == "mosquitto":
        raise RuntimeError("mosquitto not found: apt-get install mosquitto")
    return start_embedded(free_port())
