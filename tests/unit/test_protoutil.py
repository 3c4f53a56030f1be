"""Enum values a newer peer may send never break a listing, a table or a metric."""

from __future__ import annotations

from apiary.protoutil import enum_name, health_name, state_name
from cli.output import event_line, worker_rows
from protos.v1 import common_pb2, queen_pb2


def test_unknown_enum_values_read_as_unknown_n() -> None:
    assert state_name(common_pb2.WORKER_STATE_IDLE) == "IDLE"
    assert state_name(42) == "UNKNOWN(42)"  # type: ignore[arg-type]
    assert health_name(7) == "UNKNOWN(7)"  # type: ignore[arg-type]
    assert enum_name(queen_pb2.EventKind, 99, "EVENT_KIND_") == "UNKNOWN(99)"


def test_tables_and_event_lines_show_unknown_values() -> None:
    record = common_pb2.WorkerRecord(id="w1", state=42, hive_health=7)  # type: ignore[arg-type]
    assert "UNKNOWN(42)" in worker_rows([record])
    event = queen_pb2.Event(kind=99, state=42)  # type: ignore[arg-type]
    line = event_line(event)
    assert "UNKNOWN(99)" in line and "UNKNOWN(42)" in line
