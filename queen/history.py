"""Durable request history in SQLite (WAL), written by one thread with group commit.

Every request the queen accepts gets a row, keyed by the queen's own id (a client's
request_id is kept beside it, as client_request_id, and can overwrite nothing). The final
state of a request that ends normally or with an error is committed before its RPC ends,
so a queen crash never loses it. A request whose call was cancelled (or whose deadline
passed) is recorded without waiting: its end is queued here at once, and close() writes
everything queued before it returns. Rows still queued or running when the queen starts
again are marked failed with the reason "queen restarted". Drains live here too, so they
survive restarts.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apiary.protoutil import timestamp
from protos.v1 import queen_pb2

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    worker_id TEXT NOT NULL DEFAULT '',
    hive_id TEXT NOT NULL DEFAULT '',
    status INTEGER NOT NULL,
    accepted_at REAL NOT NULL,
    started_at REAL NOT NULL DEFAULT 0,
    finished_at REAL NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    client_request_id TEXT NOT NULL DEFAULT '',
    client TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS requests_by_time ON requests (accepted_at);
CREATE TABLE IF NOT EXISTS drains (kind TEXT NOT NULL, id TEXT NOT NULL, PRIMARY KEY (kind, id));
"""
# Columns added since the first schema, added to an older file when it is opened.
ADDED_COLUMNS = {
    "client_request_id": "TEXT NOT NULL DEFAULT ''",
    "client": "TEXT NOT NULL DEFAULT ''",
}
MAX_LIMIT = 10_000
_STOP = object()


@dataclass
class _Op:
    sql: str
    params: tuple[Any, ...]
    done: asyncio.Future[None] | None = None


