"""The client verbs of `apiary`: each talks to the queen (or, for catalog, process and backend
verbs, to a hive found through the queen) and shows the answer through the emitter."""

from __future__ import annotations

import argparse
import os

import grpc

from apiary.options import parse_key_values
from apiary.protoutil import parse_state
from cli.connect import admin, channel, client
from cli.emit import Emitter
from cli.errors import CliError
from cli.output import (
    ClusterStatus,
    PullProgressLines,
    backend_details,
    backend_rows,
    catalog_details,
    catalog_rows,
    event_line,
    hive_details,
    hive_rows,
    infer_summary,
    model_rows,
    process_details,
    process_rows,
    request_rows,
    status_summary,
    status_text,
    worker_details,
    worker_rows,
)
from protos.v1 import common_pb2, hive_pb2, queen_pb2, worker_pb2_grpc

# ---- inference ------------------------------------------------------------


def infer_request(args: argparse.Namespace) -> common_pb2.InferRequest:
    request = common_pb2.InferRequest(
        model=args.model,
        prompt=args.prompt,
        max_tokens=args.max_tokens,
        policy=args.policy,
        required_tags=args.tag,
        request_id=args.request_id,
        stop=args.stop,
    )
    for field in ("temperature", "top_p", "top_k", "seed"):
        if getattr(args, field) is not None:
            setattr(request, field, getattr(args, field))
    return request


def cmd_infer(args: argparse.Namespace, out: Emitter) -> int:
    request = infer_request(args)
    if args.direct:
        lease = client(args).Lease(
            queen_pb2.LeaseRequest(model=args.model, required_tags=args.tag, policy=args.policy),
            timeout=args.timeout,
        )
        out.note(f"[lease {lease.lease_id} on {lease.worker_id} at {lease.address}]")
        request.lease_id = lease.lease_id
        stream = worker_pb2_grpc.WorkerStub(channel(args, lease.address)).Infer(
            request, timeout=args.timeout
        )
    else:
        stream = client(args).Infer(request, timeout=args.timeout)
    last: common_pb2.InferChunk | None = None
    for chunk in stream:
        out.item(chunk, chunk.text, end="")
        last = chunk
    out.aside("", stdout=True)
    if last is not None:
        out.aside(infer_summary(last))
    return 0


# ---- status and models ----------------------------------------------------


def cmd_status(args: argparse.Namespace, out: Emitter) -> int:
    stub = admin(args)
    listed = stub.ListHives(queen_pb2.ListHivesRequest(), timeout=args.timeout)
    workers = stub.ListWorkers(queen_pb2.ListWorkersRequest(), timeout=args.timeout).workers
    models = client(args).ListModels(queen_pb2.ListModelsRequest(), timeout=args.timeout).models
    cluster = ClusterStatus(args.queen, listed.queen, listed.hives, workers, models)
    out.result(
        {
            "summary": status_summary(cluster),
            "queen": listed.queen,
            "hives": listed.hives,
            "workers": workers,
            "models": models,
        },
        status_text(cluster),
    )
    return 0


def cmd_model_list(args: argparse.Namespace, out: Emitter) -> int:
    if args.hive:
        catalog = admin(args).ListCatalog(on_hive(args), timeout=args.timeout)
        text = catalog_rows(catalog.models) if catalog.models else "no models in the catalog"
        out.result(catalog.models, text)
        return 0
    models = client(args).ListModels(queen_pb2.ListModelsRequest(), timeout=args.timeout).models
    out.result(models, model_rows(models) if models else "no models")
    return 0


def cmd_model_get(args: argparse.Namespace, out: Emitter) -> int:
    request = queen_pb2.HiveModelRequest(hive_id=args.hive, name=args.name)
    model = admin(args).GetCatalogModel(request, timeout=args.timeout).model
    out.result(model, catalog_details(model))
    return 0


def cmd_model_pull(args: argparse.Namespace, out: Emitter) -> int:
    source = args.source
    if "://" not in source:
        source = os.path.abspath(source)  # a path on the hive's machine, as the operator typed it
    name = args.name or os.path.splitext(os.path.basename(source.rstrip("/")))[0]
    pull = hive_pb2.PullModelRequest(source=source, name=name, sha256=args.sha256)
    request = queen_pb2.HivePullRequest(hive_id=args.hive, pull=pull)
    last: hive_pb2.PullProgress | None = None
    progress = PullProgressLines(live=out.asides_live())
    for update in admin(args).PullModel(request, timeout=args.timeout):
        last = update
        shown = progress.update(update)
        if shown is not None:
            out.aside(*shown)
    finish = progress.finish()
    if finish is not None:
        out.aside(*finish)
    if last is not None and last.HasField("model"):
        model = last.model
        out.result(model, f"pulled {model.name} ({model.file}, sha256 {model.sha256[:16]}...)")
    return 0


def cmd_model_rm(args: argparse.Namespace, out: Emitter) -> int:
    request = queen_pb2.HiveModelRequest(hive_id=args.hive, name=args.name)
    model = admin(args).DeleteCatalogModel(request, timeout=args.timeout).model
    out.result(model, f"deleted {model.name} ({model.file})")
    return 0


# ---- hives ----------------------------------------------------------------


def cmd_hive_list(args: argparse.Namespace, out: Emitter) -> int:
    hives = admin(args).ListHives(queen_pb2.ListHivesRequest(), timeout=args.timeout).hives
    out.result(hives, hive_rows(hives) if hives else "no hives")
    return 0


def cmd_hive_get(args: argparse.Namespace, out: Emitter) -> int:
    reply = admin(args).GetHive(
        queen_pb2.GetHiveRequest(hive_id=args.hive_id), timeout=args.timeout
    )
    out.result(reply, hive_details(reply))
    return 0


