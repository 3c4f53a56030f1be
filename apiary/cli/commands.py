"""The client verbs of `apiary`: each talks to the queen (or, for process and backend verbs,
to a hive found through the queen) and prints a table or JSON."""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import grpc
from google.protobuf.message import Message

from apiary.cli.output import (
    backend_rows,
    catalog_details,
    catalog_rows,
    event_line,
    hive_rows,
    model_rows,
    print_json,
    process_details,
    process_rows,
    progress_bar,
    request_rows,
    to_json,
    worker_details,
    worker_rows,
)
from apiary.options import parse_key_values
from apiary.protoutil import READY_STATES, enum_parser, health_name, parse_state, state_name
from apiary.security import Security, TlsFiles
from protos.v1 import (
    common_pb2,
    hive_pb2,
    hive_pb2_grpc,
    queen_pb2,
    queen_pb2_grpc,
    worker_pb2_grpc,
)

QUEEN_ENV = "APIARY_QUEEN"
DEFAULT_QUEEN = "127.0.0.1:7070"


class CliError(Exception):
    pass


def emit(args: argparse.Namespace, value: Message | list[Message], text: str) -> None:
    """JSON for programs (--json), else the text for people."""
    if args.json:
        print_json([to_json(v) for v in value] if isinstance(value, list) else to_json(value))
    else:
        print(text)


def default_queen() -> str:
    return os.environ.get(QUEEN_ENV, DEFAULT_QUEEN)


def channel(args: argparse.Namespace, address: str) -> grpc.Channel:
    """A channel carrying the CLI's token (--token / APIARY_TOKEN) and TLS settings."""
    security = Security(tls=TlsFiles(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca))
    return security.sync_channel(address, args.token)


def admin(args: argparse.Namespace) -> queen_pb2_grpc.QueenAdminStub:
    return queen_pb2_grpc.QueenAdminStub(channel(args, args.queen))


def client(args: argparse.Namespace) -> queen_pb2_grpc.QueenStub:
    return queen_pb2_grpc.QueenStub(channel(args, args.queen))


def hive_stub(args: argparse.Namespace) -> hive_pb2_grpc.HiveStub:
    """The named hive (or the only one), found through the queen's registry."""
    stub = admin(args)
    hive_id = args.hive
    if not hive_id:
        hives = stub.ListHives(queen_pb2.ListHivesRequest(), timeout=args.timeout).hives
        if len(hives) != 1:
            names = ", ".join(h.id for h in hives) or "none"
            raise CliError(f"--hive is required: the cluster has {len(hives)} hives ({names})")
        hive_id = hives[0].id
    hive = stub.GetHive(queen_pb2.GetHiveRequest(hive_id=hive_id), timeout=args.timeout).hive
    return hive_pb2_grpc.HiveStub(channel(args, hive.address))


parse_routing = enum_parser(common_pb2.RoutingPolicy, "ROUTING_POLICY_", "routing policy")
parse_restart = enum_parser(common_pb2.RestartPolicy, "RESTART_POLICY_", "restart policy")
parse_health = enum_parser(common_pb2.HiveHealth, "HIVE_HEALTH_", "hive health")
parse_event_kind = enum_parser(queen_pb2.EventKind, "EVENT_KIND_", "event kind")
parse_request_status = enum_parser(queen_pb2.RequestStatus, "REQUEST_STATUS_", "request status")


# ---- inference ------------------------------------------------------------


def cmd_infer(args: argparse.Namespace) -> int:
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
    if args.direct:
        lease = client(args).Lease(
            queen_pb2.LeaseRequest(model=args.model, required_tags=args.tag, policy=args.policy),
            timeout=args.timeout,
        )
        print(f"[lease {lease.lease_id} on {lease.worker_id} at {lease.address}]", file=sys.stderr)
        request.lease_id = lease.lease_id
        stream = worker_pb2_grpc.WorkerStub(channel(args, lease.address)).Infer(
            request, timeout=args.timeout
        )
    else:
        stream = client(args).Infer(request, timeout=args.timeout)
    last: common_pb2.InferChunk | None = None
    for chunk in stream:
        if args.json:
            print(json.dumps(to_json(chunk), sort_keys=True), flush=True)
        else:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        last = chunk
    if not args.json:
        sys.stdout.write("\n")
        if last is not None:
            reason = common_pb2.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_")
            print(f"[{last.completion_tokens} tokens, finish={reason.lower()}]", file=sys.stderr)
    return 0


