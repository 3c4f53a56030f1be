"""`apiary status` counts as capacity only what can be routed to."""

from __future__ import annotations

from cli.output import ClusterStatus, status_text
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
    text = status_text(ClusterStatus("q:1", queen_pb2.QueenStatus(), [hive], workers))
    assert "capacity  3/4 slots in use" in text
    assert "PROBLEM   hive h1: cannot save the worker table x: No space" in text


def test_requests_line_is_the_queens_own_totals_and_its_problems_are_shown() -> None:
    # No worker has any count: the totals come from the queen, which outlives its workers.
    queen = queen_pb2.QueenStatus(
        requests_completed=41, requests_failed=1, requests_cancelled=3, requests_refused=7,
        degraded=True, problems=["request history: rows are being dropped"],
    )  # fmt: skip
    text = status_text(ClusterStatus("q:1", queen))
    assert text.splitlines()[0] == "queen q:1 DEGRADED"
    assert (
        "requests  41 completed, 1 failed, 3 cancelled, 7 refused (success 97.6%) "
        "since the queen started" in text
    )
    assert "PROBLEM   queen: request history: rows are being dropped" in text
