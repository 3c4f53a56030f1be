"""Fewer messages per token when the receiver lags: chunks that arrive while the previous
message is still being written go out together as one.

The cost of a stream is per gRPC message, not per byte (see /work/shared/ANCHORS.md), so a
sender that cannot keep up with its source sends what piled up meanwhile in one message. It
never waits to gather: a chunk that finds the sender free goes out at once, alone, so time to
first token and a fast receiver's inter-token latency stay as they were.

A merged chunk has the text of its parts concatenated and their token ids (and logprobs)
appended in order (ids keep travelling with the text they decode to). Only chunks of one
choice merge, and a chunk with tool calls or a choice's end goes as the last of its group;
finish_reason and the usage figures come
from the last part that has them (only a stream's last chunk does), worker_id from the first
(the queen sets it on the first chunk only). `index` is the position of the message in the
stream as sent, so it stays consecutive. Used by a worker toward the queen and by the queen
toward its client (gRPC or HTTP).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Sequence

from protos.v1 import common_pb2

# A merged message stays well below the 1 MiB message limit whatever piles up.
MAX_MERGED_BYTES = 256 * 1024
# What may pile up for a receiver that does not keep up (or reads nothing): beyond it the
# source is not read until the receiver takes some, so the sender's own flow control holds
# the rest back (a worker's stream, and through it the worker) instead of this process's
# memory. Issue 24: a client that stopped reading grew the queen by 260 MB in 2 s.
MAX_BUFFERED_BYTES = 1024 * 1024
MAX_BUFFERED_CHUNKS = 4096


def merge(chunks: Sequence[common_pb2.InferChunk]) -> common_pb2.InferChunk:
    """One chunk carrying `chunks` in order (the only one, as it is, if there is one)."""
    if len(chunks) == 1:
        return chunks[0]
    first, last = chunks[0], chunks[-1]
    out = common_pb2.InferChunk(
        text="".join(chunk.text for chunk in chunks),
        index=first.index,
        request_id=first.request_id,
        worker_id=next((chunk.worker_id for chunk in chunks if chunk.worker_id), ""),
    )
    out.choice = first.choice
    for chunk in chunks:
        out.token_ids.extend(chunk.token_ids)
        out.logprobs.extend(chunk.logprobs)
        out.tool_calls.extend(chunk.tool_calls)
    ended = next((c for c in reversed(chunks) if c.finish_reason or c.completion_tokens), last)
    out.finish_reason = ended.finish_reason
    out.prompt_tokens = ended.prompt_tokens
    out.completion_tokens = ended.completion_tokens
    out.cached_prompt_tokens = ended.cached_prompt_tokens
    out.time_to_first_token_seconds = ended.time_to_first_token_seconds
    return out


def size_of(chunk: common_pb2.InferChunk) -> int:
    """About what a chunk weighs on the wire (without serializing it)."""
    size = len(chunk.text) + 5 * len(chunk.token_ids) + 16
    if chunk.logprobs:
        size += sum(32 * (1 + len(entry.top)) for entry in chunk.logprobs)
    return size


class _Pump:
    """Reads a source of chunks as fast as it gives them, in a task of its own, so they pile
    up while the consumer is busy writing; the consumer takes whatever is there."""

    def __init__(self, source: AsyncIterator[common_pb2.InferChunk]) -> None:
        self.buffer: list[common_pb2.InferChunk] = []
        self.buffered = 0  # bytes (size_of) in the buffer
        self.done = False
        self.error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        # Set while there is room: the reader waits on it when the buffer is full.
        self._room = asyncio.Event()
        self._room.set()
        self.task = asyncio.get_running_loop().create_task(self._run(source))

    async def _run(self, source: AsyncIterator[common_pb2.InferChunk]) -> None:
        try:
            async for chunk in source:
                self.buffer.append(chunk)
                self.buffered += size_of(chunk)
                self._wake()
                if self.buffered > MAX_BUFFERED_BYTES or len(self.buffer) >= MAX_BUFFERED_CHUNKS:
                    self._room.clear()
                    await self._room.wait()  # the consumer takes some, or goes away
        except asyncio.CancelledError:
            raise  # the consumer went away
        except BaseException as exc:
            self.error = exc  # raised to the consumer after the chunks before it
        finally:
            self.done = True
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Until there is a chunk or the source ended."""
        if self.buffer or self.done:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def take(self) -> list[common_pb2.InferChunk]:
        """The chunks waiting, oldest first, up to MAX_MERGED_BYTES (at least one), of one
        choice, up to one that ends the choice or carries tool calls."""
        buffer = self.buffer
        total, count = 0, 0
        for chunk in buffer:
            size = size_of(chunk)
            if count and (total + size > MAX_MERGED_BYTES or chunk.choice != buffer[0].choice):
                break
            total += size
            count += 1
            if chunk.tool_calls or chunk.finish_reason:
                break
        taken, self.buffer = buffer[:count], buffer[count:]
        self.buffered -= total
        self._room.set()
        return taken


async def coalesced(
    source: AsyncIterator[common_pb2.InferChunk],
) -> AsyncGenerator[common_pb2.InferChunk, None]:
    """`source`'s chunks, those that came while the previous one was being written merged
    into one, numbered by position (`index`). An error of the source is raised after the
    chunks that came before it."""
    pump = _Pump(source)
    index = 0
    try:
        while True:
            await pump.wait()
            if pump.buffer:
                chunk = merge(pump.take())
                chunk.index = index
                index += 1
                yield chunk
            elif pump.error is not None:
                raise pump.error
            else:
                return
    finally:
        # Without awaiting: a consumer closed with GeneratorExit may not await.
        pump.task.cancel()
