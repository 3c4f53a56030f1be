"""Whether the queen takes a request at all: valid fields, a model that is (or will be) served,
and workers carrying the tags it asks for."""

from __future__ import annotations

import grpc

from apiary.errors import StatusError
from apiary.protoutil import naming
from apiary.validation import infer_request_problem, name_problem, tag_problem
from protos.v1 import common_pb2, queen_pb2
from queen.cluster import Cluster
from queen.served import model_problem, spawn_needed

MAX_TAGS = 16


def tags_problem(tags: list[str]) -> str | None:
    if len(tags) > MAX_TAGS:
        return f"at most {MAX_TAGS} required tags are allowed (got {len(tags)})"
    for tag in tags:
        problem = tag_problem("tag", tag)
        if problem:
            return problem
    return None


def unmatched_tags(cluster: Cluster, model: str, tags: list[str]) -> StatusError | None:
    """NOT_FOUND when no worker of a served model carries every tag asked for."""
    registry = cluster.registry
    if not tags or not registry.has_model(model):
        return None
    if cluster.router.pool_size(model, frozenset(tags)):
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
    """None if the queen takes the request (Infer or Lease), else why not. A model nobody
    serves that autospawn can start is started here, so the request can wait for it."""
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
    registry, autospawn, model = cluster.registry, cluster.autospawn, request.model
    if spawn_needed(registry, autospawn, model):
        autospawn.ensure(model)
    return model_problem(registry, autospawn, model) or unmatched_tags(cluster, model, tags)
