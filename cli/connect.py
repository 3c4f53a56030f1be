"""How client verbs reach the cluster: an `apiary.client.Client` made from the connection
flags, the one way the CLI calls a queen. Verbs that act on a hive go through the queen too:
one address, and the operator's credential stays between the operator and the queen."""

from __future__ import annotations

import argparse
import math
import os

from apiary.client import DEFAULT_QUEEN, QUEEN_ENV, TOKEN_ENV, Client
from apiary.security import SecurityError
from cli.errors import CliError

__all__ = ["DEFAULT_QUEEN", "QUEEN_ENV", "TOKEN_ENV", "client", "default_queen"]


def default_queen() -> str:
    return os.environ.get(QUEEN_ENV, DEFAULT_QUEEN)


def client(args: argparse.Namespace) -> Client:
    """A client with the CLI's --queen (one address or several, comma-separated), --timeout
    (none: no deadline), --token (else APIARY_TOKEN, read here so help never shows it) and TLS
    files. A command fails at once when no queen can be reached rather than waiting out its
    --timeout: an operator at a prompt wants to know now. No address, or a TLS file that
    cannot be read, is a usage mistake."""
    try:
        return Client(
            args.queen,
            token=args.token,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            timeout=math.inf if args.timeout is None else args.timeout,
            wait_for_ready=False,
        )
    except (ValueError, SecurityError) as exc:
        raise CliError(str(exc)) from None
