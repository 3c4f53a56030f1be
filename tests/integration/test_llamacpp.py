"""The llamacpp backend end to end on a real model (SmolLM2-135M-Instruct, apiary/realmodel.py):
pulled into a hive's catalog, one engine worker with many slots spawned by the queen, real
tokens streamed through Queen.Infer and the OpenAI front."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import uuid
from pathlib import Path
from typing import Any

import grpc
import openai
import psutil
import pytest

from harness import Cluster, Proc, wait_until
from harness.ports import free_port
from protos.v1 import common_pb2, hive_pb2, queen_pb2
from tests.streams import tokens_in

pytest.importorskip("xllamacpp", reason="the llamacpp extra is not installed")

MODEL = "smollm2"
CORES = len(os.sched_getaffinity(0))


def chat(text: str, tokens: int = 16, **kw: Any) -> common_pb2.InferRequest:
    messages = [common_pb2.ChatMessage(role="user", content=text)]
    return common_pb2.InferRequest(model=MODEL, messages=messages, max_tokens=tokens, **kw)


async def collect(stub: Any, request: common_pb2.InferRequest, timeout: float = 60) -> list[Any]:
    return [c async for c in stub.Infer(request, timeout=timeout)]


def text_of(chunks: list[Any]) -> str:
    return "".join(c.text for c in chunks)


async def hive_known(cluster: Cluster, queen: Proc) -> bool:
    return bool((await cluster.admin_stub(queen).ListHives(queen_pb2.ListHivesRequest())).hives)


async def pull(cluster: Cluster, hive: Proc, model_file: Path) -> None:
    stages = [
        p
        async for p in cluster.hive_stub(hive).PullModel(
            hive_pb2.PullModelRequest(source=str(model_file), name=MODEL)
        )
    ]
    assert stages[-1].stage == "done" and stages[-1].model.backend == "llamacpp"


async def spawn(
    cluster: Cluster, queen: Proc, slots: int = 8, **options: str
) -> common_pb2.WorkerRecord:
    reply = await cluster.admin_stub(queen).SpawnWorker(
        queen_pb2.QueenSpawnWorkerRequest(
            model=MODEL, backend="llamacpp", slots=slots, wait_ready=True,
            backend_options={"context_size": "1024", "cache_ram_mb": "64", **options},
        ),
        timeout=90,
    )  # fmt: skip
    assert reply.worker.state == common_pb2.WORKER_STATE_IDLE
    return reply.worker


async def engine_cluster(
    cluster: Cluster, model_file: Path, *queen_args: str, slots: int = 8
) -> tuple[Proc, Proc, common_pb2.WorkerRecord]:
    queen = cluster.start_queen(0, *queen_args)
    hive = cluster.start_hive(queen, "h1")
    await wait_until(lambda: hive_known(cluster, queen), timeout=15)
    await pull(cluster, hive, model_file)
    worker = await spawn(cluster, queen, slots)
    await cluster.wait_workers(queen, MODEL, 1)
    return queen, hive, worker


def worker_log(cluster: Cluster, worker: common_pb2.WorkerRecord) -> str:
    return (cluster.tmp / "state-h1" / "logs" / f"{worker.id}.log").read_text(errors="replace")


async def test_one_engine_streams_real_tokens_with_ids_and_reuses_its_prompts(
    cluster: Cluster, real_model: Path
) -> None:
    queen, _, worker = await engine_cluster(cluster, real_model)
    # The engine's slots are the worker's; the hive handed it every core (its only engine).
    assert worker.slots_total == 8 and worker.backend_options["threads"] == str(CORES)
    # The engine's own listener is no network door: the worker's one TCP listener is its gRPC
    # port, and the engine's Unix socket sits in a directory only its user may enter.
    process = psutil.Process(worker.pid)
    listening = [c for c in process.net_connections("inet") if c.status == psutil.CONN_LISTEN]
    assert [c.laddr.port for c in listening] == [int(worker.address.rsplit(":", 1)[1])]
    sockets = [str(c.laddr) for c in process.net_connections("unix") if c.laddr]
    engine = [path for path in sockets if "apiary-engine-" in path]
    assert len(engine) == 1 and os.stat(os.path.dirname(engine[0])).st_mode & 0o077 == 0
    stub = cluster.queen_stub(queen)
    # Longer than a prefix block (apiary/prefix.py): the worker reports it as held.
    question = "Bees live in hives and make honey from nectar. " * 8 + "What do bees make?"
    chunks = await collect(stub, chat(question, 24, temperature=0.0))
    last = chunks[-1]
    assert last.finish_reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_STOP)
    assert 0 < last.completion_tokens <= 24 and tokens_in(chunks) == last.completion_tokens
    assert last.prompt_tokens > 20  # the model's own template adds its system turn
    assert text_of(chunks).strip()
    assert [c.index for c in chunks] == list(range(len(chunks)))
    # The same prompt again: the engine's slot still holds it.
    again = await collect(stub, chat(question, 24, temperature=0.0))
    assert text_of(again) == text_of(chunks)
    assert again[-1].cached_prompt_tokens >= last.prompt_tokens - 1

    async def reported() -> common_pb2.PrefixCache | None:
        got = await cluster.admin_stub(queen).GetWorker(
            queen_pb2.GetWorkerRequest(worker_id=worker.id)
        )
        cache = got.worker.prefix_cache
        return cache if cache.requests >= 2 else None

    cache = await wait_until(reported, timeout=10)
    assert cache.hits >= 1 and len(cache.blocks) >= 1


async def test_seeds_sampling_and_stop_strings_apply(cluster: Cluster, real_model: Path) -> None:
    queen, _, _ = await engine_cluster(cluster, real_model)
    stub = cluster.queen_stub(queen)

    async def text(**kw: Any) -> str:
        return text_of(await collect(stub, chat("Tell me a story about bees.", **kw)))

    first, again = await text(seed=7, temperature=1.0), await text(seed=7, temperature=1.0)
    assert first == again
    others = {await text(seed=s, temperature=1.0) for s in (8, 9, 10)}
    assert others - {first}  # another seed samples otherwise
    assert await text(temperature=0.0, seed=1) == await text(temperature=0.0, seed=2)
    long = await text(temperature=0.0, tokens=40)
    stop_at = long[12:16]
    chunks = await collect(stub, chat("Tell me a story about bees.", 40, temperature=0.0,
                                      stop=[stop_at]))  # fmt: skip
    assert text_of(chunks) == long[: long.index(stop_at)]
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub, chat("x", temperature=11.0))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_eight_concurrent_chats_share_one_engine_and_all_complete(
    cluster: Cluster, real_model: Path
) -> None:
    queen, hive, worker = await engine_cluster(cluster, real_model)
    stub = cluster.queen_stub(queen)
    busiest = 8

    async def watch() -> None:
        nonlocal busiest
        while True:
            got = await cluster.hive_stub(hive).GetWorker(
                hive_pb2.GetHiveWorkerRequest(worker_id=worker.id)
            )
            busiest = min(busiest, got.worker.slots_available)
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    try:
        results = await asyncio.gather(
            *(collect(stub, chat(f"Write a poem about the number {i}.", 48)) for i in range(8))
        )
    finally:
        watcher.cancel()
    assert all(r[-1].finish_reason and tokens_in(r) == r[-1].completion_tokens for r in results)
    assert all(r[-1].completion_tokens > 8 for r in results)
    assert len({c.worker_id for r in results for c in r if c.worker_id}) == 1
    assert busiest == 0  # all eight were in the one engine at once


async def test_a_cancelled_stream_stops_decoding_and_gives_its_slot_back(
    cluster: Cluster, real_model: Path
) -> None:
    queen, hive, worker = await engine_cluster(cluster, real_model)
    stub = cluster.queen_stub(queen)
    ask = chat("Count from 1 to 1000, one number per line.", 900, temperature=0.0)
    prompt = (await collect(stub, chat(ask.messages[0].content, 1)))[-1].prompt_tokens
    call = stub.Infer(ask, timeout=60)
    for _ in range(3):
        assert isinstance(await call.read(), common_pb2.InferChunk)
    call.cancel()

    async def idle() -> bool:
        got = await cluster.hive_stub(hive).GetWorker(
            hive_pb2.GetHiveWorkerRequest(worker_id=worker.id)
        )
        return got.worker.slots_available == 8

    await wait_until(idle, timeout=10)

    def released() -> list[int]:
        # llama.cpp logs each slot it releases with the tokens it then held.
        found = re.findall(r"stop processing: n_tokens = (\d+)", worker_log(cluster, worker))
        return [int(n) for n in found]

    await wait_until(lambda: len(released()) >= 2, timeout=10)
    generated = released()[-1] - prompt
    assert generated < 100  # of 900 asked: it stopped when the stream did
    assert tokens_in(await collect(stub, chat("Say hi.", 4))) >= 1


async def test_spawns_an_engine_cannot_serve_are_refused_saying_why(
    cluster: Cluster, real_model: Path, tmp_path: Path
) -> None:
    queen = cluster.start_queen()
    hive = cluster.start_hive(queen, "h1")
    await wait_until(lambda: hive_known(cluster, queen), timeout=15)
    admin = cluster.admin_stub(queen)

    async def refused(slots: int = 1, **options: str) -> Any:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin.SpawnWorker(
                queen_pb2.QueenSpawnWorkerRequest(
                    hive_id="h1", model=MODEL, backend="llamacpp", slots=slots, wait_ready=True,
                    backend_options={"model_path": str(real_model), **options},
                    restart_policy=common_pb2.RESTART_POLICY_NEVER,
                ),
                timeout=60,
            )  # fmt: skip
        return err.value

    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await admin.SpawnWorker(
            queen_pb2.QueenSpawnWorkerRequest(hive_id="h1", model="missing", backend="llamacpp")
        )
    assert missing.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "apiary model pull" in (missing.value.details() or "")
    err = await refused(slots=65)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "slots must be 1..64" in err.details()
    err = await refused(threads=str(CORES + 1))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"threads={CORES + 1} does not fit" in err.details()
    assert f"on {CORES} core(s)" in err.details()
    not_a_model = tmp_path / "notes.gguf"
    not_a_model.write_text("hello, not a model")
    err = await refused(model_path=str(not_a_model))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "is not a GGUF file" in err.details()
    # The hive's cores are all held by one engine: another is refused, with the arithmetic.
    await pull(cluster, hive, real_model)
    first = await spawn(cluster, queen, 2)
    err = await refused()
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"{CORES} of {CORES} core(s) are held by engine workers ({first.id} {CORES})" in (
        err.details()
    )


async def test_a_boot_engine_holds_its_threads_once_and_a_later_spawn_gets_the_rest(
    cluster: Cluster, real_model: Path
) -> None:
    if CORES < 2:
        pytest.skip("needs 2 cores: one for the boot engine, one for the later spawn")
    queen = cluster.start_queen()
    boot = f"model={MODEL},backend=llamacpp,slots=2,threads=1,model_path={real_model}"
    cluster.start_hive(queen, "h1", boot)
    (booted,) = await cluster.wait_workers(queen, MODEL, 1, timeout=60)
    assert booted.backend_options["threads"] == "1"
    later = await spawn(cluster, queen, 2, model_path=str(real_model))
    assert later.backend_options["threads"] == str(CORES - 1)


async def test_queen_autospawns_an_engine_from_a_hive_catalog(
    cluster: Cluster, real_model: Path
) -> None:
    queen = cluster.start_queen(0, "--autospawn-catalog")
    hive = cluster.start_hive(queen, "h1")
    await wait_until(lambda: hive_known(cluster, queen), timeout=15)
    await pull(cluster, hive, real_model)
    stub = cluster.queen_stub(queen)

    async def listed() -> queen_pb2.ModelInfo | None:
        models = (await stub.ListModels(queen_pb2.ListModelsRequest())).models
        return next((m for m in models if m.name == MODEL), None)

    info = await wait_until(listed)
    assert list(info.hives) == ["h1"] and info.idle == 0
    results = await asyncio.gather(*(collect(stub, chat(f"Hi {i}", 3)) for i in range(3)))
    assert all(r[-1].completion_tokens >= 1 for r in results)
    workers = (await cluster.admin_stub(queen).ListWorkers(
        queen_pb2.ListWorkersRequest(model=MODEL))).workers  # fmt: skip
    assert len(workers) == 1 and workers[0].backend == "llamacpp"


async def test_the_openai_sdk_chats_through_the_models_own_template(
    cluster: Cluster, real_model: Path
) -> None:
    port = free_port()
    queen, _, _ = await engine_cluster(cluster, real_model, "--http-listen", f"127.0.0.1:{port}")
    question = "What is the capital of France?"
    by_grpc = await collect(cluster.queen_stub(queen), chat(question, 16, temperature=0.0))
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
    messages: list[Any] = [{"role": "user", "content": question}]
    whole = await client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, temperature=0
    )
    assert whole.choices[0].message.content == text_of(by_grpc)
    assert whole.usage is not None and whole.usage.prompt_tokens == by_grpc[-1].prompt_tokens
    assert whole.usage.prompt_tokens_details is not None
    assert (whole.usage.prompt_tokens_details.cached_tokens or 0) > 0  # what gRPC's left
    stream = await client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True
    )
    streamed = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert streamed == whole.choices[0].message.content
    await client.close()


def eight_asks() -> tuple[list[common_pb2.InferRequest], list[str]]:
    """Six streams that can move exactly (three with logprobs, penalties and logit bias: the
    engine's penalties see the continued tokens), and two that cannot: one held to a JSON
    schema (a grammar's state does not travel) and one of n=2 choices; and for each of those
    two what its error must say."""
    # Long enough to be going still when the victim is killed (after a second worker loads).
    asks = [chat(f"Write a long story about a bee named {name}.", 160, temperature=0.0)
            for name in ("Ada", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal")]  # fmt: skip
    asks[3].logprobs, asks[3].top_logprobs = True, 2
    asks[4].frequency_penalty, asks[4].presence_penalty, asks[4].repetition_penalty = 0.5, 0.3, 1.1
    asks[5].logit_bias[13] = -100.0
    held = asks[6].response_format
    held.type = common_pb2.ResponseFormat.TYPE_JSON_SCHEMA
    chapters = {"type": "array", "items": {"type": "string"}, "minItems": 40}
    held.schema_json = json.dumps(
        {"type": "object", "properties": {"chapters": chapters}, "required": ["chapters"]}
    )
    asks[7].n, asks[7].temperature = 2, 1.0
    return asks, ["grammar (a JSON response_format)", "n=2 choices"]


async def test_a_worker_serving_eight_streams_is_killed_and_every_movable_one_moves_byte_identical(
    cluster: Cluster, real_model: Path
) -> None:
    queen = cluster.start_queen()
    hive = cluster.start_hive(queen, f"greedy-{uuid.uuid4().hex[:8]}")
    await wait_until(lambda: hive_known(cluster, queen), timeout=15)
    await pull(cluster, hive, real_model)
    victim = await spawn(cluster, queen, 8, threads="1")
    stub = cluster.queen_stub(queen)
    asks, refusals = eight_asks()
    whole = await asyncio.gather(*(collect(stub, ask) for ask in asks[:6]))
    calls = [stub.Infer(ask, timeout=120) for ask in asks]
    begun: list[list[Any]] = [[await call.read(), await call.read()] for call in calls]
    assert {chunks[0].worker_id for chunks in begun} == {victim.id}  # all eight on one engine
    await spawn(cluster, queen, 8, threads="1")
    os.kill(victim.pid, signal.SIGKILL)

    async def rest(call: Any, chunks: list[Any]) -> list[Any]:
        while isinstance(chunk := await call.read(), common_pb2.InferChunk):
            chunks.append(chunk)
        return chunks

    pairs = zip(calls[:6], begun[:6], strict=True)
    moved = await asyncio.gather(*(rest(call, chunks) for call, chunks in pairs))
    for got, expected in zip(moved, whole, strict=True):
        assert text_of(got) == text_of(expected)
        assert [i for c in got for i in c.token_ids] == [i for c in expected for i in c.token_ids]
        assert got[-1].completion_tokens == expected[-1].completion_tokens
        assert len({c.worker_id for c in got if c.worker_id}) == 2  # it did move
        tokens = [e.token for c in got for e in c.logprobs]
        assert tokens == [e.token for c in expected for e in c.logprobs]
    assert len([e for c in moved[3] for e in c.logprobs]) == moved[3][-1].completion_tokens
    for call, chunks, words in zip(calls[6:], begun[6:], refusals, strict=True):
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await rest(call, chunks)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert words in (ended.value.details() or ""), ended.value.details()
    rows = (await cluster.admin_stub(queen).ListRequests(
        queen_pb2.ListRequestsRequest(limit=14))).requests  # fmt: skip
    moved_rows = [r for r in rows if r.migrations == 1]
    assert len(moved_rows) == 6
    assert all(r.status == queen_pb2.REQUEST_STATUS_COMPLETED for r in moved_rows)
