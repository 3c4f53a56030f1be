"""The echo backend with chats, as documented in worker/backends/echo.py, through the worker's
stream (stop strings, token ids, usage): exact text tests can rely on."""

from __future__ import annotations

from protos.v1 import common_pb2
from worker.backends.echo import EchoBackend, token_id
from worker.stream import render, stream


async def run(request: common_pb2.InferRequest) -> list[common_pb2.InferChunk]:
    backend = EchoBackend("demo")
    return [c async for c in stream(backend, request, await render(backend, request))]


def chat(*turns: tuple[str, str], **kw: object) -> common_pb2.InferRequest:
    return common_pb2.InferRequest(
        model="demo",
        messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in turns],
        **kw,  # type: ignore[arg-type]
    )


async def test_a_chat_echoes_its_last_user_message_and_counts_the_rendered_prompt() -> None:
    chunks = await run(chat(("system", "be brief"), ("user", "hello bees"), max_tokens=3))
    assert "".join(c.text for c in chunks) == "hello bees hello"
    last = chunks[-1]
    # "system: be brief\nuser: hello bees\nassistant:" is 7 words
    assert (last.prompt_tokens, last.completion_tokens) == (7, 3)
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    ids = [i for c in chunks for i in c.token_ids]
    assert ids == [token_id("hello"), token_id("bees"), token_id("hello")]


async def test_stop_strings_and_ids_with_a_raw_prompt() -> None:
    request = common_pb2.InferRequest(model="demo", prompt="a b STOP c", max_tokens=8, stop=["ST"])
    chunks = await run(request)
    assert "".join(c.text for c in chunks) == "a b "
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    assert [i for c in chunks for i in c.token_ids] == [token_id("a"), token_id("b"),
                                                         token_id("STOP")]  # fmt: skip
