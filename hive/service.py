"""The Hive gRPC service: admin calls from operators and the queen, ready callbacks from workers."""

from __future__ import annotations

import asyncio
import signal

import grpc
import psutil
import structlog

from apiary.serving import Context
from apiary.validation import name_problem
from hive import processes
from hive.launcher import ProcessIdentity
from hive.supervisor import WORKER_ID_ENV, Supervisor, WorkerConflict, WorkerNotFound, WorkerSpec
from protos.v1 import common_pb2, hive_pb2, hive_pb2_grpc
from worker.backends import (
    BackendDescription,
    BackendOptionError,
    backend_class,
    backend_names,
    describe_backend,
)

log = structlog.get_logger("hive.service")

MAX_SLOTS = 256


class HiveService(hive_pb2_grpc.HiveServicer):
    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    async def SpawnWorker(
        self, request: hive_pb2.SpawnWorkerRequest, context: Context
    ) -> hive_pb2.SpawnWorkerResponse:
        problem = name_problem("model", request.model) or name_problem("backend", request.backend)
        for tag in request.tags:
            problem = problem or name_problem("tag", tag)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        if request.slots > MAX_SLOTS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"slots {request.slots} is above the limit of {MAX_SLOTS}",
            )
        try:
            # Builds (does not load) the backend: bad option names and values fail here, not later
            # in a worker process.
            backend_class(request.backend).from_options(request.model, request.backend_options)
        except KeyError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc.args[0]))
        except BackendOptionError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if request.restart_policy not in common_pb2.RestartPolicy.values():
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"unknown restart policy {request.restart_policy}"
            )
        spec = WorkerSpec(
            model=request.model,
            backend=request.backend,
            slots=request.slots or 1,
            device=request.device or "cpu",
            backend_options=dict(request.backend_options),
            restart_policy=request.restart_policy,
            tags=list(request.tags),
        )
        worker = await self.supervisor.spawn(spec)
        if request.wait_ready:
            remaining = context.time_remaining()
            try:
                await asyncio.wait_for(worker.settled.wait(), remaining)
            except TimeoutError:
                await context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"worker {worker.id} is still LOADING; watch it with GetWorker",
                )
            if worker.state == common_pb2.WORKER_STATE_FAILED:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"worker {worker.id} failed to start: {worker.failure_reason}",
                )
        return hive_pb2.SpawnWorkerResponse(worker=self.supervisor.record(worker))

    async def ListWorkers(
        self, request: hive_pb2.ListHiveWorkersRequest, context: Context
    ) -> hive_pb2.ListHiveWorkersResponse:
        return hive_pb2.ListHiveWorkersResponse(workers=self.supervisor.records())

    async def GetWorker(
        self, request: hive_pb2.GetHiveWorkerRequest, context: Context
    ) -> hive_pb2.GetHiveWorkerResponse:
        try:
            worker = self.supervisor.get(request.worker_id)
        except WorkerNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
        return hive_pb2.GetHiveWorkerResponse(worker=self.supervisor.record(worker))

    async def StopWorker(
        self, request: hive_pb2.StopWorkerRequest, context: Context
    ) -> hive_pb2.StopWorkerResponse:
        if request.grace_seconds < 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"grace_seconds must be >= 0 (got {request.grace_seconds})",
            )
        try:
            # Shielded: a caller that gives up must not leave a half-stopped worker behind.
            worker = await asyncio.shield(
                self.supervisor.stop(request.worker_id, request.force, request.grace_seconds)
            )
        except WorkerNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
        return hive_pb2.StopWorkerResponse(worker=self.supervisor.record(worker))

    async def ReportReady(
        self, request: hive_pb2.ReportReadyRequest, context: Context
    ) -> hive_pb2.ReportReadyResponse:
        if not request.load_error and not request.address:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "address is required unless load_error is set"
            )
        try:
            self.supervisor.report_ready(
                request.worker_id, request.address, request.pid, request.load_error
            )
        except WorkerNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
        except WorkerConflict as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return hive_pb2.ReportReadyResponse()

    # ---- processes --------------------------------------------------------

    async def ListProcesses(
        self, request: hive_pb2.ListProcessesRequest, context: Context
    ) -> hive_pb2.ListProcessesResponse:
        found = await asyncio.to_thread(lambda: list(processes.scan(self.supervisor)))
        return hive_pb2.ListProcessesResponse(processes=sorted(found, key=lambda p: p.pid))

    async def _process(
        self, pid: int, context: Context
    ) -> tuple[psutil.Process, hive_pb2.WorkerProcess]:
        if pid <= 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"pid must be > 0 (got {pid})")
        found = processes.find(pid, self.supervisor)
        if found is None:
            if psutil.pid_exists(pid):
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"pid {pid} is not an Apiary worker (no {WORKER_ID_ENV} in its environment); "
                    "the hive only touches its own kind",
                )
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no process with pid {pid}")
        assert found is not None
        return found

    async def GetProcess(
        self, request: hive_pb2.GetProcessRequest, context: Context
    ) -> hive_pb2.GetProcessResponse:
        _, info = await self._process(request.pid, context)
        return hive_pb2.GetProcessResponse(process=info)

    async def KillProcess(
        self, request: hive_pb2.KillProcessRequest, context: Context
    ) -> hive_pb2.KillProcessResponse:
        _, info = await self._process(request.pid, context)
        if info.known:
            # One of ours: a forced stop, so the table and the queen stay true.
            await asyncio.shield(self.supervisor.stop(info.worker_id, force=True))
        else:
            ident = ProcessIdentity(info.pid, info.create_time)
            launcher = self.supervisor.launcher
            if launcher.signal_group(ident, signal.SIGKILL):
                try:
                    await asyncio.wait_for(launcher.wait_gone(ident), 5.0)
                except TimeoutError:
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE, f"pid {info.pid} survived SIGKILL for 5s"
                    )
        log.info("process killed", pid=info.pid, worker_id=info.worker_id, known=info.known)
        return hive_pb2.KillProcessResponse(process=info)

    # ---- backends ---------------------------------------------------------

    async def ListBackends(
        self, request: hive_pb2.ListBackendsRequest, context: Context
    ) -> hive_pb2.ListBackendsResponse:
        return hive_pb2.ListBackendsResponse(
            backends=[backend_info(describe_backend(name)) for name in backend_names()]
        )

    async def GetBackend(
        self, request: hive_pb2.GetBackendRequest, context: Context
    ) -> hive_pb2.GetBackendResponse:
        try:
            description = describe_backend(request.name)
        except KeyError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
        return hive_pb2.GetBackendResponse(backend=backend_info(description))


def backend_info(d: BackendDescription) -> hive_pb2.BackendInfo:
    return hive_pb2.BackendInfo(
        name=d.name,
        available=d.available,
        unavailable_reason=d.unavailable_reason,
        version=d.version,
        devices=d.devices,
        options=d.options,
        for_testing=d.for_testing,
    )
