"""Durable on-disk FIFO of outgoing events (design.md §5: nothing is lost to an outage or a restart).

SQLite in WAL mode with synchronous=FULL: `put` returns only once the event is on disk. One
connection shared by the scoring thread and the publisher thread, serialised by a lock.
The spool is bounded: when full, the oldest event is dropped and counted in `dropped`, which is
persisted so that a restart does not hide losses.

A full disk: the spool can hold back `reserve_bytes` of it in a file beside it (`<spool>.reserve`,
real blocks of zeros). When SQLite reports the disk full, the reserve is deleted and the write
retried, so events stay durable (a restart loses none) until that room is used up too; the
publisher recreates the reserve once the disk has room again.
"""
from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, List, NamedTuple, Optional, Tuple, Union

from engine.errors import DaadError

logger = logging.getLogger(__name__)

SPOOL_SCHEMA_VERSION = 1
DEFAULT_MAX_EVENTS = 10000
DEFAULT_RESERVE_MB = 16.0  # ~10 000 events of ~1 KB with SQLite's page and WAL overhead
BUSY_TIMEOUT_S = 5.0  # another process holding the file (e.g. an inspection tool) waits this long
DROP_WARN_INTERVAL_S = 10.0  # a full spool drops on every put: warn at most this often
RESERVE_SUFFIX = ".reserve"
RESERVE_CHUNK = 1 << 20
RESERVE_RETRY_S = 30.0  # a missing reserve is recreated at most this often (16 MB of writes each try)
_META_SCHEMA = "schema_version"
_META_DROPPED = "dropped"

_DDL = (
    # AUTOINCREMENT: seq never goes backwards, even after the newest row was deleted.
    "CREATE TABLE IF NOT EXISTS events ("
    " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
    " event_id TEXT NOT NULL UNIQUE,"
    " topic TEXT NOT NULL,"
    " payload BLOB NOT NULL,"
    " created REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
)



@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception; a body that rolled back itself commits nothing."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        if conn.in_transaction:
            conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise

class SpoolError(DaadError):
    """The spool file cannot be opened, is corrupt, or was used after close()."""


class SpooledEvent(NamedTuple):
    seq: int  # insertion order, strictly increasing
    event_id: str
    topic: str
    payload: bytes


