"""The Hive gRPC service: admin calls from operators and the queen, ready callbacks from workers."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
from collections.abc import AsyncIterator

import grpc
import psutil
import structlog

from apiary.errors import StatusError
from apiary.protoutil import naming, timestamp
from apiary.security import bearer
from apiary.serving import Context
from apiary.validation import grace_problem, name_problem, tag_problem
from hive import monitor, processes
from hive.catalog import (
    AlreadyExists,
    Catalog,
    CatalogEntry,
    CatalogError,
    NoSpace,
    NotInCatalog,
)
from hive.drains import Drains
from hive.launcher import WORKER_ID_ENV, ProcessIdentity
from hive.records import worker_record, worker_records
from hive.spec import WorkerSpec
from hive.states import Conflict, Phase
from hive.supervisor import Supervisor, WorkerNotFound
from hive.threads import ThreadsRefused, thread_share
from protos.v1 import common_pb2, hive_pb2, hive_pb2_grpc
from worker.backends import (
    BackendDescription,
    BackendOptionError,
    backend_class,
    backend_names,
    describe_backend,
)
from worker.backends.base import parse_int_option

PROGRESS_INTERVAL = 0.2

log = structlog.get_logger("hive.service")

MAX_SLOTS = 256


class HiveService(hive_pb2_grpc.HiveServicer):
    def __init__(self, supervisor: Supervisor, catalog: Catalog, drains: Drains) -> None:
        self.supervisor = supervisor
        self.catalog = catalog
        self.drains = drains
        # The cores this hive may use (its affinity), shared among its engine workers.
        self.cores = len(os.sched_getaffinity(0))

    async def SetDrain(
        self, request: hive_pb2.SetDrainRequest, context: Context
    ) -> hive_pb2.SetDrainResponse:
        if request.worker_id and request.worker_id not in self.supervisor.workers:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"hive {self.supervisor.hive_id} has no worker {request.worker_id!r}; "
                f"its workers: {naming(self.supervisor.workers)}",
            )
        try:
            self.drains.set(request.worker_id, request.drained)
        except OSError as exc:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"hive {self.supervisor.hive_id} cannot save its drains: {exc}",
            )
        self.supervisor.on_change()  # every queen hears it now, not at the next interval
        return hive_pb2.SetDrainResponse()

    def backend_for(self, model: str) -> str:
        """The backend a spawn names none for: the one its catalog entry says (a GGUF runs on
        llamacpp). A model the catalog lacks is refused: the echo backend is never a guess."""
        try:
            return self.catalog.get(model).backend
        except NotInCatalog:
            models = ", ".join(e.name for e in self.catalog.cached_entries()) or "none"
            raise StatusError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model {model!r} is not in hive {self.supervisor.hive_id}'s catalog (models: "
                f"{models}) and no backend was named: pull it (apiary model pull) or name a "
                f"backend ({', '.join(backend_names())}; echo is for tests)",
            ) from None

    def uses_threads(self, spec: WorkerSpec) -> bool:
        """Whether the spec's backend computes on CPU threads its hive hands out."""
        try:
            return backend_class(spec.backend or self.backend_for(spec.model)).USES_CPU_THREADS
        except (KeyError, StatusError):
            return False

    def prepare(
        self,
        spec: WorkerSpec,
        count: int = 1,
        among: int = 0,
        booting: dict[str, int] | None = None,
    ) -> WorkerSpec:
        """Check a spawn of `count` workers against what this hive can do, and fill in what
        the hive knows: the backend and model file from the catalog, and an engine's CPU
        threads (shared `among` that many engine workers being spawned together). `booting`:
        the threads already given to the --spawn specs prepared before this one, which this
        one's are added to; its workers re-adopted from before a restart count as its own.
        Raises StatusError."""
        if not spec.backend and not name_problem("model", spec.model):
            spec = dataclasses.replace(spec, backend=self.backend_for(spec.model))
        problem = name_problem("model", spec.model) or name_problem("backend", spec.backend)
        for tag in spec.tags:
            problem = problem or tag_problem("tag", tag)
        if problem:
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, problem)
        try:
            cls = backend_class(spec.backend)
        except KeyError as exc:
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, str(exc.args[0])) from None
        described = describe_backend(spec.backend)
        if not described.available:
            raise StatusError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"backend {spec.backend!r} is not available on hive {self.supervisor.hive_id}: "
                f"{described.unavailable_reason}",
            )
        limit = min(MAX_SLOTS, cls.MAX_SLOTS)
        if not spec.slots:
            spec = dataclasses.replace(spec, slots=cls.DEFAULT_SLOTS)
        if not 1 <= spec.slots <= limit:
            raise StatusError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"slots must be 1..{limit} for backend {spec.backend!r} (got {spec.slots})",
            )
        options = dict(spec.backend_options)
        if "model_path" in cls.OPTIONS and not options.get("model_path"):
            options["model_path"] = self._model_file(spec.model)
        if cls.USES_CPU_THREADS:
            options["threads"] = str(
                self._threads(spec, options, count, max(among, count), booting)
            )
        try:
            # Builds (does not load) the backend: bad option names and values fail here, not
            # later in a worker process.
            cls.from_options(spec.model, options, spec.slots)
        except BackendOptionError as exc:
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        if spec.restart_policy not in common_pb2.RestartPolicy.values():
            raise StatusError(
                grpc.StatusCode.INVALID_ARGUMENT, f"unknown restart policy {spec.restart_policy}"
            )
        return dataclasses.replace(spec, backend_options=options)

    def _model_file(self, model: str) -> str:
        """The catalog's file of `model`, or FAILED_PRECONDITION saying how to pull it."""
        try:
            entry = self.catalog.get(model)
        except NotInCatalog as exc:
            raise StatusError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{exc}; pull it first: apiary model pull SOURCE --name {model} "
                f"--hive {self.supervisor.hive_id}",
            ) from None
        return str(self.catalog.path(entry))

    def _threads(
        self,
        spec: WorkerSpec,
        options: dict[str, str],
        count: int,
        among: int,
        booting: dict[str, int] | None,
    ) -> int:
        """hive/threads.py's share for this spawn, against the engine workers this hive runs
        (and, at boot, the --spawn specs given threads before this one)."""
        try:
            wanted = parse_int_option(spec.backend, options, "threads", 0) or None
        except BackendOptionError as exc:
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        boot = booting is not None
        held = dict(booting or {})
        for worker in self.supervisor.workers.values():
            own = boot and (worker.spec.model, worker.spec.backend) == (spec.model, spec.backend)
            if own or worker.life.phase in (Phase.FAILED, Phase.GONE, Phase.STOPPING):
                continue
            if backend_class(worker.spec.backend).USES_CPU_THREADS:
                held[worker.id] = int(worker.spec.backend_options.get("threads", "0") or 0)
        try:
            share = thread_share(self.cores, held, wanted, count, among)
        except ThreadsRefused as exc:
            raise StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
        if booting is not None:
            booting[f"--spawn {spec.model}"] = share * count
        return share

    async def SpawnWorker(
        self, request: hive_pb2.SpawnWorkerRequest, context: Context
    ) -> hive_pb2.SpawnWorkerResponse:
        try:
            spec = self.prepare(
                WorkerSpec(
                    model=request.model,
                    backend=request.backend,
                    slots=request.slots,
                    device=request.device or "cpu",
                    backend_options=dict(request.backend_options),
                    restart_policy=request.restart_policy,
                    tags=list(request.tags),
                )
            )
        except StatusError as refused:
            await context.abort(refused.code, refused.message, refused.trailers)
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
        return hive_pb2.SpawnWorkerResponse(worker=worker_record(self.supervisor, worker))

    async def ListWorkers(
        self, request: hive_pb2.ListHiveWorkersRequest, context: Context
    ) -> hive_pb2.ListHiveWorkersResponse:
        return hive_pb2.ListHiveWorkersResponse(workers=worker_records(self.supervisor))

    async def GetWorker(
        self, request: hive_pb2.GetHiveWorkerRequest, context: Context
    ) -> hive_pb2.GetHiveWorkerResponse:
        try:
            worker = self.supervisor.get(request.worker_id)
        except WorkerNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
        return hive_pb2.GetHiveWorkerResponse(worker=worker_record(self.supervisor, worker))

    async def StopWorker(
        self, request: hive_pb2.StopWorkerRequest, context: Context
    ) -> hive_pb2.StopWorkerResponse:
        problem = grace_problem(request.grace_seconds)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        try:
            # Shielded: a caller that gives up must not leave a half-stopped worker behind.
            worker = await asyncio.shield(
                self.supervisor.stop(request.worker_id, request.force, request.grace_seconds)
            )
        except WorkerNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
        return hive_pb2.StopWorkerResponse(worker=worker_record(self.supervisor, worker))

    async def _check_worker(self, worker_id: str, context: Context) -> None:
        """A report must come with that worker's own credential: checked before anything."""
        tokens, hive_id = self.supervisor.security.tokens, self.supervisor.hive_id
        token = bearer(context.invocation_metadata())
        if tokens.enabled and not tokens.is_worker(hive_id, worker_id, token):
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "a worker reports with its own credential (APIARY_WORKER_TOKEN, set by its hive)",
            )

    async def ReportReady(
        self, request: hive_pb2.ReportReadyRequest, context: Context
    ) -> hive_pb2.ReportReadyResponse:
        await self._check_worker(request.worker_id, context)
        if not request.load_error and not request.address:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "address is required unless load_error is set"
            )
        try:
            await monitor.report_ready(
                self.supervisor,
                request.worker_id,
                request.address,
                request.pid,
                request.load_error,
                request,
            )
        except WorkerNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
        except Conflict as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return hive_pb2.ReportReadyResponse()

    async def ReportLoading(
        self, request: hive_pb2.ReportLoadingRequest, context: Context
    ) -> hive_pb2.ReportLoadingResponse:
        await self._check_worker(request.worker_id, context)
        try:
            monitor.report_loading(
                self.supervisor,
                request.worker_id,
                request.pid,
                request.progress,
                request.detail[:200],
            )
        except WorkerNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
        except Conflict as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return hive_pb2.ReportLoadingResponse()

    # ---- model catalog ----------------------------------------------------

    def catalog_model(self, entry: CatalogEntry) -> hive_pb2.CatalogModel:
        users = [
            w.id
            for w in self.supervisor.workers.values()
            if w.spec.backend_options.get("model_path") == str(self.catalog.path(entry))
            and w.alive()
        ]
        return hive_pb2.CatalogModel(
            name=entry.name,
            file=entry.file,
            size_bytes=entry.size_bytes,
            sha256=entry.sha256,
            source=entry.source,
            added_at=timestamp(entry.added_at),
            backend=entry.backend,
            path=str(self.catalog.path(entry)),
            used_by=sorted(users),
        )

    async def ListModels(
        self, request: hive_pb2.ListCatalogRequest, context: Context
    ) -> hive_pb2.ListCatalogResponse:
        entries = await asyncio.to_thread(self.catalog.entries)
        return hive_pb2.ListCatalogResponse(models=[self.catalog_model(e) for e in entries])

    async def GetModel(
        self, request: hive_pb2.GetCatalogModelRequest, context: Context
    ) -> hive_pb2.GetCatalogModelResponse:
        try:
            entry = self.catalog.get(request.name)
        except NotInCatalog as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        return hive_pb2.GetCatalogModelResponse(model=self.catalog_model(entry))

    async def DeleteModel(
        self, request: hive_pb2.DeleteCatalogModelRequest, context: Context
    ) -> hive_pb2.DeleteCatalogModelResponse:
        try:
            model = self.catalog_model(self.catalog.get(request.name))
        except NotInCatalog as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        if model.used_by:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model {request.name!r} is in use by worker(s) {', '.join(model.used_by)}; "
                "retire them first",
            )
        await asyncio.to_thread(self.catalog.delete, request.name)
        log.info("model deleted", model=request.name)
        self.supervisor.on_change()
        return hive_pb2.DeleteCatalogModelResponse(model=model)

    async def PullModel(
        self, request: hive_pb2.PullModelRequest, context: Context
    ) -> AsyncIterator[hive_pb2.PullProgress]:
        if not request.source:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "source is required")
        loop = asyncio.get_running_loop()
        latest: list[tuple[int, int, str]] = [(0, 0, "starting")]
        started = time.monotonic()

        def progress(done: int, total: int, stage: str) -> None:
            latest[0] = (done, total, stage)  # read by the stream below, on the loop

        pulling = loop.run_in_executor(
            None, self.catalog.pull, request.source, request.name, request.sha256, progress
        )
        sent: tuple[int, int, str] | None = None
        while not pulling.done():
            await asyncio.wait([pulling], timeout=PROGRESS_INTERVAL)
            done, total, stage = latest[0]
            if (done, total, stage) != sent:
                sent = (done, total, stage)
                rate = done / max(time.monotonic() - started, 1e-6)
                yield hive_pb2.PullProgress(
                    bytes_done=done, bytes_total=total, bytes_per_second=rate, stage=stage
                )
        try:
            entry = pulling.result()
        except AlreadyExists as exc:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        except NoSpace as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except CatalogError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        log.info("model pulled", model=entry.name, source=entry.source, size=entry.size_bytes)
        self.supervisor.on_change()
        yield hive_pb2.PullProgress(
            bytes_done=entry.size_bytes,
            bytes_total=entry.size_bytes,
            bytes_per_second=entry.size_bytes / max(time.monotonic() - started, 1e-6),
            stage="done",
            model=self.catalog_model(entry),
        )

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
        if info.owner == hive_pb2.PROCESS_OWNER_OTHER_HIVE:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"pid {info.pid} is worker {info.worker_id} of hive {info.hive_id or '?'}, which "
                "is running: only that hive stops its workers (retire it through the queen)",
            )
        if info.known:
            # One of ours: a forced stop, so the table and the queen stay true.
            await asyncio.shield(self.supervisor.stop(info.worker_id, force=True))
        else:
            ident = ProcessIdentity(info.pid, info.create_time)
            launcher = self.supervisor.launcher
            launcher.signal_group(ident, signal.SIGKILL)
            try:
                # Success is the process gone, not a signal sent.
                await asyncio.wait_for(launcher.wait_gone(ident), 5.0)
            except TimeoutError:
                await context.abort(
                    grpc.StatusCode.INTERNAL,
                    f"pid {info.pid} is still running 5s after SIGKILL "
                    "(another user's process, or stuck in the kernel)",
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
