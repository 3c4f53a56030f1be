"""How client verbs reach the cluster: the queen's address, and channels with the CLI's token
and TLS files. Verbs that act on a hive go through the queen too: one address, and the
operator's credential stays between the operator and the queen."""

from __future__ import annotations

import argparse
import os

import grpc

from apiary.security import Security, TlsFiles
from protos.v1 import queen_pb2_grpc

QUEEN_ENV = "APIARY_QUEEN"
TOKEN_ENV = "APIARY_TOKEN"
DEFAULT_QUEEN = "127.0.0.1:7070"


def default_queen() -> str:
    return os.environ.get(QUEEN_ENV, DEFAULT_QUEEN)


def token(args: argparse.Namespace) -> str:
    """--token, else APIARY_TOKEN (read here, not as the flag's default, so help never shows
    it)."""
    return str(args.token if args.token is not None else os.environ.get(TOKEN_ENV, ""))


def channel(args: argparse.Namespace, address: str) -> grpc.Channel:
    """A channel carrying the CLI's token (--token / APIARY_TOKEN) and TLS settings."""
    security = Security(tls=TlsFiles(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca))
    return security.sync_channel(address, token(args))


def admin(args: argparse.Namespace) -> queen_pb2_grpc.QueenAdminStub:
    return queen_pb2_grpc.QueenAdminStub(channel(args, args.queen))


def client(args: argparse.Namespace) -> queen_pb2_grpc.QueenStub:
    return queen_pb2_grpc.QueenStub(channel(args, args.queen))
