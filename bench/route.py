"""Routing overhead: through the queen vs straight to a worker vs a bare grpc.aio relay.

Starts a real cluster (queen, hive, echo workers; echo is for benchmarks only) and bare relay
processes, then drives each target in turns within one run, and prints the queen's cost as
ratios against the baselines measured here and now. Two modes:

- unpaced: echo workers with zero token delay, closed-loop clients at each concurrency and
  stream length: requests/s, chunks (messages) and tokens per second, latency and time to
  first chunk, queen vs direct and vs relay.
- paced: echo workers that make 50 tokens/s per stream (token_delay 0.02, on a schedule),
  like a real model; 64 to 512 concurrent 50-token streams. Token k of a stream is due
  (k + 1) x 20 ms after the client sent the request and on time if it arrives at most
  LATE_S after that. Prints, for each target at each level, the tokens/s delivered, those
  delivered on time, messages/s and tokens per message, and each target's knee: the most
  tokens/s it delivered on time at any level.
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

from harness import Cluster, Proc
from protos.v1 import common_pb2, queen_pb2_grpc, worker_pb2_grpc

PACE_S = 0.02  # seconds per token: 50 tokens/s per stream
PACED_TOKENS = 50
LATE_S = 0.1  # a paced stream ending this much behind its pace is late
LEVELS = (64, 128, 192, 256, 384, 512)


@dataclass
class Result:
    requests: int = 0
    chunks: int = 0
    tokens: int = 0
    errors: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    ttfc: list[float] = field(default_factory=list)
    late: list[float] = field(default_factory=list)  # paced: each token's delay past its due
    on_time: int = 0  # paced: tokens that came at most LATE_S past due

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed if self.elapsed else 0.0

    @property
    def cps(self) -> float:
        return self.chunks / self.elapsed if self.elapsed else 0.0

    @property
    def tps(self) -> float:
        return self.tokens / self.elapsed if self.elapsed else 0.0

    @property
    def on_time_tps(self) -> float:
        return self.on_time / self.elapsed if self.elapsed else 0.0

    def arrived(self, sent: float, before: int, count: int, pace: float) -> None:
        """`count` tokens after `before` others of a stream sent at `sent`: token k is due at
        sent + (k + 1) x pace, as the worker makes them (queueing and routing count as late)."""
        now = time.perf_counter()
        for k in range(before, before + count):
            late = now - sent - (k + 1) * pace
            self.late.append(late)
            self.on_time += late <= LATE_S


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)] * 1000


async def drive(
    stubs: list[Any],
    model: str,
    tokens: int,
    concurrency: int,
    seconds: float,
    cap: int,
    pace: float = 0.0,
) -> Result:
    """`concurrency` closed-loop clients for `seconds` (and at most `cap` requests in all);
    `pace`: the seconds per token the worker keeps, to judge each token's lateness."""
    result = Result()
    request = common_pb2.InferRequest(model=model, prompt="the quick brown fox", max_tokens=tokens)
    rotation = itertools.cycle(stubs)
    start = time.perf_counter()
    stop_at = start + seconds

    async def client() -> None:
        while time.perf_counter() < stop_at and result.requests + result.errors < cap:
            stub = next(rotation)
            t0 = time.perf_counter()
            first = 0.0
            n = got = 0
            try:
                async for chunk in stub.Infer(request, timeout=60):
                    if n == 0:
                        first = time.perf_counter() - t0
                    n += 1
                    if pace:
                        result.arrived(t0, got, len(chunk.token_ids), pace)
                    got += len(chunk.token_ids)
            except grpc.aio.AioRpcError:
                result.errors += 1
                continue
            result.latencies.append(time.perf_counter() - t0)
            result.ttfc.append(first)
            result.requests += 1
            result.chunks += n
            result.tokens += got

    await asyncio.gather(*(client() for _ in range(concurrency)))
    result.elapsed = time.perf_counter() - start
    return result


def target(ratio: float) -> str:
    """The issue's target for unpaced 100-token streams at c=64."""
    return f"   {'ok' if ratio >= 0.7 else 'BELOW'} (>= 0.7x direct)"


async def unpaced(targets: dict[str, list[Any]], args: argparse.Namespace) -> list[str]:
    header = (
        f"{'tokens':>6} {'conc':>4} {'target':>6} {'req/s':>8} {'chunks/s':>9} {'tokens/s':>9} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'ttfc50':>7} {'ttfc99':>7} {'err':>4}"
    )
    print(header)
    summary = []
    for tokens in map(int, args.tokens.split(",")):
        for conc in map(int, args.concurrency.split(",")):
            results: dict[str, Result] = {}
            for name, stubs in targets.items():
                await drive(stubs, "bench", tokens, conc, min(0.5, args.seconds), 2_000)  # warm-up
                r = await drive(stubs, "bench", tokens, conc, args.seconds, args.max_requests)
                results[name] = r
                print(
                    f"{tokens:>6} {conc:>4} {name:>6} {r.rps:>8.0f} {r.cps:>9.0f} {r.tps:>9.0f} "
                    f"{pct(r.latencies, 0.5):>7.2f} {pct(r.latencies, 0.99):>7.2f} "
                    f"{pct(r.ttfc, 0.5):>7.2f} {pct(r.ttfc, 0.99):>7.2f} {r.errors:>4}"
                )
            q, d, b = results["queen"], results["direct"], results["relay"]
            summary.append(
                f"{tokens:>6} {conc:>4}   queen/direct {q.rps / d.rps:5.2f}x req/s   "
                f"queen/relay {q.rps / b.rps:5.2f}x req/s   "
                f"ttfc p50 {pct(q.ttfc, 0.5) - pct(d.ttfc, 0.5):+.2f} ms vs direct, "
                f"{pct(q.ttfc, 0.5) - pct(b.ttfc, 0.5):+.2f} ms vs relay"
                + (target(q.rps / d.rps) if (tokens, conc) == (100, 64) else "")
            )
    return summary


