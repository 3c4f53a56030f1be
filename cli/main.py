"""`apiary`'s entry point: server verbs (queen, hive, up, certs) parse their own flags; client
verbs run through the parser, print through one emitter, and turn errors into one line."""

from __future__ import annotations

import os
import sys

import grpc

from cli.connect import QUEEN_ENV
from cli.emit import Emitter
from cli.errors import CliError
from cli.parser import build_parser

# `apiary hive VERB` for these; any other `apiary hive ...` runs a hive.
HIVE_ADMIN_VERBS = ("list", "get", "drain", "undrain")


def run_server_verb(argv: list[str]) -> int | None:
    """Run `apiary queen|hive|certs|up ...` if that is what argv asks for, else None."""
    if argv and argv[0] == "queen":
        from queen.__main__ import main as queen_main

        return queen_main(argv[1:], prog="apiary queen")
    if argv and argv[0] == "hive" and (len(argv) == 1 or argv[1] not in HIVE_ADMIN_VERBS):
        from hive.__main__ import main as hive_main

        return hive_main(argv[1:], prog="apiary hive")
    if argv and argv[0] == "certs":
        from cli.certs import main as certs_main

        return certs_main(argv[1:])
    if argv and argv[0] == "up":
        from cli.up import main as up_main

        return up_main(argv[1:])
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    served = run_server_verb(argv)
    if served is not None:
        return served
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args, Emitter(args.json))
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
