"""One request's completion as a stream of chunks: the backend's pieces, cut at stop strings
(the request's and the chat template's end of turn), each chunk with the token ids of its
text (and their log-probabilities when asked), tool calls read out of the answer, and each
choice's last chunk with the usage and why it ended."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator

from apiary.controls import asked_features
from apiary.prefix import request_chain
from protos.v1 import common_pb2
from worker.backends import Backend, GenerationRequest, Message, Piece
from worker.backends.base import Tool, ToolCall, Tools
from worker.completion import Completion, Release
from worker.tool_format import GENERIC, LAYOUTS, ToolCallReader

MODES = {
    common_pb2.ToolChoice.MODE_UNSPECIFIED: "auto",
    common_pb2.ToolChoice.MODE_AUTO: "auto",
    common_pb2.ToolChoice.MODE_NONE: "none",
    common_pb2.ToolChoice.MODE_REQUIRED: "required",
    common_pb2.ToolChoice.MODE_FUNCTION: "function",
}
ANY_OBJECT = '{"type": "object"}'


@dataclasses.dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    time_to_first_token: float = 0.0


def generation_of(request: common_pb2.InferRequest) -> GenerationRequest:
    continuation = tuple(request.continuation.token_ids)
    return GenerationRequest(
        prompt=request.prompt,
        max_tokens=request.max_tokens - len(continuation),
        continuation=continuation,
        temperature=request.temperature if request.HasField("temperature") else None,
        top_p=request.top_p if request.HasField("top_p") else None,
        top_k=request.top_k if request.HasField("top_k") else None,
        seed=request.seed if request.HasField("seed") else None,
        messages=tuple(message_of(m) for m in request.messages),
        tools=tools_of(request),
        json_schema=schema_of(request.response_format),
        logprobs=request.logprobs,
        top_logprobs=request.top_logprobs,
        n=max(request.n, 1),
        presence_penalty=_optional(request, "presence_penalty"),
        frequency_penalty=_optional(request, "frequency_penalty"),
        repetition_penalty=_optional(request, "repetition_penalty"),
        logit_bias=tuple(sorted(request.logit_bias.items())),
    )


def message_of(message: common_pb2.ChatMessage) -> Message:
    calls = tuple(ToolCall(c.id, c.name, c.arguments) for c in message.tool_calls)
    return Message(message.role, message.content, message.tool_call_id, calls)


def tools_of(request: common_pb2.InferRequest) -> Tools | None:
    if not request.tools:
        return None
    tools = tuple(Tool(t.name, t.description, t.parameters_json) for t in request.tools)
    parallel = request.parallel_tool_calls if request.HasField("parallel_tool_calls") else False
    choice = request.tool_choice
    return Tools(tools, MODES.get(choice.mode, "auto"), choice.function, parallel)


def schema_of(response_format: common_pb2.ResponseFormat) -> str:
    """The schema an answer must be valid against, as JSON text ('' for text)."""
    if response_format.type == common_pb2.ResponseFormat.TYPE_JSON_OBJECT:
        return ANY_OBJECT
    if response_format.type == common_pb2.ResponseFormat.TYPE_JSON_SCHEMA:
        return response_format.schema_json or ANY_OBJECT
    return ""


def _optional(request: common_pb2.InferRequest, name: str) -> float | None:
    return float(getattr(request, name)) if request.HasField(name) else None  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A request as the model will take it: the rendered prompt (and grammar), every stop
    string, and how tool calls are read from the answer ('auto', 'forced' or '')."""

    generation: GenerationRequest
    stops: tuple[str, ...]
    tool_calls: str = ""
    tool_layout: str = "generic"


async def render(backend: Backend, request: common_pb2.InferRequest) -> Prepared:
    """Raises ValueError if the backend cannot do what the request asks, or the model's chat
    template refuses the messages."""
    generation = generation_of(request)
    missing = [name for name in asked_features(request) if name not in backend.SUPPORTS]
    if missing:
        raise ValueError(
            f"backend {backend.name!r} does not do {', '.join(missing)} (the llamacpp backend does)"
        )
    rendered = await backend.render(generation)
    blocks = tuple(request_chain(request)) if backend.KEEPS_PREFIXES else ()
    generation = dataclasses.replace(
        generation, prompt=rendered.text, special=rendered.special, blocks=blocks,
        grammar=rendered.grammar,
    )  # fmt: skip
    return Prepared(
        generation, (*request.stop, *rendered.stops), rendered.tool_calls, rendered.tool_layout
    )


@dataclasses.dataclass
class _Choice:
    """One choice's completion as it goes."""

    number: int
    completion: Completion
    reader: ToolCallReader | None
    tokens: int = 0
    done: bool = False

    @property
    def calls(self) -> int:
        """Tool calls begun in the answer so far."""
        reader = self.reader
        return 0 if reader is None else len(reader.calls) + (reader.current is not None)


