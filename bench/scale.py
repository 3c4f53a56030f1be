"""Scale of the queen's registry: pick cost and heartbeat ingest at 10 to 10,000 workers.

Pick cost is measured in-process on the registry (the pure logic the router
calls), for every routing policy, with a rolling window of leases in flight;
the ratio is against the 10-worker run in the same process. Heartbeat ingest
is measured against a real queen process fed by simulated 8-worker hives, with
the cheapest unary call (grpc.health Check) to the same queen as the same-run baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apiary.clock import SystemClock
from harness import Cluster
from protos.v1 import common_pb2, queen_pb2, queen_pb2_grpc
from queen.registry import Registry, RegistrySettings
from queen.routing.ask import Ask, Outcome, Slot
from queen.routing.prefix_index import Want
from queen.routing.router import Router

SIZES = (10, 100, 1_000, 10_000)
PER_HIVE = 8
ROUNDS = 9  # ingest: heartbeat and baseline windows alternate this many times (median)
MAX_CALLS = 200_000  # per ingest measurement: loads are bounded in count as well as time
POLICIES = {
    "least-loaded": common_pb2.ROUTING_POLICY_LEAST_LOADED,
    "lru": common_pb2.ROUTING_POLICY_LRU,
    "score": common_pb2.ROUTING_POLICY_SCORE,
    "lottery": common_pb2.ROUTING_POLICY_LOTTERY,
    "shortest-queue": common_pb2.ROUTING_POLICY_SHORTEST_QUEUE,
    "cache-aware": common_pb2.ROUTING_POLICY_CACHE_AWARE,
}
# cache-aware picks route real requests: TENANTS system prompts of PROMPT_BYTES, each with
# questions of its own, so every pick hashes an 8 KB prompt and matches it in the index.
TENANTS = 64
PROMPT_BYTES = 8 * 1024


def requests() -> list[common_pb2.InferRequest]:
    prompts = [(f"tenant {t} rules: " * PROMPT_BYTES)[:PROMPT_BYTES] for t in range(TENANTS)]
    return [
        common_pb2.InferRequest(model="m", prompt=f"{prompts[n % TENANTS]} question {n}?")
        for n in range(TENANTS * 8)
    ]


def heartbeat(hive: int, workers: int, model: str = "m") -> queen_pb2.HiveHeartbeat:
    return queen_pb2.HiveHeartbeat(
        hive_id=f"hive-{hive}",
        address=f"10.0.{hive // 256}.{hive % 256}:7071",
        resources=queen_pb2.HiveResources(cpu_count=8, memory_total_bytes=2**36),
        workers=[
            common_pb2.WorkerRecord(
                id=f"w-{hive}-{i}", hive_id=f"hive-{hive}", model=model,
                address=f"10.0.{hive // 256}.{hive % 256}:{9000 + i}",
                state=common_pb2.WORKER_STATE_IDLE, slots_total=4, backend="echo",
            )
            for i in range(workers)
        ],
    )  # fmt: skip


def pick_cost(size: int, policy: int, picks: int) -> float:
    """Median microseconds per acquire + release over 5 rounds."""
    asks = requests() if policy == common_pb2.ROUTING_POLICY_CACHE_AWARE else []
    registry = Registry(SystemClock(), RegistrySettings(interval=3600.0))
    router = Router(registry, seed=1)
    for hive in range(max(size // PER_HIVE, 1)):
        registry.apply_heartbeat(heartbeat(hive, min(PER_HIVE, size)))
    window: collections.deque[Slot] = collections.deque()
    in_flight = min(size * 2, 256)  # half the slots of the smallest, a realistic load elsewhere
    rounds = []
    # A request makes its Ask once (queen/requests/route.py), not once per pick; a cache-aware
    # one makes it with its prompt's Want, whose hashes each pick computes anew here.
    plain = Ask("m", policy=policy)  # type: ignore[arg-type]
    for _ in range(5):
        start = time.perf_counter()
        for n in range(picks):
            if len(window) >= in_flight:
                router.give_back(window.popleft(), Outcome(ok=True, duration=0.5, tokens=8 + n % 5))
            ask = Ask("m", policy=policy, want=Want(asks[n % len(asks)])) if asks else plain  # type: ignore[arg-type]
            lease = router.take(ask)
            if lease is not None:
                window.append(lease)
        rounds.append((time.perf_counter() - start) / picks * 1e6)
    return statistics.median(rounds)


async def drive(call: Any, requests: Sequence[Any], seconds: float, concurrency: int) -> float:
    """Calls per second of `concurrency` closed loops, bounded by `seconds` and MAX_CALLS."""
    done = 0
    stop = time.perf_counter() + seconds

    async def one(offset: int) -> None:
        nonlocal done
        i = offset
        while time.perf_counter() < stop and done < MAX_CALLS:
            await call(requests[i % len(requests)])
            i += concurrency
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(one(k) for k in range(concurrency)))
    return done / (time.perf_counter() - start)


async def ingest(
    queen: str, size: int, seconds: float, concurrency: int
) -> tuple[float, float, float]:
    """(heartbeats/s, baseline health checks/s, median ratio) into one queen process: the two
    alternate in ROUNDS windows of seconds / ROUNDS each, so a neighbour's load on the box
    weighs on both alike; the ratio is the median of the rounds' ratios."""
    hives = max(size // PER_HIVE, 1)
    beats = [
        heartbeat(10_000 + size + h, min(PER_HIVE, size), model=f"scale{size}")
        for h in range(hives)
    ]
    window = seconds / ROUNDS
    async with grpc.aio.insecure_channel(queen) as channel:
        registry = queen_pb2_grpc.QueenRegistryStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        for beat in beats:  # everyone joins first: we measure steady-state replacement
            await registry.Heartbeat(beat)
        checks = [health_pb2.HealthCheckRequest()]
        await drive(registry.Heartbeat, beats, 0.2, concurrency)  # warm-up, both paths
        await drive(health.Check, checks, 0.2, concurrency)
        rates, baselines = [], []
        for _ in range(ROUNDS):
            rates.append(await drive(registry.Heartbeat, beats, window, concurrency))
            baselines.append(await drive(health.Check, checks, window, concurrency))
        for beat in beats:
            await registry.Heartbeat(queen_pb2.HiveHeartbeat(hive_id=beat.hive_id, leaving=True))
    ratio = statistics.median(r / b for r, b in zip(rates, baselines, strict=True))
    return statistics.median(rates), statistics.median(baselines), ratio


def pick_costs(picks: int) -> None:
    print("\n## pick cost (acquire + release, in-process registry, all workers one model)")
    print(f"{'policy':>15} " + " ".join(f"{s:>9}" for s in SIZES) + "   ratio 10k/10")
    for name, policy in POLICIES.items():
        costs = [pick_cost(size, policy, picks) for size in SIZES]
        row = " ".join(f"{c:>7.2f}us" for c in costs)
        ratio = costs[-1] / costs[0]
        verdict = "ok" if ratio <= 1.5 else "ABOVE 1.5x"
        if name == "cache-aware":
            fast = "ok" if max(costs) < 100 else "ABOVE"
            verdict += f", {fast} (< 100 us per pick, 8 KB prompts)"
        print(f"{name:>15} {row}   {ratio:5.2f}x {verdict}", flush=True)


async def ingests(seconds: float, concurrency: int) -> None:
    print("\n## heartbeat ingest (real queen process, 8-worker hives, "
          f"{concurrency} concurrent senders)")  # fmt: skip
    print(f"{'workers':>8} {'hives':>6} {'beats/s':>9} {'checks/s':>9} {'ratio':>6}"
          f"   (medians of {ROUNDS} alternating rounds)")  # fmt: skip
    cluster = Cluster(heartbeat_interval=3600.0)
    try:
        # The queen's per-hive heartbeat budget (2 per interval) lifted: one simulated hive
        # stands for many here; the budget is still checked on every beat.
        queen = cluster.start_queen(0, "--max-beats-per-interval", "1e9")
        for size in SIZES:
            rate, baseline, ratio = await ingest(queen.address, size, seconds, concurrency)
            verdict = "ok" if ratio >= 0.8 else "BELOW 0.8x"
            print(f"{size:>8} {max(size // PER_HIVE, 1):>6} {rate:>9.0f} {baseline:>9.0f} "
                  f"{ratio:>5.2f}x {verdict}", flush=True)  # fmt: skip
    finally:
        await cluster.close()
    print("\nbeats/s is also how many 8-worker hives one queen keeps at a 1 s heartbeat.")


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--picks", type=int, default=20_000, help="per size, policy and round")
    p.add_argument("--seconds", type=float, default=3.0, help="per ingest measurement")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--part", choices=["pick", "ingest", "both"], default="both")
    args = p.parse_args()
    print(f"# bench/scale.py: python {sys.version.split()[0]}, grpcio {grpc.__version__}")
    if args.part in ("pick", "both"):
        pick_costs(args.picks)
    if args.part in ("ingest", "both"):
        await ingests(args.seconds, args.concurrency)


if __name__ == "__main__":
    asyncio.run(main())
