"""The `apiary` command line: one function per command group, one helper for the flags every
client verb shares. Each verb's parser carries the command it runs (`func`); a group alone
prints its help. `queen start` and `hive start` are listed here but run by the daemons' own
parsers (`cli.main` hands them their arguments)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from argcomplete.shell_integration import shellcode

from apiary.protoutil import enum_labels, enum_parser
from cli import commands as cmd
from cli.certs import add_certs_verbs
from cli.connect import QUEEN_ENV, TOKEN_ENV, default_queen
from cli.emit import Emitter
from cli.parsing import CliParser, Command, HelpFormatter, Subparsers, add_group, subcommands
from cli.up import add_up_verb
from protos.v1 import common_pb2, queen_pb2

DESCRIPTION = (
    "`apiary`: run a queen or hive, bring up a one-machine cluster, and talk to a running cluster."
)
EPILOG = (
    "`apiary VERB` alone lists its verbs; `apiary VERB --help` shows every flag.\n"
    'Shell completion: eval "$(apiary completion bash)" (or zsh, fish).'
)
SHELLS = ("bash", "zsh", "fish")
DAEMONS = {
    "queen": "run the queen in the foreground (its flags: `apiary queen start --help`)",
    "hive": "run this machine's hive in the foreground (`apiary hive start --help`)",
}

parse_routing = enum_parser(common_pb2.RoutingPolicy, "ROUTING_POLICY_", "routing policy")
parse_restart = enum_parser(common_pb2.RestartPolicy, "RESTART_POLICY_", "restart policy")
parse_health = enum_parser(common_pb2.HiveHealth, "HIVE_HEALTH_", "hive health")
parse_event_kind = enum_parser(queen_pb2.EventKind, "EVENT_KIND_", "event kind")
parse_request_status = enum_parser(queen_pb2.RequestStatus, "REQUEST_STATUS_", "request status")
WORKER_STATES = [name.removeprefix("WORKER_STATE_") for name in common_pb2.WorkerState.keys()[1:]]

HIVE_HELP = "hive id (optional when there is one hive)"


def package_version() -> str:
    try:
        return version("apiary")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def completes(action: argparse.Action, choices: Sequence[str]) -> argparse.Action:
    """Tab completion offers `choices` for a flag whose type= checks them itself."""
    options = list(choices)
    action.completer = lambda **_: options  # type: ignore[attr-defined]  # argcomplete reads it
    return action


def enum_flag(p: argparse.ArgumentParser, flag: str, parse: Callable[[str], Any],
              enum: Any, prefix: str, **kwargs: Any) -> None:  # fmt: skip
    """A flag taking a proto enum by label (`--policy least-loaded`)."""
    completes(p.add_argument(flag, type=parse, **kwargs), enum_labels(enum, prefix))


def connection_flags(p: argparse.ArgumentParser, timeout: float | None) -> None:
    """Where the queen is, how long a call may take, the credentials, and --json."""
    p.add_argument(
        "--queen",
        default=default_queen(),
        help=f"queen address, or several as A,B: the next is tried when one is unreachable "
        f"(env {QUEEN_ENV})",
    )
    p.add_argument(
        "--timeout", type=float, default=timeout, help="seconds the call may take (none: no limit)"
    )
    # No default here: help would print it. The token is read from the environment when used.
    p.add_argument("--token", help=f"client or admin token (env {TOKEN_ENV}; never printed)")
    p.add_argument(
        "--tls-ca",
        default=os.environ.get("APIARY_TLS_CA", ""),
        help="CA that signed the queen's certificate; turns TLS on (env APIARY_TLS_CA)",
    )
    p.add_argument(
        "--tls-cert",
        default=os.environ.get("APIARY_TLS_CERT", ""),
        help="client certificate, when the queen requires one (mTLS) (env APIARY_TLS_CERT)",
    )
    p.add_argument(
        "--tls-key",
        default=os.environ.get("APIARY_TLS_KEY", ""),
        help="the client certificate's key (env APIARY_TLS_KEY)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output (README: JSON)")


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


def daemon_parser(name: str) -> argparse.ArgumentParser:
    """The daemon's own parser (queen/__main__.py, hive/__main__.py), with the CLI's help
    format: defaults shown."""
    prog = f"apiary {name} start"
    if name == "queen":
        from queen.__main__ import build_parser as build_queen_parser

        parser = build_queen_parser(prog)
    else:
        from hive.__main__ import build_parser as build_hive_parser

        parser = build_hive_parser(prog)
    parser.formatter_class = HelpFormatter
    return parser


def add_start_verb(group: Subparsers, name: str, completing: bool) -> None:
    """`apiary queen|hive start`, listed in the group's help. `cli.main` runs it through the
    daemon's parser before this one sees it; while completing, that parser's flags are here."""
    parents = [daemon_parser(name)] if completing else []
    group.add_parser(
        "start", help=DAEMONS[name], description=DAEMONS[name], parents=parents, add_help=False
    )


def add_infer(sub: Subparsers) -> None:
    p = verb(sub, "infer", cmd.cmd_infer, "stream a completion through the queen", timeout=60.0)
    p.add_argument("model", help="model name (`apiary model list`)")
    p.add_argument("prompt", help="what you say: sent as a chat's user turn, which the model's "
                   "own chat template renders (--raw: as a bare prompt to continue)")  # fmt: skip
    p.add_argument("--system", default="", help="a system turn before the prompt")
    p.add_argument(
        "--raw", action="store_true", help="send the prompt as is (a completion), not as a chat"
    )
    p.add_argument(
        "--max-tokens", type=int, default=0,
        help="tokens to generate at most (0: the queen's --default-max-tokens)",
    )  # fmt: skip
    enum_flag(p, "--policy", parse_routing, common_pb2.RoutingPolicy, "ROUTING_POLICY_",
              default=0, help="routing policy for this request (default: the queen's)")  # fmt: skip
    p.add_argument("--tag", action="append", default=[], help="require a worker tag (repeatable)")
    p.add_argument("--request-id", default="", help="your own reference, echoed in every chunk")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest")
    p.add_argument("--seed", type=int, default=None, help="same seed, same completion")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument(
        "--direct", action="store_true", help="lease a slot and call the worker directly"
    )
    add_asking_flags(p)


def add_asking_flags(p: argparse.ArgumentParser) -> None:
    """What a request may ask beyond sampling: tools, structured output, logprobs, n, ..."""
    p.add_argument("--tool", action="append", default=[], metavar="FILE",
                   help="a tool the model may call: a JSON file with name, description and "
                   "parameters (a JSON schema), or a list of them (repeatable)")  # fmt: skip
    p.add_argument("--tool-choice", default="", metavar="CHOICE",
                   help="auto, none, required, or the name of the function to call")  # fmt: skip
    p.add_argument("--parallel-tool-calls", action="store_true",
                   help="let the model make several calls in one answer")  # fmt: skip
    p.add_argument("--json-schema", default="", metavar="FILE",
                   help="answer JSON valid against the schema in FILE ('-': stdin)")  # fmt: skip
    p.add_argument("--json-object", action="store_true", help="answer a JSON object")
    p.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="each token's log-probability, and the N likeliest beside it")  # fmt: skip
    p.add_argument("-n", type=int, default=1, metavar="N",
                   help="choices to generate from one computation of the prompt")  # fmt: skip
    p.add_argument("--presence-penalty", type=float, default=None, help="-2..2")
    p.add_argument("--frequency-penalty", type=float, default=None, help="-2..2")
    p.add_argument("--repetition-penalty", type=float, default=None, help="llama.cpp's; 1: none")
    p.add_argument("--logit-bias", action="append", default=[], metavar="ID=BIAS",
                   help="add BIAS (-100..100) to token ID's logit (repeatable)")  # fmt: skip


def add_embed(sub: Subparsers) -> None:
    p = verb(sub, "embed", cmd.cmd_embed, "embed texts with an embedding model", timeout=60.0)
    p.add_argument("model", help="an embedding model (its workers spawned with embeddings=mean)")
    p.add_argument("text", nargs="+", help="texts to embed, one vector each")
    p.add_argument("--tag", action="append", default=[], help="require a worker tag (repeatable)")


def add_model_verbs(sub: Subparsers) -> None:
    model = add_group(sub, "model", "models the cluster serves, and each hive's model catalog")
    p = verb(model, "list", cmd.cmd_model_list, "models with worker counts; --hive: that catalog")
    p.add_argument("--hive", default="", help="list this hive's catalog instead")
    for name, func, text in [
        ("get", cmd.cmd_model_get, "one model in a hive's catalog"),
        ("rm", cmd.cmd_model_rm, "delete a model from a hive's catalog (refused while in use)"),
    ]:
        p = verb(model, name, func, text)
        p.add_argument("name", help="catalog name")
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
        p.add_argument(id_dest, help=f"{noun} id")
        p.set_defaults(undrain=undrain)


def add_hive_verbs(sub: Subparsers, completing: bool) -> None:
    hive = add_group(sub, "hive", "start a hive; list, inspect and drain hives")
    add_start_verb(hive, "hive", completing)
    verb(hive, "list", cmd.cmd_hive_list, "hives with health, heartbeat age and capacity")
    p = verb(hive, "get", cmd.cmd_hive_get, "one hive and its workers")
    p.add_argument("hive_id", help="hive id")
    add_drain_verbs(hive, cmd.cmd_hive_drain, "hive", "hive_id")


def add_worker_verbs(sub: Subparsers) -> None:
    worker = add_group(sub, "worker", "list, inspect, spawn, drain and retire workers")
    p = verb(worker, "list", cmd.cmd_worker_list, "workers, filtered")
    p.add_argument("--hive", default="", help="on this hive")
    p.add_argument("--model", default="", help="serving this model")
    completes(p.add_argument("--state", default="", help=", ".join(WORKER_STATES)), WORKER_STATES)
    p.add_argument("--tag", action="append", default=[], help="carrying this tag (repeatable)")
    enum_flag(p, "--health", parse_health, common_pb2.HiveHealth, "HIVE_HEALTH_", default=0,
              help="on a hive of this health")  # fmt: skip
    p.add_argument("--min-free", type=int, default=0, help="at least this many free slots")
    p = verb(worker, "get", cmd.cmd_worker_get, "one worker in detail, with the queen's statistics")
    p.add_argument("worker_id", help="worker id")
    add_worker_spawn(worker)
    p = verb(
        worker, "retire", cmd.cmd_worker_retire, "stop a worker (gracefully unless --force)", 60.0
    )
    p.add_argument("worker_id", help="worker id")
    p.add_argument("--force", action="store_true", help="SIGKILL at once")
    p.add_argument("--hive", default="", help="accepted for symmetry; the queen knows the hive")
    add_drain_verbs(worker, cmd.cmd_worker_drain, "worker", "worker_id")
    add_process_verbs(worker)
    add_backend_verbs(worker)


def add_worker_spawn(worker: Subparsers) -> None:
    p = verb(worker, "spawn", cmd.cmd_worker_spawn, "start a worker on a hive", timeout=180.0)
    p.add_argument("--hive", default="", help=HIVE_HELP)
    p.add_argument("--model", required=True, help="model to serve")
    p.add_argument(
        "--backend", default="",
        help="inference backend (default: the one the model's catalog entry names; "
        "echo, for tests and benchmarks, only by name)",
    )  # fmt: skip
    p.add_argument(
        "--slots",
        type=int,
        default=0,
        help="requests it serves at once (default: the backend's: llamacpp 8, echo 1)",
    )
    p.add_argument("--device", default="", help="device for the backend, e.g. cpu")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="backend option (repeatable; see `apiary worker backend get NAME`)",
    )
    p.add_argument("--tag", action="append", default=[], help="a capability tag (repeatable)")
    p.add_argument("--no-wait", action="store_true", help="return while the worker is LOADING")
    enum_flag(p, "--restart", parse_restart, common_pb2.RestartPolicy, "RESTART_POLICY_",
              default=0, help="never, on-failure or always (default: the hive's)")  # fmt: skip


def add_process_verbs(worker: Subparsers) -> None:
    process = add_group(
        worker, "process", "worker processes on a hive's machine, orphans included", "process_verb"
    )
    p = verb(process, "list", cmd.cmd_process_list, "every Apiary worker process on the machine")
    p.add_argument("--hive", default="", help=HIVE_HELP)
    for name, func, text in [
        ("get", cmd.cmd_process_get, "one worker process by pid"),
        ("kill", cmd.cmd_process_kill, "SIGKILL a worker process (refuses other pids)"),
    ]:
        p = verb(process, name, func, text)
        p.add_argument("pid", type=int, help="process id")
        p.add_argument("--hive", default="", help=HIVE_HELP)


def add_backend_verbs(worker: Subparsers) -> None:
    backend = add_group(worker, "backend", "inference backends a hive can run", "backend_verb")
    p = verb(backend, "list", cmd.cmd_backend_list, "backends, whether available, version, devices")
    p.add_argument("--hive", default="", help=HIVE_HELP)
    p = verb(backend, "get", cmd.cmd_backend_get, "one backend and its options")
    p.add_argument("name", help="backend name")
    p.add_argument("--hive", default="", help=HIVE_HELP)


def add_event_verbs(sub: Subparsers) -> None:
    p = verb(sub, "events", cmd.cmd_events, "print cluster events as they happen", timeout=None)
    enum_flag(p, "--kind", parse_event_kind, queen_pb2.EventKind, "EVENT_KIND_", action="append",
              default=[], help="only this kind (repeatable), e.g. request-completed")  # fmt: skip


def add_requests_verbs(sub: Subparsers) -> None:
    requests = add_group(sub, "requests", "the queen's durable request history")
    p = verb(requests, "list", cmd.cmd_requests_list, "recent requests, newest first")
    enum_flag(p, "--status", parse_request_status, queen_pb2.RequestStatus, "REQUEST_STATUS_",
              default=0, help="only requests in this state")  # fmt: skip
    p.add_argument("--model", default="", help="only requests for this model")
    p.add_argument("--limit", type=int, default=50, help="newest N")


def cmd_completion(args: argparse.Namespace, out: Emitter) -> int:
    print(shellcode(["apiary"], shell=args.shell))
    return 0


def add_completion_verb(sub: Subparsers) -> None:
    text = "print the shell code that completes `apiary` (README: shell completion)"
    p = sub.add_parser("completion", help=text, description=text)
    p.add_argument("shell", choices=SHELLS, help='e.g. eval "$(apiary completion bash)"')
    p.set_defaults(func=cmd_completion)


def build_parser(completing: bool = False) -> argparse.ArgumentParser:
    """The whole command tree. `completing`: for tab completion, with the daemons' flags."""
    parser = CliParser(prog="apiary", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"apiary {package_version()}")
    sub = subcommands(parser, "verb")
    add_start_verb(add_group(sub, "queen", "start the queen"), "queen", completing)
    add_hive_verbs(sub, completing)
    add_up_verb(sub)
    add_certs_verbs(sub)
    add_infer(sub)
    add_embed(sub)
    verb(sub, "status", cmd.cmd_status, "the cluster at a glance, then hives, workers and models")
    add_model_verbs(sub)
    add_worker_verbs(sub)
    add_event_verbs(sub)
    add_requests_verbs(sub)
    add_completion_verb(sub)
    return parser
