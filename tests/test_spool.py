"""agent.spool: the durable, bounded, thread-safe FIFO of outgoing events (real SQLite files)."""
from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from agent.spool import Spool, SpooledEvent, SpoolError
from engine.errors import DaadError

TOPIC = "daad/st1/defects"
REPO_ROOT = Path(__file__).resolve().parents[1]


def ids(spool: Spool, limit: int = 1000):
    return [e.event_id for e in spool.peek(limit)]


def test_put_peek_ack_in_insertion_order(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool.db") as spool:
        for i in range(5):
            spool.put(f"e{i}", TOPIC, f"payload {i}".encode())
        events = spool.peek(3)
        assert [e.event_id for e in events] == ["e0", "e1", "e2"]
        assert events[0] == SpooledEvent(events[0].seq, "e0", TOPIC, b"payload 0")
        assert [e.seq for e in events] == sorted(e.seq for e in events)
        assert spool.depth() == 5
        spool.ack("e1")
        spool.ack("unknown")  # already acked or dropped: ignored
        assert ids(spool) == ["e0", "e2", "e3", "e4"]
        assert spool.depth() == 4
        spool.ack_many(["e0", "e4"])
        assert ids(spool) == ["e2", "e3"]
        assert spool.depth() == 2


def test_survives_reopen_with_order_and_dropped_count(tmp_path: Path) -> None:
    path = tmp_path / "state" / "spool.db"  # missing parent directories are created
    spool = Spool(path, max_events=4)
    for i in range(6):
        spool.put(f"e{i}", TOPIC, b"x")
    spool.ack("e3")
    spool.close()

    reopened = Spool(path, max_events=4)
    try:
        assert ids(reopened) == ["e2", "e4", "e5"]
        assert reopened.depth() == 3
        assert reopened.dropped == 2
        reopened.put("e6", TOPIC, b"x")
        reopened.put("e7", TOPIC, b"x")  # full again: drops e2
        assert ids(reopened) == ["e4", "e5", "e6", "e7"]
        assert reopened.dropped == 3
        seqs = [e.seq for e in reopened.peek(10)]
        assert seqs == sorted(seqs) and len(set(seqs)) == 4  # seq keeps growing across reopen
    finally:
        reopened.close()


def test_bounded_spool_drops_oldest_counts_and_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="agent.spool")
    with Spool(tmp_path / "spool.db", max_events=3) as spool:
        for i in range(5):
            spool.put(f"e{i}", TOPIC, b"x")
        assert ids(spool) == ["e2", "e3", "e4"]
        assert spool.depth() == 3
        assert spool.dropped == 2
    assert any("full" in r.getMessage() and "dropping the oldest" in r.getMessage() for r in caplog.records)


