"""Cache-aware routing with real processes: a tenant's requests go back to the worker holding
its prompt's prefix (which reuses it), a hot tenant is spread over both workers, sessions
stick, and the policy is in the request history."""

from __future__ import annotations

import asyncio
from collections import Counter as Tally
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness import Cluster, Proc, wait_until
from harness.ports import free_port
from protos.v1 import common_pb2, queen_pb2

CACHE_AWARE = common_pb2.ROUTING_POLICY_CACHE_AWARE
TOKENS = 48
WORDS = "the bees fly to the hive and the queen is sweet honey of gold in the field".split()


def system_prompt(tenant: int, words: int = 120) -> str:
    """A tenant's long shared prefix (~700 bytes: several hash blocks)."""
    return " ".join(WORDS[(tenant * 7 + i * (tenant + 3)) % len(WORDS)] for i in range(words))


def ask(tenant: int, question: str, tokens: int = 2, **fields: Any) -> common_pb2.InferRequest:
    return common_pb2.InferRequest(
        model="smollm2", prompt=f"{system_prompt(tenant)} {question}", max_tokens=tokens, seed=1,
        **fields,
    )  # fmt: skip


async def last_chunk(cluster: Cluster, queen: Proc, request: common_pb2.InferRequest) -> Any:
    return [c async for c in cluster.queen_stub(queen).Infer(request, timeout=60)][-1]


async def two_llama_workers(cluster: Cluster, model_file: Path, *queen_args: str) -> Proc:
    """Two one-slot engine workers of the real model, a core each."""
    pytest.importorskip("xllamacpp", reason="the llamacpp extra is not installed")
    queen = cluster.start_queen(0, *queen_args)
    cluster.start_hive(queen, "ca-h1")
    admin = cluster.admin_stub(queen)
    await wait_until(lambda: hives(admin))
    options = {"threads": "1", "context_size": "1024", "cache_ram_mb": "0",
               "model_path": str(model_file)}  # fmt: skip
    for _ in range(2):
        await admin.SpawnWorker(
            queen_pb2.QueenSpawnWorkerRequest(
                model="smollm2", backend="llamacpp", slots=1, wait_ready=True,
                backend_options=options,
            ),
            timeout=60,
        )  # fmt: skip
    await cluster.wait_workers(queen, "smollm2", 2)
    return queen


async def hives(admin: Any) -> bool:
    return bool((await admin.ListHives(queen_pb2.ListHivesRequest())).hives)


async def served_by(cluster: Cluster, queen: Proc) -> dict[str, str]:
    """client_request_id -> worker id, from the history."""
    rows = (
        await cluster.admin_stub(queen).ListRequests(queen_pb2.ListRequestsRequest(limit=1000))
    ).requests
    assert {r.policy for r in rows} == {CACHE_AWARE}
    return {r.client_request_id: r.worker_id for r in rows}


async def test_a_tenant_goes_back_to_the_worker_holding_its_prefix(
    cluster: Cluster, real_model: Path
) -> None:
    queen = await two_llama_workers(cluster, real_model)
    first = await last_chunk(cluster, queen, ask(0, "where", request_id="a1"))
    assert first.cached_prompt_tokens == 0
    other = await last_chunk(cluster, queen, ask(1, "where", request_id="b1"))
    for i in range(2, 5):
        again = await last_chunk(cluster, queen, ask(0, f"why {i}", request_id=f"a{i}"))
        # The shared prefix was computed once, on this worker: most of it is reused.
        assert again.cached_prompt_tokens > again.prompt_tokens // 2, again
        await last_chunk(cluster, queen, ask(1, f"why {i}", request_id=f"b{i}"))
    workers = await served_by(cluster, queen)
    assert len({workers[f"a{i}"] for i in (1, 2, 3, 4)}) == 1
    assert len({workers[f"b{i}"] for i in (1, 2, 3, 4)}) == 1
    assert workers["a1"] != workers["b1"]  # the second tenant went to the free worker
    del other


async def test_a_hot_tenant_is_spread_over_both_workers(cluster: Cluster, real_model: Path) -> None:
    queen = await two_llama_workers(cluster, real_model)
    # Both workers' first decode (buffers allocated: slow) is done before timing matters.
    await asyncio.gather(*(last_chunk(cluster, queen, ask(t, "warm")) for t in (1, 2)))
    for i in range(8):  # one at a time: enough requests for the tenant's share to count
        await last_chunk(cluster, queen, ask(0, f"w{i}", request_id=f"warm-{i}"))

    async def client(n: int) -> None:
        for i in range(6):
            request = ask(0, f"q{n}-{i}", tokens=TOKENS, request_id=f"hot-{n}-{i}")
            await last_chunk(cluster, queen, request)

    await asyncio.gather(*(client(n) for n in range(3)))
    workers = await served_by(cluster, queen)
    assert len({workers[f"warm-{i}"] for i in range(8)}) == 1  # nothing busy: the holder
    # Three clients, two one-slot workers: the holder is busy, and the hot prefix goes to the
    # other worker rather than waiting for it (once; then both hold it). Requests decode long
    # enough for the holder to be busy while the other worker computes the prefix.
    shares = Tally(w for request_id, w in workers.items() if request_id.startswith("hot-"))
    assert len(shares) == 2 and min(shares.values()) >= 4, shares


async def test_over_http_user_prompt_cache_key_and_the_affinity_header_pick_the_session(
    cluster: Cluster, real_model: Path
) -> None:
    port = free_port()
    queen = await two_llama_workers(cluster, real_model, "--http-listen", f"127.0.0.1:{port}")
    url = f"http://127.0.0.1:{port}/v1/completions"
    short = {"model": "smollm2", "prompt": "hi", "max_tokens": 1}  # too short for prefix matching
    async with httpx.AsyncClient(timeout=30) as http:

        async def post(body: dict[str, Any], **headers: str) -> None:
            reply = await http.post(url, json={**short, **body}, headers=headers)
            assert reply.status_code == 200, reply.text

        for i in range(3):
            await post({"user": "alice"}, **{"X-Request-Id": f"u{i}"})
            await post({"prompt_cache_key": "k", "user": "bob"}, **{"X-Request-Id": f"k{i}"})
            await post({}, **{"X-Session-Affinity": "s", "X-Request-Id": f"h{i}"})
            await post({}, **{"X-Request-Id": f"n{i}"})
    workers = await served_by(cluster, queen)
    for group in "ukh":
        assert len({workers[f"{group}{i}"] for i in range(3)}) == 1, (group, workers)
    # Without a session, short prompts go least-loaded, then least recently used: both.
    assert len({workers[f"n{i}"] for i in range(3)} | {workers["u0"], workers["k0"]}) == 2


async def test_a_session_sticks_to_its_worker(cluster: Cluster) -> None:
    queen = cluster.start_queen()
    cluster.start_hive(queen, "ca-h2", "model=demo,count=2,token_delay=0")
    await cluster.wait_workers(queen, "demo", 2)
    stub = cluster.queen_stub(queen)

    async def worker_of(**fields: Any) -> str:
        request = common_pb2.InferRequest(model="demo", prompt="hi", max_tokens=1, **fields)
        chunks = [c async for c in stub.Infer(request, timeout=10)]
        return chunks[0].worker_id

    sticky = {await worker_of(policy=CACHE_AWARE, session_id="chat-1") for _ in range(6)}
    spread = {await worker_of() for _ in range(6)}  # echo's default: least-loaded, in turns
    assert len(sticky) == 1 and len(spread) == 2
