"""apiary.client without a cluster: which queens, in which order, which failures move a call
to another queen, the failover and wait-for-ready loops driven by fake calls, and the
blocking client's loop thread."""

from __future__ import annotations

import asyncio
import inspect
import math
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from apiary.client import Admin, AsyncAdmin, AsyncClient, Client, infer_request, queens_from
from apiary.client.admin import catalog_name
from apiary.client.blocking import Blocking, LoopThread, OnLoop, blocking, blocking_stream
from apiary.client.queens import (
    Backoff,
    Rotation,
    deadline_passed,
    grpc_timeout,
    queen_lost,
    unreached,
)
from apiary.client.transport import Transport
from apiary.errors import ANSWERED, STOPPING
from protos.v1 import common_pb2

# grpc's own words for a refused connection and an unresolvable name.
REFUSED = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: "
    "Failed to connect to remote host: Connection refused"
)
UNRESOLVED = "errors resolving nohost.invalid:7070: [hostname lookup error: Domain name not found]"
# What a stopping queen says, in words for people: its trailer (STOPPING) is what moves a call.
SHUTTING_DOWN = "queen shutting down: it takes no new requests; retry on another queen"


def rpc_error(
    code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, str], ...] = ()
) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details, None
    )


# ---- queens_from ----------------------------------------------------------------------------


def test_queens_from_a_comma_list_or_a_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APIARY_QUEEN", raising=False)
    assert queens_from("a:1") == ("a:1",)
    assert queens_from(" a:1 , b:2 ,") == ("a:1", "b:2")
    assert queens_from(["a:1", "b:2", "a:1"]) == ("a:1", "b:2")  # each once, first place kept
    assert queens_from(None) == ("127.0.0.1:7070",)
    monkeypatch.setenv("APIARY_QUEEN", "x:1,y:2")
    assert queens_from(None) == ("x:1", "y:2")
    monkeypatch.setenv("APIARY_QUEEN", "")
    assert queens_from(None) == ("127.0.0.1:7070",)
    nothings: list[str | list[str]] = ["", " , ", []]
    for nothing in nothings:
        with pytest.raises(ValueError, match="no queen address"):
            queens_from(nothing)


# ---- unreached: what may go to another queen ------------------------------------------------


@pytest.mark.parametrize(
    ("code", "details", "moves"),
    [
        (grpc.StatusCode.UNAVAILABLE, REFUSED, True),
        (grpc.StatusCode.UNAVAILABLE, UNRESOLVED, True),
        (grpc.StatusCode.UNAVAILABLE, "DNS resolution failed for nohost:1", True),
        # The request may have reached a queen: never sent twice.
        (grpc.StatusCode.UNAVAILABLE, "Socket closed", False),
        (grpc.StatusCode.UNAVAILABLE, "Connection reset by peer", False),
        (grpc.StatusCode.UNAVAILABLE, "every worker of model 'demo' has failed", False),
        # Another queen would say the same.
        (grpc.StatusCode.NOT_FOUND, "unknown model 'x'", False),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", False),
        (grpc.StatusCode.UNAUTHENTICATED, "failed to connect to all addresses", False),
    ],
)
def test_only_failures_that_prove_nothing_was_served_move_a_call(
    code: grpc.StatusCode, details: str, moves: bool
) -> None:
    assert unreached(rpc_error(code, details)) is moves


def test_a_stopping_queens_trailer_moves_a_call_and_its_words_alone_do_not() -> None:
    assert unreached(rpc_error(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN, STOPPING))
    assert unreached(rpc_error(grpc.StatusCode.UNAVAILABLE, "any words", STOPPING))
    assert not unreached(rpc_error(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN))
    assert not unreached(rpc_error(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN, ANSWERED))


def test_an_rpc_error_without_a_status_never_moves() -> None:
    assert not unreached(grpc.RpcError())


@pytest.mark.parametrize(
    "details",
    [
        # What a live queen says when a worker failed mid-stream and could not be continued,
        # or no worker could take the request: both quote the worker's connection error.
        "worker w-1 failed after 3 token chunk(s) were delivered (UNAVAILABLE: Stream removed "
        "(recvmsg:Connection timed out (110))); the stream is incomplete; it already moved 3 "
        "time(s) (--migration-limit 3)",
        "no worker of model 'demo' could serve the request after 3 attempt(s); last error: "
        "worker w-1: UNAVAILABLE: failed to connect to all addresses; last error: keepalive",
    ],
)
def test_a_live_queens_own_failure_is_final_whatever_it_quotes(details: str) -> None:
    answered = rpc_error(grpc.StatusCode.UNAVAILABLE, details, ANSWERED)
    assert not unreached(answered) and not queen_lost(answered)
    # The same words without the server's mark came from the connection itself.
    assert queen_lost(rpc_error(grpc.StatusCode.UNAVAILABLE, details))