def drain_verb(undrain: bool) -> str:
    return "undrained" if undrain else "drained (in-flight requests finish; no new ones)"


def cmd_hive_drain(args: argparse.Namespace, out: Emitter) -> int:
    """drain, or undrain (args.undrain, set by the parser)."""
    request = queen_pb2.DrainHiveRequest(hive_id=args.hive_id, undrain=args.undrain)
    reply = admin(args).DrainHive(request, timeout=args.timeout)
    out.result(reply.hive, f"hive {reply.hive.id} {drain_verb(args.undrain)}")
    return 0


# ---- workers --------------------------------------------------------------


def cmd_worker_list(args: argparse.Namespace, out: Emitter) -> int:
    try:
        state = parse_state(args.state) if args.state else common_pb2.WORKER_STATE_UNSPECIFIED
    except ValueError as exc:
        raise CliError(str(exc)) from None
    request = queen_pb2.ListWorkersRequest(
        hive_id=args.hive,
        model=args.model,
        state=state,
        tags=args.tag,
        hive_health=args.health,
        min_free_slots=args.min_free,
    )
    workers = admin(args).ListWorkers(request, timeout=args.timeout).workers
    out.result(workers, worker_rows(workers) if workers else "no workers")
    return 0


def cmd_worker_get(args: argparse.Namespace, out: Emitter) -> int:
    request = queen_pb2.GetWorkerRequest(worker_id=args.worker_id)
    worker = admin(args).GetWorker(request, timeout=args.timeout).worker
    out.result(worker, worker_details(worker))
    return 0


def cmd_worker_spawn(args: argparse.Namespace, out: Emitter) -> int:
    try:
        options = parse_key_values(args.option, "--option")
    except ValueError as exc:
        raise CliError(str(exc)) from None
    request = queen_pb2.QueenSpawnWorkerRequest(
        hive_id=args.hive,
        model=args.model,
        backend=args.backend,
        slots=args.slots,
        device=args.device,
        backend_options=options,
        wait_ready=not args.no_wait,
        restart_policy=args.restart,
        tags=args.tag,
    )
    worker = admin(args).SpawnWorker(request, timeout=args.timeout).worker
    out.result(worker, worker_details(worker))
    return 0


def cmd_worker_retire(args: argparse.Namespace, out: Emitter) -> int:
    request = queen_pb2.RetireWorkerRequest(worker_id=args.worker_id, force=args.force)
    worker = admin(args).RetireWorker(request, timeout=args.timeout).worker
    out.result(worker, f"retired {worker.id} ({worker.model} on {worker.hive_id})")
    return 0


def cmd_worker_drain(args: argparse.Namespace, out: Emitter) -> int:
    """drain, or undrain (args.undrain, set by the parser)."""
    request = queen_pb2.DrainWorkerRequest(worker_id=args.worker_id, undrain=args.undrain)
    reply = admin(args).DrainWorker(request, timeout=args.timeout)
    out.result(reply.worker, f"worker {reply.worker.id} {drain_verb(args.undrain)}")
    return 0


# ---- processes and backends (on a hive, through the queen) -----------------


def on_hive(args: argparse.Namespace) -> queen_pb2.HiveRequest:
    """The --hive a verb acts on (empty: the queen picks the only one, or says which exist)."""
    return queen_pb2.HiveRequest(hive_id=args.hive)


def on_process(args: argparse.Namespace) -> queen_pb2.HiveProcessRequest:
    return queen_pb2.HiveProcessRequest(hive_id=args.hive, pid=args.pid)


def cmd_process_list(args: argparse.Namespace, out: Emitter) -> int:
    reply = admin(args).ListProcesses(on_hive(args), timeout=args.timeout)
    procs = reply.processes
    out.result(procs, process_rows(procs) if procs else "no Apiary worker processes")
    return 0


def cmd_process_get(args: argparse.Namespace, out: Emitter) -> int:
    reply = admin(args).GetProcess(on_process(args), timeout=args.timeout)
    out.result(reply.process, process_details(reply.process))
    return 0


def cmd_process_kill(args: argparse.Namespace, out: Emitter) -> int:
    reply = admin(args).KillProcess(on_process(args), timeout=args.timeout)
    process = reply.process
    out.result(process, f"killed pid {process.pid} (worker {process.worker_id})")
    return 0


def cmd_backend_list(args: argparse.Namespace, out: Emitter) -> int:
    reply = admin(args).ListBackends(on_hive(args), timeout=args.timeout)
    out.result(reply.backends, backend_rows(reply.backends))
    return 0


def cmd_backend_get(args: argparse.Namespace, out: Emitter) -> int:
    request = queen_pb2.HiveBackendRequest(hive_id=args.hive, name=args.name)
    reply = admin(args).GetBackend(request, timeout=args.timeout)
    out.result(reply.backend, backend_details(reply.backend))
    return 0


# ---- events and history ---------------------------------------------------


def cmd_events(args: argparse.Namespace, out: Emitter) -> int:
    stream = admin(args).WatchEvents(
        queen_pb2.WatchEventsRequest(kinds=args.kind), timeout=args.timeout
    )
    try:
        for event in stream:
            out.item(event, event_line(event))
    except grpc.RpcError as exc:
        if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return 0  # --timeout ends a watch on purpose
        raise
    return 0


def cmd_requests_list(args: argparse.Namespace, out: Emitter) -> int:
    request = queen_pb2.ListRequestsRequest(status=args.status, model=args.model, limit=args.limit)
    records = admin(args).ListRequests(request, timeout=args.timeout).requests
    out.result(records, request_rows(records) if records else "no requests")
    return 0
