"""sd_notify in pure Python: a datagram to $NOTIFY_SOCKET (jetson.md, systemd).

READY=1 once the model is loaded and the first frame scored; WATCHDOG=1 from the scoring loop at
half of $WATCHDOG_USEC; STATUS=... for `systemctl status`; STOPPING=1 on shutdown. Outside systemd
(no $NOTIFY_SOCKET) every call is a cheap no-op. A failed send is logged once, never raised.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Callable, Mapping, Optional

logger = logging.getLogger(__name__)

USEC_PER_S = 1_000_000


class SystemdNotifier:
    def __init__(self, environ: Optional[Mapping[str, str]] = None, monotonic: Callable[[], float] = time.monotonic) -> None:
        env = os.environ if environ is None else environ
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval_s = _watchdog_interval(env)
        self._monotonic = monotonic
        self._last_watchdog = float("-inf")
        self._sock: Optional[socket.socket] = None
        self._warned = False
        self.sent = 0

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, message: str) -> bool:
        """Send one datagram (e.g. "READY=1\\nSTATUS=scoring"); False when not under systemd or it failed."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.sendto(message.encode("utf-8"), self.address)
        except OSError as exc:
            if not self._warned:
                logger.warning("sd_notify to %s failed: %s", os.environ.get("NOTIFY_SOCKET", "?"), exc)
                self._warned = True
            return False
        self.sent += 1
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1" + (f"\nSTATUS={status}" if status else ""))

    def watchdog(self) -> bool:
        """WATCHDOG=1, at most once per half of WATCHDOG_USEC; call it as often as you like."""
        if self.watchdog_interval_s is None:
            return False
        now = self._monotonic()
        if now - self._last_watchdog < self.watchdog_interval_s:
            return False
        self._last_watchdog = now
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC: ask for more start time (e.g. while TensorRT builds a plan)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * USEC_PER_S)}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _address(value: str) -> Optional[str]:
    if not value:
        return None
    if value.startswith("@"):  # abstract namespace socket
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    logger.warning("NOTIFY_SOCKET=%r is neither a path nor @abstract: not notifying systemd", value)
    return None


def _watchdog_interval(env: Mapping[str, str]) -> Optional[float]:
    raw = env.get("WATCHDOG_USEC", "")
    if not raw:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None  # the watchdog is meant for another process (e.g. a wrapper)
    try:
        usec = int(raw)
    except ValueError:
        logger.warning("WATCHDOG_USEC=%r is not an integer: watchdog pings off", raw)
        return None
    return usec / USEC_PER_S / 2 if usec > 0 else None
