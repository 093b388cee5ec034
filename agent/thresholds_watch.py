"""Hot reload of thresholds.yaml: on SIGHUP, or when the file's identity (mtime, size, inode) changes.

The check is a stat() at most every poll_s seconds, called from the scoring loop. A new file that
does not load (bad YAML, a missing field, made for another bundle) is rejected with its reason in
the log and the last good thresholds stay in force; it is not retried until the file changes again
or another SIGHUP arrives.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Tuple, Union

from engine.thresholds import Thresholds, load_thresholds
from engine.errors import ThresholdsError

logger = logging.getLogger(__name__)

Signature = Optional[Tuple[int, int, int]]  # (mtime_ns, size, inode); None when the file is missing


def file_signature(path: Path) -> Signature:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class ThresholdsWatch:
    def __init__(
        self,
        path: Union[str, Path],
        bundle: Any,
        initial: Thresholds,
        poll_s: float = 2.0,
        monotonic: Optional[Callable[[], float]] = None,
    ) -> None:
        import time

        self.path = Path(path)
        self.bundle = bundle
        self.current = initial
        self.poll_s = poll_s
        self._monotonic = monotonic or time.monotonic
        self._signature = file_signature(self.path)
        self._last_poll = self._monotonic()
        self._requested = threading.Event()  # set from a signal handler: only an atomic flag there
        self.reloads = 0
        self.rejected = 0
        self.last_error = ""

    def request_reload(self) -> None:
        """Safe to call from a signal handler: the reload happens at the next poll()."""
        self._requested.set()

    def poll(self) -> Optional[Thresholds]:
        """The new thresholds when they changed and loaded, else None (cheap: one stat at most every poll_s)."""
        forced = self._requested.is_set()
        if not forced:
            if self.poll_s <= 0:
                return None
            now = self._monotonic()
            if now - self._last_poll < self.poll_s:
                return None
            self._last_poll = now
            signature = file_signature(self.path)
            if signature == self._signature:
                return None
        self._requested.clear()
        return self.reload("SIGHUP" if forced else "file changed")

    def reload(self, why: str = "requested") -> Optional[Thresholds]:
        self._signature = file_signature(self.path)
        try:
            new = load_thresholds(self.path, self.bundle)
        except ThresholdsError as exc:
            self.rejected += 1
            self.last_error = str(exc)
            logger.warning(
                "thresholds: new file rejected (%s), keeping image %.6g / pixel %.6g: %s",
                why, self.current.image_threshold, self.current.pixel_threshold, exc,
            )
            return None
        old, self.current = self.current, new
        self.reloads += 1
        self.last_error = ""
        logger.info(
            "thresholds: reloaded (%s): image %.6g -> %.6g, pixel %.6g -> %.6g, min area %d -> %d",
            why, old.image_threshold, new.image_threshold, old.pixel_threshold, new.pixel_threshold,
            old.min_defect_area, new.min_defect_area,
        )
        return new
