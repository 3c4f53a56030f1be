"""worker/stream.py with a scripted backend: n choices end one by one with their own finish
and the usage of all so far; logprobs travel with their tokens; tool calls are read out of
the answer; a backend that cannot do what is asked refuses by name."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, ClassVar, Self

import pytest

from protos.v1 import common_pb2
from worker.backends.base import Backend, GenerationRequest, Piece, Progress, Rendered
from worker.backends.echo import EchoBackend
from worker.backends.llamacpp import LlamaCppBackend
from worker.stream import render, stream

FINISH = common_pb2.FinishReason


class Scripted(Backend):
    """Yields the pieces it was given; renders chats as the llamacpp backend does tools."""

    name: ClassVar[str] = "scripted"
    SUPPORTS: ClassVar[frozenset[str]] = frozenset({"tools", "logprobs", "n"})

    def __init__(self, pieces: list[Piece], tool_calls: str = "") -> None:
        self.pieces, self.tool_calls = pieces, tool_calls

    @classmethod
    def from_options(cls, model: str, options: Mapping[str, str], slots: int = 1) -> Self:
        raise NotImplementedError

    async def load(self, progress: Progress) -> None:
        return None

    async def render(self, request: GenerationRequest) -> Rendered:
        return Rendered("prompt", tool_calls=self.tool_calls)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Piece]:
        for piece in self.pieces:
            yield piece

    def count_tokens(self, text: str) -> int:
        return 1


async def chunks(backend: Backend, request: common_pb2.InferRequest) -> list[common_pb2.InferChunk]:
    return [c async for c in stream(backend, request, await render(backend, request))]


def lp(token: str) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(token=token, logprob=-0.5)


async def test_choices_end_one_by_one_and_the_last_carries_the_total() -> None:
    pieces = [
        Piece("a", 1, (1,), prompt_tokens=5, choice=0, logprobs=(lp("a"),)),
        Piece("x", 1, (9,), choice=1, logprobs=(lp("x"),)),
        Piece("", 0, (), choice=1, ended=True),
        Piece("b", 1, (2,), choice=0, logprobs=(lp("b"),)),
        Piece("c", 1, (3,), choice=0, logprobs=(lp("c"),)),
    ]
    request = common_pb2.InferRequest(model="m", prompt="p", max_tokens=3, n=2, logprobs=True)
    out = await chunks(Scripted(pieces), request)
    by_choice = {i: "".join(c.text for c in out if c.choice == i) for i in (0, 1)}
    assert by_choice == {0: "abc", 1: "x"}
    ends = [(c.choice, c.finish_reason, c.completion_tokens) for c in out if c.finish_reason]
    assert ends == [(1, FINISH.FINISH_REASON_STOP, 2), (0, FINISH.FINISH_REASON_LENGTH, 4)]
    assert out[-1].prompt_tokens == 5
    assert [e.token for c in out if c.choice == 0 for e in c.logprobs] == ["a", "b", "c"]


async def test_tool_calls_are_read_out_of_the_answer() -> None:
    call = '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'
    pieces = [Piece(call[i : i + 4], 1, (i,)) for i in range(0, len(call), 4)]
    request = common_pb2.InferRequest(
        model="m", max_tokens=100, messages=[common_pb2.ChatMessage(role="user", content="q")],
        tools=[common_pb2.Tool(name="f")],
    )  # fmt: skip
    out = await chunks(Scripted(pieces, tool_calls="forced"), request)
    assert "".join(c.text for c in out) == ""
    deltas = [d for c in out for d in c.tool_calls]
    assert deltas[0].name == "f" and deltas[0].id and all(d.index == 0 for d in deltas)
    assert json.loads("".join(d.arguments for d in deltas)) == {"x": 1}
    assert out[-1].finish_reason == FINISH.FINISH_REASON_TOOL_CALLS
    # Every token id still travels (the stream's usage and ids stay whole).
    assert [t for c in out for t in c.token_ids] == list(range(0, len(call), 4))


@pytest.mark.parametrize(
    ("fields", "named"),
    [({"logprobs": True}, "logprobs"), ({"n": 2}, "n"), ({"presence_penalty": 1.0}, "penalties"),
     ({"logit_bias": {1: 2.0}}, "logit_bias")],
)  # fmt: skip
async def test_a_backend_refuses_what_it_cannot_do_by_name(
    fields: dict[str, object], named: str
) -> None:
    request = common_pb2.InferRequest(model="m", prompt="p", max_tokens=4)
    for key, value in fields.items():
        if key == "logit_bias":
            request.logit_bias.update(value)  # type: ignore[call-overload]
        else:
            setattr(request, key, value)
    with pytest.raises(ValueError, match=f"backend 'echo' does not do {named}"):
        await render(EchoBackend("m"), request)


class FakeEngine:
    """Answers each completion with one token per choice, and keeps the bodies it was sent."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def complete(self, body: dict[str, Any], on_chunk: Callable[[Any], bool]) -> None:
        self.bodies.append(body)
        for index in range(body.get("n_cmpl", 1)):
            text = f"s{body['seed']}+{index}"
            logprobs = {"content": [{"id": 1, "logprob": -0.1}]}
            on_chunk({"choices": [{"index": index, "text": text, "logprobs": logprobs,
                                   "finish_reason": "stop"}]})  # fmt: skip


@pytest.mark.parametrize(("parallel", "calls"), [(0, 1), (3, 1), (2, 2), (1, 3)])
async def test_waves_of_choices_keep_the_seeds_of_one_call(parallel: int, calls: int) -> None:
    backend = LlamaCppBackend.from_options("m", {"model_path": "/nonexistent.gguf"}, slots=4)
    engine = FakeEngine()
    backend.engine = engine  # type: ignore[assignment]
    request = GenerationRequest(prompt="p", max_tokens=4, n=3, seed=7, parallel=parallel)
    pieces = [p async for p in backend.generate(request)]
    texts = {p.choice: p.text for p in pieces if p.text}
    # Whatever the waves, choice i is what one n_cmpl=3 call gives it: seed 7 + i.
    assert {i: int(t[1:].split("+")[0]) + int(t.split("+")[1]) for i, t in texts.items()} == {
        0: 7, 1: 8, 2: 9}  # fmt: skip
    assert len(engine.bodies) == calls
