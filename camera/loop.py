"""The capture thread: reads a FrameSource apart from scoring, and keeps the camera alive.

Mode `latest` (live cameras): a one-slot mailbox; the newest frame replaces an unscored one,
and every replaced frame is counted as dropped. Mode `every` (files, folders): a bounded queue
with a blocking put, so scoring paces reading and nothing is dropped.

No frame for stall_timeout_s, a read error or a failed open: the source is closed and reopened
after a wait that doubles from reopen_min_s to reopen_max_s. A read blocked inside the driver is
unblocked by closing the source from a watchdog thread. The end of a finite source (a video that
does not loop, a folder not watched) is state `ended`.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Callable, Deque, Dict, List, Optional

from engine.errors import CameraError

from .sources import SYSTEM_CLOCK, CameraSetupError, Clock, Frame, FrameSource

logger = logging.getLogger(__name__)

CONNECTING = "connecting"  # opening the source for the first time
STREAMING = "streaming"  # frames arrive
STALLED = "stalled"  # no frame for stall_timeout_s: about to reopen
RECONNECTING = "reconnecting"  # waiting before / while reopening after a failure
ENDED = "ended"  # a finite source is done; the app drains and exits 0
ERROR = "error"  # cannot work as configured (or an unexpected failure); retried at reopen_max_s
STATES = (CONNECTING, STREAMING, STALLED, RECONNECTING, ENDED, ERROR)

MODES = ("latest", "every")
COUNTERS = ("captured", "dropped", "reconnects", "read_errors", "open_failures", "stalls")  # in stats(), in this order
PUT_TICK_S = 0.1  # a blocked put in mode every re-checks stop this often
WAIT_TICK_S = 0.25  # backoff waits re-check stop and refresh the heartbeat this often
STOP_GRACE_S = 1.0  # a healthy read returns well within this


class Mailbox:
    """One slot: put never blocks; an unconsumed frame is replaced and counted as dropped."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._frame: Optional[Frame] = None
        self.dropped = 0

    def put(self, frame: Frame, stop: threading.Event) -> bool:
        with self._cond:
            if self._frame is not None:
                self.dropped += 1
            self._frame = frame
            self._cond.notify()
        return True

    def get(self, timeout: float) -> Optional[Frame]:
        with self._cond:
            if self._frame is None:
                self._cond.wait(timeout)
            frame, self._frame = self._frame, None
            return frame

    def empty(self) -> bool:
        with self._cond:
            return self._frame is None

    def qsize(self) -> int:
        return 0 if self.empty() else 1


class BoundedQueue:
    """Back-pressure: put blocks while full (until stop is set); nothing is dropped.

    A blocked producer is woken only once the queue has drained to half, not after every get:
    one thread switch per size/2 frames instead of one per frame (it shows at high frame rates)."""

    def __init__(self, size: int) -> None:
        self._items: Deque[Frame] = deque()
        self._size = size
        self._low = size // 2
        self._cond = threading.Condition()
        self._producer_waiting = False
        self._consumer_waiting = False
        self.dropped = 0  # a frame refused because capture was stopping is not scored

    def put(self, frame: Frame, stop: threading.Event) -> bool:
        with self._cond:
            while len(self._items) >= self._size:
                if stop.is_set():
                    return False
                self._producer_waiting = True
                self._cond.wait(PUT_TICK_S)
                self._producer_waiting = False
            self._items.append(frame)
            if self._consumer_waiting:
                self._cond.notify_all()
        return True

    def get(self, timeout: float) -> Optional[Frame]:
        with self._cond:
            if not self._items:
                if timeout <= 0:
                    return None
                self._consumer_waiting = True
                self._cond.wait(timeout)
                self._consumer_waiting = False
                if not self._items:
                    return None
            frame = self._items.popleft()
            if self._producer_waiting and len(self._items) <= self._low:
                self._cond.notify_all()
            return frame

    def empty(self) -> bool:
        with self._cond:
            return not self._items

    def qsize(self) -> int:
        with self._cond:
            return len(self._items)


