"""The hive's model catalog: pulls from a path, file:// and a local HTTP server (one that
drops the connection halfway), verification, and deletion rules."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from harness import Cluster, wait_until
from harness.gguf import write_tiny_gguf
from protos.v1 import common_pb2, hive_pb2, queen_pb2


class FlakyServer(http.server.ThreadingHTTPServer):
    """Serves one file with Range support; the first `drops` GETs die halfway through."""

    def __init__(self, path: Path, drops: int) -> None:
        self.payload = path.read_bytes()
        self.drops = drops
        self.ranges: list[str] = []
        super().__init__(("127.0.0.1", 0), Handler)


class Handler(http.server.BaseHTTPRequestHandler):
    server: FlakyServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        data = self.server.payload
        start = 0
        header = self.headers.get("Range")
        self.server.ranges.append(header or "")
        if header:
            start = int(header.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("ETag", '"tiny-v1"')  # what a resume names in If-Range
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.server.drops > 0:
            self.server.drops -= 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)  # the network fails mid-transfer
            return
        self.wfile.write(body)


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    return write_tiny_gguf(tmp_path / "tiny.gguf")


@pytest.fixture
def served(gguf: Path) -> Iterator[FlakyServer]:
    server = FlakyServer(gguf, drops=1)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


async def pull(stub: Any, source: str, name: str, sha256: str = "") -> list[hive_pb2.PullProgress]:
    request = hive_pb2.PullModelRequest(source=source, name=name, sha256=sha256)
    return [p async for p in stub.PullModel(request, timeout=60)]


async def test_pull_from_http_resumes_after_a_dropped_connection(
    cluster: Cluster, gguf: Path, served: FlakyServer
) -> None:
    queen = cluster.start_queen()
    hive = cluster.start_hive(queen, "h1")
    stub = cluster.hive_stub(hive)
    url = f"http://127.0.0.1:{served.server_address[1]}/models/tiny.gguf"
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    progress = await pull(stub, url, "tiny", sha256=digest)
    assert served.ranges[0] == "" and served.ranges[1].startswith(
        "bytes="
    )  # resumed, not restarted
    assert int(served.ranges[1].removeprefix("bytes=").rstrip("-")) > 0
    done = progress[-1]
    assert done.stage == "done" and done.bytes_done == gguf.stat().st_size
    model = done.model
    assert (model.name, model.file, model.sha256, model.source) == (
        "tiny",
        "tiny.gguf",
        digest,
        url,
    )
    assert Path(model.path).read_bytes() == gguf.read_bytes()
    listed = (await stub.ListModels(hive_pb2.ListCatalogRequest())).models
    assert [m.name for m in listed] == ["tiny"]
    got = (await stub.GetModel(hive_pb2.GetCatalogModelRequest(name="tiny"))).model
    assert got.size_bytes == gguf.stat().st_size and got.added_at.seconds > 0


async def test_bad_pulls_leave_nothing_in_the_catalog(
    cluster: Cluster, gguf: Path, tmp_path: Path
) -> None:
    queen = cluster.start_queen()
    hive = cluster.start_hive(queen, "h1")
    stub = cluster.hive_stub(hive)
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_bytes(b"hello, not a model")
    cases = [
        (str(gguf), "tiny", "0" * 64, "sha256 mismatch"),
        (str(not_gguf), "notes", "", "is not a GGUF file"),
        (str(tmp_path / "missing.gguf"), "missing", "", "no file at"),
        ("ftp://example/x.gguf", "x", "", "unsupported source"),
        (str(gguf), "bad/name", "", "cannot contain '/'"),
        ("http://127.0.0.1:1/tiny.gguf", "down", "", "failed after 4 attempts"),
    ]
    for source, name, sha256, message in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pull(stub, source, name, sha256)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, source
        assert message in (err.value.details() or ""), err.value.details()
    assert list((await stub.ListModels(hive_pb2.ListCatalogRequest())).models) == []
    await pull(stub, f"file://{gguf}", "tiny")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await pull(stub, str(gguf), "tiny")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetModel(hive_pb2.GetCatalogModelRequest(name="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "models: tiny" in (
        err.value.details() or ""
    )


async def test_delete_is_refused_while_a_worker_uses_the_model(
    cluster: Cluster, real_model: Path
) -> None:
    pytest.importorskip("xllamacpp", reason="the llamacpp extra is not installed")
    queen = cluster.start_queen()
    hive = cluster.start_hive(queen, "h1")
    stub = cluster.hive_stub(hive)
    await pull(stub, str(real_model), "tiny")
    spawned = await stub.SpawnWorker(
        hive_pb2.SpawnWorkerRequest(model="tiny", backend="llamacpp", wait_ready=True), timeout=60
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.DeleteModel(hive_pb2.DeleteCatalogModelRequest(name="tiny"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert spawned.worker.id in (err.value.details() or "")
    got = (await stub.GetModel(hive_pb2.GetCatalogModelRequest(name="tiny"))).model
    assert list(got.used_by) == [spawned.worker.id]
    await stub.StopWorker(hive_pb2.StopWorkerRequest(worker_id=spawned.worker.id))
    deleted = await stub.DeleteModel(hive_pb2.DeleteCatalogModelRequest(name="tiny"))
    assert deleted.model.name == "tiny" and not Path(deleted.model.path).exists()
    assert list((await stub.ListModels(hive_pb2.ListCatalogRequest())).models) == []


async def test_loading_progress_is_reported_while_a_worker_loads(cluster: Cluster) -> None:
    queen = cluster.start_queen()
    hive = cluster.start_hive(queen, "h1")
    await cluster.hive_stub(hive).SpawnWorker(
        hive_pb2.SpawnWorkerRequest(
            model="slow", backend="echo", backend_options={"load_delay": "2"}
        )
    )
    admin = cluster.admin_stub(queen)
    seen: list[tuple[float, str]] = []

    async def partly_loaded() -> bool:
        workers = (await admin.ListWorkers(queen_pb2.ListWorkersRequest(model="slow"))).workers
        if workers and workers[0].state == common_pb2.WORKER_STATE_LOADING:
            seen.append((workers[0].load_progress, workers[0].status_detail))
        return any(0 < p < 1 for p, _ in seen)

    await wait_until(partly_loaded, timeout=10, interval=0.05)
    detail = next(d for p, d in seen if 0 < p < 1)
    assert "step" in detail
    await cluster.wait_workers(queen, "slow", 1)


async def test_a_spawn_without_a_backend_takes_the_catalogs_and_never_guesses_echo(
    cluster: Cluster, real_model: Path
) -> None:
    queen = cluster.start_queen()
    hive = cluster.start_hive(queen, "h1")
    stub = cluster.hive_stub(hive)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.SpawnWorker(hive_pb2.SpawnWorkerRequest(model="capital-of-france"))
    details = err.value.details() or ""
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not in hive h1's catalog (models: none)" in details and "echo is for tests" in details
    pytest.importorskip("xllamacpp", reason="the llamacpp extra is not installed")
    await pull(stub, str(real_model), "tiny")
    spawned = await stub.SpawnWorker(
        hive_pb2.SpawnWorkerRequest(model="tiny", wait_ready=True), timeout=60
    )
    assert spawned.worker.backend == "llamacpp"
