"""Mid-stream migration's bookkeeping with no processes: the ids relayed, the budget left,
when a stream may move, the retry decision, and a worker continuing (echo, through the
worker's stream: the seam has no gap, no repeat, and stop strings still match)."""

from __future__ import annotations

import grpc
import pytest

from apiary.validation import infer_request_problem
from protos.v1 import common_pb2
from queen.requests.progress import Progress
from queen.requests.retry import Failure, decide
from queen.routing.ask import Outcome
from worker.backends.echo import EchoBackend
from worker.stream import render, stream

Code = grpc.StatusCode


def chunk(text: str, *ids: int, finish: int = 0) -> common_pb2.InferChunk:
    return common_pb2.InferChunk(text=text, token_ids=ids, finish_reason=finish)  # type: ignore[arg-type]


def request(**fields: object) -> common_pb2.InferRequest:
    return common_pb2.InferRequest(model="demo", prompt="a b c", max_tokens=8, **fields)  # type: ignore[arg-type]


def test_progress_collects_the_ids_relayed_after_the_requests_own_continuation() -> None:
    progress = Progress.of(request(continuation=common_pb2.Continuation(token_ids=[1, 2])))
    progress.add(chunk("x", 3))
    progress.add(chunk("yz", 4, 5))
    assert progress.token_ids == [1, 2, 3, 4, 5] and progress.movable(8, limit=3)
    moved = progress.continued(request())
    assert list(moved.continuation.token_ids) == [1, 2, 3, 4, 5] and progress.moves == 1
    assert moved.prompt == "a b c" and moved.max_tokens == 8  # the rest is the same request


def test_a_stream_cannot_move_when_done_over_its_limit_or_without_ids() -> None:
    done = Progress()
    done.add(chunk("x", 1, finish=common_pb2.FINISH_REASON_LENGTH))
    assert not done.movable(8, 3) and done.why_not(8, 3) == "nothing was left to generate"
    full = Progress(token_ids=[1] * 8)
    assert not full.movable(8, 3)
    tired = Progress(moves=3)
    assert not tired.movable(8, 3) and "--migration-limit 3" in tired.why_not(8, 3)
    blind = Progress()
    blind.add(chunk("text without ids"))
    assert not blind.movable(8, 3) and "no token ids" in blind.why_not(8, 3)


def test_a_workers_fault_mid_stream_moves_it_at_once_anything_else_ends_it() -> None:
    failure = Failure("w1", "10.0.0.1:1", Code.UNAVAILABLE, "killed")
    moved = decide(failure, attempt=3, chunks_sent=5, time_left=10, model="m", movable=True)
    assert moved.retry and moved.migrate and moved.backoff == 0  # past MAX_ATTEMPTS too
    assert moved.exclude == "10.0.0.1:1" and moved.mark_unreachable
    assert moved.outcome == Outcome(ok=False, worker_fault=True)
    late = decide(failure, 1, 5, time_left=0, model="m", movable=True)
    assert not late.retry and late.error is not None
    stuck = decide(failure, 1, 5, 10, "m", movable=False, stuck="it already moved 3 time(s)")
    assert not stuck.retry and stuck.error is not None
    assert stuck.error.message.endswith("the stream is incomplete; it already moved 3 time(s)")
    refused = Failure("w1", "a:1", Code.INVALID_ARGUMENT, "bad")
    assert not decide(refused, 1, 5, 10, "m", movable=True).retry  # not the worker's fault


def test_a_continuation_must_leave_something_to_generate_and_name_tokens() -> None:
    ids = common_pb2.Continuation
    assert "nothing to generate" in str(
        infer_request_problem(request(continuation=ids(token_ids=[1] * 8)), 100)
    )
    assert "negative" in str(infer_request_problem(request(continuation=ids(token_ids=[-1])), 100))
    assert infer_request_problem(request(continuation=ids(token_ids=[1] * 7)), 100) is None


async def run(req: common_pb2.InferRequest) -> list[common_pb2.InferChunk]:
    backend = EchoBackend("demo")
    return [c async for c in stream(backend, req, await render(backend, req))]


@pytest.mark.parametrize("cut", [1, 4, 7])
async def test_echo_continues_from_the_exact_token_with_usage_for_the_whole(cut: int) -> None:
    whole = await run(request())
    ids = [i for c in whole for i in c.token_ids]
    rest = await run(request(continuation=common_pb2.Continuation(token_ids=ids[:cut])))
    first_part = "".join(c.text for c in whole[:cut])  # echo: one token a chunk
    assert first_part + "".join(c.text for c in rest) == "".join(c.text for c in whole)
    assert [i for c in rest for i in c.token_ids] == ids[cut:]
    assert rest[-1].completion_tokens == 8 and rest[-1].prompt_tokens == 3


async def test_a_stop_string_after_the_seam_is_still_found() -> None:
    # "a b c a b c a b": the stop "c a" spans tokens 3 and 4; cut after token 3 ("c").
    req = request(stop=["c a"])
    whole = await run(req)
    assert "".join(c.text for c in whole) == "a b "
    cut = [i for c in whole for i in c.token_ids][:2]  # what a client had: "a b"
    rest = await run(request(stop=["c a"], continuation=common_pb2.Continuation(token_ids=cut)))
    assert (
        "".join(c.text for c in rest) == " " and rest[-1].finish_reason == whole[-1].finish_reason
    )
