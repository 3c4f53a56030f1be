"""The request history on a temporary SQLite file (no processes, no sockets): rows keyed by the
queen's ids with the client's reference beside them, an older file given the new columns, a
bad write that cannot take others down, and writes queued without waiting kept by close()."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from protos.v1 import queen_pb2
from queen.history import History

OLD_SCHEMA = """
CREATE TABLE requests (
    id TEXT PRIMARY KEY, model TEXT NOT NULL, worker_id TEXT NOT NULL DEFAULT '',
    hive_id TEXT NOT NULL DEFAULT '', status INTEGER NOT NULL, accepted_at REAL NOT NULL,
    started_at REAL NOT NULL DEFAULT 0, finished_at REAL NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0, error TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0
);
INSERT INTO requests (id, model, status, accepted_at) VALUES ('old', 'm', 3, 1.0);
"""


async def test_an_older_file_gains_the_new_columns_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript(OLD_SCHEMA)
    conn.close()
    history = History(path)
    history.open()
    history.accepted("q1", "m", 2.0, client="shop", client_request_id="order-1")
    await history.close()
    records = {r.id: r for r in history.query(0, "", 0)}
    assert (records["old"].status, records["old"].client_request_id) == (3, "")
    assert (records["q1"].client, records["q1"].client_request_id) == ("shop", "order-1")


async def test_a_row_is_never_replaced_and_a_bad_write_takes_no_other_down(
    tmp_path: Path,
) -> None:
    history = History(tmp_path / "history.sqlite3")
    # Queued before the writer starts, so it takes them as one batch. The same id twice
    # (which the queen's uuids never do): refused, the first row stays, and the other writes
    # of the batch are committed all the same.
    history.accepted("q1", "m", 1.0, client="shop", client_request_id="a")
    done = history.finish("q1", queen_pb2.REQUEST_STATUS_COMPLETED, 2.0, 5, "", 1)
    history.accepted("q1", "m", 3.0, client="search", client_request_id="b")
    history.accepted("q2", "m", 3.0, client="search", client_request_id="b")
    history.finish(
        "q2", queen_pb2.REQUEST_STATUS_CANCELLED, 4.0, 2, "CANCELLED: ...", 1, wait=False
    )
    history.open()
    assert done is not None
    await done
    await history.close()  # writes what was queued without waiting
    records = {r.id: r for r in history.query(0, "", 0)}
    assert (records["q1"].status, records["q1"].client, records["q1"].completion_tokens) == (
        queen_pb2.REQUEST_STATUS_COMPLETED,
        "shop",
        5,
    )
    assert (records["q2"].status, records["q2"].error) == (
        queen_pb2.REQUEST_STATUS_CANCELLED,
        "CANCELLED: ...",
    )
    cancelled = history.query(queen_pb2.REQUEST_STATUS_CANCELLED, "", 0)
    assert [r.id for r in cancelled] == ["q2"]
