"""Direct leases: Queen.Lease + ReleaseLease against a bare grpc.aio server of the same two
calls, in turns, in one run.

A real queen and hive with 8 echo workers of 64 slots (as in FastChat's side by side,
/work/shared/peers/fastchat/lease_side_by_side.py, which compares with FastChat's controller),
and bench/bare_lease.py, the cheapest Python server of these calls: a counter and a dict. Each
cell is a closed loop of C clients (one channel each) doing Lease then ReleaseLease; rounds
alternate the targets so a busy spell hits both. Prints pairs/s and Lease p50 per target, the
medians, and the queen's ratio to the bare server.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import Cluster
from protos.v1 import queen_pb2, queen_pb2_grpc

CAP = 200_000  # pairs per cell: bounded in count as well as time


@dataclass
class Cell:
    pairs: int = 0
    errors: int = 0
    elapsed: float = 0.0
    lease_ms: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.pairs / self.elapsed if self.elapsed else 0.0

    @property
    def lease_p50(self) -> float:
        return statistics.median(self.lease_ms) if self.lease_ms else float("nan")


async def drive(address: str, concurrency: int, seconds: float) -> Cell:
    cell = Cell()
    stop_at = time.perf_counter() + seconds
    request = queen_pb2.LeaseRequest(model="bench", ttl_seconds=5)

    async def client() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = queen_pb2_grpc.QueenStub(channel)
            while time.perf_counter() < stop_at and cell.pairs < CAP:
                t0 = time.perf_counter()
                try:
                    lease = await stub.Lease(request, timeout=5)
                    t1 = time.perf_counter()
                    release = queen_pb2.ReleaseLeaseRequest(lease_id=lease.lease_id)
                    await stub.ReleaseLease(release, timeout=5)
                except grpc.aio.AioRpcError:
                    cell.errors += 1
                    continue
                cell.lease_ms.append((t1 - t0) * 1000)
                cell.pairs += 1

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    cell.elapsed = time.perf_counter() - start
    return cell


async def measure(
    targets: dict[str, str], args: argparse.Namespace
) -> dict[tuple[str, int], list[Cell]]:
    cells: dict[tuple[str, int], list[Cell]] = {}
    print(f"{'round':>5} {'target':>6} {'conc':>4} {'pairs/s':>8} {'lease p50 ms':>12} {'err':>4}")
    for round_ in range(args.rounds):
        for conc in map(int, args.concurrency.split(",")):
            for name, address in targets.items():
                await drive(address, conc, 0.3)  # warm-up: channels, caches
                cell = await drive(address, conc, args.seconds)
                cells.setdefault((name, conc), []).append(cell)
                print(f"{round_ + 1:>5} {name:>6} {conc:>4} {cell.rate:>8.0f} "
                      f"{cell.lease_p50:>12.2f} {cell.errors:>4}")  # fmt: skip
    return cells


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=4.0, help="per cell")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", default="1,8")
    args = p.parse_args()
    cluster = Cluster(heartbeat_interval=1.0)
    try:
        queen = cluster.start_queen()
        cluster.start_hive(queen, "bench", "model=bench,backend=echo,count=8,slots=64")
        await cluster.wait_workers(queen, "bench", 8)
        bare = cluster.start("bare", ["bench.bare_lease"])
        print(
            f"# bench/lease.py: Lease + ReleaseLease, {args.seconds:g}s per cell, {args.rounds} "
            f"rounds, python {sys.version.split()[0]}, grpcio {grpc.__version__}"
        )
        cells = await measure({"bare": bare.address, "queen": queen.address}, args)
    finally:
        await cluster.close()
    print("# medians; ratio = queen / bare grpc.aio server of the same two calls")
    for conc in map(int, args.concurrency.split(",")):
        rates = {
            name: statistics.median(c.rate for c in cells[(name, conc)])
            for name in ("bare", "queen")
        }
        p50 = {
            name: statistics.median(c.lease_p50 for c in cells[(name, conc)])
            for name in ("bare", "queen")
        }
        print(f"c={conc}: queen {rates['queen']:.0f} pairs/s (Lease p50 {p50['queen']:.2f} ms), "
              f"bare {rates['bare']:.0f} pairs/s (Lease p50 {p50['bare']:.2f} ms), "
              f"ratio {rates['queen'] / rates['bare']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