def test_a_stopping_queen_cut_is_resumed_although_the_queen_said_it() -> None:
    assert queen_lost(rpc_error(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN, STOPPING))


@pytest.mark.parametrize(
    ("code", "details", "resumes"),
    [
        # The queen's process died.
        (grpc.StatusCode.UNAVAILABLE, "Socket closed", True),
        (grpc.StatusCode.UNAVAILABLE, "Connection reset by peer", True),
        # Its host vanished, seen by the client's keepalive pings (as grpc words it here).
        (grpc.StatusCode.UNAVAILABLE, "Stream removed (recvmsg:Connection timed out (110))", True),
        (grpc.StatusCode.UNAVAILABLE, "keepalive watchdog timeout", True),
        # A live queen reporting a failure it could not mend: the caller's to see.
        (grpc.StatusCode.UNAVAILABLE, "every worker of model 'demo' has failed", False),
        (grpc.StatusCode.UNAVAILABLE, "failed after 3 migrations: 12 token(s) delivered", False),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", False),
        (grpc.StatusCode.INVALID_ARGUMENT, "max_tokens must be at least 1", False),
    ],
)
def test_a_stream_resumes_on_another_queen_only_when_its_queen_went_away(
    code: grpc.StatusCode, details: str, resumes: bool
) -> None:
    assert queen_lost(rpc_error(code, details)) is resumes


# ---- rotation, backoff, deadlines -----------------------------------------------------------


def test_rotation_starts_with_the_queen_that_answered_last() -> None:
    rotation = Rotation(("a", "b", "c"))
    assert rotation.order() == ["a", "b", "c"]
    rotation.answered("b")
    assert rotation.order() == ["b", "c", "a"]
    rotation.answered("elsewhere")
    assert rotation.order() == ["b", "c", "a"]
    rotation.answered("a")
    assert rotation.order() == ["a", "b", "c"]


def test_backoff_doubles_to_its_cap_and_never_passes_the_deadline() -> None:
    backoff = Backoff()
    assert [backoff.pause(10) for _ in range(6)] == [0.05, 0.1, 0.2, 0.4, 0.5, 0.5]
    assert backoff.pause(0.01) == 0.01
    assert backoff.pause(-1) == 0.0
    assert Backoff().pause(math.inf) == 0.05


def test_grpc_timeouts_and_the_deadline_error() -> None:
    assert grpc_timeout(math.inf) is None
    assert grpc_timeout(2.5) == 2.5
    assert grpc_timeout(-0.1) == 0.0
    error = deadline_passed(3)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "deadline of 3 s" in (error.details() or "")


# ---- requests -------------------------------------------------------------------------------


def test_infer_request_from_a_prompt_or_a_chat() -> None:
    plain = infer_request("demo", "hello", max_tokens=3, stop=["."], request_id="r1")
    assert (plain.model, plain.prompt, plain.max_tokens, list(plain.stop)) == (
        "demo",
        "hello",
        3,
        ["."],
    )
    assert not plain.HasField("temperature")  # unset: the backend's default, not 0
    chat = infer_request(
        "demo",
        messages=[
            {"role": "system", "content": "be brief"},
            common_pb2.ChatMessage(role="user", content="hi"),
        ],
        temperature=0.5,
        policy=common_pb2.ROUTING_POLICY_LEAST_LOADED,
    )
    assert [(m.role, m.content) for m in chat.messages] == [("system", "be brief"), ("user", "hi")]
    assert chat.temperature == 0.5 and chat.prompt == ""
    assert chat.policy == common_pb2.ROUTING_POLICY_LEAST_LOADED


def test_a_pulled_model_is_named_after_its_file() -> None:
    assert catalog_name("https://example.org/m/qwen-0.5b.gguf") == "qwen-0.5b"
    assert catalog_name("/models/tiny.gguf") == "tiny"


# ---- the failover and wait-for-ready loops, with fake calls ---------------------------------