class History:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._ops: queue.SimpleQueue[_Op | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.recovered = 0

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a commit survives a crash of this process (not of the machine's power).
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    def open(self) -> None:
        """Create the schema, fail what a previous queen left unfinished, start the writer."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect()
        conn.executescript(SCHEMA)
        have = {row[1] for row in conn.execute("PRAGMA table_info(requests)")}
        for column, kind in ADDED_COLUMNS.items():
            if column not in have:
                conn.execute(f"ALTER TABLE requests ADD COLUMN {column} {kind}")
        cur = conn.execute(
            "UPDATE requests SET status=?, error='queen restarted' WHERE status IN (?, ?)",
            (
                queen_pb2.REQUEST_STATUS_FAILED,
                queen_pb2.REQUEST_STATUS_QUEUED,
                queen_pb2.REQUEST_STATUS_RUNNING,
            ),
        )
        self.recovered = cur.rowcount
        conn.close()
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._write_forever, name="history", daemon=True)
        self._thread.start()

    def _write_forever(self) -> None:
        conn = self._connect()
        try:
            while True:
                first = self._ops.get()
                if first is _STOP:
                    return
                batch = [first]
                while len(batch) < 2000:
                    try:
                        batch.append(self._ops.get_nowait())
                    except queue.Empty:
                        break
                stop = _STOP in batch
                ops = [op for op in batch if isinstance(op, _Op)]
                errors = _commit(conn, ops)
                for op, error in zip(ops, errors, strict=True):
                    if op.done is not None and self._loop is not None:
                        self._loop.call_soon_threadsafe(_settle, op.done, error)
                if stop:
                    return
        finally:
            conn.close()

    def _put(self, sql: str, params: tuple[Any, ...], wait: bool) -> asyncio.Future[None] | None:
        done = asyncio.get_running_loop().create_future() if wait else None
        self._ops.put(_Op(sql, params, done))
        return done

    def accepted(
        self, request_id: str, model: str, at: float, client: str = "", client_request_id: str = ""
    ) -> None:
        # A plain INSERT: the id is the queen's own (a uuid), so no row is ever replaced.
        self._put(
            "INSERT INTO requests (id, model, status, accepted_at, client, client_request_id) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (request_id, model, queen_pb2.REQUEST_STATUS_QUEUED, at, client, client_request_id),
            wait=False,
        )

    def started(
        self, request_id: str, worker_id: str, hive_id: str, at: float, attempt: int
    ) -> None:
        self._put(
            "UPDATE requests SET status=?, worker_id=?, hive_id=?, started_at=?, attempts=? "
            "WHERE id=?",
            (queen_pb2.REQUEST_STATUS_RUNNING, worker_id, hive_id, at, attempt, request_id),
            wait=False,
        )

    def finish(
        self,
        request_id: str,
        status: queen_pb2.RequestStatus.ValueType,
        at: float,
        tokens: int,
        error: str,
        attempts: int,
        wait: bool = True,
    ) -> asyncio.Future[None] | None:
        """Queue the end of a request. With `wait` (on the event loop), the future settles once
        it is committed; without, nothing is awaited (a call that is over records its end from
        a done-callback or a closing generator) and close() still writes it."""
        return self._put(
            "UPDATE requests SET status=?, finished_at=?, completion_tokens=?, error=?, "
            "attempts=MAX(attempts, ?) WHERE id=?",
            (status, at, tokens, error[:500], attempts, request_id),
            wait=wait,
        )

    async def set_drain(self, kind: str, target: str, drained: bool) -> None:
        sql = (
            "INSERT OR IGNORE INTO drains (kind, id) VALUES (?, ?)"
            if drained
            else "DELETE FROM drains WHERE kind=? AND id=?"
        )
        done = self._put(sql, (kind, target), wait=True)
        assert done is not None
        await done

    def drains(self) -> list[tuple[str, str]]:
        conn = self._connect()
        try:
            return [(str(k), str(i)) for k, i in conn.execute("SELECT kind, id FROM drains")]
        finally:
            conn.close()

    def query(self, status: int, model: str, limit: int) -> list[queen_pb2.RequestRecord]:
        """Newest first. Runs on its own connection (call it from a thread)."""
        clauses: list[str] = []
        params: list[object] = []
        if status:
            clauses.append("status=?")
            params.append(status)
        if model:
            clauses.append("model=?")
            params.append(model)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = (
            "SELECT id, model, worker_id, hive_id, status, accepted_at, started_at, finished_at, "
            "completion_tokens, error, attempts, client_request_id, client "
            f"FROM requests {where} "
            "ORDER BY accepted_at DESC LIMIT ?"
        )
        conn = self._connect()
        try:
            rows = conn.execute(sql, (*params, min(limit or 100, MAX_LIMIT))).fetchall()
        finally:
            conn.close()
        return [
            queen_pb2.RequestRecord(
                id=r[0],
                model=r[1],
                worker_id=r[2],
                hive_id=r[3],
                status=r[4],
                accepted_at=timestamp(r[5]),
                started_at=timestamp(r[6]),
                finished_at=timestamp(r[7]),
                completion_tokens=r[8],
                error=r[9],
                attempts=r[10],
                client_request_id=r[11],
                client=r[12],
            )
            for r in rows
        ]

    async def close(self) -> None:
        """Write everything queued so far, then stop the writer."""
        if self._thread is not None:
            self._ops.put(_STOP)
            await asyncio.to_thread(self._thread.join, 10)
            self._thread = None


def _commit(conn: sqlite3.Connection, ops: list[_Op]) -> list[Exception | None]:
    """Commit the ops as one transaction; if that fails, each on its own, so one bad op
    cannot take the other requests' records down with it. Returns each op's error."""
    try:
        _run(conn, ops)
        return [None] * len(ops)
    except sqlite3.Error as exc:
        if len(ops) == 1:
            return [exc]
    return [_one(conn, op) for op in ops]


def _one(conn: sqlite3.Connection, op: _Op) -> Exception | None:
    try:
        _run(conn, [op])
    except sqlite3.Error as exc:
        return exc
    return None


def _run(conn: sqlite3.Connection, ops: list[_Op]) -> None:
    try:
        conn.execute("BEGIN")
        for op in ops:
            conn.execute(op.sql, op.params)
        conn.execute("COMMIT")
    except sqlite3.Error:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _settle(done: asyncio.Future[None], error: Exception | None) -> None:
    if done.done():
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)
