"""The Hive gRPC service: admin calls from operators and the queen, ready callbacks from workers."""

from __future__ import annotations

import asyncio

import grpc
import structlog

from apiary.serving import Context
from apiary.validation import name_problem
from hive.supervisor import Supervisor, WorkerConflict, WorkerNotFound, WorkerSpec
from protos.v1 import common_pb2, hive_pb2, hive_pb2_grpc
from worker.backends import BackendOptionError, backend_class

log = structlog.get_logger("hive.service")

MAX_SLOTS = 256


class HiveService(hive_pb2_grpc.HiveServicer):
    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    async def SpawnWorker(
        self, request: hive_pb2.SpawnWorkerRequest, context: Context
    ) -> hive_pb2.SpawnWorkerResponse:
        problem = name_problem("model", request.model) or name_problem("backend", request.backend)
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
        spec = WorkerSpec(
            model=request.model,
            backend=request.backend,
            slots=request.slots or 1,
            device=request.device or "cpu",
            backend_options=dict(request.backend_options),
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
        return hive_pb2.SpawnWorkerResponse(worker=worker.record(self.supervisor.hive_id))

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
        return hive_pb2.GetHiveWorkerResponse(worker=worker.record(self.supervisor.hive_id))

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
        return hive_pb2.StopWorkerResponse(worker=worker.record(self.supervisor.hive_id))

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
