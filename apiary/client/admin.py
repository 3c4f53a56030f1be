"""`AsyncAdmin` (`AsyncClient.admin`): the QueenAdmin calls, which take an admin token. Hives,
workers, drains, events, the request history, and each hive's catalog, processes and backends,
which the queen forwards: one address and one credential for the operator."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, TypeVar

import grpc

from apiary.client.queens import unreached
from apiary.client.transport import Transport
from protos.v1 import common_pb2, hive_pb2, queen_pb2, queen_pb2_grpc

if TYPE_CHECKING:
    # Only in the generated .pyi: what QueenAdminStub(an aio channel) is.
    AdminStub = queen_pb2_grpc.QueenAdminAsyncStub

Request = TypeVar("Request")
Reply = TypeVar("Reply")


def catalog_name(source: str) -> str:
    """A pulled model's name when none is given: its file's, without the extension."""
    return os.path.splitext(os.path.basename(source.rstrip("/")))[0]


class AsyncAdmin:
    """The admin calls, through a Transport (an AsyncClient's: its queens, deadlines and
    failover). `hive_id` may be left empty when the cluster has one hive (the queen picks it,
    or says which exist)."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    async def _call(
        self,
        method: Callable[[AdminStub], grpc.aio.UnaryUnaryMultiCallable[Request, Reply]],
        request: Request,
        timeout: float | None,
    ) -> Reply:
        return await self._transport.unary(
            lambda channel, left: method(queen_pb2_grpc.QueenAdminStub(channel))(
                request, timeout=left
            ),
            timeout,
        )

    def _stream(
        self,
        method: Callable[[AdminStub], grpc.aio.UnaryStreamMultiCallable[Request, Reply]],
        request: Request,
        timeout: float | None,
    ) -> AsyncIterator[Reply]:
        return self._transport.stream(
            lambda channel, left: method(queen_pb2_grpc.QueenAdminStub(channel))(
                request, timeout=left
            ),
            timeout,
        )

    # ---- hives ----------------------------------------------------------------------------

    async def list_hives(self, *, timeout: float | None = None) -> queen_pb2.ListHivesResponse:
        """The hives (`.hives`) and the queen's own status (`.queen`), in one snapshot."""
        return await self._call(lambda stub: stub.ListHives, queen_pb2.ListHivesRequest(), timeout)

    async def get_hive(
        self, hive_id: str, *, timeout: float | None = None
    ) -> queen_pb2.GetHiveResponse:
        """One hive (`.hive`) and its workers (`.workers`)."""
        request = queen_pb2.GetHiveRequest(hive_id=hive_id)
        return await self._call(lambda stub: stub.GetHive, request, timeout)

    async def drain_hive(
        self, hive_id: str, *, undrain: bool = False, timeout: float | None = None
    ) -> queen_pb2.HiveInfo:
        """Stop routing new requests to a hive's workers (in-flight ones finish), or resume."""
        request = queen_pb2.DrainHiveRequest(hive_id=hive_id, undrain=undrain)
        return (await self._call(lambda stub: stub.DrainHive, request, timeout)).hive

    # ---- workers --------------------------------------------------------------------------

    async def list_workers(
        self,
        *,
        hive_id: str = "",
        model: str = "",
        state: common_pb2.WorkerState.ValueType = common_pb2.WORKER_STATE_UNSPECIFIED,
        tags: Iterable[str] = (),
        hive_health: common_pb2.HiveHealth.ValueType = common_pb2.HIVE_HEALTH_UNSPECIFIED,
        min_free_slots: int = 0,
        timeout: float | None = None,
    ) -> list[common_pb2.WorkerRecord]:
        """Workers matching every filter given."""
        request = queen_pb2.ListWorkersRequest(
            hive_id=hive_id, model=model, state=state, tags=tags, hive_health=hive_health,
            min_free_slots=min_free_slots,
        )  # fmt: skip
        return list((await self._call(lambda stub: stub.ListWorkers, request, timeout)).workers)

    async def get_worker(
        self, worker_id: str, *, timeout: float | None = None
    ) -> common_pb2.WorkerRecord:
        request = queen_pb2.GetWorkerRequest(worker_id=worker_id)
        return (await self._call(lambda stub: stub.GetWorker, request, timeout)).worker

    async def spawn_worker(
        self,
        model: str,
        *,
        hive_id: str = "",
        backend: str = "",
        slots: int = 1,
        device: str = "",
        backend_options: Mapping[str, str] | None = None,
        wait_ready: bool = True,
        restart_policy: common_pb2.RestartPolicy.ValueType = common_pb2.RESTART_POLICY_UNSPECIFIED,
        tags: Iterable[str] = (),
        timeout: float | None = None,
    ) -> common_pb2.WorkerRecord:
        """Start a worker on a hive; with `wait_ready`, answer once it is ready (give loading a
        long enough `timeout`). `backend` empty: the one the model's catalog entry names."""
        request = queen_pb2.QueenSpawnWorkerRequest(
            hive_id=hive_id, model=model, backend=backend, slots=slots, device=device,
            backend_options=backend_options or {}, wait_ready=wait_ready,
            restart_policy=restart_policy, tags=tags,
        )  # fmt: skip
        return (await self._call(lambda stub: stub.SpawnWorker, request, timeout)).worker

    async def retire_worker(
        self, worker_id: str, *, force: bool = False, timeout: float | None = None
    ) -> common_pb2.WorkerRecord:
        """Stop a worker, gracefully unless `force` (SIGKILL at once)."""
        request = queen_pb2.RetireWorkerRequest(worker_id=worker_id, force=force)
        return (await self._call(lambda stub: stub.RetireWorker, request, timeout)).worker

    async def drain_worker(
        self, worker_id: str, *, undrain: bool = False, timeout: float | None = None
    ) -> common_pb2.WorkerRecord:
        """Stop routing new requests to a worker (in-flight ones finish), or resume."""
        request = queen_pb2.DrainWorkerRequest(worker_id=worker_id, undrain=undrain)
        return (await self._call(lambda stub: stub.DrainWorker, request, timeout)).worker

    # ---- events and history ---------------------------------------------------------------

    def watch_events(
        self,
        *,
        kinds: Iterable[queen_pb2.EventKind.ValueType] = (),
        timeout: float | None = None,
    ) -> AsyncIterator[queen_pb2.Event]:
        """Cluster events as they happen (all kinds unless given). The watch ends with
        DEADLINE_EXCEEDED at its deadline; `timeout=math.inf` watches until you stop."""
        request = queen_pb2.WatchEventsRequest(kinds=kinds)
        return self._stream(lambda stub: stub.WatchEvents, request, timeout)

    async def list_requests(
        self,
        *,
        status: queen_pb2.RequestStatus.ValueType = queen_pb2.REQUEST_STATUS_UNSPECIFIED,
        model: str = "",
        limit: int = 0,
        timeout: float | None = None,
    ) -> list[queen_pb2.RequestRecord]:
        """The request history, newest first (`limit` 0: the queen's default, 100). Each queen
        keeps its own: given several, every one is asked and the answers merged; a queen that
        cannot be reached is left out while another answers."""
        request = queen_pb2.ListRequestsRequest(status=status, model=model, limit=limit)
        if len(self._transport.queens) == 1:
            reply = await self._call(lambda stub: stub.ListRequests, request, timeout)
            return list(reply.requests)
        replies = await self._transport.everywhere(
            lambda channel, left: queen_pb2_grpc.QueenAdminStub(channel).ListRequests(
                request, timeout=left
            ),
            timeout,
        )
        return merged_history(replies, limit or 100)

    # ---- a hive's catalog, processes and backends, through the queen ----------------------

    async def list_catalog(
        self, *, hive_id: str = "", timeout: float | None = None
    ) -> list[hive_pb2.CatalogModel]:
        request = queen_pb2.HiveRequest(hive_id=hive_id)
        return list((await self._call(lambda stub: stub.ListCatalog, request, timeout)).models)

    async def get_catalog_model(
        self, name: str, *, hive_id: str = "", timeout: float | None = None
    ) -> hive_pb2.CatalogModel:
        request = queen_pb2.HiveModelRequest(hive_id=hive_id, name=name)
        return (await self._call(lambda stub: stub.GetCatalogModel, request, timeout)).model

    async def delete_catalog_model(
        self, name: str, *, hive_id: str = "", timeout: float | None = None
    ) -> hive_pb2.CatalogModel:
        """Delete a catalog entry and its file (refused while a worker uses it)."""
        request = queen_pb2.HiveModelRequest(hive_id=hive_id, name=name)
        return (await self._call(lambda stub: stub.DeleteCatalogModel, request, timeout)).model

    def pull_model(
        self,
        source: str,
        *,
        name: str = "",
        sha256: str = "",
        hive_id: str = "",
        timeout: float | None = None,
    ) -> AsyncIterator[hive_pb2.PullProgress]:
        """Fetch a GGUF into a hive's catalog: a path on the hive's machine, file:// or
        http(s)://. Progress as it goes; the last update carries the model (`.model`).
        `name` empty: the file's name. A large download needs a long `timeout`."""
        pull = hive_pb2.PullModelRequest(
            source=source, name=name or catalog_name(source), sha256=sha256
        )
        request = queen_pb2.HivePullRequest(hive_id=hive_id, pull=pull)
        return self._stream(lambda stub: stub.PullModel, request, timeout)

    async def list_processes(
        self, *, hive_id: str = "", timeout: float | None = None
    ) -> list[hive_pb2.WorkerProcess]:
        """Every Apiary worker process on the hive's machine, orphans included."""
        request = queen_pb2.HiveRequest(hive_id=hive_id)
        return list((await self._call(lambda stub: stub.ListProcesses, request, timeout)).processes)

    async def get_process(
        self, pid: int, *, hive_id: str = "", timeout: float | None = None
    ) -> hive_pb2.WorkerProcess:
        request = queen_pb2.HiveProcessRequest(hive_id=hive_id, pid=pid)
        return (await self._call(lambda stub: stub.GetProcess, request, timeout)).process

    async def kill_process(
        self, pid: int, *, hive_id: str = "", timeout: float | None = None
    ) -> hive_pb2.WorkerProcess:
        """SIGKILL a worker process; answers once it is gone (refuses other pids)."""
        request = queen_pb2.HiveProcessRequest(hive_id=hive_id, pid=pid)
        return (await self._call(lambda stub: stub.KillProcess, request, timeout)).process

    async def list_backends(
        self, *, hive_id: str = "", timeout: float | None = None
    ) -> list[hive_pb2.BackendInfo]:
        request = queen_pb2.HiveRequest(hive_id=hive_id)
        return list((await self._call(lambda stub: stub.ListBackends, request, timeout)).backends)

    async def get_backend(
        self, name: str, *, hive_id: str = "", timeout: float | None = None
    ) -> hive_pb2.BackendInfo:
        """One backend, with its version, devices and options."""
        request = queen_pb2.HiveBackendRequest(hive_id=hive_id, name=name)
        return (await self._call(lambda stub: stub.GetBackend, request, timeout)).backend


def merged_history(
    replies: Sequence[queen_pb2.ListRequestsResponse | BaseException], limit: int
) -> list[queen_pb2.RequestRecord]:
    """Several queens' histories as one, newest first; the first failure if none answered,
    or if one refused (an unreachable queen is left out)."""
    failures = [r for r in replies if isinstance(r, BaseException)]
    refused = [f for f in failures if not (isinstance(f, grpc.RpcError) and unreached(f))]
    if refused or len(failures) == len(replies):
        raise (refused or failures)[0]
    records = {
        record.id: record
        for reply in replies
        if isinstance(reply, queen_pb2.ListRequestsResponse)
        for record in reply.requests
    }
    newest = sorted(records.values(), key=lambda r: r.accepted_at.ToNanoseconds(), reverse=True)
    return newest[:limit]
