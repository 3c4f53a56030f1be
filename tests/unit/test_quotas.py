"""Per-client limits and request references (queen/quotas.py), and how an early end is
named (queen/requests/endings.py): plain values in, refusals and words out."""

from __future__ import annotations

import pytest

from protos.v1 import queen_pb2
from queen.quotas import Quota, Quotas, References, peer_host
from queen.requests import endings


def test_a_client_at_its_limit_is_refused_and_another_is_not() -> None:
    quota = Quotas.of(max_streams=2).streams
    assert quota.acquire("shop") is None and quota.acquire("shop") is None
    refused = quota.acquire("shop")
    assert refused is not None and refused.code == "RESOURCE_EXHAUSTED"
    assert refused.message == (
        "client 'shop' already has 2 Infer streams open (the limit per client, "
        "--max-streams-per-client); wait for one to finish"
    )
    assert quota.held("shop") == 2  # a refusal counts nothing
    assert quota.acquire("search") is None  # one busy client does not lock out another
    quota.release("shop")
    assert quota.acquire("shop") is None


def test_releases_forget_idle_clients_and_zero_means_no_limit() -> None:
    quota = Quota("things", "--max-things", 0, "")
    for _ in range(1000):
        assert quota.acquire("c") is None
    for _ in range(1000):
        quota.release("c")
    assert quota.held("c") == 0 and quota._held == {}
    quota.release("never-seen")  # harmless
    assert quota._held == {}


@pytest.mark.parametrize(
    ("which", "flag", "words"),
    [
        ("queued", "--max-queued-per-client", "requests waiting for a slot"),
        ("leases", "--max-leases-per-client", "active direct leases"),
    ],
)
def test_each_limit_names_its_flag(which: str, flag: str, words: str) -> None:
    quota: Quota = getattr(Quotas.of(max_queued=1, max_leases=1), which)
    assert quota.acquire("a") is None
    refused = quota.acquire("a")
    assert refused is not None and flag in refused.message and words in refused.message
    assert "'a'" in refused.message


def test_a_reference_names_one_request_in_flight_per_client() -> None:
    refs = References()
    assert refs.claim("shop", "order-1") is None
    taken = refs.claim("shop", "order-1")
    assert taken is not None and taken.code == "ALREADY_EXISTS"
    assert "'order-1'" in taken.message and "'shop'" in taken.message
    assert refs.claim("search", "order-1") is None  # another client's reference is its own
    assert refs.claim("shop", "") is None and refs.claim("shop", "") is None  # none given
    refs.drop("shop", "order-1")
    assert refs.claim("shop", "order-1") is None  # reusable once the first has ended
    refs.drop("shop", "order-1")
    refs.drop("search", "order-1")
    refs.drop("shop", "")
    assert len(refs) == 0


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:127.0.0.1:54321", "127.0.0.1"),
        ("ipv6:[::1]:54321", "::1"),
        ("ipv6:%5B::1%5D:54321", "::1"),
        ("ipv6:%5Bfe80::1%5D:7", "fe80::1"),
        ("unix:/tmp/sock", "unix:/tmp/sock"),
        ("", ""),
    ],
)
def test_peer_host_drops_the_port(peer: str, host: str) -> None:
    assert peer_host(peer) == host


def test_an_early_end_is_a_deadline_when_no_time_was_left() -> None:
    status, error = endings.call_ended(0.0, attempts=1, delivered=3)
    assert status == queen_pb2.REQUEST_STATUS_DEADLINE_EXCEEDED
    assert error == (
        "DEADLINE_EXCEEDED: the client's deadline passed after 3 token chunk(s) were delivered"
    )
    # The client's timer fires a moment before ours: its cancel at the deadline is the deadline.
    status, _ = endings.call_ended(endings.DEADLINE_SLACK / 2, attempts=1, delivered=3)
    assert status == queen_pb2.REQUEST_STATUS_DEADLINE_EXCEEDED
    status, error = endings.call_ended(0.0, attempts=0, delivered=0)
    assert error == (
        "DEADLINE_EXCEEDED: the client's deadline passed while the request waited for a free worker"
    )


def test_an_early_end_with_time_left_or_no_deadline_is_a_cancel() -> None:
    for remaining in (None, 5.0):
        status, error = endings.call_ended(remaining, attempts=2, delivered=0)
        assert status == queen_pb2.REQUEST_STATUS_CANCELLED
        assert error == "CANCELLED: the call was cancelled after 0 token chunk(s) were delivered"
    _, error = endings.call_ended(None, attempts=0, delivered=0)
    assert error == "CANCELLED: the call was cancelled while the request waited for a free worker"


def test_statuses_name_their_event_and_metric() -> None:
    table = {
        queen_pb2.REQUEST_STATUS_COMPLETED: (queen_pb2.EVENT_KIND_REQUEST_COMPLETED, "completed"),
        queen_pb2.REQUEST_STATUS_FAILED: (queen_pb2.EVENT_KIND_REQUEST_FAILED, "failed"),
        queen_pb2.REQUEST_STATUS_CANCELLED: (queen_pb2.EVENT_KIND_REQUEST_CANCELLED, "cancelled"),
        queen_pb2.REQUEST_STATUS_DEADLINE_EXCEEDED: (
            queen_pb2.EVENT_KIND_REQUEST_FAILED,
            "deadline_exceeded",
        ),
    }
    for status, (kind, label) in table.items():
        assert (endings.event_kind(status), endings.label(status)) == (kind, label)
    assert endings.status_of_error("DEADLINE_EXCEEDED") == (
        queen_pb2.REQUEST_STATUS_DEADLINE_EXCEEDED
    )
    for code in ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "CANCELLED", "NOT_FOUND"):
        assert endings.status_of_error(code) == queen_pb2.REQUEST_STATUS_FAILED
