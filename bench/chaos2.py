"""Chaos with two active queens: 32 client-library streams while a worker, then a whole hive,
then one queen die — none of them restarted.

Two queens; two hives heartbeating to both, each with 2 echo workers; 32 closed-loop clients of
apiary.client.AsyncClient given both queens, each streaming 20 tokens x 10 ms requests. SIGKILL
one worker, then one hive with its workers (a machine lost), then the queen most streams go
through. A worker's death moves its streams mid-way to another worker
(queen/requests/progress.py); the queen's death makes the clients resume on the other queen
from the token they reached. Every completed text is checked against the uninterrupted echo
text. Target: 0 failed requests and no text with a missing or repeated token. Bounded in time
(--seconds) and count (--max-requests).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from collections import Counter as Tally
from pathlib import Path

import grpc
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apiary.client import AsyncClient
from harness import Cluster, Proc
from harness.echo import echo_text
from protos.v1 import queen_pb2

PROMPT = "one two three"


async def stream_loop(client: AsyncClient, tally: Tally[str], tokens: int, stop_at: float,
                      cap: int) -> None:  # fmt: skip
    expected = echo_text(PROMPT, tokens)
    while time.monotonic() < stop_at and tally["accepted"] < cap:
        tally["accepted"] += 1
        text = ""
        try:
            async for chunk in client.infer("chaos", PROMPT, max_tokens=tokens):
                text += chunk.text
        except grpc.aio.AioRpcError as exc:
            tally["failed"] += 1
            tally[f"error {exc.code().name}: {(exc.details() or '')[:70]}"] += 1
            continue
        tally["completed" if text == expected else "wrong text"] += 1


async def migrations(cluster: Cluster, queens: list[Proc]) -> int:
    total = 0
    for queen in queens:
        if queen.popen.poll() is None:
            admin = cluster.admin_stub(queen)
            listed = await admin.ListRequests(queen_pb2.ListRequestsRequest(limit=10_000))
            total += sum(r.migrations for r in listed.requests)
    return total


async def run(args: argparse.Namespace) -> Tally[str]:
    cluster = Cluster(heartbeat_interval=0.5)
    try:
        queens = [cluster.start_queen(), cluster.start_queen(state="queen-b")]
        both = ",".join(q.address for q in queens)
        spawn = "model=chaos,count=2,slots=8,token_delay=0.01,restart=never"
        hives = [cluster.start_hive(both, f"chaos-h{i}", spawn) for i in (1, 2)]
        for queen in queens:
            await cluster.wait_workers(queen, "chaos", 4)
        workers = await cluster.wait_workers(queens[0], "chaos", 4)
        client = AsyncClient(both, timeout=30)
        tally: Tally[str] = Tally()
        stop_at = time.monotonic() + args.seconds
        load = [
            asyncio.create_task(stream_loop(client, tally, args.tokens, stop_at, args.max_requests))
            for _ in range(args.clients)
        ]
        phase = args.seconds * 0.2
        await asyncio.sleep(phase)  # steady load before each fault
        os.kill(workers[0].pid, signal.SIGKILL)
        await asyncio.sleep(phase)
        lost = psutil.Process(hives[1].pid)
        for proc in [lost, *lost.children()]:
            proc.kill()
        await asyncio.sleep(phase)
        moved = await migrations(cluster, queens)  # the first queen's count, before it goes
        queens[0].signal(signal.SIGKILL)
        await asyncio.gather(*load)
        tally["migrated"] = moved + await migrations(cluster, queens)
        tally["resumed"] = client.resumes
        await client.close()
        return tally
    finally:
        await cluster.close()


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--max-requests", type=int, default=50_000)
    p.add_argument("--tokens", type=int, default=20)
    args = p.parse_args()
    tally = await run(args)
    print(f"# bench/chaos2.py: 2 queens, 2 hives x 2 echo workers, {args.clients} client-library "
          f"streams for {args.seconds:g}s ({args.tokens} tokens x 10 ms); SIGKILL a worker, a "
          "hive with its workers, then a queen (none restarted)")  # fmt: skip
    for key in ("accepted", "completed", "migrated", "resumed", "failed", "wrong text"):
        print(f"{key:<12}{tally[key]}")
    for key, count in sorted(tally.items()):
        if key.startswith("error"):
            print(f"  {count:>5} x {key}")
    ok = tally["failed"] == 0 and tally["wrong text"] == 0
    print(f"target: 0 failed, every text exact: {'met' if ok else 'MISSED'}")


if __name__ == "__main__":
    asyncio.run(main())