def test_smaller_bound_on_reopen_trims_on_next_put(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    with Spool(path, max_events=10) as spool:
        for i in range(6):
            spool.put(f"e{i}", TOPIC, b"x")
    with Spool(path, max_events=3) as spool:
        spool.put("e6", TOPIC, b"x")
        assert ids(spool) == ["e4", "e5", "e6"]
        assert spool.dropped == 4


def test_duplicate_event_id_is_ignored(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool.db", max_events=2) as spool:
        spool.put("e0", TOPIC, b"first")
        spool.put("e1", TOPIC, b"x")
        spool.put("e0", TOPIC, b"second")  # a retry of the same frame: neither stored nor dropping anything
        assert [(e.event_id, e.payload) for e in spool.peek(10)] == [("e0", b"first"), ("e1", b"x")]
        assert spool.depth() == 2
        assert spool.dropped == 0


def test_wal_and_full_sync(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    with Spool(path) as spool:
        spool.put("e0", TOPIC, b"x")
        assert spool._conn is not None
        assert spool._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        other = sqlite3.connect(str(path))
        try:
            assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert other.execute("SELECT event_id FROM events").fetchall() == [("e0",)]
        finally:
            other.close()


def test_put_is_durable_without_close(tmp_path: Path) -> None:
    """A process killed right after put() returns loses nothing."""
    path = tmp_path / "spool.db"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from agent.spool import Spool
        spool = Spool({str(path)!r})
        for i in range(3):
            spool.put(f"e{{i}}", {TOPIC!r}, b"x")
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=str(REPO_ROOT), timeout=30)
    assert proc.returncode == -signal.SIGKILL
    with Spool(path) as spool:
        assert ids(spool) == ["e0", "e1", "e2"]


def test_concurrent_producers_and_acker(tmp_path: Path) -> None:
    per_thread = 150
    with Spool(tmp_path / "spool.db", max_events=10_000) as spool:
        errors = []

        def produce(name: str) -> None:
            try:
                for i in range(per_thread):
                    spool.put(f"{name}-{i}", TOPIC, b"x")
            except Exception as err:  # pragma: no cover - reported below
                errors.append(err)

        def ack_a() -> None:
            try:
                for i in range(per_thread):
                    spool.ack(f"a-{i}")  # may run before or after the put: both must be safe
            except Exception as err:  # pragma: no cover
                errors.append(err)

        threads = [threading.Thread(target=produce, args=("a",)), threading.Thread(target=produce, args=("b",)),
                   threading.Thread(target=ack_a)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors
        spool.ack_many([f"a-{i}" for i in range(per_thread)])
        remaining = ids(spool, 10_000)
        assert remaining == [f"b-{i}" for i in range(per_thread)]  # b's own order kept
        assert spool.depth() == per_thread


@pytest.mark.parametrize(
    "content",
    [
        b"this is not a database" * 100,  # arbitrary bytes
        b"SQLite format 3\x00" + b"\xff" * 200,  # right header, garbage after it
    ],
)
def test_corrupt_file_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "spool.db"
    path.write_bytes(content)
    with pytest.raises(SpoolError) as info:
        Spool(path)
    message = str(info.value)
    assert str(path) in message and "move the file aside" in message
    assert isinstance(info.value, DaadError)


def test_directory_instead_of_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SpoolError, match="is a directory"):
        Spool(tmp_path)


def test_unknown_spool_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    Spool(path).close()
    conn = sqlite3.connect(str(path))
    conn.execute("UPDATE meta SET value = 99 WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(SpoolError, match="format version 99"):
        Spool(path)


@pytest.mark.parametrize("bad", [0, -1, True, 2.5])
def test_invalid_bound_is_refused(tmp_path: Path, bad: object) -> None:
    with pytest.raises(SpoolError, match="max_events"):
        Spool(tmp_path / "spool.db", max_events=bad)  # type: ignore[arg-type]


def test_use_after_close_is_a_clear_error(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db")
    spool.put("e0", TOPIC, b"x")
    spool.close()
    spool.close()  # idempotent
    assert spool.closed
    with pytest.raises(SpoolError, match="after close"):
        spool.put("e1", TOPIC, b"x")
    with pytest.raises(SpoolError, match="after close"):
        spool.peek(1)
    assert os.path.exists(tmp_path / "spool.db")


# -- the disk reserve, on a real full file system ----------------------------------------------------
@pytest.fixture()
def tiny_disk(tmp_path: Path):
    from tests.full_disk import TinyDisk

    disk = TinyDisk(tmp_path / "disk", size_kb=4096)
    why = disk.mount()
    if why is not None:
        pytest.skip(why)
    yield disk
    disk.umount()


def test_a_full_disk_releases_the_reserve_and_events_stay_durable(tiny_disk, caplog) -> None:
    path = tiny_disk.path / "spool.db"
    reserve = 1_000_000
    with Spool(path, reserve_bytes=reserve) as spool:
        assert spool.has_reserve() and spool.reserve_path.stat().st_size == reserve
        spool.put("before", TOPIC, b"x" * 500)
        tiny_disk.fill()
        for i in range(50):  # on disk, in the room the reserve held
            spool.put(f"full{i}", TOPIC, b"y" * 500)
        assert not spool.has_reserve() and spool.reserve_released == 1
        assert len([r for r in caplog.records if "released the 1.0 MB reserve" in r.getMessage()]) == 1
        assert not spool.restore_reserve(force=True)  # no room for it yet
        tiny_disk.free()
        assert spool.restore_reserve(force=True) and spool.has_reserve()
    with Spool(path, reserve_bytes=reserve) as again:  # a restart finds every event
        assert ids(again) == ["before"] + [f"full{i}" for i in range(50)]
    with Spool(path, reserve_bytes=0) as off:  # turned off: the space is given back
        assert not off.reserve_path.exists() and off.depth() == 51


def test_without_a_reserve_a_full_disk_is_a_spool_error(tiny_disk) -> None:
    with Spool(tiny_disk.path / "spool.db") as spool:
        tiny_disk.fill()
        with pytest.raises(SpoolError, match="disk is full"):
            for i in range(200):
                spool.put(f"e{i}", TOPIC, b"z" * 500)
