"""`apiary`'s entry point. `queen start` and `hive start` hand their flags to the daemon's own
parser; every other verb runs through the CLI's parser (and tab completion), prints through one
emitter, and turns errors into one line that says what is wrong."""

from __future__ import annotations

import os
import sys

DAEMON_VERBS = (("queen", "start"), ("hive", "start"))


def run_daemon(name: str, argv: list[str]) -> int:
    """`apiary queen start ...` / `apiary hive start ...`: the daemon's main, in this process."""
    from cli.parser import daemon_parser

    # Parsed first with the CLI's help format, so `--help` shows defaults; the daemon's main
    # then parses the same arguments with the same parser and runs.
    daemon_parser(name).parse_args(argv)
    prog = f"apiary {name} start"
    if name == "queen":
        from queen.__main__ import main as queen_main

        return queen_main(argv, prog=prog)
    from hive.__main__ import main as hive_main

    return hive_main(argv, prog=prog)


def run_client(argv: list[str]) -> int:
    import argcomplete
    import grpc

    from cli.emit import Emitter, inert
    from cli.errors import CliError, rpc_error_text
    from cli.parser import build_parser

    parser = build_parser(completing="_ARGCOMPLETE" in os.environ)
    argcomplete.autocomplete(parser)  # answers a shell's completion request and exits
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args, Emitter(getattr(args, "json", False)))
        return result
    except grpc.RpcError as exc:
        tls = (getattr(args, "tls_ca", ""), getattr(args, "tls_cert", ""))
        print(f"error: {inert(rpc_error_text(exc, getattr(args, 'queen', ''), *tls))}",
              file=sys.stderr)  # fmt: skip
        return 1
    except CliError as exc:
        print(f"error: {inert(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`apiary status | head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def missing_start(argv: list[str]) -> str:
    """`apiary hive --queen ...`, as a hive was started before `start` was a verb: say what to
    type now ('' for anything else)."""
    if len(argv) < 2 or argv[0] not in ("queen", "hive") or not argv[1].startswith("-"):
        return ""
    if argv[1] in ("-h", "--help"):
        return ""
    return f"to run the {argv[0]}, say `start`: apiary {argv[0]} start {' '.join(argv[1:])}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) >= 2 and (argv[0], argv[1]) in DAEMON_VERBS:
        return run_daemon(argv[0], argv[2:])
    if missing_start(argv):
        print(f"error: {missing_start(argv)}", file=sys.stderr)
        return 2
    if argv[:1] != ["up"]:
        # A client says what failed in one line of its own (cli.errors); grpc's C core would
        # also log a failed TLS handshake on stderr. It reads this once, on import. (`up`
        # passes its environment on to the daemons, which keep grpc's logging.)
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    return run_client(argv)