class _Stream:
    """The chunks of one request, choice by choice (n > 1: interleaved as they come)."""

    def __init__(self, request: common_pb2.InferRequest, prepared: Prepared) -> None:
        self.request = request
        self.usage = Usage()
        # A continued completion counts the tokens it continues (max_tokens and usage cover all).
        continued = len(prepared.generation.continuation)
        self.usage.completion_tokens = continued
        forced = prepared.tool_calls == "forced"
        tools = prepared.generation.tools
        parallel = tools is not None and tools.parallel
        layout = LAYOUTS.get(prepared.tool_layout, GENERIC)
        self.choices = [
            _Choice(i, Completion(list(prepared.stops)),
                    ToolCallReader(forced, parallel, layout) if prepared.tool_calls else None,
                    continued)
            for i in range(prepared.generation.n)
        ]  # fmt: skip
        self.index = 0

    def take(self, piece: Piece) -> list[common_pb2.InferChunk]:
        """The chunks a piece makes (none while text is held back)."""
        if piece.choice >= len(self.choices):
            raise RuntimeError(f"backend sent choice {piece.choice} of {len(self.choices)}")
        choice = self.choices[piece.choice]
        if choice.done:
            return []
        self.usage.completion_tokens += piece.tokens
        choice.tokens += piece.tokens
        if piece.ended:
            return [self.finish(choice, common_pb2.FINISH_REASON_STOP, Release())]
        release = choice.completion.feed(piece.text, list(piece.token_ids), list(piece.logprobs))
        if release.stopped:
            return [self.finish(choice, common_pb2.FINISH_REASON_STOP, release)]
        if choice.tokens >= self.request.max_tokens:
            return [self.finish(choice, common_pb2.FINISH_REASON_LENGTH, release)]
        out = self.chunk(choice, release)
        chunks = [out] if out.text or out.token_ids or out.tool_calls else []
        if choice.reader is not None and choice.reader.stopped:
            # A repeated call: the answer ends here (see worker/tool_format.py).
            chunks.append(self.finish(choice, common_pb2.FINISH_REASON_STOP, Release()))
        return chunks

    def finish(
        self, choice: _Choice, reason: common_pb2.FinishReason.ValueType, release: Release
    ) -> common_pb2.InferChunk:
        """The choice's last chunk: what it still held, why it ended, the usage so far."""
        rest = choice.completion.flush()
        release = Release(release.text + rest.text, release.token_ids + rest.token_ids,
                          logprobs=release.logprobs + rest.logprobs)  # fmt: skip
        out = self.chunk(choice, release, flushing=True)
        choice.done = True
        if choice.calls and reason != common_pb2.FINISH_REASON_LENGTH:
            reason = common_pb2.FINISH_REASON_TOOL_CALLS
        out.finish_reason = reason
        usage = self.usage
        out.prompt_tokens = usage.prompt_tokens
        out.completion_tokens = usage.completion_tokens
        out.cached_prompt_tokens = usage.cached_prompt_tokens
        out.time_to_first_token_seconds = usage.time_to_first_token
        return out

    def chunk(
        self, choice: _Choice, release: Release, flushing: bool = False
    ) -> common_pb2.InferChunk:
        text, deltas = release.text, []
        if choice.reader is not None:
            read = choice.reader.feed(text)
            if flushing:
                tail = choice.reader.flush()
                read.text, read.deltas = read.text + tail.text, read.deltas + tail.deltas
            text, deltas = read.text, read.deltas
        out = common_pb2.InferChunk(
            text=text, token_ids=release.token_ids, index=self.index,
            request_id=self.request.request_id, choice=choice.number, logprobs=release.logprobs,
        )  # fmt: skip
        for d in deltas:
            out.tool_calls.add(index=d.index, id=d.id, name=d.name, arguments=d.arguments)
        self.index += 1
        return out

    @property
    def done(self) -> bool:
        return all(choice.done for choice in self.choices)


async def stream(
    backend: Backend, request: common_pb2.InferRequest, prepared: Prepared
) -> AsyncIterator[common_pb2.InferChunk]:
    """Each choice's last chunk carries finish_reason: with its last tokens when the end is
    known with them (max_tokens, a stop string), else (the backend ended it) an empty chunk.
    The usage on a last chunk counts every choice so far: the stream's last has the total."""
    started = time.perf_counter()
    state = _Stream(request, prepared)
    usage, first = state.usage, True
    pieces = backend.generate(prepared.generation)
    try:
        async for piece in pieces:
            if first:
                usage.time_to_first_token = time.perf_counter() - started
                usage.cached_prompt_tokens = piece.cached_prompt_tokens
                usage.prompt_tokens = piece.prompt_tokens or backend.prompt_tokens(
                    prepared.generation
                )
                first = False
            for chunk in state.take(piece):
                yield chunk
            if state.done:
                return
        if first:  # nothing generated at all
            usage.prompt_tokens = backend.prompt_tokens(prepared.generation)
        for choice in state.choices:
            if not choice.done:
                yield state.finish(choice, common_pb2.FINISH_REASON_STOP, Release())
    finally:
        await pieces.aclose()  # type: ignore[attr-defined]
