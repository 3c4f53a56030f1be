"""The `apiary` command line: one function per command group, one helper for the flags every
client verb shares. Each client verb's parser carries the command it runs (`func`)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from apiary.protoutil import enum_parser
from cli import commands as cmd
from cli.connect import DEFAULT_QUEEN, QUEEN_ENV, default_queen
from cli.emit import Emitter
from protos.v1 import common_pb2, queen_pb2

DESCRIPTION = (
    "`apiary`: run a queen or hive, bring up a one-machine cluster, and talk to a running cluster."
)

Command = Callable[[argparse.Namespace, Emitter], int]
# argparse's subparsers action is a private class (_SubParsersAction).
Subparsers = Any

parse_routing = enum_parser(common_pb2.RoutingPolicy, "ROUTING_POLICY_", "routing policy")
parse_restart = enum_parser(common_pb2.RestartPolicy, "RESTART_POLICY_", "restart policy")
parse_health = enum_parser(common_pb2.HiveHealth, "HIVE_HEALTH_", "hive health")
parse_event_kind = enum_parser(queen_pb2.EventKind, "EVENT_KIND_", "event kind")
parse_request_status = enum_parser(queen_pb2.RequestStatus, "REQUEST_STATUS_", "request status")

HIVE_HELP = "hive id (optional when there is one hive)"


def connection_flags(p: argparse.ArgumentParser, timeout: float | None) -> None:
    """Where the queen is, how long a call may take, the credentials, and --json."""
    p.add_argument(
        "--queen",
        default=default_queen(),
        help=f"queen address (env {QUEEN_ENV}; default {DEFAULT_QUEEN})",
    )
    p.add_argument("--timeout", type=float, default=timeout, help="seconds (deadline of the call)")
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
    p.add_argument("--json", action="store_true", help="machine-readable output")


def verb(
    parent: Subparsers,
    name: str,
    func: Command,
    help_text: str,
    timeout: float | None = 10.0,
) -> argparse.ArgumentParser:
    """A client verb running `func`, with the connection flags."""
    p: argparse.ArgumentParser = parent.add_parser(name, help=help_text, description=help_text)
    p.set_defaults(func=func)
    connection_flags(p, timeout)
    return p


def group(parent: Subparsers, name: str, help_text: str, dest: str = "") -> Subparsers:
    return parent.add_parser(name, help=help_text).add_subparsers(
        dest=dest or f"{name}_verb", required=True, metavar="VERB"
    )


def add_server_verbs(sub: Subparsers) -> None:
    """Listed for --help only: `main` hands these to the server's own parser."""
    sub.add_parser("queen", help="run the queen (see `apiary queen --help`)", add_help=False)
    sub.add_parser(
        "up", help="run a one-machine cluster: queen + hive + 2 echo workers", add_help=False
    )
    sub.add_parser(
        "certs", help="`apiary certs init DIR`: CA, host certs and tokens", add_help=False
    )


