"""Routing overhead: through the queen vs straight to a worker vs a bare grpc.aio relay.

Starts a real cluster (queen, hive, N echo workers with zero token delay; echo is
for benchmarks only) and a bare relay process, then drives each target at the
same concurrency and stream length in turns within one run, and prints the
queen's cost as ratios against the two baselines measured here and now.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import Cluster
from protos.v1 import common_pb2, queen_pb2_grpc, worker_pb2_grpc


@dataclass
class Result:
    requests: int = 0
    chunks: int = 0
    errors: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    ttfc: list[float] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed if self.elapsed else 0.0

    @property
    def cps(self) -> float:
        return self.chunks / self.elapsed if self.elapsed else 0.0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)] * 1000


async def drive(
    stubs: list[Any], tokens: int, concurrency: int, seconds: float, cap: int
) -> Result:
    """`concurrency` closed-loop clients for `seconds` (and at most `cap` requests in all)."""
    result = Result()
    request = common_pb2.InferRequest(
        model="bench", prompt="the quick brown fox", max_tokens=tokens
    )
    rotation = itertools.cycle(stubs)
    start = time.perf_counter()
    stop_at = start + seconds

    async def client() -> None:
        while time.perf_counter() < stop_at and result.requests + result.errors < cap:
            stub = next(rotation)
            t0 = time.perf_counter()
            first = 0.0
            n = 0
            try:
                async for _ in stub.Infer(request, timeout=30):
                    if n == 0:
                        first = time.perf_counter() - t0
                    n += 1
            except grpc.aio.AioRpcError:
                result.errors += 1
                continue
            result.latencies.append(time.perf_counter() - t0)
            result.ttfc.append(first)
            result.requests += 1
            result.chunks += n

    await asyncio.gather(*(client() for _ in range(concurrency)))
    result.elapsed = time.perf_counter() - start
    return result


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    p.add_argument("--max-requests", type=int, default=50_000, help="per measurement")
    p.add_argument("--concurrency", default="1,64")
    p.add_argument("--tokens", default="8,100")
    args = p.parse_args()

    cluster = Cluster(heartbeat_interval=1.0)
    try:
        queen = cluster.start_queen()
        # Slots above the highest concurrency: we measure routing, not queueing.
        cluster.start_hive(
            queen, "bench", f"model=bench,backend=echo,count={args.workers},slots=256"
        )
        workers = await cluster.wait_workers(queen, "bench", args.workers)
        # A process of the cluster's: started the same way, stopped with the rest.
        relay = cluster.start(
            "relay", ["bench.relay", "--workers", ",".join(w.address for w in workers)]
        )

        targets: dict[str, list[Any]] = {
            "queen": [queen_pb2_grpc.QueenStub(cluster.channel(queen.address))],
            "direct": [worker_pb2_grpc.WorkerStub(cluster.channel(w.address)) for w in workers],
            "relay": [queen_pb2_grpc.QueenStub(cluster.channel(relay.address))],
        }
        print(
            f"# bench/route.py: {args.workers} echo workers (token delay 0), "
            f"{args.seconds:g}s per cell, python {sys.version.split()[0]}, "
            f"grpcio {grpc.__version__}"
        )
        header = (
            f"{'tokens':>6} {'conc':>4} {'target':>6} {'req/s':>8} {'chunks/s':>9} "
            f"{'p50 ms':>7} {'p99 ms':>7} {'ttfc50':>7} {'ttfc99':>7} {'err':>4}"
        )
        print(header)
        summary = []
        for tokens in map(int, args.tokens.split(",")):
            for conc in map(int, args.concurrency.split(",")):
                results: dict[str, Result] = {}
                for name, stubs in targets.items():
                    await drive(stubs, tokens, conc, min(0.5, args.seconds), 2_000)  # warm-up
                    r = await drive(stubs, tokens, conc, args.seconds, args.max_requests)
                    results[name] = r
                    print(
                        f"{tokens:>6} {conc:>4} {name:>6} {r.rps:>8.0f} {r.cps:>9.0f} "
                        f"{pct(r.latencies, 0.5):>7.2f} {pct(r.latencies, 0.99):>7.2f} "
                        f"{pct(r.ttfc, 0.5):>7.2f} {pct(r.ttfc, 0.99):>7.2f} {r.errors:>4}"
                    )
                q, d, b = results["queen"], results["direct"], results["relay"]
                summary.append(
                    f"{tokens:>6} {conc:>4}   queen/direct {q.rps / d.rps:5.2f}x req/s   "
                    f"queen/relay {q.rps / b.rps:5.2f}x req/s   "
                    f"ttfc p50 {pct(q.ttfc, 0.5) - pct(d.ttfc, 0.5):+.2f} ms vs direct, "
                    f"{pct(q.ttfc, 0.5) - pct(b.ttfc, 0.5):+.2f} ms vs relay"
                )
        print("\n# ratios (a = queen, b = direct, c = bare relay)")
        print("\n".join(summary))
    finally:
        await cluster.close()


if __name__ == "__main__":
    asyncio.run(main())
