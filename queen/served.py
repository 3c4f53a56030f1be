"""Whether a model is served, will be (autospawn, a queen still warming up), or why not: the one
answer admission gives a new request and the desk gives a request whose model went away while
it waited. A check only: starting an autospawn is the caller's explicit step (`spawn_needed`).
"""

from __future__ import annotations

import grpc

from apiary.errors import StatusError
from apiary.protoutil import naming
from protos.v1 import common_pb2
from queen.autospawn import Autospawner
from queen.members import WorkerEntry
from queen.registry import Registry


def _alive(workers: list[WorkerEntry]) -> list[WorkerEntry]:
    """Workers that are capacity now or soon (failed ones only while they restart)."""
    return [
        w
        for w in workers
        if w.record.state != common_pb2.WORKER_STATE_FAILED or w.record.restart_in_seconds > 0
    ]


def spawn_needed(registry: Registry, autospawn: Autospawner, model: str) -> bool:
    """Nobody serves `model` (or every worker of it failed for good) and autospawn can."""
    if not autospawn.can_spawn(model):
        return False
    return not registry.has_model(model) or not _alive(list(registry.workers_of_model(model)))


def model_problem(registry: Registry, autospawn: Autospawner, model: str) -> StatusError | None:
    """NOT_FOUND for an unserved model (unless autospawn will serve it, or the queen is still
    hearing from its hives); UNAVAILABLE if every worker of it failed and none restarts."""
    if autospawn.can_spawn(model):
        return None  # served already, or on its way once the caller asked for it
    if not registry.has_model(model):
        if registry.warming_up():
            # A queen that just (re)started has not heard every hive yet: wait for them.
            return None
        if not registry.models():
            return StatusError(
                grpc.StatusCode.NOT_FOUND,
                f"unknown model {model!r}: no workers are registered yet; "
                "start one with `apiary worker spawn`",
            )
        spawnable = autospawn.spawnable()
        extra = f"; autospawn offers: {naming(spawnable)}" if spawnable else ""
        return StatusError(
            grpc.StatusCode.NOT_FOUND,
            f"unknown model {model!r}; models served: {naming(registry.models())}{extra}",
        )
    workers = list(registry.workers_of_model(model))
    if not _alive(workers):
        reasons = "; ".join(sorted({w.record.failure_reason or "failed" for w in workers}))
        return StatusError(
            grpc.StatusCode.UNAVAILABLE,
            f"every worker of model {model!r} has failed and none is restarting: {reasons}",
        )
    return None
