"""One Embed request: a slot on an embedding worker of the model (task=embed), the worker's
vectors, and on a worker's failure another worker, as an Infer is retried before its first
chunk (the decisions are queen/requests/retry.py's). A worker's answer is checked before it
is passed on: one vector per input, all of one size, finite."""

from __future__ import annotations

import asyncio
import math
import time

import grpc

from apiary.errors import StatusError
from protos.v1 import common_pb2
from queen.cluster import Cluster
from queen.members import EMBED_TAG
from queen.requests import retry
from queen.requests.retry import Decision, failure_of
from queen.routing.ask import Ask, Outcome


async def embed(
    cluster: Cluster, request: common_pb2.EmbedRequest, client: str, remaining: float | None
) -> common_pb2.EmbedResponse:
    """The vectors, or StatusError saying why there are none."""
    ask = Ask(request.model, frozenset([*request.required_tags, EMBED_TAG]), request.policy)
    loop = asyncio.get_running_loop()
    deadline = None if remaining is None else loop.time() + remaining
    attempt, last_error = 0, ""
    while not retry.every_worker_tried(ask.exclude, _addresses(cluster, request.model)):
        attempt += 1
        left = None if deadline is None else max(deadline - loop.time(), 0.0)
        slot = await cluster.desk.take(client, ask, left)
        began, outcome = time.perf_counter(), Outcome(ok=None)
        decision: Decision | None = None
        try:
            call = cluster.channels.worker(slot.address).Embed
            answer = await call(request, timeout=None if left is None else max(left, 0.001))
            problem = answer_problem(answer, len(request.input))
            if problem:
                outcome = Outcome(False, time.perf_counter() - began, worker_fault=True)
                raise StatusError(grpc.StatusCode.INTERNAL, f"worker {slot.worker_id}: {problem}")
            outcome = Outcome(True, time.perf_counter() - began, answer.prompt_tokens)
            answer.worker_id = slot.worker_id
            return answer
        except grpc.aio.AioRpcError as exc:
            failure = failure_of(exc, slot)
            time_left = None if deadline is None else deadline - loop.time()
            decision = retry.decide(failure, attempt, 0, time_left, request.model)
            outcome = decision.outcome
            if decision.exclude:
                ask = ask.excluding(decision.exclude)
            if decision.mark_unreachable:
                cluster.registry.mark_unreachable(failure.worker_id)
        finally:
            cluster.desk.give_back(slot, outcome)
        if decision.error is not None:
            raise decision.error
        last_error = decision.last_error
        await cluster.clock.sleep(decision.backoff)
    raise retry.gave_up(request.model, attempt, last_error)


def answer_problem(answer: common_pb2.EmbedResponse, inputs: int) -> str | None:
    """What is wrong with a worker's embeddings answer (None: nothing)."""
    if len(answer.embeddings) != inputs:
        return f"answered {len(answer.embeddings)} embeddings for {inputs} inputs"
    sizes = {len(e.values) for e in answer.embeddings}
    if len(sizes) != 1 or 0 in sizes:
        return "answered embeddings of different or no sizes"
    if not all(math.isfinite(x) for e in answer.embeddings for x in e.values):
        return "answered an embedding that is not all finite numbers"
    return None


def _addresses(cluster: Cluster, model: str) -> list[str]:
    return [entry.address for entry in cluster.registry.workers_of_model(model)
            if EMBED_TAG in entry.tags]  # fmt: skip
