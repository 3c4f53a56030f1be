"""How client verbs reach the cluster: the queen's address, channels with the CLI's token and
TLS files, and a hive found through the queen."""

from __future__ import annotations

import argparse
import os

import grpc

from apiary.security import Security, TlsFiles
from cli.errors import CliError
from protos.v1 import hive_pb2_grpc, queen_pb2, queen_pb2_grpc

QUEEN_ENV = "APIARY_QUEEN"
DEFAULT_QUEEN = "127.0.0.1:7070"


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
