"""Chunks that pile up while the previous message is being written go as one; a chunk that
finds the writer free goes alone, at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from apiary.coalesce import MAX_BUFFERED_CHUNKS, MAX_MERGED_BYTES, coalesced, merge
from protos.v1 import common_pb2
from tests.fakes import settle

STOP = common_pb2.FINISH_REASON_STOP


def piece(text: str, *ids: int, **kw: object) -> common_pb2.InferChunk:
    return common_pb2.InferChunk(text=text, token_ids=ids, request_id="r", **kw)  # type: ignore[arg-type]


def test_a_merged_chunk_keeps_text_ids_and_the_end_in_order() -> None:
    first = piece("a", 1, index=3, worker_id="w-1")
    last = piece(" c", 3, finish_reason=STOP, prompt_tokens=5, completion_tokens=3,
                 cached_prompt_tokens=2, time_to_first_token_seconds=0.5)  # fmt: skip
    out = merge([first, piece(" b", 2), last])
    assert (out.text, list(out.token_ids)) == ("a b c", [1, 2, 3])
    assert (out.index, out.worker_id, out.request_id) == (3, "w-1", "r")
    assert (out.finish_reason, out.prompt_tokens, out.completion_tokens) == (STOP, 5, 3)
    assert (out.cached_prompt_tokens, out.time_to_first_token_seconds) == (2, 0.5)
    alone = piece("x", 9)
    assert merge([alone]) is alone


class Source:
    """Chunks the test hands over one by one, then the end or an error."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[common_pb2.InferChunk | Exception | None] = asyncio.Queue()
        self.closed = False

    async def chunks(self) -> AsyncIterator[common_pb2.InferChunk]:
        try:
            while (item := await self.queue.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self.closed = True


async def test_what_piles_up_while_the_writer_is_busy_goes_as_one_message() -> None:
    source = Source()
    out = coalesced(source.chunks())
    source.queue.put_nowait(piece("a", 1))
    first = await out.__anext__()  # the writer was free: it goes alone, at once
    assert (first.text, first.index) == ("a", 0)
    for text, token in ((" b", 2), (" c", 3), (" d", 4)):  # the writer is busy meanwhile
        source.queue.put_nowait(piece(text, token))
    await settle()
    second = await out.__anext__()
    assert (second.text, list(second.token_ids), second.index) == (" b c d", [2, 3, 4], 1)
    source.queue.put_nowait(piece("", finish_reason=STOP, completion_tokens=4))
    source.queue.put_nowait(None)
    last = await out.__anext__()
    assert (last.finish_reason, last.completion_tokens, last.index) == (STOP, 4, 2)
    with pytest.raises(StopAsyncIteration):
        await out.__anext__()


async def test_an_error_comes_after_the_chunks_before_it() -> None:
    source = Source()
    out = coalesced(source.chunks())
    for item in (piece("a", 1), piece(" b", 2), RuntimeError("worker lost")):
        source.queue.put_nowait(item)
    await settle()
    assert (await out.__anext__()).text == "a b"
    with pytest.raises(RuntimeError, match="worker lost"):
        await out.__anext__()


async def test_a_merged_message_stays_small_and_closing_stops_the_source() -> None:
    source = Source()
    out = coalesced(source.chunks())
    big = "x" * (MAX_MERGED_BYTES // 3)
    for _ in range(4):
        source.queue.put_nowait(piece(big))
    await settle()
    assert len((await out.__anext__()).text) == 2 * len(big)
    assert len((await out.__anext__()).text) == 2 * len(big)
    await out.aclose()
    await settle()
    assert source.closed


async def test_only_chunks_of_one_choice_merge_and_a_choices_end_closes_its_group() -> None:
    source = Source()
    out = coalesced(source.chunks())
    source.queue.put_nowait(piece("a", 1))
    await out.__anext__()
    logprob = common_pb2.TokenLogprob(token="b", logprob=-1.0)
    for chunk in (
        piece("b", 2, logprobs=[logprob]), piece("c", 3, finish_reason=STOP),
        piece("x", 8, choice=1), piece("y", 9, choice=1), piece("z", 10, choice=2),
    ):  # fmt: skip
        source.queue.put_nowait(chunk)
    source.queue.put_nowait(None)
    await settle()
    merged = [c async for c in out]
    assert [(c.choice, c.text, list(c.token_ids)) for c in merged] == [
        (0, "bc", [2, 3]), (1, "xy", [8, 9]), (2, "z", [10])]  # fmt: skip
    assert merged[0].finish_reason == STOP and [e.token for e in merged[0].logprobs] == ["b"]


async def test_a_receiver_that_reads_nothing_holds_back_the_source_not_memory() -> None:
    """Beyond MAX_BUFFERED_* the source is not read until the receiver takes some: what piles
    up stays bounded, and the sender's flow control holds the rest (issue 24)."""
    read = 0

    async def endless() -> AsyncIterator[common_pb2.InferChunk]:
        nonlocal read
        for i in range(100_000):
            read += 1
            yield piece("x" * 100, i)

    out = coalesced(endless())
    first = await out.__anext__()  # the receiver takes one, then reads nothing more
    await settle()
    for _ in range(50):
        await asyncio.sleep(0)
    assert first.text.startswith("x" * 100)
    assert read <= MAX_BUFFERED_CHUNKS * 2 + 2  # the source stopped being read
    stalled = read
    await settle()
    assert read == stalled
    more = await out.__anext__()  # once it reads again, the rest comes, merged
    assert more.text and read <= MAX_BUFFERED_CHUNKS * 4 + 2
    await out.aclose()
