"""Durable request history in SQLite (WAL), written by one thread with group commit.

Every request the queen accepts gets a row, keyed by the queen's own id (a client's
request_id is kept beside it, as client_request_id, and can overwrite nothing). The final
state of a request that ends normally or with an error is committed before its RPC ends,
so a queen crash never loses it. A request whose call was cancelled (or whose deadline
passed) is recorded without waiting: its end is queued here at once, and close() writes
everything queued before it returns. Rows still queued or running when the queen starts
again are marked failed with the reason "queen restarted". Drains live here too, so they
survive restarts.

Routing never depends on the history. A file SQLite finds corrupt when the queen starts is
moved aside (logged at ERROR with both paths) and a new one begun. A write that fails (a full
disk) drops its rows: they are counted (`Drops`, the metric apiary_history_rows_dropped_total),
logged at most once a minute, and the queen says it is degraded until a minute has passed
without a failed write; the requests themselves go on and end as they would have, and writing
resumes by itself once there is room.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import structlog

from apiary.errors import StatusError
from apiary.protoutil import timestamp
from protos.v1 import queen_pb2

log = structlog.get_logger("queen.history")

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
    client TEXT NOT NULL DEFAULT '',
    policy INTEGER NOT NULL DEFAULT 0,
    migrations INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS requests_by_time ON requests (accepted_at);
CREATE TABLE IF NOT EXISTS drains (kind TEXT NOT NULL, id TEXT NOT NULL, PRIMARY KEY (kind, id));
"""
# Columns added since the first schema, added to an older file when it is opened.
ADDED_COLUMNS = {
    "client_request_id": "TEXT NOT NULL DEFAULT ''",
    "client": "TEXT NOT NULL DEFAULT ''",
    "policy": "INTEGER NOT NULL DEFAULT 0",
    "migrations": "INTEGER NOT NULL DEFAULT 0",
}
MAX_LIMIT = 10_000
_STOP = object()
# What SQLite says of a file it cannot read as a database (primary result codes).
SQLITE_CORRUPT, SQLITE_NOTADB = 11, 26
# At most one log line a minute about rows that could not be written; the queen says it is
# degraded until a minute has passed without a failed write.
LOG_EVERY = 60.0
DEGRADED_FOR = 60.0


@dataclass
class _Op:
    sql: str
    params: tuple[Any, ...]
    done: asyncio.Future[None] | None = None


class Drops:
    """Rows the history could not write: counted, logged at most once a LOG_EVERY, and whether
    the history is degraded: its last write failed, or one did within DEGRADED_FOR (a nearly
    full disk lets some writes through, and a status that flickers to fine would hide that).
    Written by the writer thread only."""

    def __init__(self, path: Path, now: Callable[[], float]) -> None:
        self.path = path
        self.now = now
        self.total = 0
        self.failing = False
        self.error = ""
        self._failed_at: float | None = None
        self._unlogged = 0
        self._logged_at: float | None = None
        # A failure was logged and no recovery since: the recovery is logged too.
        self._told = False

    def degraded(self) -> bool:
        failed_at = self._failed_at
        return self.failing or (failed_at is not None and self.now() - failed_at < DEGRADED_FOR)

    def problem(self) -> str:
        """The degradation in words, or ''."""
        failed_at = self._failed_at
        if not self.degraded() or failed_at is None:
            return ""
        now = "cannot be written" if self.failing else "could not be written"
        return (
            f"request history {self.path} {now}: {self.error} ({self.total} row(s) dropped "
            f"since the queen started, the last {self.now() - failed_at:.0f} s ago)"
        )

    def failed(self, rows: int, error: BaseException) -> None:
        now = self.now()
        self.total += rows
        self._unlogged += rows
        self.failing, self.error, self._failed_at = True, str(error), now
        if self._logged_at is None or now - self._logged_at >= LOG_EVERY:
            log.error(
                "request history cannot be written; its rows are dropped, requests go on",
                path=str(self.path),
                error=str(error),
                dropped=self._unlogged,
                dropped_total=self.total,
            )
            self._logged_at, self._unlogged, self._told = now, 0, True

    def wrote(self, refused: int = 0) -> None:
        """A batch was committed; `refused` of its rows were refused on their own (a
        duplicate id: the row's fault, not the file's), and are counted dropped."""
        self.total += refused
        if not self.failing:
            return
        self.failing = False
        if self._told:
            log.warning(
                "request history written again",
                path=str(self.path),
                dropped=self._unlogged,
                dropped_total=self.total,
            )
            self._unlogged, self._told = 0, False


