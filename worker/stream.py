"""One request's completion as a stream of chunks: the backend's pieces, cut at stop strings
(the request's and the chat template's end of turn), each chunk with the token ids of its
text, and the last with the usage and why it ended."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator

from apiary.prefix import request_chain
from protos.v1 import common_pb2
from worker.backends import Backend, GenerationRequest, Message
from worker.completion import Completion, Release


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
        messages=tuple(Message(m.role, m.content) for m in request.messages),
    )


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A request as the model will take it: the rendered prompt and every stop string."""

    generation: GenerationRequest
    stops: tuple[str, ...]


async def render(backend: Backend, request: common_pb2.InferRequest) -> Prepared:
    """Raises ValueError if the model's chat template refuses the messages."""
    generation = generation_of(request)
    rendered = await backend.render(generation)
    blocks = tuple(request_chain(request)) if backend.KEEPS_PREFIXES else ()
    generation = dataclasses.replace(
        generation, prompt=rendered.text, special=rendered.special, blocks=blocks
    )
    return Prepared(generation, (*request.stop, *rendered.stops))


async def stream(
    backend: Backend, request: common_pb2.InferRequest, prepared: Prepared
) -> AsyncIterator[common_pb2.InferChunk]:
    """The last token chunk carries finish_reason when the end is known with it (max_tokens,
    a stop string); when the backend ends by itself (end of sequence) an empty closing
    chunk does."""
    started = time.perf_counter()
    usage = Usage()
    # A continued completion counts the tokens it continues (max_tokens and usage cover all).
    usage.completion_tokens = len(prepared.generation.continuation)
    first = True
    completion = Completion(list(prepared.stops))
    index = 0

    def chunk(
        release: Release,
        finish: common_pb2.FinishReason.ValueType = common_pb2.FINISH_REASON_UNSPECIFIED,
    ) -> common_pb2.InferChunk:
        nonlocal index
        out = common_pb2.InferChunk(
            text=release.text,
            token_ids=release.token_ids,
            index=index,
            request_id=request.request_id,
        )
        index += 1
        if finish:
            out.finish_reason = finish
            out.prompt_tokens = usage.prompt_tokens
            out.completion_tokens = usage.completion_tokens
            out.cached_prompt_tokens = usage.cached_prompt_tokens
            out.time_to_first_token_seconds = usage.time_to_first_token
        return out

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
            usage.completion_tokens += piece.tokens
            release = completion.feed(piece.text, list(piece.token_ids))
            if release.stopped:
                yield chunk(release, common_pb2.FINISH_REASON_STOP)
                return
            if usage.completion_tokens >= request.max_tokens:
                yield chunk(merged(release, completion.flush()), common_pb2.FINISH_REASON_LENGTH)
                return
            if release.text or release.token_ids:
                yield chunk(release)
        if first:  # nothing generated at all
            usage.prompt_tokens = backend.prompt_tokens(prepared.generation)
        yield chunk(completion.flush(), common_pb2.FINISH_REASON_STOP)
    finally:
        await pieces.aclose()  # type: ignore[attr-defined]


def merged(first: Release, then: Release) -> Release:
    return Release(first.text + then.text, first.token_ids + then.token_ids, then.stopped)
