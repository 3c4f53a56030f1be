"""`apiary`: run a queen or hive, bring up a one-machine cluster, and talk to a running cluster."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

import grpc

from apiary.cli import commands as c
from apiary.cli.commands import DEFAULT_QUEEN, QUEEN_ENV, CliError

# `apiary hive VERB` for these; any other `apiary hive ...` runs a hive.
HIVE_ADMIN_VERBS = ("list", "get", "drain", "undrain")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apiary", description=__doc__)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(
        parent: Any,
        name: str,
        func: Callable[[argparse.Namespace], int],
        help_text: str,
        json_flag: bool = True,
        timeout: float | None = 10.0,
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        p.add_argument(
            "--queen",
            default=c.default_queen(),
            help=f"queen address (env {QUEEN_ENV}; default {DEFAULT_QUEEN})",
        )
        p.add_argument(
            "--timeout", type=float, default=timeout, help="seconds (deadline of the call)"
        )
        p.add_argument(
            "--token",
            default=os.environ.get("APIARY_TOKEN", ""),
            help="client or admin token (env APIARY_TOKEN; never printed)",
        )
        p.add_argument(
            "--tls-ca",
            default=os.environ.get("APIARY_TLS_CA", ""),
            help="CA that signed the servers' certificates (env APIARY_TLS_CA)",
        )
        p.add_argument(
            "--tls-cert",
            default=os.environ.get("APIARY_TLS_CERT", ""),
            help="client certificate, for mTLS (env APIARY_TLS_CERT)",
        )
        p.add_argument(
            "--tls-key",
            default=os.environ.get("APIARY_TLS_KEY", ""),
            help="its key (env APIARY_TLS_KEY)",
        )
        if json_flag:
            p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    def group(name: str, help_text: str) -> Any:
        return sub.add_parser(name, help=help_text).add_subparsers(
            dest=f"{name}_verb", required=True, metavar="VERB"
        )

    sub.add_parser("queen", help="run the queen (see `apiary queen --help`)", add_help=False)
    sub.add_parser(
        "up", help="run a one-machine cluster: queen + hive + 2 echo workers", add_help=False
    )
    sub.add_parser(
        "certs", help="`apiary certs init DIR`: CA, host certs and tokens", add_help=False
    )

    p = verb(sub, "infer", c.cmd_infer, "stream a completion through the queen", timeout=60.0)
    p.add_argument("model")
    p.add_argument("prompt")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument(
        "--policy", type=c.parse_routing, default=0, help="routing policy for this request"
    )
    p.add_argument("--tag", action="append", default=[], help="require a worker tag (repeatable)")
    p.add_argument("--request-id", default="")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None, help="same seed, same completion")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument(
        "--direct", action="store_true", help="lease a slot and call the worker directly"
    )

    verb(sub, "status", c.cmd_status, "the cluster at a glance, then hives, workers and models")

    model = group("model", "models the cluster serves, and each hive's model catalog")
    p = verb(model, "list", c.cmd_model_list, "models with worker counts; --hive: that catalog")
    p.add_argument("--hive", default="", help="list this hive's catalog instead")
    for name, func, text in [
        ("get", c.cmd_model_get, "one model in a hive's catalog"),
        ("rm", c.cmd_model_rm, "delete a model from a hive's catalog (refused while in use)"),
    ]:
        p = verb(model, name, func, text)
        p.add_argument("name")
        p.add_argument("--hive", default="", help="hive id (optional when there is one hive)")
    p = verb(model, "pull", c.cmd_model_pull, "fetch a GGUF into a hive's catalog", timeout=None)
    p.add_argument("source", help="path on the hive's machine, file://PATH or http(s)://URL")
    p.add_argument("--name", default="", help="catalog name (default: the file name)")
    p.add_argument("--sha256", default="", help="refuse the file unless it has this digest")
    p.add_argument("--hive", default="", help="hive id (optional when there is one hive)")

    hive = group("hive", "run a hive (`apiary hive --queen ADDR ...`), or list, inspect, drain")
    verb(hive, "list", c.cmd_hive_list, "hives with health, heartbeat age and capacity")
    verb(hive, "get", c.cmd_hive_get, "one hive and its workers").add_argument("hive_id")
    for name, undrain, text in [
        ("drain", False, "stop routing new requests to a hive"),
        ("undrain", True, "route to a drained hive again"),
    ]:
        p = verb(hive, name, c.cmd_hive_drain, text)
        p.add_argument("hive_id")
        p.set_defaults(undrain=undrain)

    worker = group("worker", "list, inspect, spawn, drain and retire workers")
    p = verb(worker, "list", c.cmd_worker_list, "workers, filtered")
    p.add_argument("--hive", default="")
    p.add_argument("--model", default="")
    p.add_argument("--state", default="", help="LOADING, IDLE, BUSY, STOPPING or FAILED")
    p.add_argument("--tag", action="append", default=[], help="carrying this tag (repeatable)")
    p.add_argument("--health", type=c.parse_health, default=0, help="hive health")
    p.add_argument("--min-free", type=int, default=0, help="at least this many free slots")
    p = verb(worker, "get", c.cmd_worker_get, "one worker in detail, with the queen's statistics")
    p.add_argument("worker_id")
    p = verb(worker, "spawn", c.cmd_worker_spawn, "start a worker on a hive", timeout=180.0)
    p.add_argument("--hive", default="", help="hive id (optional when there is one hive)")
    p.add_argument("--model", required=True)
    p.add_argument("--backend", default="echo", help="inference backend (echo: tests/benchmarks)")
    p.add_argument("--slots", type=int, default=1)
    p.add_argument("--device", default="")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--tag", action="append", default=[], help="a capability tag (repeatable)")
    p.add_argument("--no-wait", action="store_true", help="return while the worker is LOADING")
    p.add_argument(
        "--restart",
        type=c.parse_restart,
        default=0,
        help="never, on-failure or always (default: the hive's)",
    )
    p = verb(
        worker,
        "retire",
        c.cmd_worker_retire,
        "stop a worker (gracefully unless --force)",
        timeout=60.0,
    )
    p.add_argument("worker_id")
    p.add_argument("--force", action="store_true", help="SIGKILL at once")
    p.add_argument("--hive", default="", help="accepted for symmetry; the queen knows the hive")
    for name, undrain, text in [
        ("drain", False, "stop routing new requests to a worker"),
        ("undrain", True, "route to a drained worker again"),
    ]:
        p = verb(worker, name, c.cmd_worker_drain, text)
        p.add_argument("worker_id")
        p.set_defaults(undrain=undrain)

    process = worker.add_parser(
        "process", help="worker processes on a hive's machine, orphans included"
    ).add_subparsers(dest="process_verb", required=True, metavar="VERB")
    p = verb(process, "list", c.cmd_process_list, "every Apiary worker process on the machine")
    p.add_argument("--hive", default="", help="hive id (optional when there is one hive)")
    for name, func, text in [
        ("get", c.cmd_process_get, "one worker process by pid"),
        ("kill", c.cmd_process_kill, "SIGKILL a worker process (refuses other pids)"),
    ]:
        p = verb(process, name, func, text)
        p.add_argument("pid", type=int)
        p.add_argument("--hive", default="")

    backend = worker.add_parser("backend", help="inference backends a hive can run").add_subparsers(
        dest="backend_verb", required=True, metavar="VERB"
    )
    p = verb(backend, "list", c.cmd_backend_list, "backends, whether available, version, devices")
    p.add_argument("--hive", default="")
    p = verb(backend, "get", c.cmd_backend_get, "one backend and its options")
    p.add_argument("name")
    p.add_argument("--hive", default="")

    p = verb(sub, "events", c.cmd_events, "print cluster events as they happen", timeout=None)
    p.add_argument(
        "--kind",
        action="append",
        default=[],
        type=c.parse_event_kind,
        help="only this kind (repeatable), e.g. request-completed",
    )

    requests = group("requests", "the queen's durable request history")
    p = verb(requests, "list", c.cmd_requests_list, "recent requests, newest first")
    p.add_argument(
        "--status",
        type=c.parse_request_status,
        default=0,
        help="queued, running, completed or failed",
    )
    p.add_argument("--model", default="")
    p.add_argument("--limit", type=int, default=50)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Servers parse their own flags.
    if argv and argv[0] == "queen":
        from queen.__main__ import main as queen_main

        return queen_main(argv[1:], prog="apiary queen")
    if argv and argv[0] == "hive" and (len(argv) == 1 or argv[1] not in HIVE_ADMIN_VERBS):
        from hive.__main__ import main as hive_main

        return hive_main(argv[1:], prog="apiary hive")
    if argv and argv[0] == "certs":
        from apiary.certs import main as certs_main

        return certs_main(argv[1:])
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
    except BrokenPipeError:
        # The reader went away (`apiary status | head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


__all__ = ["main"]
