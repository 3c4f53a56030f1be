"""Tokens per role, TLS and mTLS, safe defaults and limits, against real processes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apiary.security import TlsFiles, derive_queen_token
from cli.certs import init as certs_init
from harness import ROOT, Cluster, wait_until
from protos.v1 import (
    common_pb2,
    hive_pb2,
    hive_pb2_grpc,
    queen_pb2,
    queen_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from tests.streams import tokens_in


def infer(**kw: Any) -> common_pb2.InferRequest:
    fields: dict[str, Any] = {"model": "demo", "prompt": "a b", "max_tokens": 3, **kw}
    return common_pb2.InferRequest(**fields)


async def collect(stub: Any, request: common_pb2.InferRequest, timeout: float = 20) -> list[Any]:
    return [c async for c in stub.Infer(request, timeout=timeout)]


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    certs_init(
        tmp_path / "certs",
        [("queen", ["127.0.0.1"]), ("h1", ["127.0.0.1"]), ("impostor", ["127.0.0.1"])],
    )
    return tmp_path / "certs"


def tokens_of(certs: Path) -> dict[str, str]:
    """Every credential by role: admin, client, h1 (a hive), queen (toward h1)."""
    data = json.loads((certs / "tokens.json").read_text())
    h1 = data["hives"]["h1"]
    return {
        "admin": data["admin"],
        "client": data["clients"]["client"],
        "h1": h1,
        "impostor": data["hives"]["impostor"],
        "queen": derive_queen_token(h1),
    }


async def code_of(call: Any) -> grpc.StatusCode | None:
    try:
        result = call
        if hasattr(result, "__aiter__"):
            async for _ in result:
                pass
        else:
            await result
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return None


async def test_each_role_may_call_only_its_own_methods(cluster: Cluster, certs: Path) -> None:
    tokens = tokens_of(certs)
    cluster.server_args = ["--tokens-file", str(certs / "tokens.json")]
    cluster.token = tokens["admin"]
    queen = cluster.start_queen()
    hive = cluster.start_hive(queen, "h1", "model=demo,count=2")
    (worker, _) = await cluster.wait_workers(queen, "demo", 2)

    def stubs(token: str) -> tuple[Any, Any, Any, Any, Any]:
        q = cluster.channel(queen.address, token)
        return (
            queen_pb2_grpc.QueenStub(q),
            queen_pb2_grpc.QueenAdminStub(q),
            queen_pb2_grpc.QueenRegistryStub(q),
            hive_pb2_grpc.HiveStub(cluster.channel(hive.address, token)),
            worker_pb2_grpc.WorkerStub(cluster.channel(worker.address, token)),
        )

    U, P = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED
    for token, expected in [
        ("", U),
        ("not-a-token", U),
    ]:
        client, admin, registry, hive_stub, worker_stub = stubs(token)
        assert await code_of(client.Infer(infer())) == expected
        assert await code_of(admin.ListHives(queen_pb2.ListHivesRequest())) == expected
        assert (
            await code_of(registry.Heartbeat(queen_pb2.HiveHeartbeat(hive_id="x", address="y:1")))
            == expected
        )
        assert await code_of(hive_stub.ListWorkers(hive_pb2.ListHiveWorkersRequest())) == expected
        assert await code_of(worker_stub.GetStatus(worker_pb2.GetStatusRequest())) == expected
        assert await code_of(worker_stub.Infer(infer())) == expected

    client, admin, registry, hive_stub, worker_stub = stubs(tokens["client"])
    assert tokens_in(await collect(client, infer())) == 3
    assert await code_of(client.ListModels(queen_pb2.ListModelsRequest())) is None
    assert await code_of(admin.ListHives(queen_pb2.ListHivesRequest())) == P
    assert (
        await code_of(registry.Heartbeat(queen_pb2.HiveHeartbeat(hive_id="x", address="y:1"))) == P
    )
    assert await code_of(hive_stub.ListWorkers(hive_pb2.ListHiveWorkersRequest())) == U
    # A worker knows only the worker token: a client reaches it with a lease, or not at all.
    assert await code_of(worker_stub.Infer(infer())) == U
    lease = await client.Lease(queen_pb2.LeaseRequest(model="demo"))
    direct = worker_pb2_grpc.WorkerStub(cluster.channel(lease.address, tokens["client"]))
    assert tokens_in(await collect(direct, infer(lease_id=lease.lease_id))) == 3

    # The admin token is for the queen only: a hive does not take it (the queen forwards).
    client, admin, registry, hive_stub, worker_stub = stubs(tokens["admin"])
    assert tokens_in(await collect(client, infer())) == 3
    assert await code_of(admin.ListHives(queen_pb2.ListHivesRequest())) is None
    assert await code_of(admin.ListProcesses(queen_pb2.HiveRequest(hive_id="h1"))) is None
    assert await code_of(hive_stub.ListWorkers(hive_pb2.ListHiveWorkersRequest())) == U
    assert (
        await code_of(registry.Heartbeat(queen_pb2.HiveHeartbeat(hive_id="x", address="y:1"))) == P
    )

    client, admin, registry, hive_stub, worker_stub = stubs(tokens["h1"])
    assert await code_of(client.Infer(infer())) == P
    assert await code_of(admin.ListHives(queen_pb2.ListHivesRequest())) == P
    assert await code_of(hive_stub.ListWorkers(hive_pb2.ListHiveWorkersRequest())) == P
    # The queen's credential toward h1 opens h1, and nothing at the queen.
    client, admin, registry, hive_stub, worker_stub = stubs(tokens["queen"])
    assert await code_of(hive_stub.ListWorkers(hive_pb2.ListHiveWorkersRequest())) is None
    assert await code_of(admin.ListHives(queen_pb2.ListHivesRequest())) == U

    # Health checks need no token (load balancers and probes).
    health = health_pb2_grpc.HealthStub(cluster.channel(queen.address, ""))
    assert (await health.Check(health_pb2.HealthCheckRequest())).status == 1
    # The cluster itself works with tokens: heartbeats, worker callbacks, routing.
    listed = await cluster.admin_stub(queen).ListWorkers(queen_pb2.ListWorkersRequest())
    assert len(listed.workers) == 2
    # No process ever logged a token.
    for proc in cluster.procs:
        log = proc.log()
        for value in tokens.values():
            assert value not in log, f"{proc.name} logged a token"
    for path in (cluster.tmp / "state-h1" / "logs").glob("*.log"):
        text = path.read_text()
        assert all(value not in text for value in tokens.values())


async def test_a_lease_is_a_one_call_credential_for_its_worker_only(
    cluster: Cluster, certs: Path
) -> None:
    """The worker checks a lease by itself: forged, another worker's, reused and expired
    leases are refused (UNAUTHENTICATED: with tokens a lease is a credential)."""
    tokens = tokens_of(certs)
    cluster.server_args = ["--tokens-file", str(certs / "tokens.json")]
    cluster.token = tokens["admin"]
    queen = cluster.start_queen()
    cluster.start_hive(queen, "h1", "model=demo,count=2")
    workers = await cluster.wait_workers(queen, "demo", 2)
    client = queen_pb2_grpc.QueenStub(cluster.channel(queen.address, tokens["client"]))

    def direct(address: str) -> Any:
        return worker_pb2_grpc.WorkerStub(cluster.channel(address, tokens["client"]))

    async def refused(address: str, lease_id: str) -> grpc.StatusCode | None:
        return await code_of(direct(address).Infer(infer(lease_id=lease_id)))

    lease = await client.Lease(queen_pb2.LeaseRequest(model="demo"))
    other = next(w.address for w in workers if w.address != lease.address)
    body, _, signature = lease.lease_id.rpartition(".")
    lease_id, _, expires = body.partition(".")
    forged = [
        f"{lease_id}.{int(expires) + 3_600_000}.{signature}",  # a later expiry
        f"l-{'A' * 22}.{expires}.{signature}",  # another lease's id
        f"{body}.{'A' * len(signature)}",  # a made-up signature
        "l-nothing",
    ]
    U = grpc.StatusCode.UNAUTHENTICATED
    for token in forged:
        assert await refused(lease.address, token) == U, token
    assert await refused(other, lease.lease_id) == U  # signed for its own worker only
    chunks = await collect(direct(lease.address), infer(lease_id=lease.lease_id))
    assert tokens_in(chunks) == 3
    assert await refused(lease.address, lease.lease_id) == U  # replayed

    short = await client.Lease(queen_pb2.LeaseRequest(model="demo", ttl_seconds=0.2))
    admin = cluster.admin_stub(queen)

    async def slot_back() -> bool:
        listed = await admin.ListWorkers(queen_pb2.ListWorkersRequest())
        return all(w.state == common_pb2.WORKER_STATE_IDLE for w in listed.workers)

    await wait_until(slot_back)  # the queen takes the slot back after the lease's end
    assert await refused(short.address, short.lease_id) == U  # expired


async def test_tls_and_mutual_tls(cluster: Cluster, certs: Path) -> None:
    tokens = tokens_of(certs)
    cluster.server_args = [
        "--tokens-file",
        str(certs / "tokens.json"),
        "--tls-ca",
        str(certs / "ca.pem"),
        "--tls-client-ca",
        str(certs / "ca.pem"),
    ]
    queen = cluster.start_queen(
        0,
        "--tls-cert",
        str(certs / "queen.pem"),
        "--tls-key",
        str(certs / "queen.key"),
        "--hive-identity-from-cert",
    )
    cluster.start_hive(
        queen,
        "h1",  # the name in h1.pem: the queen checks it (--hive-identity-from-cert)
        "model=demo",
        extra=("--tls-cert", str(certs / "h1.pem"), "--tls-key", str(certs / "h1.key")),
    )
    # A hive with its own valid token but h1's certificate is refused: its id must be a name
    # in its certificate.
    impostor = cluster.start_hive(
        queen,
        "impostor",
        extra=("--tls-cert", str(certs / "h1.pem"), "--tls-key", str(certs / "h1.key")),
    )
    cluster.token = tokens["admin"]
    cluster.tls = TlsFiles(
        cert=str(certs / "client.pem"), key=str(certs / "client.key"), ca=str(certs / "ca.pem")
    )
    await cluster.wait_workers(queen, "demo", 1, timeout=20)
    assert tokens_in(await collect(cluster.queen_stub(queen), infer())) == 3
    # The impostor has been told no (its heartbeat failed) and is still not in the registry.
    await wait_until(lambda: "PERMISSION_DENIED" in impostor.log())
    hives = (await cluster.admin_stub(queen).ListHives(queen_pb2.ListHivesRequest())).hives
    assert [h.id for h in hives] == ["h1"]
    assert "is not a name in this hive's client certificate" in impostor.log()

    # Without a client certificate the handshake fails (mTLS).
    cluster.tls = TlsFiles(ca=str(certs / "ca.pem"))
    assert await code_of(
        cluster.queen_stub(queen).ListModels(queen_pb2.ListModelsRequest(), timeout=3)
    ) == (grpc.StatusCode.UNAVAILABLE)
    # Plain text to a TLS server does not get through either.
    cluster.tls = TlsFiles()
    assert await code_of(
        cluster.queen_stub(queen).ListModels(queen_pb2.ListModelsRequest(), timeout=3)
    ) == (grpc.StatusCode.UNAVAILABLE)

    # The CLI with TLS and a client token.
    env_cli = {
        "APIARY_TLS_CA": str(certs / "ca.pem"),
        "APIARY_TLS_CERT": str(certs / "client.pem"),
        "APIARY_TLS_KEY": str(certs / "client.key"),
        "APIARY_TOKEN": tokens["client"],
    }
    import os

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "infer",
            "demo",
            "x y",
            "--max-tokens",
            "2",
            "--queen",
            queen.address,
        ],
        env={**os.environ, **env_cli, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0 and out.stdout == "x y\n", out.stderr
    denied = subprocess.run(
        [sys.executable, "-m", "cli", "status", "--queen", queen.address],
        env={**os.environ, **env_cli, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr


def test_servers_refuse_to_listen_beyond_loopback_without_tokens(tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(ROOT), "APIARY_LOG_FORMAT": "json", "PATH": "/usr/bin:/bin"}
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "queen",
            "--listen",
            "0.0.0.0:0",
            "--state-dir",
            str(tmp_path / "q"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 1
    assert "refusing to listen on 0.0.0.0:0 (--listen) without tokens" in refused.stderr
    assert "--tokens-file" in refused.stderr
    hive = subprocess.run(
        [sys.executable, "-m", "hive", "--listen", "0.0.0.0:0", "--state-dir", str(tmp_path / "h")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert hive.returncode == 1 and "refusing to listen" in hive.stderr
    workers = subprocess.run(
        [sys.executable, "-m", "hive", "--worker-host", "0.0.0.0", "--state-dir",
         str(tmp_path / "w")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )  # fmt: skip
    assert workers.returncode == 1
    assert "refusing to listen on 0.0.0.0:0 (--worker-host) without tokens" in workers.stderr


async def test_insecure_flag_overrides_loudly(cluster: Cluster) -> None:
    queen = cluster.start(
        "queen",
        ["queen", "--listen", "0.0.0.0:0", "--insecure", "--state-dir", str(cluster.tmp / "q")],
    )
    assert "INSECURE" in queen.log()


async def test_limits_per_client_and_per_request(cluster: Cluster, certs: Path) -> None:
    tokens = tokens_of(certs)
    cluster.server_args = ["--tokens-file", str(certs / "tokens.json")]
    cluster.token = tokens["admin"]
    queen = cluster.start_queen(0, "--max-streams-per-client", "2", "--max-prompt-bytes", "1000")
    cluster.start_hive(queen, "h1", "model=demo,count=4,token_delay=0.05")
    await cluster.wait_workers(queen, "demo", 4)
    client = queen_pb2_grpc.QueenStub(cluster.channel(queen.address, tokens["client"]))
    other = queen_pb2_grpc.QueenStub(cluster.channel(queen.address, tokens["admin"]))  # "admin"
    holding = [asyncio.create_task(collect(client, infer(max_tokens=30))) for _ in range(2)]

    async def both_streaming() -> bool:
        return (await other.ListModels(queen_pb2.ListModelsRequest())).models[0].busy == 2

    await wait_until(both_streaming)
    assert await code_of(client.Infer(infer())) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert tokens_in(await collect(other, infer())) == 3  # the limit is per token
    await asyncio.gather(*holding)
    assert tokens_in(await collect(client, infer())) == 3
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(client, infer(prompt="x" * 1001))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 1000" in (
        err.value.details() or ""
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(client, infer(prompt="x" * (2 << 20)))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # over the message size limit
