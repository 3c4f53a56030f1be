"""The engine under Apiary, on the real model: 64-token streamed chats at c = 1, 2, 4 and 8.

SmolLM2-135M-Instruct (Q4_1; apiary/realmodel.py fetches it once). Three setups, measured by
turns in the same run (a shared machine's speed drifts by a fifth between minutes, so each
cell is the median over rounds, and every setup runs in every round):

  (a) queen + hive + one llamacpp worker with 8 slots, through the queen's OpenAI HTTP front
      (the official client's wire format: streamed chat completions with usage);
  (b) the same engine alone, called in this process (xllamacpp's Server with 8 parallel
      sequences, handle_chat_completions with the same body): the floor for our overhead;
  (c) the same engine as one worker with 1 slot (through the queen's HTTP front), to show
      what batching gains.

`--setups legacy` measures the worker before this engine (2 llamacpp workers x 1 slot x 1
thread, llama-cpp-python) with the same client, when run from a checkout of that code.

Each cell: c clients, each sending `--per-client` chats one after another (distinct prompts);
tokens/s is all completion tokens over the cell's wall time; time to first token is the first
content a client sees. Prints each cell, then the ratios and the issue's targets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

# The checkout, in place of bench/ (whose http.py would shadow the standard library's).
sys.path.pop(0)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from apiary.realmodel import model_path
from harness import Cluster, Proc, wait_until
from harness.ports import free_port
from protos.v1 import queen_pb2
from worker.backends.llama_engine import EngineConfig, LlamaEngine

TOKENS = 64
TOPICS = ["bees", "rivers", "mountains", "the moon", "bread", "winter", "a lighthouse", "clocks",
          "owls", "the sea", "maps", "gardens", "trains", "salt", "kites", "glass"]  # fmt: skip
LABELS = {
    "a": "(a) queen + 1 worker x 8 slots",
    "b": "(b) engine in-process, 8 seq",
    "c": "(c) queen + 1 worker x 1 slot",
    "legacy": "before: 2 workers x 1 slot x 1 thread",
}


def body(i: int) -> dict[str, Any]:
    topic = TOPICS[i % len(TOPICS)]
    return {
        "messages": [{"role": "user", "content": f"Write a long story about {topic} ({i})."}],
        "max_tokens": TOKENS, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip


@dataclass
class Cell:
    tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


# One chat: (completion tokens, seconds to the first content).
Chat = Callable[[int], Awaitable[tuple[int, float]]]


async def cell(chat: Chat, clients: int, per_client: int, offset: int) -> Cell:
    result = Cell()

    async def client(k: int) -> None:
        for j in range(per_client):
            tokens, first = await chat(offset + k * per_client + j)
            result.tokens += tokens
            result.ttft.append(first)

    began = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    result.seconds = time.perf_counter() - began
    return result


class HttpFront:
    """Streamed chats through a queen's OpenAI HTTP front."""

    def __init__(self, url: str, model: str) -> None:
        self.model = model
        self.http = httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(
            max_connections=64, max_keepalive_connections=64))  # fmt: skip

    async def chat(self, i: int) -> tuple[int, float]:
        began, first, tokens = time.perf_counter(), 0.0, 0
        async with self.http.stream("POST", "/v1/chat/completions",
                                    json={"model": self.model, **body(i)}) as reply:  # fmt: skip
            reply.raise_for_status()
            async for line in reply.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                choices = chunk.get("choices") or []
                if not first and choices and (choices[0].get("delta") or {}).get("content"):
                    first = time.perf_counter() - began
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        return tokens, first


class InProcess:
    """The worker's engine host (worker/backends/llama_engine.py) in this process, with the
    same model, slots and threads as worker (a), called through the engine's own chat path."""

    def __init__(self, path: Path, slots: int, threads: int, context: int) -> None:
        self.engine = LlamaEngine(EngineConfig(str(path), slots, threads, context))
        self.engine.start()

    def _blocking(self, i: int, out: list[tuple[int, float]]) -> None:
        began, first, tokens = time.perf_counter(), 0.0, 0

        def on_chunk(chunk: Any) -> bool:
            nonlocal first, tokens
            choices = chunk.get("choices") or []
            if not first and choices and (choices[0].get("delta") or {}).get("content"):
                first = time.perf_counter() - began
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            return False

        self.engine.chat(body(i), on_chunk)
        out.append((tokens, first))

    async def chat(self, i: int) -> tuple[int, float]:
        out: list[tuple[int, float]] = []
        thread = threading.Thread(target=self._blocking, args=(i, out))
        thread.start()
        await asyncio.to_thread(thread.join)
        return out[0]


async def cluster_front(cluster: Cluster, path: Path, setups: list[str]) -> dict[str, HttpFront]:
    """One queen with an HTTP front, a hive per setup (each hive hands its engines every core:
    only one setup runs at a time), each setup's model under its own name."""
    port = free_port()
    queen = cluster.start_queen(0, "--http-listen", f"127.0.0.1:{port}")
    fronts = {}
    shapes = {"a": (1, 8, ""), "c": (1, 1, ""), "legacy": (2, 1, "1")}
    for setup in setups:
        if setup == "b":
            continue
        workers, slots, threads = shapes[setup]
        cluster.start_hive(queen, f"h-{setup}")
        await wait_until(partial(hive_named, cluster, queen, f"h-{setup}"), timeout=30)
        options = {"model_path": str(path), "context_size": "2048"}
        if threads:
            options["threads"] = threads
        for _ in range(workers):
            await cluster.admin_stub(queen).SpawnWorker(
                queen_pb2.QueenSpawnWorkerRequest(
                    hive_id=f"h-{setup}", model=f"m-{setup}", backend="llamacpp", slots=slots,
                    wait_ready=True, backend_options=options,
                ),
                timeout=300,
            )  # fmt: skip
        await cluster.wait_workers(queen, f"m-{setup}", workers, timeout=60)
        fronts[setup] = HttpFront(f"http://127.0.0.1:{port}", f"m-{setup}")
    return fronts


