"""The name of a defective frame the agent saves: `<UTC time>_<camera>_<seq>_<event_id>.jpg`.

The agent writes it (agent.frames_store); `daad-calibrate teach --events ID` finds a false alarm's frame by the
event id at its end. Names start with the time, so name order is age order, also across restarts.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

SUFFIX = ".jpg"
_ID_CHARS = 36  # a UUID's text, 8-4-4-4-12


def frame_file_name(timestamp: datetime, camera: str, seq: int, event_id: Optional[str] = None) -> str:
    stamp = timestamp.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    tail = "" if event_id is None else f"_{event_id}"
    return f"{stamp}_{camera}_{seq:08d}{tail}{SUFFIX}"


def event_id_of(path: Path) -> Optional[str]:
    """The event id a saved frame's name ends with (lower case); None for another file, or a frame saved by an
    agent before names carried the id."""
    stem = path.stem.lower()
    if path.suffix.lower() != SUFFIX or len(stem) <= _ID_CHARS or stem[-_ID_CHARS - 1] != "_":
        return None
    return stem[-_ID_CHARS:]

