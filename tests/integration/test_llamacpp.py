"""The llamacpp backend end to end: a tiny GGUF pulled into a hive's catalog, a worker
spawned on it by the queen, real tokens streamed through Queen.Infer."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest

from harness import Cluster, Proc, wait_until
from harness.gguf import Shape, write_tiny_gguf
from harness.ports import free_port
from protos.v1 import common_pb2, hive_pb2, queen_pb2
from tests.streams import tokens_in

pytest.importorskip("llama_cpp", reason="the llamacpp extra is not installed")


def infer(tokens: int = 12, **kw: Any) -> common_pb2.InferRequest:
    return common_pb2.InferRequest(
        model="tiny", prompt="the bees fly to the hive", max_tokens=tokens, **kw
    )


async def collect(stub: Any, request: common_pb2.InferRequest, timeout: float = 30) -> list[Any]:
    return [c async for c in stub.Infer(request, timeout=timeout)]


async def pull_and_spawn(
    cluster: Cluster, queen: Proc, hive: Proc, tmp: Path
) -> common_pb2.WorkerRecord:
    gguf = write_tiny_gguf(tmp / "tiny.gguf")
    stages = [
        p
        async for p in cluster.hive_stub(hive).PullModel(
            hive_pb2.PullModelRequest(source=str(gguf), name="tiny")
        )
    ]
    assert stages[-1].stage == "done" and stages[-1].model.backend == "llamacpp"
    reply = await cluster.admin_stub(queen).SpawnWorker(
        queen_pb2.QueenSpawnWorkerRequest(
            hive_id="h1",
            model="tiny",
            backend="llamacpp",
            wait_ready=True,
            backend_options={"threads": "1", "context_size": "256"},
        ),
        timeout=60,
    )
    assert reply.worker.state == common_pb2.WORKER_STATE_IDLE
    await cluster.wait_workers(queen, "tiny", 1)
    return reply.worker


async def test_real_tokens_stream_one_by_one_with_counts(cluster: Cluster, tmp_path: Path) -> None:
    queen = cluster.start_queen()
    hive = cluster.start_hive(queen, "h1")
    await pull_and_spawn(cluster, queen, hive, tmp_path)
    stub = cluster.queen_stub(queen)
    chunks = [chunk async for chunk in stub.Infer(infer(tokens=24, seed=1), timeout=30)]
    last = chunks[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert last.completion_tokens == 24
    assert last.prompt_tokens > 1 and last.time_to_first_token_seconds > 0
    # Every token, with its id (this model decodes 24 tokens in a few ms: those that pile up
    # while a message is being written go together in the next, apiary/coalesce.py, so how
    # many messages carry them depends on the machine's load).
    assert tokens_in(chunks) == 24
    assert [c.index for c in chunks] == list(range(len(chunks)))
    text = "".join(c.text for c in chunks)
    assert text.strip()


async def test_seeded_runs_repeat_and_sampling_and_stop_strings_apply(
    cluster: Cluster, tmp_path: Path
) -> None:
    queen = cluster.start_queen()
    hive = cluster.start_hive(queen, "h1")
    await pull_and_spawn(cluster, queen, hive, tmp_path)
    stub = cluster.queen_stub(queen)

    async def text(**kw: Any) -> str:
        return "".join(c.text for c in await collect(stub, infer(**kw)))

    first, again, other = await text(seed=7), await text(seed=7), await text(seed=8)
    assert first == again and first != other
    greedy = await text(temperature=0.0, seed=1)
    assert greedy == await text(temperature=0.0, seed=2)  # no sampling: the seed does not matter
    assert await text(top_k=1, seed=3) == await text(top_k=1, seed=4)
    # A stop string cuts the completion before it, and says so.
    long = await text(seed=7, tokens=40)
    stop_at = long[5:8]
    chunks = await collect(stub, infer(seed=7, tokens=40, stop=[stop_at]))
    cut = "".join(c.text for c in chunks)
    assert cut == long[: long.index(stop_at)]
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub, infer(temperature=11.0))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_cancelled_stream_frees_the_slot_and_health_stays_answered(
    cluster: Cluster, tmp_path: Path
) -> None:
    queen = cluster.start_queen()
    hive = cluster.start_hive(queen, "h1")
    worker = await pull_and_spawn(cluster, queen, hive, tmp_path)
    stub = cluster.queen_stub(queen)
    call = stub.Infer(infer(tokens=200, seed=1))
    assert isinstance(await call.read(), common_pb2.InferChunk)
    call.cancel()

    async def idle() -> bool:
        return (await stub.ListModels(queen_pb2.ListModelsRequest())).models[0].idle == 1

    await wait_until(idle, timeout=5)
    assert tokens_in(await collect(stub, infer(tokens=4, seed=1))) == 4
    got = await cluster.hive_stub(hive).GetWorker(
        hive_pb2.GetHiveWorkerRequest(worker_id=worker.id)
    )
    assert got.worker.health_failures == 0


async def test_catalog_spawn_refusals(cluster: Cluster, tmp_path: Path) -> None:
    queen = cluster.start_queen()
    hive = cluster.start_hive(queen, "h1")
    admin = cluster.admin_stub(queen)
    await wait_until(lambda: _hive_known(admin))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin.SpawnWorker(
            queen_pb2.QueenSpawnWorkerRequest(hive_id="h1", model="missing", backend="llamacpp")
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "apiary model pull" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin.SpawnWorker(
            queen_pb2.QueenSpawnWorkerRequest(
                hive_id="h1",
                model="x",
                backend="llamacpp",
                slots=2,
                backend_options={"model_path": "/nonexistent.gguf"},
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "slots must be 1..1" in (
        err.value.details() or ""
    )
    del hive


async def _hive_known(admin: Any) -> bool:
    return bool((await admin.ListHives(queen_pb2.ListHivesRequest())).hives)


async def test_queen_lists_which_hives_have_a_model_and_autospawns_from_catalogs(
    cluster: Cluster, tmp_path: Path
) -> None:
    queen = cluster.start_queen(0, "--autospawn-catalog")
    hive = cluster.start_hive(queen, "h1")
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    async for _ in cluster.hive_stub(hive).PullModel(
        hive_pb2.PullModelRequest(source=f"file://{gguf}", name="tiny")
    ):
        pass
    stub = cluster.queen_stub(queen)

    async def listed() -> queen_pb2.ModelInfo | None:
        models = (await stub.ListModels(queen_pb2.ListModelsRequest())).models
        return next((m for m in models if m.name == "tiny"), None)

    info = await wait_until(listed)
    assert list(info.hives) == ["h1"] and info.idle == 0
    results = await asyncio.gather(*(collect(stub, infer(tokens=3, seed=1)) for _ in range(3)))
    assert all(r[-1].completion_tokens == 3 for r in results)
    workers = (
        await cluster.admin_stub(queen).ListWorkers(queen_pb2.ListWorkersRequest(model="tiny"))
    ).workers
    assert len(workers) == 1 and workers[0].backend == "llamacpp"


async def spawn_file(
    cluster: Cluster, queen: Proc, gguf: Path, model: str, **options: str
) -> common_pb2.WorkerRecord:
    reply = await cluster.admin_stub(queen).SpawnWorker(
        queen_pb2.QueenSpawnWorkerRequest(
            model=model,
            backend="llamacpp",
            wait_ready=True,
            backend_options={"threads": "1", "context_size": "256", "model_path": str(gguf),
                             **options},
        ),
        timeout=60,
    )  # fmt: skip
    return reply.worker


def chat(model: str, *turns: tuple[str, str], tokens: int = 8) -> common_pb2.InferRequest:
    messages = [common_pb2.ChatMessage(role=r, content=c) for r, c in turns]
    return common_pb2.InferRequest(model=model, messages=messages, max_tokens=tokens, seed=3)


async def test_chats_render_with_the_models_own_template_or_a_named_fallback(
    cluster: Cluster, tmp_path: Path
) -> None:
    queen = cluster.start_queen()
    cluster.start_hive(queen, "h1")
    await wait_until(lambda: _hives(cluster, queen), timeout=10)
    templated = await spawn_file(cluster, queen, write_tiny_gguf(tmp_path / "t.gguf"), "tmpl")
    plain = write_tiny_gguf(tmp_path / "p.gguf", chat_template=None)
    fallback = await spawn_file(cluster, queen, plain, "plain")
    stub = cluster.queen_stub(queen)
    turns = (("system", "be sweet"), ("user", "the bees fly to the hive"))
    chunks = await collect(stub, chat("tmpl", *turns))
    last = chunks[-1]
    # The same chat again: the worker's context still holds the prompt's prefix.
    again = (await collect(stub, chat("tmpl", *turns)))[-1]
    assert again.cached_prompt_tokens >= last.prompt_tokens - 1
    # Rendered "<s>[system] be sweet</s>[user] ...</s>[assistant]", <s> and </s> read as the
    # special tokens they are: fewer tokens than the same text sent as a raw prompt.
    rendered = "<s>[system] be sweet</s>[user] the bees fly to the hive</s>[assistant]"
    raw = common_pb2.InferRequest(model="tmpl", prompt=rendered, max_tokens=1)
    as_text = (await collect(stub, raw))[-1].prompt_tokens
    assert last.prompt_tokens <= as_text - 1 - 3  # BOS added to text; 3 markers: 1 token each
    assert last.completion_tokens == 8 == sum(len(c.token_ids) for c in chunks)
    assert "".join(c.text for c in chunks).strip()
    logs = {w.id: (cluster.tmp / "state-h1" / "logs" / f"{w.id}.log").read_text()
            for w in (templated, fallback)}  # fmt: skip
    assert "chats rendered with the model's chat template" in logs[templated.id]
    assert "chats rendered with the chatml chat format" in logs[fallback.id]
    assert (await collect(stub, chat("plain", *turns)))[-1].completion_tokens == 8


async def test_a_chat_the_template_refuses_is_the_clients_mistake(
    cluster: Cluster, tmp_path: Path
) -> None:
    strict = (
        "{% for m in messages %}{% if m.role == 'system' %}"
        "{{ raise_exception('this model takes no system turn') }}{% endif %}"
        "{{ m.content }}{% endfor %}"
    )
    queen = cluster.start_queen()
    cluster.start_hive(queen, "h1")
    await wait_until(lambda: _hives(cluster, queen), timeout=10)
    await spawn_file(
        cluster, queen, write_tiny_gguf(tmp_path / "s.gguf", chat_template=strict), "strict"
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(cluster.queen_stub(queen), chat("strict", ("system", "x"), ("user", "y")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "this model takes no system turn" in (err.value.details() or "")


async def _hives(cluster: Cluster, queen: Proc) -> bool:
    return bool((await cluster.admin_stub(queen).ListHives(queen_pb2.ListHivesRequest())).hives)


async def test_the_openai_sdk_chats_with_a_real_template(cluster: Cluster, tmp_path: Path) -> None:
    port = free_port()
    queen = cluster.start_queen(0, "--http-listen", f"127.0.0.1:{port}")
    cluster.start_hive(queen, "h1")
    await wait_until(lambda: _hives(cluster, queen), timeout=10)
    await spawn_file(cluster, queen, write_tiny_gguf(tmp_path / "t.gguf"), "tmpl")
    turns = (("system", "be sweet"), ("user", "the bees fly to the hive"))
    by_grpc = await collect(cluster.queen_stub(queen), chat("tmpl", *turns))
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
    messages: list[Any] = [{"role": role, "content": text} for role, text in turns]
    whole = await client.chat.completions.create(
        model="tmpl", messages=messages, max_tokens=8, seed=3
    )
    # The same template, tokens and sampling as over gRPC: the same words.
    assert whole.choices[0].message.content == "".join(c.text for c in by_grpc)
    assert whole.usage is not None and whole.usage.prompt_tokens == by_grpc[-1].prompt_tokens
    assert whole.usage.completion_tokens == 8 and whole.choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens_details is not None
    assert (whole.usage.prompt_tokens_details.cached_tokens or 0) > 0  # the prefix gRPC left
    stream = await client.chat.completions.create(
        model="tmpl", messages=messages, max_tokens=8, seed=3, stream=True
    )
    streamed = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert streamed == whole.choices[0].message.content


# Decoding takes ~5 ms a token here (a 512 x 8 random-weight llama): a stream lasts long
# enough to kill its worker in the middle.
SLOW_DECODE = Shape(n_embd=512, n_head=8, n_ff=1024, n_layer=8, n_ctx=512)


async def test_greedy_a_worker_killed_mid_stream_the_text_is_byte_identical(
    cluster: Cluster, tmp_path: Path
) -> None:
    queen = cluster.start_queen()
    cluster.start_hive(queen, f"greedy-{uuid.uuid4().hex[:8]}")
    gguf = write_tiny_gguf(tmp_path / "slow.gguf", shape=SLOW_DECODE)
    admin = cluster.admin_stub(queen)
    await wait_until(lambda: any_hive(admin))
    options = {"threads": "1", "context_size": "512", "model_path": str(gguf)}
    for _ in range(2):
        spawn = queen_pb2.QueenSpawnWorkerRequest(
            model="tiny", backend="llamacpp", wait_ready=True, backend_options=options
        )
        await admin.SpawnWorker(spawn, timeout=60)
    stub = cluster.queen_stub(queen)
    greedy = infer(tokens=150, temperature=0.0)
    whole = await collect(stub, greedy, timeout=60)
    call = stub.Infer(greedy, timeout=60)
    chunks: list[Any] = [await call.read() for _ in range(5)]
    serving = (
        await admin.GetWorker(queen_pb2.GetWorkerRequest(worker_id=chunks[0].worker_id))
    ).worker
    os.kill(serving.pid, signal.SIGKILL)
    while isinstance(chunk := await call.read(), common_pb2.InferChunk):
        chunks.append(chunk)
    assert "".join(c.text for c in chunks) == "".join(c.text for c in whole)
    assert [i for c in chunks for i in c.token_ids] == [i for c in whole for i in c.token_ids]
    assert chunks[-1].completion_tokens == whole[-1].completion_tokens
    assert len({c.worker_id for c in chunks if c.worker_id}) == 2  # it did move
    (row,) = (await admin.ListRequests(queen_pb2.ListRequestsRequest(limit=1))).requests
    assert row.migrations == 1 and row.status == queen_pb2.REQUEST_STATUS_COMPLETED


async def any_hive(admin: Any) -> bool:
    return bool((await admin.ListHives(queen_pb2.ListHivesRequest())).hives)