class CaptureLoop:
    """Owns the source and the capture thread. start() / get() / stop(); state and stats() for status."""

    def __init__(
        self,
        source: FrameSource,
        *,
        mode: str = "latest",
        queue_size: int = 8,
        stall_timeout_s: float = 20.0,
        reopen_min_s: float = 1.0,
        reopen_max_s: float = 10.0,
        clock: Optional[Clock] = None,
        on_state: Optional[Callable[[str], None]] = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"capture mode must be one of {MODES}, got {mode!r}")
        self.source = source
        self.mode = mode
        self.stall_timeout_s = stall_timeout_s
        self.reopen_min_s = reopen_min_s
        self.reopen_max_s = reopen_max_s
        self.clock = clock or SYSTEM_CLOCK
        self.on_state = on_state
        self._slot = Mailbox() if mode == "latest" else BoundedQueue(queue_size)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._watchdog: Optional[threading.Thread] = None
        self._state_lock = threading.Lock()
        self.state = CONNECTING
        self.captured = 0
        self.reconnects = 0
        self.read_errors = 0
        self.open_failures = 0
        self.stalls = 0
        self._opened = False
        self.last_error: Optional[str] = None  # why the source last failed to open or read; None once streaming
        self._in_read_since: Optional[float] = None  # set while the thread is inside source.read()
        self._last_frame = self.clock.monotonic()
        self.heartbeat = self.clock.monotonic()  # refreshed by every loop turn; ages only if the thread is wedged
        self._stalled_by_watchdog = False

    # -- consumer side ---------------------------------------------------------------------------
    def get(self, timeout: float) -> Optional[Frame]:
        """The next frame to score, or None after timeout."""
        return self._slot.get(timeout)

    @property
    def dropped(self) -> int:
        return self._slot.dropped

    @property
    def finished(self) -> bool:
        """The source ended (or capture stopped) and every captured frame was taken."""
        alive = self._thread is not None and self._thread.is_alive()
        return not alive and self._slot.empty()

    @property
    def failures(self) -> int:
        """Stalls, read errors and failed opens so far, plus one while in state error: a consumer that must not wait
        for a reopen (a calibration capture) stops at the first."""
        return self.stalls + self.read_errors + self.open_failures + int(self.state == ERROR)

    def wedged(self) -> bool:
        """The capture thread has not turned its loop for far longer than any wait it makes."""
        alive = self._thread is not None and self._thread.is_alive()
        limit = max(2 * self.stall_timeout_s, 2 * self.reopen_max_s) + WAIT_TICK_S
        return alive and self.clock.monotonic() - self.heartbeat > limit

    def stats(self) -> Dict[str, object]:
        return {"state": self.state, **{name: getattr(self, name) for name in COUNTERS}, "queued": self._slot.qsize()}

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)
        self._thread.start()
        self._watchdog = threading.Thread(target=self._watch_stall, name="capture-watchdog", daemon=True)
        self._watchdog.start()

    def stop(self, timeout_s: float = 3.0) -> None:
        """Stop reading; frames already queued stay available to get() (the app drains them)."""
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            # Let the thread finish its current read first: releasing an OpenCV capture while another
            # thread is inside read() can deadlock in the driver. Close it from here only when the
            # read is stuck (a dead camera), to unblock it.
            self._thread.join(min(timeout_s, STOP_GRACE_S))
            if self._thread.is_alive():
                self.source.close()
                self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("camera %s: capture thread did not stop within %.1fs", self.source.source_id, timeout_s)
        if self._watchdog is not None:
            self._watchdog.join(timeout_s)
        self._close()

    # -- capture thread --------------------------------------------------------------------------
    def _set_state(self, state: str, why: str = "") -> None:
        if why and state in (STALLED, RECONNECTING, ERROR):
            self.last_error = why
        with self._state_lock:
            if state == self.state:
                return
            self.state = state
        level = logging.INFO if state in (STREAMING, ENDED, CONNECTING) else logging.WARNING
        logger.log(level, "camera %s: %s%s", self.source.source_id, state, f" ({why})" if why else "")
        if self.on_state is not None:
            try:
                self.on_state(state)
            except Exception:  # a status callback must never kill capture
                logger.exception("camera state callback failed")

    def _close(self) -> None:
        if self._opened:
            self.source.close()
            self._opened = False

    def _wait(self, seconds: float) -> None:
        deadline = self.clock.monotonic() + seconds
        while not self._stop.is_set():
            self.heartbeat = self.clock.monotonic()
            left = deadline - self.heartbeat
            if left <= 0:
                return
            self._stop.wait(min(left, WAIT_TICK_S))

    def _run(self) -> None:
        backoff = self.reopen_min_s
        first = True
        while not self._stop.is_set():
            self.heartbeat = self.clock.monotonic()
            if not self._opened:
                if not first:
                    self.reconnects += 1
                try:
                    self.source.open()
                except CameraSetupError as exc:
                    self._set_state(ERROR, str(exc))
                    self._wait(self.reopen_max_s)
                    continue
                except CameraError as exc:
                    # RECONNECTING even before the first frame: "connecting" would hide the cause.
                    self._open_failed(str(exc))
                    self._wait(backoff)
                    backoff = min(backoff * 2, self.reopen_max_s)
                    continue
                except Exception as exc:  # a bug in a source: keep the service up, say so loudly
                    logger.exception("camera %s: unexpected error opening the source", self.source.source_id)
                    self._set_state(ERROR, f"{type(exc).__name__}: {exc}")
                    self._wait(self.reopen_max_s)
                    continue
                self._opened = True
                first = False
                self._last_frame = self.clock.monotonic()
            try:
                self._in_read_since = self.clock.monotonic()
                frame = self.source.read()
            except CameraError as exc:
                self._in_read_since = None
                if self._stop.is_set():
                    break
                self.read_errors += 1
                why = "no frame for too long" if self._stalled_by_watchdog else str(exc)
                self._stalled_by_watchdog = False
                self._close()
                self._set_state(RECONNECTING, why)
                self._wait(backoff)
                backoff = min(backoff * 2, self.reopen_max_s)
                continue
            except Exception as exc:
                self._in_read_since = None
                logger.exception("camera %s: unexpected error reading the source", self.source.source_id)
                self._close()
                self._set_state(ERROR, f"{type(exc).__name__}: {exc}")
                self._wait(self.reopen_max_s)
                continue
            self._in_read_since = None
            now = self.clock.monotonic()
            if frame is None:
                if self.source.ended:
                    self._set_state(ENDED, "end of the source")
                    break
                if self.source.detects_stalls and now - self._last_frame > self.stall_timeout_s:
                    self._on_stall(now)
                    self._wait(backoff)
                    backoff = min(backoff * 2, self.reopen_max_s)
                continue
            self._last_frame = now
            backoff = self.reopen_min_s
            self.captured += 1
            self.last_error = None
            self._set_state(STREAMING)
            if not self._slot.put(frame, self._stop):
                self._slot.dropped += 1
        self._close()

    def _open_failed(self, why: str) -> None:
        """Each new cause is logged at WARNING; the same cause again (every reopen) is not."""
        self.open_failures += 1
        changed = why != self.last_error
        self.last_error = why
        if self.state == RECONNECTING and changed:
            logger.warning("camera %s: still cannot open: %s", self.source.source_id, why)
        self._set_state(RECONNECTING, why)

    def _on_stall(self, now: float) -> None:
        self.stalls += 1
        self._set_state(STALLED, f"no frame for {now - self._last_frame:.1f}s")
        self._close()

    def _watch_stall(self) -> None:
        """Close a source whose read() has blocked past stall_timeout_s, so the capture thread can reopen it."""
        tick = min(1.0, self.stall_timeout_s / 4)
        while not self._stop.wait(tick):
            since = self._in_read_since
            if since is None or not self.source.detects_stalls:
                continue
            if self.clock.monotonic() - max(since, self._last_frame) > self.stall_timeout_s:
                self.stalls += 1
                self._stalled_by_watchdog = True
                self._set_state(STALLED, f"read blocked for more than {self.stall_timeout_s:g}s")
                self.source.close()
                self._in_read_since = None


__all__: List[str] = ["CaptureLoop", "Mailbox", "BoundedQueue", "STATES", "MODES"] + [s.upper() for s in STATES]