class History:
    """The requests table, in one SQLite file written by one thread. (Its drains table is left
    from before drains moved to the hives, and no longer read or written.)"""

    def __init__(self, path: Path, now: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._ops: queue.SimpleQueue[_Op | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.recovered = 0
        self.drops = Drops(path, now)
        # The file is set up (schema, columns, unfinished rows failed); until then the writer
        # tries again before each batch, and drops the batch if it still cannot.
        self._ready = False
        # Where an unreadable file was moved, if one was.
        self.moved_aside: Path | None = None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            _configure(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def open(self) -> None:
        """Set the file up (an unreadable one moved aside), start the writer. Never raises for
        the file's sake: a history that cannot be set up now is tried again by the writer."""
        try:
            self._set_up()
        except (sqlite3.Error, OSError) as exc:
            self.drops.failed(0, exc)
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._write_forever, name="history", daemon=True)
        self._thread.start()

    def _set_up(self) -> None:
        """Make the file ready: created, or read and brought up to date. Raises sqlite3.Error
        or OSError if it cannot be now."""
        try:
            self.recovered = self._prepare()
        except sqlite3.DatabaseError as exc:
            if not corrupt(exc):
                raise
            self.recovered = self._prepare()  # on a new file: the unreadable one was moved
        self._ready = True
        if self.recovered:
            log.warning(
                "requests left unfinished by the previous queen marked failed",
                count=self.recovered,
            )

    def _prepare(self) -> int:
        """Create the schema and fail what a previous queen left unfinished; how many. A file
        SQLite cannot read is moved aside (and the error raised)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            _configure(conn)
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
            return cur.rowcount
        except sqlite3.DatabaseError as exc:
            if corrupt(exc):
                # Before closing: the last connection to close deletes the WAL, which is
                # part of what a person will want to look at.
                self._move_aside(exc)
            raise
        finally:
            conn.close()

    def _move_aside(self, error: sqlite3.DatabaseError) -> None:
        """Keep an unreadable file (and its WAL and shared memory) for a person to look at,
        under a name of its own, so a new history can begin."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        moved = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        copy = 1
        while moved.exists():  # another in the same second: never overwrite one
            copy += 1
            moved = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{copy}")
        for suffix in ("", "-wal", "-shm"):
            source = self.path.with_name(self.path.name + suffix)
            if source.exists():
                source.replace(moved.with_name(moved.name + suffix))
        self.moved_aside = moved
        log.error(
            "request history unreadable: moved aside, a new one begins",
            path=str(self.path),
            moved_to=str(moved),
            error=str(error),
        )

    def _write_forever(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while True:
                batch = [self._ops.get()]
                while len(batch) < 2000:
                    try:
                        batch.append(self._ops.get_nowait())
                    except queue.Empty:
                        break
                ops = [op for op in batch if isinstance(op, _Op)]
                if ops:
                    conn = self._write(conn, ops)
                if _STOP in batch:
                    return
        finally:
            if conn is not None:
                conn.close()

    def _write(self, conn: sqlite3.Connection | None, ops: list[_Op]) -> sqlite3.Connection | None:
        """Commit the ops, or count them dropped; settle their futures either way (a request
        never fails for its record's sake). Returns the connection to use next: None after a
        failure, so the next batch starts on a new one."""
        try:
            if not self._ready:
                self._set_up()
            conn = conn or self._connect()
            refused = _commit(conn, ops)
        except Exception as exc:  # the writer must not die: every op's future must settle
            self.drops.failed(len(ops), exc)
            if conn is not None:
                with suppress(sqlite3.Error):
                    conn.close()
            conn = None
        else:
            self.drops.wrote(refused)
        for op in ops:
            if op.done is not None and self._loop is not None:
                self._loop.call_soon_threadsafe(_settle, op.done)
        return conn

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
        self, request_id: str, worker_id: str, hive_id: str, at: float, attempt: int,
        policy: int = 0,
    ) -> None:  # fmt: skip
        self._put(
            "UPDATE requests SET status=?, worker_id=?, hive_id=?, started_at=?, attempts=?, "
            "policy=? WHERE id=?",
            (queen_pb2.REQUEST_STATUS_RUNNING, worker_id, hive_id, at, attempt, policy,
             request_id),
            wait=False,
        )  # fmt: skip

    def migrated(self, request_id: str, moves: int) -> None:
        """The request moved mid-stream to another worker (`started` names the new one)."""
        self._put("UPDATE requests SET migrations=? WHERE id=?", (moves, request_id), wait=False)

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
        it is committed (or dropped: it never raises); without, nothing is awaited (a call
        that is over records its end from a done-callback or a closing generator) and close()
        still writes it."""
        return self._put(
            "UPDATE requests SET status=?, finished_at=?, completion_tokens=?, error=?, "
            "attempts=MAX(attempts, ?) WHERE id=?",
            (status, at, tokens, error[:500], attempts, request_id),
            wait=wait,
        )

    def status(self) -> queen_pb2.QueenStatus:
        """What the history adds to the queen's own status: whether it is degraded, and why."""
        problem = self.drops.problem()
        problems = [problem] if problem else []
        return queen_pb2.QueenStatus(
            degraded=bool(problems),
            problems=problems,
            history_rows_dropped=self.drops.total,
        )

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
            "completion_tokens, error, attempts, client_request_id, client, policy, migrations "
            f"FROM requests {where} "
            "ORDER BY accepted_at DESC LIMIT ?"
        )
        try:
            conn = self._connect()
            try:
                rows = conn.execute(sql, (*params, min(limit or 100, MAX_LIMIT))).fetchall()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise StatusError(
                grpc.StatusCode.UNAVAILABLE, f"the request history cannot be read: {exc}"
            ) from None
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
                policy=r[13],
                migrations=r[14],
            )
            for r in rows
        ]

    async def close(self) -> None:
        """Write everything queued so far, then stop the writer."""
        if self._thread is not None:
            self._ops.put(_STOP)
            await asyncio.to_thread(self._thread.join, 10)
            self._thread = None