async def hive_named(cluster: Cluster, queen: Proc, hive: str) -> bool:
    listed = await cluster.admin_stub(queen).ListHives(queen_pb2.ListHivesRequest())
    return any(h.id == hive for h in listed.hives)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def report(results: dict[tuple[str, int], list[Cell]], setups: list[str], rounds: int) -> None:
    print(f"\n{'setup':<38} {'c':>2} {'tokens/s':>9} {'ttft p50 ms':>12} {'ttft p99 ms':>12}")
    summary: dict[tuple[str, int], tuple[float, float, float]] = {}
    for concurrency in sorted({c for _, c in results}):
        for setup in setups:
            cells = results[(setup, concurrency)]
            rate = statistics.median(c.rate for c in cells)
            ttft = [t for c in cells for t in c.ttft]
            summary[(setup, concurrency)] = (rate, pct(ttft, 0.5) * 1000, pct(ttft, 0.99) * 1000)
            p50, p99 = summary[(setup, concurrency)][1:]
            print(f"{LABELS[setup]:<38} {concurrency:>2} {rate:>9.1f} {p50:>12.1f} {p99:>12.1f}")
    print(f"(tokens/s: median of {rounds} rounds; ttft over every request of every round)")
    verdicts(summary)


def verdicts(summary: dict[tuple[str, int], tuple[float, float, float]]) -> None:
    def ok(met: bool) -> str:
        return "met" if met else "MISSED"

    concurrencies = sorted({c for _, c in summary})
    if all(("a", c) in summary and ("b", c) in summary for c in concurrencies):
        print("\n# (a) against (b), the engine alone")
        for c in concurrencies:
            ratio = summary[("a", c)][0] / summary[("b", c)][0]
            print(f"c={c}: tokens/s {ratio:.3f}x (target >= 0.95x: {ok(ratio >= 0.95)}); "
                  f"ttft p50 {summary[('a', c)][1] - summary[('b', c)][1]:+.1f} ms")  # fmt: skip
        if 1 in concurrencies:
            delta = summary[("a", 1)][1] - summary[("b", 1)][1]
            print(f"c=1 ttft p50 within +5 ms of (b): {delta:+.1f} ms: {ok(delta <= 5)}")
    if ("a", 8) in summary and ("c", 8) in summary:
        gain = summary[("a", 8)][0] / summary[("c", 8)][0]
        print(f"batching: (a) at c=8 {gain:.2f}x (c) in tokens/s "
              f"(target >= 1.4x: {ok(gain >= 1.4)})")  # fmt: skip
    if ("a", 8) in summary and ("legacy", 8) in summary:
        rate, p50 = summary[("a", 8)][:2]
        old_rate, old_p50 = summary[("legacy", 8)][:2]
        print(f"against before: c=8 ttft p50 {p50:.0f} ms vs {old_p50:.0f} ms "
              f"({p50 / old_p50:.2f}x; target <= 0.25x: {ok(p50 <= old_p50 / 4)}), tokens/s "
              f"{rate:.0f} vs {old_rate:.0f} (no lower: {ok(rate >= old_rate)})")  # fmt: skip


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--setups", default="a,b,c", help="which setups, of a, b, c, legacy")
    p.add_argument("--concurrency", default="1,2,4,8")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--per-client", type=int, default=3, help="chats each client sends in a cell")
    args = p.parse_args()
    setups = args.setups.split(",")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    path = model_path()
    threads = len(os.sched_getaffinity(0))
    print(f"# bench/engine.py: {path.name}, {TOKENS}-token streamed chats (temperature 0), "
          f"{args.per_client} per client per cell, {args.rounds} rounds, {threads} cores; "
          f"setups by turns: {', '.join(LABELS[s] for s in setups)}")  # fmt: skip
    cluster = Cluster(heartbeat_interval=1.0)
    try:
        fronts = await cluster_front(cluster, path, setups)
        chats: dict[str, Chat] = {s: f.chat for s, f in fronts.items()}
        if "b" in setups:
            chats["b"] = InProcess(path, 8, threads, 2048).chat
        results: dict[tuple[str, int], list[Cell]] = {}
        for setup in setups:  # warm-up: each engine's first requests, untimed
            await cell(chats[setup], 2, 1, 10_000)
        for round_ in range(args.rounds):
            for c in concurrencies:
                for setup in setups:
                    got = await cell(chats[setup], c, args.per_client, round_ * 1000 + c * 100)
                    results.setdefault((setup, c), []).append(got)
            print(f"round {round_ + 1} of {args.rounds} done", flush=True)
        report(results, setups, args.rounds)
    finally:
        await cluster.close()


if __name__ == "__main__":
    asyncio.run(main())