async def paced(targets: dict[str, list[Any]], args: argparse.Namespace) -> list[str]:
    """Each target at each level in turn (warm-up, then a measured window); the knee of a
    target is the most tokens/s it delivered on time at any level."""
    print(f"{'conc':>5} {'target':>6} {'tokens/s':>9} {'on time':>8} {'msgs/s':>8} "
          f"{'tok/msg':>7} {'late50':>7} {'late95':>7} {'late99':>7} {'err':>4}")  # fmt: skip
    knees = {name: 0.0 for name in targets}
    for conc in LEVELS:
        for name, stubs in targets.items():
            await drive(stubs, "paced", PACED_TOKENS, conc, 1.0, 20_000, PACE_S)  # warm-up
            r = await drive(
                stubs, "paced", PACED_TOKENS, conc, args.seconds, args.max_requests, PACE_S
            )
            knees[name] = max(knees[name], r.on_time_tps)
            print(
                f"{conc:>5} {name:>6} {r.tps:>9.0f} {r.on_time_tps:>8.0f} {r.cps:>8.0f} "
                f"{r.tokens / max(r.chunks, 1):>7.2f} {pct(r.late, 0.5):>7.1f} "
                f"{pct(r.late, 0.95):>7.1f} {pct(r.late, 0.99):>7.1f} {r.errors:>4}",
                flush=True,
            )
    ratio = knees["queen"] / knees["relay"] if knees["relay"] else float("nan")
    verdict = "ok" if ratio >= 1.5 else "BELOW 1.5x"
    return [
        f"paced knee (most tokens/s delivered on time, any level): queen {knees['queen']:.0f}, "
        f"relay {knees['relay']:.0f}, queen/relay {ratio:.2f}x {verdict}"
    ]


async def start(args: argparse.Namespace) -> tuple[Cluster, dict[str, dict[str, list[Any]]]]:
    """The cluster, relays and stubs: targets by mode."""
    cluster = Cluster(heartbeat_interval=1.0)
    # No per-client limits: one client process stands for every stream here.
    queen = cluster.start_queen(0, "--max-streams-per-client", "0", "--max-queued-per-client", "0")
    specs = [f"model=bench,backend=echo,count={args.workers},slots=256"]
    specs.append(f"model=paced,backend=echo,count={args.workers},slots=256,token_delay={PACE_S}")
    cluster.start_hive(queen, "bench", *specs)
    modes: dict[str, dict[str, list[Any]]] = {}
    for model in ("bench", "paced"):
        workers = await cluster.wait_workers(queen, model, args.workers)
        # A process of the cluster's: started the same way, stopped with the rest.
        relay: Proc = cluster.start(
            f"relay-{model}", ["bench.relay", "--workers", ",".join(w.address for w in workers)]
        )
        modes[model] = {
            "queen": [queen_pb2_grpc.QueenStub(cluster.channel(queen.address))],
            "direct": [worker_pb2_grpc.WorkerStub(cluster.channel(w.address)) for w in workers],
            "relay": [queen_pb2_grpc.QueenStub(cluster.channel(relay.address))],
        }
    del modes["paced"]["direct"]  # paced: the queen against the relay
    return cluster, modes


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mode", choices=["unpaced", "paced", "both"], default="both")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    p.add_argument("--max-requests", type=int, default=50_000, help="per measurement")
    p.add_argument("--concurrency", default="1,64")
    p.add_argument("--tokens", default="8,100")
    args = p.parse_args()
    cluster, modes = await start(args)
    summary: list[str] = []
    try:
        print(
            f"# bench/route.py: {args.workers} echo workers per model, {args.seconds:g}s per "
            f"cell, python {sys.version.split()[0]}, grpcio {grpc.__version__}"
        )
        if args.mode in ("unpaced", "both"):
            print("\n## unpaced (token delay 0)")
            summary += await unpaced(modes["bench"], args)
        if args.mode in ("paced", "both"):
            print(
                f"\n## paced: {PACED_TOKENS}-token streams at 50 tokens/s each; a token more than "
                f"{LATE_S * 1000:.0f} ms past its due is late (late50/95/99: ms past due)"
            )
            summary += await paced(modes["paced"], args)
    finally:
        await cluster.close()
    print("\n# ratios (queen vs direct and vs a bare relay, measured in this run)")
    print("\n".join(summary))


if __name__ == "__main__":
    asyncio.run(main())
