"""`apiary status` counts as capacity only what can be routed to."""

from __future__ import annotations

from cli.output import status_text
from protos.v1 import common_pb2, queen_pb2


def test_failed_loading_and_drained_workers_are_no_capacity() -> None:
    workers = [
        common_pb2.WorkerRecord(id="ok", state=common_pb2.WORKER_STATE_BUSY, slots_total=4,
                                slots_available=1, hive_health=common_pb2.HIVE_HEALTH_HEALTHY),
        common_pb2.WorkerRecord(id="failed", state=common_pb2.WORKER_STATE_FAILED, slots_total=8),
        common_pb2.WorkerRecord(id="loading", state=common_pb2.WORKER_STATE_LOADING,
                                slots_total=8),
        common_pb2.WorkerRecord(id="drained", state=common_pb2.WORKER_STATE_IDLE, slots_total=2,
                                slots_available=2, drained=True),
    ]  # fmt: skip
    hive = queen_pb2.HiveInfo(id="h1", problems=["cannot save the worker table x: No space"])
    text = status_text("q:1", [hive], workers, [])
    assert "capacity  3/4 slots in use" in text
    assert "PROBLEM   hive h1: cannot save the worker table x: No space" in text
