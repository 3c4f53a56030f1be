"""The client verbs of `apiary`: each calls the cluster through `apiary.client` (the queen,
or through it a hive; `infer --direct` a leased worker) and shows the answer through the
emitter."""

from __future__ import annotations

import argparse
import os

import grpc

from apiary.client import infer_request
from apiary.options import parse_key_values
from apiary.protoutil import parse_state
from cli.asking import Choices, asking
from cli.connect import client
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
from protos.v1 import common_pb2, hive_pb2

# ---- inference ------------------------------------------------------------


def request_from_flags(args: argparse.Namespace) -> common_pb2.InferRequest:
    """The InferRequest `apiary infer` sends; sampling flags left out stay unset."""
    turns = [{"role": "system", "content": args.system}] if args.system else []
    turns.append({"role": "user", "content": args.prompt})
    request = infer_request(
        args.model,
        args.prompt if args.raw else "",
        () if args.raw else turns,
        max_tokens=args.max_tokens,
        policy=args.policy,
        required_tags=args.tag,
        request_id=args.request_id,
        stop=args.stop,
        **asking(args),
    )
    for field in ("temperature", "top_p", "top_k", "seed"):
        if getattr(args, field) is not None:
            setattr(request, field, getattr(args, field))
    return request


def cmd_infer(args: argparse.Namespace, out: Emitter) -> int:
    request = request_from_flags(args)
    with client(args) as cluster:
        if args.direct:
            lease = cluster.lease(args.model, required_tags=args.tag, policy=args.policy)
            out.note(f"[lease {lease.lease_id} on {lease.worker_id} at {lease.address}]")
            stream = cluster.infer_direct(lease, request)
        else:
            stream = cluster.send(request)
        # Text streams as it comes; several choices, tool calls and logprobs show at the end.
        gathered = request.n > 1 or bool(request.tools) or request.logprobs
        choices, last = Choices(), None
        for chunk in stream:
            out.item(chunk, "" if gathered else chunk.text, end="")
            choices.take(chunk)
            last = chunk
    if gathered:
        out.aside(choices.text(headed=request.n > 1), stdout=True)
    out.aside("", stdout=True)
    if last is not None:
        out.aside(infer_summary(last))
    return 0


def cmd_embed(args: argparse.Namespace, out: Emitter) -> int:
    with client(args) as cluster:
        vectors = cluster.embed(args.model, args.text, required_tags=args.tag)
    lines = [f"[{i}] {len(v)} dimensions: " + " ".join(f"{x:.4f}" for x in v[:8]) + " ..."
             for i, v in enumerate(vectors)]  # fmt: skip
    out.result([{"index": i, "embedding": v} for i, v in enumerate(vectors)], "\n".join(lines))
    return 0


# ---- status and models ----------------------------------------------------


def cmd_status(args: argparse.Namespace, out: Emitter) -> int:
    with client(args) as cluster:
        listed = cluster.admin.list_hives()
        workers = cluster.admin.list_workers()
        models = cluster.list_models()
    status = ClusterStatus(args.queen, listed.queen, listed.hives, workers, models)
    out.result(
        {
            "summary": status_summary(status),
            "queen": listed.queen,
            "hives": listed.hives,
            "workers": workers,
            "models": models,
        },
        status_text(status),
    )
    return 0


def cmd_model_list(args: argparse.Namespace, out: Emitter) -> int:
    with client(args) as cluster:
        if args.hive:
            catalog = cluster.admin.list_catalog(hive_id=args.hive)
            out.result(catalog, catalog_rows(catalog) if catalog else "no models in the catalog")
            return 0
        models = cluster.list_models()
    out.result(models, model_rows(models) if models else "no models")
    return 0


def cmd_model_get(args: argparse.Namespace, out: Emitter) -> int:
    with client(args) as cluster:
        model = cluster.admin.get_catalog_model(args.name, hive_id=args.hive)
    out.result(model, catalog_details(model))
    return 0


def cmd_model_pull(args: argparse.Namespace, out: Emitter) -> int:
    source = args.source
    if "://" not in source:
        source = os.path.abspath(source)  # a path on the hive's machine, as the operator typed it
    last: hive_pb2.PullProgress | None = None
    progress = PullProgressLines(live=out.asides_live())
    with client(args) as cluster:
        pulls = cluster.admin.pull_model(
            source, name=args.name, sha256=args.sha256, hive_id=args.hive
        )
        for update in pulls:
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
    with client(args) as cluster:
        model = cluster.admin.delete_catalog_model(args.name, hive_id=args.hive)
    out.result(model, f"deleted {model.name} ({model.file})")
    return 0


# ---- hives ----------------------------------------------------------------


def cmd_hive_list(args: argparse.Namespace, out: Emitter) -> int:
    with client(args) as cluster:
        hives = cluster.admin.list_hives().hives
    out.result(hives, hive_rows(hives) if hives else "no hives")
    return 0


