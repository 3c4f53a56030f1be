"""Apiary worker processes on this machine, found through psutil by their environment markers.

Unlike a `ps aux | grep worker`, this finds only processes a hive started (they
carry APIARY_WORKER_ID), and tells this hive's own from another live hive's and
from orphans whose hive is gone, by the hive process each one's marker names.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import psutil

from hive.launcher import HIVE_ID_ENV, HIVE_PROCESS_ENV, WORKER_ID_ENV
from hive.supervisor import Supervisor
from protos.v1 import hive_pb2


def _flag(cmdline: list[str], name: str) -> str:
    try:
        return cmdline[cmdline.index(name) + 1]
    except (ValueError, IndexError):
        return ""


def owner(marker: str, supervisor: Supervisor) -> hive_pb2.ProcessOwner.ValueType:
    launcher = supervisor.launcher
    if marker and marker == launcher.instance.marker:
        return hive_pb2.PROCESS_OWNER_THIS_HIVE
    if marker and launcher.hive_alive(marker):
        return hive_pb2.PROCESS_OWNER_OTHER_HIVE
    return hive_pb2.PROCESS_OWNER_ORPHAN


def describe(proc: psutil.Process, supervisor: Supervisor) -> hive_pb2.WorkerProcess | None:
    """The process as a WorkerProcess, or None if it is not an Apiary worker (or is gone)."""
    try:
        with proc.oneshot():
            env = proc.environ()
            worker_id = env.get(WORKER_ID_ENV, "")
            if not worker_id:
                return None
            cmdline = proc.cmdline()
            create_time = proc.create_time()
            info = hive_pb2.WorkerProcess(
                pid=proc.pid,
                create_time=create_time,
                worker_id=worker_id,
                hive_id=env.get(HIVE_ID_ENV) or _flag(cmdline, "--hive-id"),
                model=_flag(cmdline, "--model"),
                backend=_flag(cmdline, "--backend"),
                cpu_percent=proc.cpu_percent(None),
                rss_bytes=proc.memory_info().rss,
                age_seconds=max(time.time() - create_time, 0.0),
                status=proc.status(),
                cmdline=cmdline,
                owner=owner(env.get(HIVE_PROCESS_ENV, ""), supervisor),
            )
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    worker = supervisor.workers.get(worker_id)
    ident = worker.identity if worker is not None else None
    info.known = ident is not None and (ident.pid, ident.create_time) == (info.pid, create_time)
    if info.known:
        info.owner = hive_pb2.PROCESS_OWNER_THIS_HIVE  # adopted from an earlier run of this hive
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