def _configure(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA journal_mode=WAL")
    # WAL + NORMAL: a commit survives a crash of this process (not of the machine's power).
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")


def corrupt(error: sqlite3.DatabaseError) -> bool:
    """Whether SQLite says the file is not a database it can read (not: full, locked)."""
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (SQLITE_CORRUPT, SQLITE_NOTADB)
    text = str(error)
    return "malformed" in text or "not a database" in text


def _commit(conn: sqlite3.Connection, ops: list[_Op]) -> int:
    """Commit the ops as one transaction. If one is refused on its own (a constraint), each
    on its own, so it cannot take the other requests' records down with it; returns how many
    were refused. Any other failure is the file's (a full disk): raised."""
    try:
        _run(conn, ops)
        return 0
    except sqlite3.IntegrityError:
        if len(ops) == 1:
            return 1
    return sum(_refused(conn, op) for op in ops)


def _refused(conn: sqlite3.Connection, op: _Op) -> bool:
    try:
        _run(conn, [op])
    except sqlite3.IntegrityError:
        return True
    return False


def _run(conn: sqlite3.Connection, ops: list[_Op]) -> None:
    try:
        conn.execute("BEGIN")
        for op in ops:
            conn.execute(op.sql, op.params)
        conn.execute("COMMIT")
    except sqlite3.Error:
        if conn.in_transaction:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


def _settle(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)