def cmd_hive_get(args: argparse.Namespace, out: Emitter) -> int:
    with client(args) as cluster:
        reply = cluster.admin.get_hive(args.hive_id)
    out.result(reply, hive_details(reply))
    return 0


def drain_verb(undrain: bool) -> str:
    return "undrained" if undrain else "drained (in-flight requests finish; no new ones)"


def cmd_hive_drain(args: argparse.Namespace, out: Emitter) -> int:
    """drain, or undrain (args.undrain, set by the parser)."""
    with client(args) as cluster:
        hive = cluster.admin.drain_hive(args.hive_id, undrain=args.undrain)
    out.result(hive, f"hive {hive.id} {drain_verb(args.undrain)}")
    return 0


# ---- workers --------------------------------------------------------------


def cmd_worker_list(args: argparse.Namespace, out: Emitter) -> int:
    try:
        state = parse_state(args.state) if args.state else common_pb2.WORKER_STATE_UNSPECIFIED
    except ValueError as exc:
        raise CliError(str(exc)) from None
    with client(args) as cluster:
        workers = cluster.admin.list_workers(
            hive_id=args.hive,
            model=args.model,
            state=state,
            tags=args.tag,
            hive_health=args.health,
            min_free_slots=args.min_free,
        )
    out.result(workers, worker_rows(workers) if workers else "no workers")
    return 0


def cmd_worker_get(args: argparse.Namespace, out: Emitter) -> int:
    with client(args) as cluster:
        worker = cluster.admin.get_worker(args.worker_id)
    out.result(worker, worker_details(worker))
    return 0


def cmd_worker_spawn(args: argparse.Namespace, out: Emitter) -> int:
    try:
        options = parse_key_values(args.option, "--option")
    except ValueError as exc:
        raise CliError(str(exc)) from None
    with client(args) as cluster:
        worker = cluster.admin.spawn_worker(
            args.model,
            hive_id=args.hive,
            backend=args.backend,
            slots=args.slots,
            device=args.device,
            backend_options=options,
            wait_ready=not args.no_wait,
            restart_policy=args.restart,
            tags=args.tag,
        )
    out.result(worker, worker_details(worker))
    return 0


def cmd_worker_retire(args: argparse.Namespace, out: Emitter) -> int:
    with client(args) as cluster:
        worker = cluster.admin.retire_worker(args.worker_id, force=args.force)
    out.result(worker, f"retired {worker.id} ({worker.model} on {worker.hive_id})")
    return 0


def cmd_worker_drain(args: argparse.Namespace, out: Emitter) -> int:
    """drain, or undrain (args.undrain, set by the parser)."""
    with client(args) as cluster:
        worker = cluster.admin.drain_worker(args.worker_id, undrain=args.undrain)
    out.result(worker, f"worker {worker.id} {drain_verb(args.undrain)}")
    return 0


# ---- processes and backends (on a hive, through the queen) -----------------
# --hive empty: the queen picks the only hive, or says which exist.


def cmd_process_list(args: argparse.Namespace, out: Emitter) -> int:
    with client(args) as cluster:
        procs = cluster.admin.list_processes(hive_id=args.hive)
    out.result(procs, process_rows(procs) if procs else "no Apiary worker processes")
    return 0


def cmd_process_get(args: argparse.Namespace, out: Emitter) -> int:
    with client(args) as cluster:
        process = cluster.admin.get_process(args.pid, hive_id=args.hive)
    out.result(process, process_details(process))
    return 0


def cmd_process_kill(args: argparse.Namespace, out: Emitter) -> int:
    with client(args) as cluster:
        process = cluster.admin.kill_process(args.pid, hive_id=args.hive)
    out.result(process, f"killed pid {process.pid} (worker {process.worker_id})")
    return 0


def cmd_backend_list(args: argparse.Namespace, out: Emitter) -> int:
    with client(args) as cluster:
        backends = cluster.admin.list_backends(hive_id=args.hive)
    out.result(backends, backend_rows(backends))
    return 0


def cmd_backend_get(args: argparse.Namespace, out: Emitter) -> int:
    with client(args) as cluster:
        backend = cluster.admin.get_backend(args.name, hive_id=args.hive)
    out.result(backend, backend_details(backend))
    return 0


# ---- events and history ---------------------------------------------------


def cmd_events(args: argparse.Namespace, out: Emitter) -> int:
    with client(args) as cluster:
        try:
            for event in cluster.admin.watch_events(kinds=args.kind):
                out.item(event, event_line(event))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return 0  # --timeout ends a watch on purpose
            raise
    return 0


def cmd_requests_list(args: argparse.Namespace, out: Emitter) -> int:
    with client(args) as cluster:
        records = cluster.admin.list_requests(
            status=args.status, model=args.model, limit=args.limit
        )
    out.result(records, request_rows(records) if records else "no requests")
    return 0
