"""Whether the queen takes a request at all: valid fields, a model that is (or will be) served,
and workers carrying the tags it asks for."""

from __future__ import annotations

import grpc

from apiary.errors import StatusError
from apiary.protoutil import naming
from apiary.validation import infer_request_problem, name_problem, tag_problem
from protos.v1 import common_pb2, queen_pb2
from queen.cluster import Cluster

MAX_TAGS = 16


def tags_problem(tags: list[str]) -> str | None:
    if len(tags) > MAX_TAGS:
        return f"at most {MAX_TAGS} required tags are allowed (got {len(tags)})"
    for tag in tags:
        problem = tag_problem("tag", tag)
        if problem:
            return problem
    return None


def model_problem(cluster: Cluster, model: str) -> StatusError | None:
    """NOT_FOUND for an unserved model (unless autospawn will); UNAVAILABLE if all failed.

    Starts the autospawn of a model nobody serves yet, so the request can wait for it.
    """
    registry = cluster.registry
    if not registry.has_model(model):
        if cluster.autospawn.can_spawn(model):
            cluster.autospawn.ensure(model)
            return None
        if registry.warming_up():
            # A queen that just (re)started has not heard every hive yet: wait for them.
            return None
        if not registry.models():
            return StatusError(
                grpc.StatusCode.NOT_FOUND,
                f"unknown model {model!r}: no workers are registered yet; "
                "start one with `apiary worker spawn`",
            )
        spawnable = cluster.autospawn.spawnable()
        extra = f"; autospawn offers: {naming(spawnable)}" if spawnable else ""
        return StatusError(
            grpc.StatusCode.NOT_FOUND,
            f"unknown model {model!r}; models served: {naming(registry.models())}{extra}",
        )
    workers = list(registry.workers_of_model(model))
    alive = [
        w
        for w in workers
        if w.record.state != common_pb2.WORKER_STATE_FAILED or w.record.restart_in_seconds > 0
    ]
    if not alive and cluster.autospawn.can_spawn(model):
        # Failed workers are no capacity: a fresh one is on its way (the request waits).
        cluster.autospawn.ensure(model)
        return None
    if not alive:
        reasons = "; ".join(sorted({w.record.failure_reason or "failed" for w in workers}))
        return StatusError(
            grpc.StatusCode.UNAVAILABLE,
            f"every worker of model {model!r} has failed and none is restarting: {reasons}",
        )
    return None


def unmatched_tags(cluster: Cluster, model: str, tags: list[str]) -> StatusError | None:
    """NOT_FOUND when no worker of a served model carries every tag asked for."""
    registry = cluster.registry
    if not tags or not registry.has_model(model):
        return None
    if registry.pool_size(model, frozenset(tags)):
        return None
    present = sorted(
        {",".join(sorted(w.record.tags)) or "(none)" for w in registry.workers_of_model(model)}
    )
    return StatusError(
        grpc.StatusCode.NOT_FOUND,
        f"no worker of model {model!r} carries tags {', '.join(sorted(tags))}; "
        f"tag sets present: {naming(present)}",
    )


def admit(
    cluster: Cluster, request: common_pb2.InferRequest | queen_pb2.LeaseRequest
) -> StatusError | None:
    """None if the queen takes the request (Infer or Lease), else why not."""
    tags = list(request.required_tags)
    if isinstance(request, common_pb2.InferRequest):
        problem = infer_request_problem(request, cluster.max_tokens_cap, cluster.max_prompt_bytes)
    else:
        problem = name_problem("model", request.model)
    problem = problem or tags_problem(tags)
    if not problem and request.policy not in common_pb2.RoutingPolicy.values():
        problem = f"unknown routing policy {request.policy}"
    if problem:
        return StatusError(grpc.StatusCode.INVALID_ARGUMENT, problem)
    return model_problem(cluster, request.model) or unmatched_tags(cluster, request.model, tags)