def add_infer(sub: Subparsers) -> None:
    p = verb(sub, "infer", cmd.cmd_infer, "stream a completion through the queen", timeout=60.0)
    p.add_argument("model")
    p.add_argument("prompt")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument(
        "--policy", type=parse_routing, default=0, help="routing policy for this request"
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


def add_model_verbs(sub: Subparsers) -> None:
    model = group(sub, "model", "models the cluster serves, and each hive's model catalog")
    p = verb(model, "list", cmd.cmd_model_list, "models with worker counts; --hive: that catalog")
    p.add_argument("--hive", default="", help="list this hive's catalog instead")
    for name, func, text in [
        ("get", cmd.cmd_model_get, "one model in a hive's catalog"),
        ("rm", cmd.cmd_model_rm, "delete a model from a hive's catalog (refused while in use)"),
    ]:
        p = verb(model, name, func, text)
        p.add_argument("name")
        p.add_argument("--hive", default="", help=HIVE_HELP)
    p = verb(model, "pull", cmd.cmd_model_pull, "fetch a GGUF into a hive's catalog", timeout=None)
    p.add_argument("source", help="path on the hive's machine, file://PATH or http(s)://URL")
    p.add_argument("--name", default="", help="catalog name (default: the file name)")
    p.add_argument("--sha256", default="", help="refuse the file unless it has this digest")
    p.add_argument("--hive", default="", help=HIVE_HELP)


def add_drain_verbs(parent: Subparsers, func: Command, noun: str, id_dest: str) -> None:
    """`drain ID` and `undrain ID`: one command, told which by args.undrain."""
    for name, undrain, text in [
        ("drain", False, f"stop routing new requests to a {noun}"),
        ("undrain", True, f"route to a drained {noun} again"),
    ]:
        p = verb(parent, name, func, text)
        p.add_argument(id_dest)
        p.set_defaults(undrain=undrain)


def add_hive_verbs(sub: Subparsers) -> None:
    hive = group(
        sub, "hive", "run a hive (`apiary hive --queen ADDR ...`), or list, inspect, drain"
    )
    verb(hive, "list", cmd.cmd_hive_list, "hives with health, heartbeat age and capacity")
    verb(hive, "get", cmd.cmd_hive_get, "one hive and its workers").add_argument("hive_id")
    add_drain_verbs(hive, cmd.cmd_hive_drain, "hive", "hive_id")


def add_worker_verbs(sub: Subparsers) -> None:
    worker = group(sub, "worker", "list, inspect, spawn, drain and retire workers")
    p = verb(worker, "list", cmd.cmd_worker_list, "workers, filtered")
    p.add_argument("--hive", default="")
    p.add_argument("--model", default="")
    p.add_argument("--state", default="", help="LOADING, IDLE, BUSY, STOPPING or FAILED")
    p.add_argument("--tag", action="append", default=[], help="carrying this tag (repeatable)")
    p.add_argument("--health", type=parse_health, default=0, help="hive health")
    p.add_argument("--min-free", type=int, default=0, help="at least this many free slots")
    p = verb(worker, "get", cmd.cmd_worker_get, "one worker in detail, with the queen's statistics")
    p.add_argument("worker_id")
    add_worker_spawn(worker)
    p = verb(
        worker, "retire", cmd.cmd_worker_retire, "stop a worker (gracefully unless --force)", 60.0
    )
    p.add_argument("worker_id")
    p.add_argument("--force", action="store_true", help="SIGKILL at once")
    p.add_argument("--hive", default="", help="accepted for symmetry; the queen knows the hive")
    add_drain_verbs(worker, cmd.cmd_worker_drain, "worker", "worker_id")
    add_process_verbs(worker)
    add_backend_verbs(worker)


def add_worker_spawn(worker: Subparsers) -> None:
    p = verb(worker, "spawn", cmd.cmd_worker_spawn, "start a worker on a hive", timeout=180.0)
    p.add_argument("--hive", default="", help=HIVE_HELP)
    p.add_argument("--model", required=True)
    p.add_argument("--backend", default="echo", help="inference backend (echo: tests/benchmarks)")
    p.add_argument("--slots", type=int, default=1)
    p.add_argument("--device", default="")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--tag", action="append", default=[], help="a capability tag (repeatable)")
    p.add_argument("--no-wait", action="store_true", help="return while the worker is LOADING")
    p.add_argument(
        "--restart",
        type=parse_restart,
        default=0,
        help="never, on-failure or always (default: the hive's)",
    )


def add_process_verbs(worker: Subparsers) -> None:
    process = group(
        worker, "process", "worker processes on a hive's machine, orphans included", "process_verb"
    )
    p = verb(process, "list", cmd.cmd_process_list, "every Apiary worker process on the machine")
    p.add_argument("--hive", default="", help=HIVE_HELP)
    for name, func, text in [
        ("get", cmd.cmd_process_get, "one worker process by pid"),
        ("kill", cmd.cmd_process_kill, "SIGKILL a worker process (refuses other pids)"),
    ]:
        p = verb(process, name, func, text)
        p.add_argument("pid", type=int)
        p.add_argument("--hive", default="")


def add_backend_verbs(worker: Subparsers) -> None:
    backend = group(worker, "backend", "inference backends a hive can run", "backend_verb")
    p = verb(backend, "list", cmd.cmd_backend_list, "backends, whether available, version, devices")
    p.add_argument("--hive", default="")
    p = verb(backend, "get", cmd.cmd_backend_get, "one backend and its options")
    p.add_argument("name")
    p.add_argument("--hive", default="")


def add_event_verbs(sub: Subparsers) -> None:
    p = verb(sub, "events", cmd.cmd_events, "print cluster events as they happen", timeout=None)
    p.add_argument(
        "--kind",
        action="append",
        default=[],
        type=parse_event_kind,
        help="only this kind (repeatable), e.g. request-completed",
    )


def add_requests_verbs(sub: Subparsers) -> None:
    requests = group(sub, "requests", "the queen's durable request history")
    p = verb(requests, "list", cmd.cmd_requests_list, "recent requests, newest first")
    p.add_argument(
        "--status",
        type=parse_request_status,
        default=0,
        help="queued, running, completed or failed",
    )
    p.add_argument("--model", default="")
    p.add_argument("--limit", type=int, default=50)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apiary", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    add_server_verbs(sub)
    add_infer(sub)
    verb(sub, "status", cmd.cmd_status, "the cluster at a glance, then hives, workers and models")
    add_model_verbs(sub)
    add_hive_verbs(sub)
    add_worker_verbs(sub)
    add_event_verbs(sub)
    add_requests_verbs(sub)
    return parser
