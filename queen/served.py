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


def _alive(worker: WorkerEntry) -> bool:
    """Capacity now or soon (a failed worker only while it restarts)."""
    return (
        worker.record.state != common_pb2.WORKER_STATE_FAILED
        or worker.record.restart_in_seconds > 0
    )


def spawn_needed(registry: Registry, autospawn: Autospawner, model: str) -> bool:
    """Nobody serves `model` (or every worker of it failed for good) and autospawn can."""
    if registry.has_model(model) and any(map(_alive, registry.workers_of_model(model))):
        return False  # served: the common case, and the cheap one
    return autospawn.can_spawn(model)


def model_problem(registry: Registry, autospawn: Autospawner, model: str) -> StatusError | None:
    """NOT_FOUND for an unserved model (unless autospawn will serve it, or the queen is still
    hearing from its hives); UNAVAILABLE if every worker of it failed and none restarts."""
    if registry.has_model(model):
        if any(map(_alive, registry.workers_of_model(model))) or autospawn.can_spawn(model):
            return None  # served, or a fresh worker on its way once the caller asked for one
        workers = list(registry.workers_of_model(model))
        reasons = "; ".join(sorted({w.record.failure_reason or "failed" for w in workers}))
        return StatusError(
            grpc.StatusCode.UNAVAILABLE,
            f"every worker of model {model!r} has failed and none is restarting: {reasons}",
        )
    if autospawn.can_spawn(model) or registry.warming_up():
        # On its way once the caller asked for it; or a queen that just (re)started has not
        # heard every hive yet: wait for them.
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
