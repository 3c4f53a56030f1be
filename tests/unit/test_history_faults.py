"""The request history when its file fails (a temporary SQLite file, no processes): a corrupt
file moved aside and a new one begun, a full disk (SQLite's max_page_count stands in for it)
whose rows are dropped, counted and logged once a minute while waiting writers go on, and
writing again once there is room, without a restart."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import grpc
import pytest
from structlog.testing import capture_logs

from apiary.errors import StatusError
from protos.v1 import queen_pb2
from queen.history import History
from queen.metrics import QueenMetrics
from queen.registry import Registry
from queen.routing.desk import Desk
from queen.routing.router import Router
from tests.fakes import FakeClock

COMPLETED = queen_pb2.REQUEST_STATUS_COMPLETED
JUNK = b"this is not a database, it is junk " * 200


class Now:
    """The seconds the history's log limit reads, moved by the test."""

    def __init__(self) -> None:
        self.seconds = 1000.0

    def __call__(self) -> float:
        return self.seconds


class SmallDisk(History):
    """A history whose file may not grow past `pages` pages (at least its size): writes beyond
    fail as a full disk does (SQLITE_FULL, "database or disk is full"). Read before each batch."""

    pages = 1_000_000

    def _write(self, conn: sqlite3.Connection | None, ops: list[Any]) -> sqlite3.Connection | None:
        conn = conn or self._connect()
        conn.execute(f"PRAGMA max_page_count={self.pages}")
        return super()._write(conn, ops)


async def record(history: History, request_id: str, model: str = "m") -> None:
    """A request accepted and finished, its end awaited as a route awaits it."""
    history.accepted(request_id, model, 1.0)
    done = history.finish(request_id, COMPLETED, 2.0, 3, "", 1)
    assert done is not None
    await done  # never raises, whatever the file does


def ids(history: History) -> set[str]:
    return {r.id for r in history.query(0, "", 0)}


async def test_a_corrupt_file_is_moved_aside_and_a_new_history_begins(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    path.write_bytes(JUNK)
    Path(f"{path}-wal").write_bytes(JUNK[:100])
    history = History(path)
    with capture_logs() as logs:
        history.open()
    moved = history.moved_aside
    assert moved is not None and moved.name.startswith("history.sqlite3.corrupt-")
    assert moved.read_bytes() == JUNK and Path(f"{moved}-wal").read_bytes() == JUNK[:100]
    (said,) = [e for e in logs if e["log_level"] == "error"]
    assert said["path"] == str(path) and said["moved_to"] == str(moved)
    assert "not a database" in said["error"]
    await record(history, "q1")
    await history.close()
    assert ids(history) == {"q1"} and not history.status().degraded


async def test_a_truncated_file_is_moved_aside_and_a_garbage_wal_alone_is_ignored(
    tmp_path: Path,
) -> None:
    path = tmp_path / "history.sqlite3"
    history = History(path)
    history.open()
    for i in range(2000):
        history.accepted(f"q{i}", "m" * 50, 1.0)
    await history.close()
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    truncated = History(path)
    truncated.open()
    assert truncated.moved_aside is not None and ids(truncated) == set()
    await truncated.close()
    # A WAL SQLite cannot read beside a sound file is SQLite's to ignore: nothing is lost.
    Path(f"{path}-wal").write_bytes(JUNK)
    again = History(path)
    again.open()
    await record(again, "kept")
    await again.close()
    assert again.moved_aside is None and ids(again) == {"kept"}


async def test_a_full_disk_drops_rows_but_not_requests_and_writing_resumes(
    tmp_path: Path,
) -> None:
    now = Now()
    history = SmallDisk(tmp_path / "history.sqlite3", now=now)
    metrics = QueenMetrics(Registry(FakeClock()), Desk(Router(Registry(FakeClock()))), history)
    history.open()
    await record(history, "before")
    history.pages = 1  # the disk is full from now on
    with capture_logs() as logs:
        for i in range(5):
            await record(history, f"full-{i}", model="m" * 5000)
        now.seconds += 30
        await record(history, "full-5", model="m" * 5000)
    status = history.status()
    assert status.degraded and status.history_rows_dropped >= 6
    assert "database or disk is full" in status.problems[0]
    dropped = metrics.prometheus.get_sample_value("apiary_history_rows_dropped_total")
    assert dropped == status.history_rows_dropped
    assert metrics.prometheus.get_sample_value("apiary_history_degraded") == 1
    # Said once, not once a row: the next line comes a minute after the first.
    errors = [e for e in logs if e["log_level"] == "error"]
    assert len(errors) == 1 and errors[0]["path"] == str(history.path)
    with capture_logs() as logs:
        now.seconds += 31
        await record(history, "full-6", model="m" * 5000)
    (again,) = [e for e in logs if e["log_level"] == "error"]
    assert again["dropped"] >= 2  # the rows dropped since the last line
    # Room again: the next rows are written, no restart needed.
    history.pages = 1_000_000
    with capture_logs() as logs:
        await record(history, "after")
    assert [e["event"] for e in logs] == ["request history written again"]
    # Still degraded for a minute after the last failed write, so a flicker is not missed.
    (problem,) = history.status().problems
    assert problem.startswith(f"request history {history.path} could not be written: ")
    assert "row(s) dropped since the queen started, the last 0 s ago" in problem
    now.seconds += 60
    assert not history.status().degraded and not history.status().problems
    assert metrics.prometheus.get_sample_value("apiary_history_degraded") == 0
    await history.close()
    assert ids(history) == {"before", "after"}


async def test_a_history_that_cannot_be_set_up_is_tried_again_before_each_write(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.write_text("a file where the state directory should be")
    now = Now()
    history = History(state / "history.sqlite3", now=now)
    history.open()  # does not raise: routing never depends on the history
    assert history.status().degraded
    await record(history, "lost")
    assert history.status().history_rows_dropped >= 2
    state.unlink()
    await record(history, "kept")
    await history.close()
    now.seconds += 60
    assert ids(history) == {"kept"} and not history.status().degraded


async def test_an_unreadable_history_is_unavailable_to_read(tmp_path: Path) -> None:
    history = History(tmp_path / "history.sqlite3")
    history.open()
    await history.close()
    history.path.write_bytes(JUNK)
    with pytest.raises(StatusError) as unreadable:
        history.query(0, "", 0)
    assert unreadable.value.code == grpc.StatusCode.UNAVAILABLE
    assert str(unreadable.value).startswith("the request history cannot be read: ")