# ---- status ---------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    stub = admin(args)
    hives = stub.ListHives(queen_pb2.ListHivesRequest(), timeout=args.timeout).hives
    workers = stub.ListWorkers(queen_pb2.ListWorkersRequest(), timeout=args.timeout).workers
    models = client(args).ListModels(queen_pb2.ListModelsRequest(), timeout=args.timeout).models
    if args.json:
        print_json(
            {
                "hives": [to_json(h) for h in hives],
                "workers": [to_json(w) for w in workers],
                "models": [to_json(m) for m in models],
            }
        )
        return 0
    by_health = collections.Counter(health_name(h.health) for h in hives)
    by_state = collections.Counter(state_name(w.state) for w in workers)
    slots = sum(w.slots_total for w in workers)
    used = sum(w.slots_total - w.slots_available for w in workers if w.state in READY_STATES)
    done = sum(w.requests_completed for w in workers)
    failed = sum(w.requests_failed for w in workers)
    rate = f"{done / (done + failed):.1%}" if done + failed else "-"
    queued = ", ".join(f"{m.name} {m.queued}" for m in models if m.queued) or "none"
    print(f"queen {args.queen}")
    print(f"hives     {len(hives)}: " + (_counts(by_health) or "none"))
    print(f"workers   {len(workers)}: " + (_counts(by_state) or "none"))
    print(f"capacity  {used}/{slots} slots in use")
    print(f"queued    {queued}")
    print(f"requests  {done} completed, {failed} failed (success {rate})")
    top = sorted((w for w in workers if w.state in READY_STATES), key=lambda w: -w.stats.score)[:5]
    if top:
        print("top       " + ", ".join(f"{w.id} ({w.stats.score:.2f})" for w in top))
    print()
    print(hive_rows(hives) if hives else "no hives", end="\n\n")
    print(worker_rows(workers) if workers else "no workers", end="\n\n")
    print(model_rows(models) if models else "no models")
    return 0


def _counts(counter: collections.Counter[str]) -> str:
    return ", ".join(f"{n} {name.lower()}" for name, n in sorted(counter.items()))


def cmd_model_list(args: argparse.Namespace) -> int:
    if args.hive:
        catalog = hive_stub(args).ListModels(hive_pb2.ListCatalogRequest(), timeout=args.timeout)
        text = catalog_rows(catalog.models) if catalog.models else "no models in the catalog"
        emit(args, list(catalog.models), text)
        return 0
    models = client(args).ListModels(queen_pb2.ListModelsRequest(), timeout=args.timeout).models
    emit(args, list(models), model_rows(models) if models else "no models")
    return 0


def cmd_model_get(args: argparse.Namespace) -> int:
    request = hive_pb2.GetCatalogModelRequest(name=args.name)
    model = hive_stub(args).GetModel(request, timeout=args.timeout).model
    emit(args, model, catalog_details(model))
    return 0


def cmd_model_pull(args: argparse.Namespace) -> int:
    source = args.source
    if "://" not in source:
        source = os.path.abspath(source)  # a path on the hive's machine, as the operator typed it
    name = args.name or os.path.splitext(os.path.basename(source.rstrip("/")))[0]
    request = hive_pb2.PullModelRequest(source=source, name=name, sha256=args.sha256)
    last: hive_pb2.PullProgress | None = None
    for update in hive_stub(args).PullModel(request, timeout=args.timeout):
        last = update
        if not args.json:
            sys.stderr.write("\r" + progress_bar(update))
            sys.stderr.flush()
    if not args.json:
        sys.stderr.write("\n")
    if last is not None and last.HasField("model"):
        if args.json:
            print_json(to_json(last.model))
        else:
            print(
                f"pulled {last.model.name} ({last.model.file}, sha256 {last.model.sha256[:16]}...)"
            )
    return 0


def cmd_model_rm(args: argparse.Namespace) -> int:
    request = hive_pb2.DeleteCatalogModelRequest(name=args.name)
    model = hive_stub(args).DeleteModel(request, timeout=args.timeout).model
    emit(args, model, f"deleted {model.name} ({model.file})")
    return 0


# ---- hives ----------------------------------------------------------------


def cmd_hive_list(args: argparse.Namespace) -> int:
    hives = admin(args).ListHives(queen_pb2.ListHivesRequest(), timeout=args.timeout).hives
    emit(args, list(hives), hive_rows(hives) if hives else "no hives")
    return 0


def cmd_hive_get(args: argparse.Namespace) -> int:
    reply = admin(args).GetHive(
        queen_pb2.GetHiveRequest(hive_id=args.hive_id), timeout=args.timeout
    )
    if args.json:
        print_json(to_json(reply))
        return 0
    print(hive_rows([reply.hive]), end="\n\n")
    print(worker_rows(reply.workers) if reply.workers else "no workers")
    return 0


def drain_verb(undrain: bool) -> str:
    return "undrained" if undrain else "drained (in-flight requests finish; no new ones)"


