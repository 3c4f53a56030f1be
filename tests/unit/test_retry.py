"""The retry decision of a request whose attempt failed, with plain values."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from queen.requests.retry import (
    MAX_ATTEMPTS,
    RETRYABLE,
    WORKER_FAULTS,
    Failure,
    decide,
    every_worker_tried,
    gave_up,
)
from queen.routing.ask import Outcome

Code = grpc.StatusCode


def failure(code: grpc.StatusCode | None, details: str | None = "boom") -> Failure:
    return Failure("w1", "addr-1", code, details)


def test_unavailable_before_the_first_chunk_retries_elsewhere_and_marks_unreachable() -> None:
    decision = decide(failure(Code.UNAVAILABLE), attempt=1, chunks_sent=0, time_left=10, model="m")
    assert decision.retry and decision.error is None
    assert decision.exclude == "addr-1" and decision.mark_unreachable
    assert decision.outcome == Outcome(ok=False, worker_fault=True)
    assert decision.failover and decision.backoff == pytest.approx(0.1)
    assert decision.last_error == "worker w1: UNAVAILABLE: boom"


@pytest.mark.parametrize("code", sorted(WORKER_FAULTS - {Code.UNAVAILABLE}, key=str))
def test_other_worker_faults_retry_elsewhere_without_marking_unreachable(
    code: grpc.StatusCode,
) -> None:
    decision = decide(failure(code), attempt=1, chunks_sent=0, time_left=None, model="m")
    assert decision.retry and decision.exclude == "addr-1"
    assert not decision.mark_unreachable
    assert decision.outcome == Outcome(ok=False, worker_fault=True)


def test_a_full_worker_is_retried_but_not_excluded_and_not_counted() -> None:
    decision = decide(
        failure(Code.RESOURCE_EXHAUSTED), attempt=1, chunks_sent=0, time_left=None, model="m"
    )
    assert decision.retry and decision.exclude == "" and not decision.mark_unreachable
    assert decision.outcome == Outcome(ok=None)
    assert decision.failover
    assert decision.last_error == "worker w1: RESOURCE_EXHAUSTED: boom"


def test_hive_lost_retries_elsewhere_as_the_workers_fault() -> None:
    lost = failure(None, "hive h1 of worker w1 stopped heartbeating before the first chunk")
    decision = decide(lost, attempt=1, chunks_sent=0, time_left=None, model="m")
    assert decision.retry and decision.exclude == "addr-1" and not decision.mark_unreachable
    assert decision.outcome == Outcome(ok=False, worker_fault=True)
    assert decision.last_error == lost.details


@pytest.mark.parametrize(
    "code", [Code.INVALID_ARGUMENT, Code.DEADLINE_EXCEEDED, Code.PERMISSION_DENIED]
)
def test_a_code_that_is_not_retryable_ends_the_request_with_that_code(
    code: grpc.StatusCode,
) -> None:
    assert code not in RETRYABLE
    decision = decide(failure(code), attempt=1, chunks_sent=0, time_left=10, model="m")
    assert not decision.retry and not decision.failover and decision.exclude == ""
    assert decision.error is not None
    assert (decision.error.code, decision.error.message) == (code, "boom")
    assert decision.outcome == Outcome(ok=False, worker_fault=False)


def test_a_code_without_details_is_named() -> None:
    decision = decide(failure(Code.NOT_FOUND, ""), 1, 0, None, "m")
    assert decision.error is not None and decision.error.message == "NOT_FOUND"


def test_after_chunks_were_sent_nothing_is_retried() -> None:
    decision = decide(failure(Code.UNAVAILABLE), attempt=1, chunks_sent=3, time_left=10, model="m")
    assert not decision.retry and not decision.failover
    assert not decision.mark_unreachable and decision.exclude == ""
    assert decision.outcome == Outcome(ok=False, worker_fault=True)
    assert decision.error is not None
    assert decision.error.code == Code.UNAVAILABLE
    assert decision.error.message == (
        "worker w1 failed after 3 token chunk(s) were delivered (UNAVAILABLE: boom); "
        "the stream is incomplete"
    )


def test_after_chunks_a_failure_that_is_not_the_workers_fault_is_counted_so() -> None:
    decision = decide(failure(Code.CANCELLED), 1, 1, None, "m")
    assert decision.outcome == Outcome(ok=False, worker_fault=False)
    assert decision.error is not None and decision.error.code == Code.UNAVAILABLE


def test_backoff_doubles_and_the_last_attempt_gives_up() -> None:
    backoffs = [decide(failure(Code.UNAVAILABLE), n, 0, None, "m").backoff for n in (1, 2)]
    assert backoffs == pytest.approx([0.1, 0.2])
    last = decide(failure(Code.UNAVAILABLE), MAX_ATTEMPTS, 0, None, "m")
    assert not last.retry
    # Still a failover (counted, logged) and still excluded / marked: the effects stay.
    assert last.failover and last.exclude == "addr-1" and last.mark_unreachable
    assert last.error is not None and last.error.code == Code.UNAVAILABLE
    assert last.error.message == (
        "no worker of model 'm' could serve the request after 3 attempt(s); "
        "last error: worker w1: UNAVAILABLE: boom"
    )


def test_a_deadline_too_close_for_the_backoff_gives_up_now() -> None:
    assert decide(failure(Code.INTERNAL), 1, 0, time_left=0.11, model="m").retry
    for time_left in (0.1, 0.05, -1.0):
        decision = decide(failure(Code.INTERNAL), 1, 0, time_left=time_left, model="m")
        assert not decision.retry
        assert decision.error is not None and "after 1 attempt(s)" in decision.error.message
    second = decide(failure(Code.INTERNAL), 2, 0, time_left=0.15, model="m")
    assert not second.retry  # the second backoff is 0.2 s


def test_every_worker_tried_stops_early() -> None:
    assert not every_worker_tried(set(), ["a", "b"])  # nothing tried yet
    assert not every_worker_tried({"a"}, ["a", "b"])
    assert every_worker_tried({"a", "b"}, ["a", "b"])
    assert every_worker_tried({"a"}, [])  # every worker of the model left meanwhile


def test_the_workers_are_not_read_before_anything_was_tried() -> None:
    def unread() -> Iterator[str]:
        raise AssertionError("scanned the model's workers for a first attempt")
        yield ""

    assert not every_worker_tried(set(), unread())


def test_gave_up_names_the_model_attempts_and_last_error() -> None:
    error = gave_up("m", 2, "worker w1: INTERNAL: x")
    assert error.code == Code.UNAVAILABLE
    assert str(error) == (
        "no worker of model 'm' could serve the request after 2 attempt(s); "
        "last error: worker w1: INTERNAL: x"
    )
