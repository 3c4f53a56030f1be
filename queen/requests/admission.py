"""Whether the queen takes a request at all: valid fields, a model that is (or will be) served,
and workers carrying the tags it asks for."""

from __future__ import annotations

import grpc

from apiary.controls import asked_features, feature_param
from apiary.errors import StatusError
from apiary.protoutil import naming
from apiary.validation import (
    embed_request_problem,
    infer_request_problem,
    name_problem,
    tag_problem,
)
from protos.v1 import common_pb2, queen_pb2
from queen.cluster import Cluster
from queen.members import EMBED_TAG, GENERATE_TAG
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


def wrong_task(cluster: Cluster, model: str, task: str) -> StatusError | None:
    """INVALID_ARGUMENT when a served model's workers all serve the other task (a completion
    asked of an embedding model, or embeddings of a chat model)."""
    if not cluster.registry.has_model(model) or cluster.router.pool_size(model, frozenset([task])):
        return None
    if task == EMBED_TAG:
        return StatusError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"model {model!r} serves completions, not embeddings; embeddings come from workers "
            "spawned with --option embeddings=mean (llamacpp)",
        )
    return StatusError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"model {model!r} serves embeddings only (Embed, POST /v1/embeddings), not completions",
    )


def unsupported(cluster: Cluster, request: common_pb2.InferRequest) -> StatusError | None:
    """INVALID_ARGUMENT when the request asks what no worker of its model carries out (by
    what the workers say; one that says nothing is not judged), naming the parameter."""
    workers = [w.record for w in cluster.registry.workers_of_model(request.model)
               if w.record.features and w.record.task != common_pb2.WORKER_TASK_EMBED]  # fmt: skip
    if not workers:
        return None
    for feature in asked_features(request):
        if not any(feature in w.features for w in workers):
            backends = ", ".join(sorted({w.backend for w in workers}))
            return StatusError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{feature_param(request, feature)} is not supported by model "
                f"{request.model!r}: its workers' backend ({backends}) does not do {feature}",
            )
    return None


def unmatched_tags(
    cluster: Cluster, model: str, tags: list[str], task: str = GENERATE_TAG
) -> StatusError | None:
    """NOT_FOUND when no worker of a served model (of the request's task) carries every tag
    asked for."""
    registry = cluster.registry
    if not tags or not registry.has_model(model):
        return None
    if cluster.router.pool_size(model, frozenset([*tags, task])):
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
    cluster: Cluster,
    request: common_pb2.InferRequest | queen_pb2.LeaseRequest | common_pb2.EmbedRequest,
) -> StatusError | None:
    """None if the queen takes the request (Infer, Lease or Embed), else why not. A model
    nobody serves that autospawn can start is started here, so the request can wait for it."""
    tags = list(request.required_tags)
    task = GENERATE_TAG
    if isinstance(request, common_pb2.InferRequest):
        problem = infer_request_problem(request, cluster.max_tokens_cap, cluster.max_prompt_bytes)
    elif isinstance(request, common_pb2.EmbedRequest):
        problem, task = embed_request_problem(request, cluster.max_prompt_bytes), EMBED_TAG
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
    return (
        model_problem(registry, autospawn, model)
        or wrong_task(cluster, model, task)
        or unmatched_tags(cluster, model, tags, task)
        or (unsupported(cluster, request) if isinstance(request, common_pb2.InferRequest) else None)
    )
