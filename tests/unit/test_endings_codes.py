"""queen/requests/endings.py: the gRPC code a request ended with (the metric's label) and its
outcome (the status totals), from what its record says."""

from __future__ import annotations

import pytest

from protos.v1 import queen_pb2
from queen import metrics
from queen.requests import endings


@pytest.mark.parametrize(
    ("status", "error", "code", "outcome"),
    [
        (queen_pb2.REQUEST_STATUS_COMPLETED, "", "OK", "completed"),
        (queen_pb2.REQUEST_STATUS_CANCELLED, "CANCELLED: the call was cancelled", "CANCELLED",
         "cancelled"),
        (queen_pb2.REQUEST_STATUS_DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED: passed",
         "DEADLINE_EXCEEDED", "failed"),
        (queen_pb2.REQUEST_STATUS_FAILED, "UNAVAILABLE: queen shutting down: ...", "UNAVAILABLE",
         "failed"),
        (queen_pb2.REQUEST_STATUS_FAILED, "RESOURCE_EXHAUSTED: queue full", "RESOURCE_EXHAUSTED",
         "failed"),
        # Not a code name: a label must still be one of the codes.
        (queen_pb2.REQUEST_STATUS_FAILED, "worker exploded: boom", "UNKNOWN", "failed"),
        (queen_pb2.REQUEST_STATUS_FAILED, "", "UNKNOWN", "failed"),
    ],
)  # fmt: skip
def test_code_and_outcome(
    status: queen_pb2.RequestStatus.ValueType, error: str, code: str, outcome: str
) -> None:
    assert endings.code_of(status, error) == code
    assert metrics.outcome(code) == outcome


def test_every_grpc_code_name_is_known() -> None:
    import grpc

    assert {c.name for c in grpc.StatusCode} == endings.CODE_NAMES
