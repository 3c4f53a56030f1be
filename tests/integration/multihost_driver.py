"""Runs inside the client host's network namespace and drives a multi-host scenario.

Started by test_multihost.py with `ip netns exec`; prints one JSON object with what it
observed, for the test to judge. It talks to the cluster only over the namespaces'
network, with TLS and tokens, as a client on another machine would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from apiary.protoutil import READY_STATES
from apiary.security import Security, TlsFiles
from harness.wait import stays_true, wait_until
from protos.v1 import common_pb2, queen_pb2, queen_pb2_grpc


async def took(predicate: Any, timeout: float) -> float:
    """Seconds until `predicate` held (polled every 50 ms)."""
    start = time.monotonic()
    await wait_until(predicate, timeout, interval=0.05)
    return time.monotonic() - start


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--queen", required=True)
    p.add_argument("--tokens", required=True)
    p.add_argument("--certs", required=True)
    p.add_argument("--switch", required=True)
    p.add_argument("--veth", required=True, help="the switch port of the hive to cut off")
    p.add_argument("--cut-hive", required=True)
    args = p.parse_args()
    tokens = json.loads(Path(args.tokens).read_text())
    certs = Path(args.certs)
    tls = TlsFiles(
        cert=str(certs / "client.pem"), key=str(certs / "client.key"), ca=str(certs / "ca.pem")
    )
    security = Security(tls=tls)
    admin = queen_pb2_grpc.QueenAdminStub(security.aio_channel(args.queen, tokens["admin"]))
    client = queen_pb2_grpc.QueenStub(security.aio_channel(args.queen, tokens["clients"]["client"]))
    out: dict[str, Any] = {}

    async def ready_workers() -> list[common_pb2.WorkerRecord]:
        listed = (await admin.ListWorkers(queen_pb2.ListWorkersRequest(), timeout=2)).workers
        healthy = common_pb2.HIVE_HEALTH_HEALTHY
        return [w for w in listed if w.state in READY_STATES and w.hive_health == healthy]

    async def all_ready() -> bool:
        return len(await ready_workers()) == 4

    out["cluster_ready_after"] = await took(all_ready, 30)
    before = {w.id: w.hive_id for w in await ready_workers()}

    async def infer(i: int) -> common_pb2.InferChunk:
        request = common_pb2.InferRequest(model="demo", prompt=f"request {i}", max_tokens=4)
        chunks = [c async for c in client.Infer(request, timeout=30)]
        return chunks[0]

    firsts = await asyncio.gather(*(infer(i) for i in range(24)))
    out["served_hives"] = sorted({before[c.worker_id] for c in firsts})

    # Strangers and the wrong role are refused across the network too.
    def code(exc: BaseException | None) -> str:
        return exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else "OK"

    stranger = queen_pb2_grpc.QueenStub(security.aio_channel(args.queen, "not-a-token"))
    try:
        await stranger.ListModels(queen_pb2.ListModelsRequest(), timeout=5)
        out["wrong_token"] = "OK"
    except grpc.aio.AioRpcError as exc:
        out["wrong_token"] = code(exc)
    as_client = security.aio_channel(args.queen, tokens["clients"]["client"])
    client_admin = queen_pb2_grpc.QueenAdminStub(as_client)
    try:
        await client_admin.ListHives(queen_pb2.ListHivesRequest(), timeout=5)
        out["client_on_admin"] = "OK"
    except grpc.aio.AioRpcError as exc:
        out["client_on_admin"] = code(exc)

    # Load through the partition: bounded in count and time.
    results: list[str] = []
    stop_at = time.monotonic() + 12

    async def load(worker: int) -> None:
        i = 0
        while time.monotonic() < stop_at and len(results) < 2000:
            try:
                await infer(worker * 10_000 + i)
                results.append("OK")
            except grpc.aio.AioRpcError as exc:
                results.append(f"{exc.code().name}: {exc.details()}")
            i += 1

    loaders = [asyncio.create_task(load(k)) for k in range(4)]
    await wait_until(lambda: len(results) >= 8, 10)  # the load is flowing before the cut
    subprocess.run(["ip", "-n", args.switch, "link", "set", args.veth, "down"], check=True)

    async def cut_off() -> bool:
        hive = (
            await admin.GetHive(queen_pb2.GetHiveRequest(hive_id=args.cut_hive), timeout=2)
        ).hive
        return hive.health == common_pb2.HIVE_HEALTH_UNHEALTHY

    out["cut_to_unhealthy"] = await took(cut_off, 10)
    routable = await ready_workers()
    out["routable_hives_while_cut"] = sorted({w.hive_id for w in routable})

    async def cut_hive_stays_out() -> bool:
        return args.cut_hive not in {w.hive_id for w in await ready_workers()}

    # The load runs on through the partition for a while; the cut hive never comes back.
    await stays_true(cut_hive_stays_out, 2.0)
    subprocess.run(["ip", "-n", args.switch, "link", "set", args.veth, "up"], check=True)
    out["restore_to_routable"] = await took(all_ready, 20)
    after = {w.id: w.hive_id for w in await ready_workers()}
    out["same_worker_ids"] = after == before
    await asyncio.gather(*loaders)
    out["requests"] = len(results)
    out["failures"] = [r for r in results if r != "OK"]
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