class Script:
    """A transport whose calls are answered per queen from lists of outcomes (an exception to
    raise, or a value to return; the last one repeats), recording which queen was asked."""

    def __init__(self, transport: Transport, outcomes: dict[str, list[object]]) -> None:
        self.transport, self.outcomes = transport, outcomes
        # Channels are made once per address on this loop: a call's channel names its queen.
        self.queen_of = {id(transport.channel(address)): address for address in transport.queens}
        self.asked: list[str] = []

    async def call(self, channel: grpc.aio.Channel, left: float | None) -> object:
        address = self.queen_of[id(channel)]
        self.asked.append(address)
        steps = self.outcomes[address]
        outcome = steps.pop(0) if len(steps) > 1 else steps[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def scripted(outcomes: dict[str, list[object]], timeout: float = 5.0, wait: bool = True) -> Script:
    transport = Transport(tuple(outcomes), timeout=timeout, wait_for_ready=wait)
    return Script(transport, outcomes)


async def test_a_call_moves_to_the_next_queen_and_stays_with_the_one_that_answered() -> None:
    script = scripted({"a:1": [rpc_error(grpc.StatusCode.UNAVAILABLE, REFUSED)], "b:2": ["ok"]})
    assert await script.transport.unary(script.call) == "ok"
    assert await script.transport.unary(script.call) == "ok"
    assert script.asked == ["a:1", "b:2", "b:2"]  # the second call starts where one answered
    await script.transport.close()


async def test_a_failure_another_queen_would_repeat_is_raised_at_once() -> None:
    not_found = rpc_error(grpc.StatusCode.NOT_FOUND, "unknown model 'x'")
    script = scripted({"a:1": [not_found], "b:2": ["ok"]})
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await script.transport.unary(script.call)
    assert raised.value is not_found and script.asked == ["a:1"]
    await script.transport.close()


async def test_while_every_queen_is_down_a_call_waits_for_one_to_come_back() -> None:
    down = rpc_error(grpc.StatusCode.UNAVAILABLE, REFUSED)
    script = scripted({"a:1": [down, down, down, "back"], "b:2": [down]})
    assert await script.transport.unary(script.call) == "back"
    assert script.asked == ["a:1", "b:2"] * 3 + ["a:1"]
    await script.transport.close()


async def test_waiting_for_ready_ends_at_the_deadline_with_the_last_failure() -> None:
    down = rpc_error(grpc.StatusCode.UNAVAILABLE, REFUSED)
    script = scripted({"a:1": [down]}, timeout=0.3)
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await script.transport.unary(script.call)
    assert raised.value is down
    assert 0.25 <= time.monotonic() - started < 2
    await script.transport.close()


async def test_without_waiting_for_ready_every_queen_is_tried_once() -> None:
    down = rpc_error(grpc.StatusCode.UNAVAILABLE, REFUSED)
    script = scripted({"a:1": [down], "b:2": [down]}, wait=False)
    with pytest.raises(grpc.aio.AioRpcError):
        await script.transport.unary(script.call)
    assert script.asked == ["a:1", "b:2"]
    await script.transport.close()


async def test_a_deadline_already_past_is_deadline_exceeded() -> None:
    script = scripted({"a:1": ["never asked"]}, timeout=0)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await script.transport.unary(script.call)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and script.asked == []
    await script.transport.close()


class FakeStream:
    """A server stream that yields `items`, then raises `error` if given."""

    def __init__(self, items: list[str], error: grpc.aio.AioRpcError | None = None) -> None:
        self.items, self.error, self.cancelled = items, error, False

    async def _run(self) -> AsyncIterator[str]:
        for item in self.items:
            yield item
        if self.error is not None:
            raise self.error

    def __aiter__(self) -> AsyncIterator[str]:
        return self._run()

    def cancel(self) -> bool:
        self.cancelled = True
        return True


async def test_a_stream_moves_to_another_queen_only_before_its_first_item() -> None:
    transport = Transport(("a:1", "b:2"), timeout=5)
    stopping = rpc_error(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN, STOPPING)
    streams = {"a:1": FakeStream([], stopping), "b:2": FakeStream(["x", "y"])}
    by_channel = {id(transport.channel(a)): s for a, s in streams.items()}
    items = [item async for item in transport.stream(lambda ch, left: by_channel[id(ch)])]
    assert items == ["x", "y"] and streams["a:1"].cancelled

    cut = FakeStream(["x"], rpc_error(grpc.StatusCode.UNAVAILABLE, REFUSED))
    got: list[str] = []
    with pytest.raises(grpc.aio.AioRpcError):
        async for item in transport.stream(lambda ch, left: cut):
            got.append(item)
    assert got == ["x"]  # delivered, then the failure: never replayed elsewhere
    await transport.close()


async def test_a_call_to_every_queen_gives_each_ones_reply_or_failure_in_order() -> None:
    down = rpc_error(grpc.StatusCode.UNAVAILABLE, REFUSED)
    script = scripted({"a:1": ["from a"], "b:2": [down], "c:3": ["from c"]})
    assert await script.transport.everywhere(script.call) == ["from a", down, "from c"]
    await script.transport.close()


async def test_a_direct_stream_never_moves_and_is_cancelled_when_left() -> None:
    transport = Transport(("a:1",), timeout=5)
    stream = FakeStream(["x", "y"], rpc_error(grpc.StatusCode.UNAVAILABLE, REFUSED))
    got: list[str] = []
    with pytest.raises(grpc.aio.AioRpcError):
        async for item in transport.direct("worker:9", lambda ch, left: stream):
            got.append(item)
    assert got == ["x", "y"] and stream.cancelled
    await transport.close()


async def test_channels_belong_to_the_loop_that_made_them() -> None:
    transport = Transport(("a:1",))
    first = transport.channel("a:1")
    assert transport.channel("a:1") is first

    async def elsewhere() -> grpc.aio.Channel:
        return transport.channel("a:1")

    other = await asyncio.to_thread(asyncio.run, elsewhere())
    assert other is not first
    await transport.close()


# ---- the blocking client's loop thread ------------------------------------------------------


def test_the_loop_thread_runs_coroutines_and_streams_and_closes_streams_left_early() -> None:
    thread = LoopThread()
    closed: list[bool] = []

    async def numbers() -> AsyncIterator[int]:
        try:
            for number in range(10):
                yield number
        finally:
            closed.append(True)

    async def double(number: int) -> int:
        return number * 2

    assert thread.run(double(21)) == 42
    assert list(thread.iterate(numbers())) == list(range(10)) and closed == [True]
    for number in thread.iterate(numbers()):
        if number == 2:
            break
    assert closed == [True, True]  # the generator was closed on its loop when left

    async def failing() -> None:
        raise rpc_error(grpc.StatusCode.NOT_FOUND, "nope")

    with pytest.raises(grpc.aio.AioRpcError):  # errors cross the thread unchanged
        thread.run(failing())

    async def nothing() -> None:
        return None

    thread.stop(nothing())
    with pytest.raises(RuntimeError, match="closed"):
        thread.run(double(1))


class Counter:
    """An async object for a blocking face to wrap."""

    async def double(self, number: int, *, plus: int = 0) -> tuple[int, str]:
        """Twice `number`, and where it ran."""
        return number * 2 + plus, threading.current_thread().name

    async def count(self, up_to: int) -> AsyncIterator[int]:
        for number in range(up_to):
            yield number


class BlockingCounter(OnLoop[Counter]):
    double = blocking(Counter.double)
    count = blocking_stream(Counter.count)


def test_blocking_methods_run_the_async_ones_on_the_loop_thread() -> None:
    thread = LoopThread()
    counter = BlockingCounter(Counter(), thread)
    assert counter.double(20, plus=2) == (42, "apiary-client")
    assert list(counter.count(3)) == [0, 1, 2]
    assert counter.double.__doc__ == Counter.double.__doc__
    assert list(inspect.signature(counter.double).parameters) == ["number", "plus"]

    async def nothing() -> None:
        return None

    thread.stop(nothing())


def public_methods(cls: type) -> set[str]:
    return {
        name
        for name, value in vars(cls).items()
        if (inspect.isfunction(value) or isinstance(value, Blocking)) and name[0] != "_"
    }


def test_every_async_call_has_its_blocking_twin() -> None:
    """A call added to AsyncClient or AsyncAdmin and not to Client or Admin fails here."""
    with Client("a:1") as client:
        pairs = ((client, Client, AsyncClient), (client.admin, Admin, AsyncAdmin))
        for face, blocking_class, async_class in pairs:
            # close is the blocking client's own: it also stops the loop thread.
            twins = public_methods(blocking_class) - {"close"}
            assert twins == public_methods(async_class) - {"close"}
            for name in twins:
                assert getattr(face, name).__wrapped__ is vars(async_class)[name]


@pytest.mark.parametrize(
    ("options", "resumed"),
    [({}, True), ({"logprobs": True, "presence_penalty": 1.0}, True),
     ({"json_object": True}, False), ({"n": 2}, False)],
)  # fmt: skip
async def test_a_stream_that_cannot_continue_exactly_is_not_resumed(
    options: dict[str, Any], resumed: bool
) -> None:
    client = AsyncClient("a:1")
    asked: list[common_pb2.InferRequest] = []

    async def stream(request: common_pb2.InferRequest, _: float) -> AsyncIterator[Any]:
        asked.append(request)
        if not request.continuation.token_ids:  # a resumed stream goes on after it
            yield common_pb2.InferChunk(text="{", token_ids=[90])
        if len(asked) == 1:
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, "Socket closed")
        yield common_pb2.InferChunk(
            text="}", token_ids=[92], finish_reason=common_pb2.FINISH_REASON_STOP
        )

    client._infer_stream = stream  # type: ignore[method-assign, assignment]
    request = infer_request("m", "p", max_tokens=8, **options)
    if resumed:
        texts = [c.text async for c in client.send(request)]
        assert texts == ["{", "}"] and list(asked[1].continuation.token_ids) == [90]
    else:
        with pytest.raises(grpc.aio.AioRpcError):
            _ = [c async for c in client.send(request)]
        assert len(asked) == 1
    await client.close()
