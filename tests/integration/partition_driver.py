"""Runs inside the client host's network namespace: streams through two queens while the first
queen's host is cut off from the network, and reports what the client library saw.

Started by test_multihost.py with `ip netns exec`; prints one JSON object for the test to judge.
The load is closed-loop client-library streams given both queens, bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from apiary.client import AsyncClient
from apiary.protoutil import READY_STATES
from harness.echo import echo_text
from harness.wait import wait_until
from protos.v1 import worker_pb2, worker_pb2_grpc

PROMPT = "one two three"
TOKENS = 20
STREAMS = 16


async def ready_workers(queen: str) -> int:
    """Ready workers one queen sees (0 while it cannot be asked)."""
    one = AsyncClient(queen, timeout=2, wait_for_ready=False)
    try:
        listed = await one.admin.list_workers()
        return sum(1 for w in listed if w.state in READY_STATES)
    except grpc.aio.AioRpcError:
        return 0
    finally:
        await one.close()


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--queens", required=True, help="A,B: the first one's host is cut")
    p.add_argument("--switch", required=True)
    p.add_argument("--veth", required=True, help="the switch port of the first queen's host")
    p.add_argument("--seconds", type=float, default=14.0)
    args = p.parse_args()
    queens = args.queens.split(",")
    client = AsyncClient(args.queens, timeout=30)
    for queen in queens:
        await wait_until(functools.partial(_all_ready, queen), 30)
    tally: Counter[str] = Counter()
    expected = echo_text(PROMPT, TOKENS)
    # Until --seconds after the cut (set then); bounded before it by the waits' deadlines.
    stop_at = [time.monotonic() + 60]

    async def stream_loop() -> None:
        while time.monotonic() < stop_at[0] and tally["accepted"] < 5000:
            tally["accepted"] += 1
            text = ""
            try:
                async for chunk in client.infer("demo", PROMPT, max_tokens=TOKENS):
                    text += chunk.text
            except grpc.aio.AioRpcError as exc:
                tally[f"failed {exc.code().name}: {exc.details()}"] += 1
                continue
            tally["completed" if text == expected else f"wrong text: {text!r}"] += 1

    load = [asyncio.create_task(stream_loop()) for _ in range(STREAMS)]
    await wait_until(lambda: tally["completed"] >= STREAMS, 15)  # the load flows before the cut
    # One long stream (30 s of tokens) relayed by the queen about to be lost, from a client of
    # that queen alone: once the queen is gone its worker should stop making tokens nobody
    # will read and give the slot back, without waiting for the stream's end.
    # Its deadline is well past the stream's end: the worker must not stop it for that reason.
    lost_only = AsyncClient(queens[0], timeout=120, wait_for_ready=False)
    long_stream = asyncio.create_task(_drain(lost_only.infer("long", PROMPT, max_tokens=600)))
    long_model = AsyncClient(queens[1], timeout=2, wait_for_ready=False)
    await wait_until(lambda: _long_slot(long_model, taken=True), 10)
    subprocess.run(["ip", "-n", args.switch, "link", "set", args.veth, "down"], check=True)
    cut_at = time.monotonic()
    stop_at[0] = cut_at + args.seconds
    completed_at_cut = tally["completed"]
    out: dict[str, Any] = {}
    # Every stream the lost queen was relaying resumes on the other one.
    await wait_until(lambda: client.resumes >= STREAMS, args.seconds)
    out["all_resumed_after"] = round(time.monotonic() - cut_at, 2)
    await wait_until(lambda: _long_slot(long_model, taken=False), args.seconds)
    out["long_stream_slot_freed_after"] = round(time.monotonic() - cut_at, 2)
    long_stream.cancel()
    await asyncio.gather(long_stream, return_exceptions=True)
    await asyncio.gather(*load)
    await asyncio.gather(lost_only.close(), long_model.close())
    out.update(tally)
    out["completed_after_cut"] = tally["completed"] - completed_at_cut
    out["seconds_after_cut"] = round(time.monotonic() - cut_at, 2)
    out["resumed"] = client.resumes
    await client.close()
    print(json.dumps(out))


async def _drain(chunks: AsyncIterator[Any]) -> None:
    async for _ in chunks:
        pass


async def _long_slot(client: AsyncClient, taken: bool) -> bool:
    """Whether the one-slot `long` worker has its slot taken (or free again), asked of the
    worker itself: each queen's view counts only its own streams."""
    try:
        (worker,) = await client.admin.list_workers(model="long")
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            status = await stub.GetStatus(worker_pb2.GetStatusRequest(), timeout=2)
    except (grpc.aio.AioRpcError, ValueError):
        return False
    return (status.worker.slots_available == 0) is taken


async def _all_ready(queen: str) -> bool:
    return await ready_workers(queen) == 5


if __name__ == "__main__":
    asyncio.run(main())
