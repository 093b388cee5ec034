"""A real Mosquitto broker on a free loopback port, started and stopped by the tests."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

MOSQUITTO_CANDIDATES = ("mosquitto", "/usr/sbin/mosquitto")
STARTUP_TIMEOUT_S = 10.0


def find_mosquitto() -> Optional[str]:
    for candidate in MOSQUITTO_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def broker_store() -> Path:
    """A directory mosquitto can write to: started as root it drops to its own user, which cannot enter
    pytest's private tmp_path (saving its database then fails, and sessions are lost at a restart)."""
    store = Path(tempfile.mkdtemp(prefix="daad-mosquitto-"))
    os.chmod(store, 0o777)
    return store


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll `predicate` until it holds or `timeout` seconds pass; its last answer (a broker's delivery, a
    process's log line)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MosquittoBroker:
    """Start with `start()`, stop (and later restart on the same port) to simulate outages."""

    def __init__(self, workdir: Path, port: Optional[int] = None) -> None:
        exe = find_mosquitto()
        if exe is None:
            raise RuntimeError("mosquitto not found: apt-get install mosquitto (the CI script does)")
        self.exe = exe
        self.port = port or free_port()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf = self.workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "max_queued_messages 100000\n"
        )
        self.proc: Optional[subprocess.Popen] = None
        self.log = self.workdir / "mosquitto.log"
        self.persistent = False

    def persist(self, store: Path) -> "MosquittoBroker":
        """Keep sessions and queued messages across restarts, in `store` (see broker_store); from the next start."""
        with open(self.conf, "a") as fh:
            fh.write(f"persistence true\npersistence_location {store}/\nautosave_interval 0\n")
        self.persistent = True
        return self

    def tls(self, cert: Path, key: Path, ca: Path, require_certificate: bool = False) -> "MosquittoBroker":
        """Serve MQTT over TLS on the listener (from the next start); files readable by mosquitto's user."""
        with open(self.conf, "a") as fh:
            fh.write(f"certfile {cert}\nkeyfile {key}\ncafile {ca}\n")
            if require_certificate:
                fh.write("require_certificate true\n")
        return self

    def password_file(self, passwd: Path) -> "MosquittoBroker":
        """Refuse anonymous clients and check users against a mosquitto_passwd file (from the next start)."""
        with open(self.conf, "a") as fh:
            fh.write(f"allow_anonymous false\npassword_file {passwd}\n")
        return self

    def start(self) -> "MosquittoBroker":
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text(errors='replace')}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {STARTUP_TIMEOUT_S}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.persistent and "Error saving" in self.log.read_text(errors="replace"):
            # a test that relies on the saved sessions would only fail by chance later on
            raise RuntimeError(f"mosquitto could not save its database: {self.log}")
