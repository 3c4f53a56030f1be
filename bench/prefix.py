"""Cache-aware routing through the queen vs least-loaded, on the real model.

SmolLM2-135M-Instruct (apiary/realmodel.py), 2 llamacpp workers of 1 thread each, spawned
fresh for each run (no run inherits another's caches). Tenants' traffic: each request a
tenant's system prompt (~1,000 tokens of its own words) plus a short question of its own,
max_tokens 4. Prefill dominates here: a cold 1,000-token prompt costs seconds on one thread,
a cached one tens of milliseconds. Runs: 4 tenants evenly, then one hot tenant with 80% of the
requests; each with least-loaded, then with cache-aware. Prints mean/p50/p90 time to first
token, each worker's share of requests, and the share of prompt tokens served from a cache,
then cache-aware's gain over least-loaded against the targets (>= 5x mean TTFT evenly; >= 2x
with the hot tenant while each worker serves >= 25%).

What a worker can hold matters as much as routing. The measured runs give each worker
`--slots` (1) slot and a 40 MB host-RAM prompt cache (`--pressure-ram-mb`): a worker holds half
the tenants' prefixes, the regime a real deployment is in when its tenants' prefixes outgrow
its KV (a 7B model's 1,500-token prefix is ~0.75 GB). A last pair of runs gives each worker
the backend's defaults (8 slots, a 1 GB RAM cache: room for every tenant), where least-loaded
also finds prefixes after one miss per tenant and worker: the gain is then the misses saved.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from collections import Counter as Tally
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apiary.realmodel import model_path
from harness import Cluster, Proc, wait_until
from harness.gguf import WORDS
from protos.v1 import common_pb2, queen_pb2

POLICIES = {
    "least-loaded": common_pb2.ROUTING_POLICY_LEAST_LOADED,
    "cache-aware": common_pb2.ROUTING_POLICY_CACHE_AWARE,
}


@dataclass
class Run:
    ttft: list[float] = field(default_factory=list)
    workers: Tally[str] = field(default_factory=Tally)
    prompt_tokens: int = 0
    cached_tokens: int = 0

    def pct(self, q: float) -> float:
        ordered = sorted(self.ttft)
        return ordered[min(int(q * len(ordered)), len(ordered) - 1)]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.ttft)

    def shares(self) -> list[float]:
        total = sum(self.workers.values())
        return sorted((n / total for n in self.workers.values()), reverse=True)


def system_prompt(tenant: int, words: int) -> str:
    rng = random.Random(tenant)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def schedule(requests: int, tenants: int, hot: float, seed: int) -> list[int]:
    """Which tenant each request is for: one hot tenant with share `hot` (0: all even)."""
    rng = random.Random(seed)
    if not hot:
        return [rng.randrange(tenants) for _ in range(requests)]
    return [0 if rng.random() < hot else rng.randrange(1, tenants) for _ in range(requests)]


async def fresh_workers(
    cluster: Cluster, queen: Proc, gguf: Path, cache_ram_mb: int | None, slots: int
) -> list[str]:
    """Retire every worker, then spawn 2 new ones (empty caches); `slots` 0: the default."""
    admin = cluster.admin_stub(queen)
    for worker in (await admin.ListWorkers(queen_pb2.ListWorkersRequest())).workers:
        await admin.RetireWorker(queen_pb2.RetireWorkerRequest(worker_id=worker.id), timeout=60)
    options = {"threads": "1", "context_size": "2048", "model_path": str(gguf)}
    if cache_ram_mb is not None:
        options["cache_ram_mb"] = str(cache_ram_mb)
    ids = []
    for _ in range(2):
        reply = await admin.SpawnWorker(
            queen_pb2.QueenSpawnWorkerRequest(model="bench", backend="llamacpp", slots=slots,
                                              wait_ready=True, backend_options=options),
            timeout=120,
        )  # fmt: skip
        ids.append(reply.worker.id)
    await cluster.wait_workers(queen, "bench", 2, timeout=60)
    return ids


async def drive(cluster: Cluster, queen: Proc, tenants: list[int], policy: int, args: Any) -> Run:
    stub = cluster.queen_stub(queen)
    run = Run()
    todo = list(enumerate(tenants))

    async def client() -> None:
        while todo:
            i, tenant = todo.pop(0)
            prompt = f"{system_prompt(tenant, args.prefix_words)} question {i}: why?"
            request = common_pb2.InferRequest(
                model="bench",
                prompt=prompt,
                max_tokens=4,
                seed=i,
                policy=policy,  # type: ignore[arg-type]
            )
            began, first, last, worker = time.perf_counter(), 0.0, None, ""
            async for chunk in stub.Infer(request, timeout=600):
                if not first:
                    first = time.perf_counter() - began
                    run.workers[chunk.worker_id] += 1
                    worker = chunk.worker_id
                last = chunk
            run.ttft.append(first)
            if args.trace and last is not None:
                print(f"  trace: request {i} tenant {tenant} worker {worker[-4:]} "
                      f"ttft {first * 1000:.0f}ms cached {last.cached_prompt_tokens}/"
                      f"{last.prompt_tokens}", flush=True)  # fmt: skip
            if last is not None:
                run.prompt_tokens += last.prompt_tokens
                run.cached_tokens += last.cached_prompt_tokens

    await asyncio.gather(*(client() for _ in range(args.concurrency)))
    return run


def line(scenario: str, budget: str, name: str, run: Run) -> str:
    shares = "/".join(f"{s:.0%}" for s in run.shares())
    cached = run.cached_tokens / run.prompt_tokens if run.prompt_tokens else 0.0
    times = f"{run.mean * 1000:>8.0f} {run.pct(0.5) * 1000:>7.0f} {run.pct(0.9) * 1000:>7.0f}"
    return (f"{scenario:>8} {budget:>7} {name:>12} {len(run.ttft):>4} {times} {shares:>9} "
            f"{cached:>7.0%}")  # fmt: skip


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=60)
    p.add_argument("--tenants", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--prefix-words", type=int, default=600, help="~1,000 tokens")
    p.add_argument("--slots", type=int, default=1, help="each worker's, in the measured runs")
    p.add_argument("--trace", action="store_true", help="print every request")
    p.add_argument("--queen-args", default="", help="extra queen flags, e.g. '--cache-wait 5'")
    p.add_argument("--scenarios", default="even,hot 80%,even*", help="which runs, by name")
    p.add_argument("--pressure-ram-mb", type=int, default=40,
                   help="each worker's host-RAM prompt cache in the measured runs")  # fmt: skip
    args = p.parse_args()
    cluster = Cluster(heartbeat_interval=1.0)
    try:
        gguf = model_path()
        queen = cluster.start_queen(0, *args.queen_args.split())
        cluster.start_hive(queen, "bench")
        await wait_until(lambda: hive_known(cluster, queen), timeout=30)
        print(f"# bench/prefix.py: {args.requests} requests per run, {args.tenants} tenants, "
              f"~{args.prefix_words}-word system prompts, max_tokens 4, concurrency "
              f"{args.concurrency}, 2 llamacpp workers on {gguf.name} (1 thread each; measured "
              f"runs {args.slots} slots, {args.pressure_ram_mb} MB RAM cache)")  # fmt: skip
        print(f"{'traffic':>8} {'budget':>7} {'policy':>12} {'n':>4} {'mean ms':>8} "
              f"{'p50 ms':>7} {'p90 ms':>7} {'shares':>9} {'cached':>7}")  # fmt: skip
        results: dict[tuple[str, str], Run] = {}
        runs = (("even", 0.0, args.pressure_ram_mb), ("hot 80%", 0.8, args.pressure_ram_mb),
                ("even*", 0.0, None))  # fmt: skip
        for scenario, hot, budget in runs:
            if scenario not in args.scenarios.split(","):
                continue
            tenants = schedule(args.requests, args.tenants, hot, seed=7)
            for name, policy in POLICIES.items():
                slots = args.slots if budget is not None else 0
                await fresh_workers(cluster, queen, gguf, budget, slots)
                run = await drive(cluster, queen, tenants, policy, args)
                results[(scenario, name)] = run
                shown = f"{slots}s/{budget}MB" if budget is not None else "default"
                print(line(scenario, shown, name, run), flush=True)
        if len(results) == 2 * len(runs):
            verdicts(results)
    finally:
        await cluster.close()


def verdicts(results: dict[tuple[str, str], Run]) -> None:
    even = results[("even", "least-loaded")].mean / results[("even", "cache-aware")].mean
    hot = results[("hot 80%", "least-loaded")].mean / results[("hot 80%", "cache-aware")].mean
    shares = results[("hot 80%", "cache-aware")].shares()
    least_share = shares[1] if len(shares) > 1 else 0.0
    print("\n# cache-aware against least-loaded (mean TTFT)")
    print(f"even    {even:5.1f}x  (target >= 5x)  {'ok' if even >= 5 else 'MISSED'}")
    print(f"hot 80% {hot:5.1f}x  (target >= 2x)  {'ok' if hot >= 2 else 'MISSED'};  "
          f"smallest worker share {least_share:.0%} (target >= 25%)  "
          f"{'ok' if least_share >= 0.25 else 'MISSED'}")  # fmt: skip
    ample = results[("even*", "least-loaded")].mean / results[("even*", "cache-aware")].mean
    print(f"even*   {ample:5.1f}x  (default budget: every tenant fits on every worker)")


async def hive_known(cluster: Cluster, queen: Proc) -> bool:
    listed = await cluster.admin_stub(queen).ListHives(queen_pb2.ListHivesRequest())
    return bool(listed.hives)


if __name__ == "__main__":
    asyncio.run(main())
