"""`apiary`: run a queen or hive, bring up a one-machine cluster, and talk to a running cluster."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from apiary.protoutil import parse_state, state_name
from protos.v1 import common_pb2, hive_pb2, hive_pb2_grpc, queen_pb2, queen_pb2_grpc

QUEEN_ENV = "APIARY_QUEEN"
DEFAULT_QUEEN = "127.0.0.1:7070"


class CliError(Exception):
    pass


# ---- output ---------------------------------------------------------------


def to_json(message: Message) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True)


def print_json(value: object) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def age(ts_seconds: int) -> str:
    return duration(max(time.time() - ts_seconds, 0)) if ts_seconds else "-"


def worker_rows(workers: Sequence[common_pb2.WorkerRecord]) -> str:
    rows = [
        (
            w.id,
            w.hive_id,
            w.model,
            w.backend,
            state_name(w.state),
            f"{w.slots_available}/{w.slots_total}",
            w.pid or "-",
            w.address or "-",
            age(w.started_at.seconds),
            w.requests_completed,
            w.requests_failed,
            w.failure_reason or "",
        )
        for w in workers
    ]
    headers = (
        "WORKER",
        "HIVE",
        "MODEL",
        "BACKEND",
        "STATE",
        "FREE",
        "PID",
        "ADDRESS",
        "AGE",
        "DONE",
        "FAILED",
        "REASON",
    )
    return table(headers, rows)


def gib(n: int) -> str:
    return f"{n / 2**30:.1f}G"


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def hive_rows(hives: Sequence[queen_pb2.HiveInfo]) -> str:
    rows = [
        (
            h.id,
            h.address,
            common_pb2.HiveHealth.Name(h.health).removeprefix("HIVE_HEALTH_"),
            f"{h.heartbeat_age_seconds:.1f}s",
            h.worker_count,
            f"{h.slots_in_use}/{h.slots_total}",
            f"{h.resources.load_1m:.1f}/{h.resources.cpu_count}",
            f"{gib(h.resources.memory_available_bytes)}/{gib(h.resources.memory_total_bytes)}",
            f"{h.stats.spawns}/{h.stats.crashes}/{h.stats.restarts}",
            duration(h.stats.uptime_seconds),
            h.health_reason,
        )
        for h in hives
    ]
    headers = (
        "HIVE",
        "ADDRESS",
        "HEALTH",
        "BEAT",
        "WORKERS",
        "SLOTS USED",
        "LOAD/CPUS",
        "MEM FREE",
        "SPAWN/CRASH/RESTART",
        "UP",
        "REASON",
    )
    return table(headers, rows)


# ---- client verbs ---------------------------------------------------------


def admin(args: argparse.Namespace) -> queen_pb2_grpc.QueenAdminStub:
    return queen_pb2_grpc.QueenAdminStub(grpc.insecure_channel(args.queen))


def client(args: argparse.Namespace) -> queen_pb2_grpc.QueenStub:
    return queen_pb2_grpc.QueenStub(grpc.insecure_channel(args.queen))


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
    address = stub.GetHive(queen_pb2.GetHiveRequest(hive_id=hive_id), timeout=args.timeout).hive
    return hive_pb2_grpc.HiveStub(grpc.insecure_channel(address.address))


def cmd_infer(args: argparse.Namespace) -> int:
    request = common_pb2.InferRequest(
        model=args.model, prompt=args.prompt, max_tokens=args.max_tokens
    )
    last: common_pb2.InferChunk | None = None
    for chunk in client(args).Infer(request, timeout=args.timeout):
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
    print(
        f"queen {args.queen}: {len(hives)} hive(s), {len(workers)} worker(s), "
        f"{len(models)} model(s)\n"
    )
    print(hive_rows(hives) if hives else "no hives", end="\n\n")
    print(worker_rows(workers) if workers else "no workers", end="\n\n")
    print(model_rows(models) if models else "no models")
    return 0


def model_rows(models: Sequence[queen_pb2.ModelInfo]) -> str:
    return table(
        ("MODEL", "IDLE", "BUSY", "LOADING", "FAILED", "QUEUED"),
        [(m.name, m.idle, m.busy, m.loading, m.failed, m.queued) for m in models],
    )


def cmd_model_list(args: argparse.Namespace) -> int:
    models = client(args).ListModels(queen_pb2.ListModelsRequest(), timeout=args.timeout).models
    if args.json:
        print_json([to_json(m) for m in models])
    else:
        print(model_rows(models) if models else "no models")
    return 0


def cmd_worker_list(args: argparse.Namespace) -> int:
    try:
        state = parse_state(args.state) if args.state else common_pb2.WORKER_STATE_UNSPECIFIED
    except ValueError as exc:
        raise CliError(str(exc)) from None
    request = queen_pb2.ListWorkersRequest(hive_id=args.hive, model=args.model, state=state)
    workers = admin(args).ListWorkers(request, timeout=args.timeout).workers
    if args.json:
        print_json([to_json(w) for w in workers])
    else:
        print(worker_rows(workers) if workers else "no workers")
    return 0


def print_worker(worker: common_pb2.WorkerRecord, as_json: bool) -> None:
    if as_json:
        print_json(to_json(worker))
        return
    fields = [
        ("id", worker.id),
        ("hive", worker.hive_id),
        ("model", worker.model),
        ("backend", worker.backend),
        ("device", worker.device),
        ("state", state_name(worker.state)),
        ("slots", f"{worker.slots_available} free of {worker.slots_total}"),
        ("pid", worker.pid or "-"),
        ("address", worker.address or "-"),
        ("started", age(worker.started_at.seconds) + " ago"),
        ("last activity", age(worker.last_activity.seconds) + " ago"),
        ("requests", f"{worker.requests_completed} completed, {worker.requests_failed} failed"),
        ("options", ", ".join(f"{k}={v}" for k, v in sorted(worker.backend_options.items()))),
        ("restart policy", policy_name(worker.restart_policy)),
        ("restarts", worker.restart_count),
        ("restart in", f"{worker.restart_in_seconds:.1f}s" if worker.restart_in_seconds else "-"),
        ("health fails", worker.health_failures),
        ("cpu / rss", f"{worker.cpu_percent:.0f}% / {worker.rss_bytes / 2**20:.0f} MiB"),
        ("failure", worker.failure_reason or "-"),
    ]
    for key, value in fields:
        print(f"{key + ':':<16}{value}")


def policy_name(policy: common_pb2.RestartPolicy.ValueType) -> str:
    if not policy:
        return "-"
    return (
        common_pb2.RestartPolicy.Name(policy)
        .removeprefix("RESTART_POLICY_")
        .lower()
        .replace("_", "-")
    )


def cmd_process_list(args: argparse.Namespace) -> int:
    procs = hive_stub(args).ListProcesses(hive_pb2.ListProcessesRequest(), timeout=args.timeout)
    if args.json:
        print_json([to_json(p) for p in procs.processes])
        return 0
    rows = [
        (
            p.pid,
            p.worker_id,
            p.model,
            p.backend,
            f"{p.cpu_percent:.0f}%",
            f"{p.rss_bytes / 2**20:.0f}M",
            f"{p.age_seconds:.0f}s",
            p.status,
            "yes" if p.known else "ORPHAN",
        )
        for p in procs.processes
    ]
    headers = ("PID", "WORKER", "MODEL", "BACKEND", "CPU", "RSS", "AGE", "STATUS", "IN TABLE")
    print(table(headers, rows) if rows else "no Apiary worker processes")
    return 0


def print_process(process: hive_pb2.WorkerProcess, as_json: bool) -> None:
    if as_json:
        print_json(to_json(process))
        return
    for key, value in [
        ("pid", process.pid),
        ("worker", process.worker_id),
        ("hive", process.hive_id),
        ("model", process.model),
        ("backend", process.backend),
        ("status", process.status),
        ("cpu", f"{process.cpu_percent:.0f}%"),
        ("rss", f"{process.rss_bytes / 2**20:.0f} MiB"),
        ("age", f"{process.age_seconds:.0f}s"),
        ("in table", "yes" if process.known else "no (orphan)"),
        ("cmdline", " ".join(process.cmdline)),
    ]:
        print(f"{key + ':':<11}{value}")


def cmd_process_get(args: argparse.Namespace) -> int:
    reply = hive_stub(args).GetProcess(
        hive_pb2.GetProcessRequest(pid=args.pid), timeout=args.timeout
    )
    print_process(reply.process, args.json)
    return 0


def cmd_process_kill(args: argparse.Namespace) -> int:
    reply = hive_stub(args).KillProcess(
        hive_pb2.KillProcessRequest(pid=args.pid), timeout=args.timeout
    )
    if args.json:
        print_json(to_json(reply.process))
    else:
        print(f"killed pid {reply.process.pid} (worker {reply.process.worker_id})")
    return 0


def backend_rows(backends: Sequence[hive_pb2.BackendInfo]) -> str:
    rows = [
        (
            b.name,
            "yes" if b.available else "no",
            b.version or "-",
            ",".join(b.devices) or "-",
            "tests/benchmarks only" if b.for_testing else "",
            b.unavailable_reason,
        )
        for b in backends
    ]
    return table(("BACKEND", "AVAILABLE", "VERSION", "DEVICES", "NOTE", "WHY NOT"), rows)


def cmd_backend_list(args: argparse.Namespace) -> int:
    reply = hive_stub(args).ListBackends(hive_pb2.ListBackendsRequest(), timeout=args.timeout)
    if args.json:
        print_json([to_json(b) for b in reply.backends])
    else:
        print(backend_rows(reply.backends))
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


def cmd_worker_get(args: argparse.Namespace) -> int:
    reply = admin(args).GetWorker(
        queen_pb2.GetWorkerRequest(worker_id=args.worker_id), timeout=args.timeout
    )
    print_worker(reply.worker, args.json)
    return 0


def cmd_worker_spawn(args: argparse.Namespace) -> int:
    options: dict[str, str] = {}
    for pair in args.option:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--option {pair!r} is not KEY=VALUE")
        options[key] = value
    request = queen_pb2.QueenSpawnWorkerRequest(
        hive_id=args.hive,
        model=args.model,
        backend=args.backend,
        slots=args.slots,
        device=args.device,
        backend_options=options,
        wait_ready=not args.no_wait,
        restart_policy=args.restart,
    )
    reply = admin(args).SpawnWorker(request, timeout=args.timeout)
    print_worker(reply.worker, args.json)
    return 0


def cmd_worker_retire(args: argparse.Namespace) -> int:
    request = queen_pb2.RetireWorkerRequest(worker_id=args.worker_id, force=args.force)
    reply = admin(args).RetireWorker(request, timeout=args.timeout)
    if args.json:
        print_json(to_json(reply.worker))
    else:
        print(f"retired {reply.worker.id} ({reply.worker.model} on {reply.worker.hive_id})")
    return 0


# ---- parser ---------------------------------------------------------------


def parse_policy(name: str) -> common_pb2.RestartPolicy.ValueType:
    try:
        return common_pb2.RestartPolicy.Value("RESTART_POLICY_" + name.upper().replace("-", "_"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"unknown restart policy {name!r}; choose never, on-failure or always"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apiary", description=__doc__)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(
        parent: Any,
        name: str,
        func: Callable[[argparse.Namespace], int],
        help_text: str,
        json_flag: bool = True,
        timeout: float = 10.0,
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        p.add_argument(
            "--queen",
            default=os.environ.get(QUEEN_ENV, DEFAULT_QUEEN),
            help=f"queen address (env {QUEEN_ENV}; default {DEFAULT_QUEEN})",
        )
        p.add_argument(
            "--timeout", type=float, default=timeout, help="seconds (deadline of the call)"
        )
        if json_flag:
            p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    sub.add_parser("queen", help="run the queen (see `apiary queen --help`)", add_help=False)
    sub.add_parser("hive", help="run a hive (see `apiary hive --help`)", add_help=False)
    sub.add_parser(
        "up", help="run a one-machine cluster: queen + hive + 2 echo workers", add_help=False
    )

    p = verb(sub, "infer", cmd_infer, "stream a completion through the queen", timeout=60.0)
    p.add_argument("model")
    p.add_argument("prompt")
    p.add_argument("--max-tokens", type=int, default=16)

    verb(sub, "status", cmd_status, "hives, workers and models as tables")

    model = sub.add_parser("model", help="models served by the cluster").add_subparsers(
        dest="model_verb", required=True, metavar="VERB"
    )
    verb(model, "list", cmd_model_list, "models with idle / busy / loading worker counts")

    worker = sub.add_parser(
        "worker", help="list, inspect, spawn and retire workers"
    ).add_subparsers(dest="worker_verb", required=True, metavar="VERB")
    p = verb(worker, "list", cmd_worker_list, "workers, filtered by hive, model or state")
    p.add_argument("--hive", default="")
    p.add_argument("--model", default="")
    p.add_argument("--state", default="", help="LOADING, IDLE, BUSY, STOPPING or FAILED")
    p = verb(worker, "get", cmd_worker_get, "one worker in detail")
    p.add_argument("worker_id")
    p = verb(worker, "spawn", cmd_worker_spawn, "start a worker on a hive", timeout=180.0)
    p.add_argument("--hive", default="", help="hive id (optional when there is one hive)")
    p.add_argument("--model", required=True)
    p.add_argument("--backend", default="echo", help="inference backend (echo: tests/benchmarks)")
    p.add_argument("--slots", type=int, default=1)
    p.add_argument("--device", default="")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-wait", action="store_true", help="return while the worker is LOADING")
    p.add_argument(
        "--restart",
        type=parse_policy,
        default=common_pb2.RESTART_POLICY_UNSPECIFIED,
        help="never, on-failure or always (default: the hive's)",
    )
    p = verb(
        worker,
        "retire",
        cmd_worker_retire,
        "stop a worker (gracefully unless --force)",
        timeout=60.0,
    )
    p.add_argument("worker_id")
    p.add_argument("--force", action="store_true", help="SIGKILL at once")
    p.add_argument("--hive", default="", help="accepted for symmetry; the queen knows the hive")

    process = worker.add_parser(
        "process", help="worker processes on a hive's machine, orphans included"
    ).add_subparsers(dest="process_verb", required=True, metavar="VERB")
    p = verb(process, "list", cmd_process_list, "every Apiary worker process on the hive's machine")
    p.add_argument("--hive", default="", help="hive id (optional when there is one hive)")
    p = verb(process, "get", cmd_process_get, "one worker process by pid")
    p.add_argument("pid", type=int)
    p.add_argument("--hive", default="")
    p = verb(process, "kill", cmd_process_kill, "SIGKILL a worker process (refuses other pids)")
    p.add_argument("pid", type=int)
    p.add_argument("--hive", default="")

    backend = worker.add_parser("backend", help="inference backends a hive can run").add_subparsers(
        dest="backend_verb", required=True, metavar="VERB"
    )
    p = verb(backend, "list", cmd_backend_list, "backends, whether available, version, devices")
    p.add_argument("--hive", default="")
    p = verb(backend, "get", cmd_backend_get, "one backend and its options")
    p.add_argument("name")
    p.add_argument("--hive", default="")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Servers parse their own flags.
    if argv and argv[0] == "queen":
        from queen.__main__ import main as queen_main

        return queen_main(argv[1:], prog="apiary queen")
    if argv and argv[0] == "hive":
        from hive.__main__ import main as hive_main

        return hive_main(argv[1:], prog="apiary hive")
    if argv and argv[0] == "up":
        from apiary.up import main as up_main

        return up_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        name = code.name if code else "ERROR"
        if code == grpc.StatusCode.UNAVAILABLE and "failed to connect" in (details or "").lower():
            details = f"cannot reach the queen at {args.queen}; is it running? ({QUEEN_ENV})"
        print(f"error: {name}: {details}", file=sys.stderr)
        return 1
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