class Spool:
    """Durable, bounded, thread-safe FIFO of (event_id, topic, payload)."""

    def __init__(self, path: Union[str, Path], max_events: int = DEFAULT_MAX_EVENTS, reserve_bytes: int = 0) -> None:
        if isinstance(max_events, bool) or not isinstance(max_events, int) or max_events < 1:
            raise SpoolError(f"spool max_events must be a positive integer, got {max_events!r}")
        self.path = Path(path)
        self.max_events = max_events
        self.reserve_bytes = max(0, int(reserve_bytes))
        self.reserve_path = Path(str(self.path) + RESERVE_SUFFIX)
        self.reserve_released = 0  # times the reserve was given up to store events
        self._next_reserve_try = float("-inf")
        self._lock = threading.Lock()
        self._last_drop_warning = float("-inf")
        self._conn: Optional[sqlite3.Connection] = self._open()
        self._depth, self._dropped = self._load_counters()
        if not self.restore_reserve(force=True) and self.reserve_bytes:  # also removes one no longer wanted
            logger.warning("spool %s: not enough free disk for a %.1f MB reserve (twice that is needed); a full disk "
                           "will leave events in memory only", self.path, self.reserve_bytes / 1e6)
        if self._depth:
            logger.info("spool %s: %d event(s) waiting from a previous run", self.path, self._depth)

    # -- opening ---------------------------------------------------------------------------
    def _fail(self, what: str, err: Exception) -> SpoolError:
        return SpoolError(
            f"{self.path}: {what} ({err}); check that the directory exists and is writable by the service "
            "user, or move the file aside (the events in it are then lost) and restart"
        )

    def _open(self) -> sqlite3.Connection:
        if self.path.is_dir():
            raise SpoolError(f"{self.path}: is a directory; spool.path must name a file, e.g. {self.path / 'spool.db'}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise self._fail("cannot create the spool directory", err) from None
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a put is one transaction.
            conn = sqlite3.connect(
                str(self.path), timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as err:
            raise self._fail("cannot open the spool database", err) from None
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"journal_mode is {mode!r}, WAL could not be enabled")
            # FULL: every commit is fsynced, so an event is on disk when put() returns.
            conn.execute("PRAGMA synchronous=FULL")
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {check}")
            for statement in _DDL:
                conn.execute(statement)
            conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", (_META_SCHEMA, SPOOL_SCHEMA_VERSION))
            conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES (?, 0)", (_META_DROPPED,))
            version = conn.execute("SELECT value FROM meta WHERE key = ?", (_META_SCHEMA,)).fetchone()[0]
        except sqlite3.Error as err:
            conn.close()
            raise self._fail("not a usable spool database", err) from None
        if version != SPOOL_SCHEMA_VERSION:
            conn.close()
            raise SpoolError(
                f"{self.path}: spool format version {version}, this agent reads version {SPOOL_SCHEMA_VERSION}; "
                "deliver its events with the agent version that wrote it, or move the file aside"
            )
        return conn

    def _load_counters(self) -> Tuple[int, int]:
        conn = self._require()
        depth = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        dropped = conn.execute("SELECT value FROM meta WHERE key = ?", (_META_DROPPED,)).fetchone()[0]
        return int(depth), int(dropped)

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise SpoolError(f"{self.path}: spool used after close()")
        return self._conn

    # -- public API --------------------------------------------------------------------------
    def put(self, event_id: str, topic: str, payload: bytes) -> None:
        """Append an event; durable on return. A repeated event_id is ignored; when full, drops the oldest.

        The disk full: the reserve (if any) is released and the write tried once more."""
        try:
            self._put(event_id, topic, payload)
        except SpoolError as err:
            if "full" not in str(err).lower() or not self._release_reserve():
                raise
            self._put(event_id, topic, payload)

    def _put(self, event_id: str, topic: str, payload: bytes) -> None:
        with self._lock:
            conn = self._require()
            try:
                with _transaction(conn):
                    cur = conn.execute(
                        "INSERT OR IGNORE INTO events(event_id, topic, payload, created) VALUES (?, ?, ?, ?)",
                        (event_id, topic, bytes(payload), time.time()),
                    )
                    if cur.rowcount == 0:
                        conn.execute("ROLLBACK")
                        logger.debug("spool: event %s already spooled, ignored", event_id)
                        return
                    excess = self._depth + 1 - self.max_events
                    if excess > 0:
                        conn.execute(
                            "DELETE FROM events WHERE seq IN (SELECT seq FROM events ORDER BY seq LIMIT ?)", (excess,)
                        )
                        conn.execute("UPDATE meta SET value = value + ? WHERE key = ?", (excess, _META_DROPPED))
            except sqlite3.Error as err:
                raise SpoolError(f"{self.path}: cannot store event {event_id} ({err}); is the disk full?") from None
            self._depth += 1
            if excess > 0:
                self._depth -= excess
                self._dropped += excess
                self._warn_dropped()

    def peek(self, limit: int) -> List[SpooledEvent]:
        """The oldest `limit` events, in insertion order; they stay in the spool until ack()."""
        with self._lock:
            conn = self._require()
            try:
                rows = conn.execute(
                    "SELECT seq, event_id, topic, payload FROM events ORDER BY seq LIMIT ?", (max(0, int(limit)),)
                ).fetchall()
            except sqlite3.Error as err:
                raise SpoolError(f"{self.path}: cannot read events ({err})") from None
        return [SpooledEvent(int(seq), str(eid), str(topic), bytes(payload)) for seq, eid, topic, payload in rows]

    def ack(self, event_id: str) -> None:
        """Remove a delivered event; an unknown id (already acked or dropped) is ignored."""
        self.ack_many((event_id,))

    def ack_many(self, event_ids: Iterable[str]) -> None:
        """Remove several delivered events in one transaction (one fsync instead of one per event)."""
        ids = [(eid,) for eid in event_ids]
        if not ids:
            return
        with self._lock:
            conn = self._require()
            try:
                removed = 0
                with _transaction(conn):
                    for row in ids:
                        removed += conn.execute("DELETE FROM events WHERE event_id = ?", row).rowcount
            except sqlite3.Error as err:
                raise SpoolError(f"{self.path}: cannot remove delivered events ({err})") from None
            self._depth -= removed

    def depth(self) -> int:
        with self._lock:
            return self._depth

    @property
    def dropped(self) -> int:
        """Events dropped because the spool was full, over the life of this spool file."""
        with self._lock:
            return self._dropped

    @property
    def closed(self) -> bool:
        return self._conn is None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the reserve ------------------------------------------------------------------------------
    def has_reserve(self) -> bool:
        return self.reserve_path.is_file()

    def _release_reserve(self) -> bool:
        if not self.has_reserve():
            return False
        size = self.reserve_path.stat().st_size
        self.reserve_path.unlink()
        self.reserve_released += 1
        self._next_reserve_try = time.monotonic() + RESERVE_RETRY_S
        logger.error(
            "spool %s: the disk is full; released the %.1f MB reserve kept for this, so events stay on disk (and "
            "survive a restart) a while longer; free space on %s", self.path, size / 1e6, self.path.parent,
        )
        return True

    def restore_reserve(self, force: bool = False) -> bool:
        """(Re)create the reserve when it is missing and the disk has room for it twice over; True if present.

        Writes real blocks (a sparse or fallocated file may not hold the space on every file system)."""
        if self.reserve_bytes == 0:
            if self.reserve_path.exists():
                self.reserve_path.unlink()
            return False
        if self.has_reserve() and self.reserve_path.stat().st_size >= self.reserve_bytes:
            return True
        now = time.monotonic()
        if not force and now < self._next_reserve_try:
            return False
        self._next_reserve_try = now + RESERVE_RETRY_S
        try:
            free = shutil.disk_usage(str(self.path.parent)).free
        except OSError:
            return False
        if free < 2 * self.reserve_bytes:
            return False
        tmp = Path(str(self.reserve_path) + ".tmp")
        chunk = b"\0" * RESERVE_CHUNK
        try:
            with open(tmp, "wb") as fh:
                left = self.reserve_bytes
                while left > 0:
                    left -= fh.write(chunk[: min(left, RESERVE_CHUNK)])
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.reserve_path)
        except OSError as err:
            try:
                tmp.unlink()
            except OSError:
                pass
            logger.warning("spool %s: cannot keep a %.1f MB disk reserve (%s)", self.path, self.reserve_bytes / 1e6, err)
            return False
        logger.info("spool %s: %.1f MB of disk held in reserve for a full disk (%s)",
                    self.path, self.reserve_bytes / 1e6, self.reserve_path)
        return True

    def _warn_dropped(self) -> None:
        now = time.monotonic()
        if now - self._last_drop_warning >= DROP_WARN_INTERVAL_S:
            self._last_drop_warning = now
            logger.warning(
                "spool %s is full (%d events): dropping the oldest; %d dropped so far. "
                "Is the broker reachable? Raise spool.max_events to buffer longer outages",
                self.path, self.max_events, self._dropped,
            )
