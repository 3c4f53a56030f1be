"""Apiary worker processes on this machine, found through psutil by their environment marker.

Unlike a `ps aux | grep worker`, this finds only processes a hive started (they
carry APIARY_WORKER_ID), whether or not this hive's table still knows them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import psutil

from hive.launcher import WORKER_ID_ENV
from hive.supervisor import Supervisor
from protos.v1 import hive_pb2


def _flag(cmdline: list[str], name: str) -> str:
    try:
        return cmdline[cmdline.index(name) + 1]
    except (ValueError, IndexError):
        return ""


def describe(proc: psutil.Process, supervisor: Supervisor) -> hive_pb2.WorkerProcess | None:
    """The process as a WorkerProcess, or None if it is not an Apiary worker (or is gone)."""
    try:
        with proc.oneshot():
            worker_id = proc.environ().get(WORKER_ID_ENV, "")
            if not worker_id:
                return None
            cmdline = proc.cmdline()
            create_time = proc.create_time()
            info = hive_pb2.WorkerProcess(
                pid=proc.pid,
                create_time=create_time,
                worker_id=worker_id,
                hive_id=_flag(cmdline, "--hive-id"),
                model=_flag(cmdline, "--model"),
                backend=_flag(cmdline, "--backend"),
                cpu_percent=proc.cpu_percent(None),
                rss_bytes=proc.memory_info().rss,
                age_seconds=max(time.time() - create_time, 0.0),
                status=proc.status(),
                cmdline=cmdline,
            )
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    worker = supervisor.workers.get(worker_id)
    info.known = bool(
        worker is not None
        and worker.identity is not None
        and worker.identity.pid == info.pid
        and worker.identity.create_time == create_time
    )
    return info


def scan(supervisor: Supervisor) -> Iterator[hive_pb2.WorkerProcess]:
    for proc in psutil.process_iter():
        info = describe(proc, supervisor)
        if info is not None:
            yield info


def find(pid: int, supervisor: Supervisor) -> tuple[psutil.Process, hive_pb2.WorkerProcess] | None:
    try:
        proc = psutil.Process(pid)
    except (psutil.NoSuchProcess, ValueError):
        return None
    info = describe(proc, supervisor)
    return None if info is None else (proc, info)