def cmd_hive_drain(args: argparse.Namespace) -> int:
    """drain, or undrain (args.undrain, set by the parser)."""
    undrain = args.undrain
    request = queen_pb2.DrainHiveRequest(hive_id=args.hive_id, undrain=undrain)
    reply = admin(args).DrainHive(request, timeout=args.timeout)
    emit(args, reply.hive, f"hive {reply.hive.id} {drain_verb(undrain)}")
    return 0


# ---- workers --------------------------------------------------------------


def cmd_worker_list(args: argparse.Namespace) -> int:
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
    emit(args, list(workers), worker_rows(workers) if workers else "no workers")
    return 0


def _print_worker(worker: common_pb2.WorkerRecord, as_json: bool) -> None:
    if as_json:
        print_json(to_json(worker))
    else:
        print(worker_details(worker))


def cmd_worker_get(args: argparse.Namespace) -> int:
    request = queen_pb2.GetWorkerRequest(worker_id=args.worker_id)
    _print_worker(admin(args).GetWorker(request, timeout=args.timeout).worker, args.json)
    return 0


def cmd_worker_spawn(args: argparse.Namespace) -> int:
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
    _print_worker(admin(args).SpawnWorker(request, timeout=args.timeout).worker, args.json)
    return 0


def cmd_worker_retire(args: argparse.Namespace) -> int:
    request = queen_pb2.RetireWorkerRequest(worker_id=args.worker_id, force=args.force)
    reply = admin(args).RetireWorker(request, timeout=args.timeout)
    emit(
        args,
        reply.worker,
        f"retired {reply.worker.id} ({reply.worker.model} on {reply.worker.hive_id})",
    )
    return 0


def cmd_worker_drain(args: argparse.Namespace) -> int:
    """drain, or undrain (args.undrain, set by the parser)."""
    undrain = args.undrain
    request = queen_pb2.DrainWorkerRequest(worker_id=args.worker_id, undrain=undrain)
    reply = admin(args).DrainWorker(request, timeout=args.timeout)
    emit(args, reply.worker, f"worker {reply.worker.id} {drain_verb(undrain)}")
    return 0


# ---- processes and backends (on a hive) -----------------------------------


def cmd_process_list(args: argparse.Namespace) -> int:
    procs = hive_stub(args).ListProcesses(hive_pb2.ListProcessesRequest(), timeout=args.timeout)
    emit(
        args,
        list(procs.processes),
        process_rows(procs.processes) if procs.processes else "no Apiary worker processes",
    )
    return 0


def cmd_process_get(args: argparse.Namespace) -> int:
    reply = hive_stub(args).GetProcess(
        hive_pb2.GetProcessRequest(pid=args.pid), timeout=args.timeout
    )
    emit(args, reply.process, process_details(reply.process))
    return 0


def cmd_process_kill(args: argparse.Namespace) -> int:
    reply = hive_stub(args).KillProcess(
        hive_pb2.KillProcessRequest(pid=args.pid), timeout=args.timeout
    )
    emit(args, reply.process, f"killed pid {reply.process.pid} (worker {reply.process.worker_id})")
    return 0


def cmd_backend_list(args: argparse.Namespace) -> int:
    reply = hive_stub(args).ListBackends(hive_pb2.ListBackendsRequest(), timeout=args.timeout)
    emit(args, list(reply.backends), backend_rows(reply.backends))
    return 0


def cmd_backend_get(args: argparse.Namespace) -> int:
    reply = hive_stub(args).GetBackend(
        hive_pb2.GetBackendRequest(name=args.name), timeout=args.timeout
    )
    if args.json:
        print_json(to_json(reply.backend))
        return 0
    print(backend_rows([reply.backend]))
    for name, help_text in sorted(reply.backend.options.items()):
        print(f"  option {name}: {help_text}")
    return 0


# ---- events and history ---------------------------------------------------


def cmd_events(args: argparse.Namespace) -> int:
    kinds = args.kind
    stream = admin(args).WatchEvents(
        queen_pb2.WatchEventsRequest(kinds=kinds), timeout=args.timeout
    )
    try:
        for event in stream:
            if args.json:
                print(json.dumps(to_json(event), sort_keys=True), flush=True)
            else:
                print(event_line(event), flush=True)
    except grpc.RpcError as exc:
        if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return 0  # --timeout ends a watch on purpose
        raise
    return 0


def cmd_requests_list(args: argparse.Namespace) -> int:
    status = args.status
    request = queen_pb2.ListRequestsRequest(status=status, model=args.model, limit=args.limit)
    records = admin(args).ListRequests(request, timeout=args.timeout).requests
    emit(args, list(records), request_rows(records) if records else "no requests")
    return 0
