"""queen/requests/admission.py: a request lands only on workers of its kind (completions or
embeddings), and one asking what no worker of its model does is refused naming the
parameter, by what the workers say of themselves; the HTTP front names that parameter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc

from protos.v1 import common_pb2
from queen.cluster import Cluster
from queen.http.errors import from_status
from queen.requests.admission import admit
from tests.fakes import FakeClock
from tests.queen_fakes import beat, make_cluster, record


def cluster_of(tmp: Path, *workers: common_pb2.WorkerRecord) -> Cluster:
    cluster = make_cluster(FakeClock(), tmp)
    cluster.apply_heartbeat(beat("h1", *workers))
    return cluster


def worker(worker_id: str, model: str, task: int, *features: str) -> common_pb2.WorkerRecord:
    out = record(worker_id, model=model)
    out.task, out.context_length = task, 1024  # type: ignore[assignment]
    out.features.extend(features)
    return out


GENERATE, EMBED = common_pb2.WORKER_TASK_GENERATE, common_pb2.WORKER_TASK_EMBED


def test_each_request_goes_to_its_kind_of_worker(tmp_path: Path) -> None:
    cluster = cluster_of(tmp_path, worker("c", "chat", GENERATE, "text"),
                         worker("e", "emb", EMBED, "text"))  # fmt: skip
    chat = common_pb2.InferRequest(model="chat", prompt="p", max_tokens=4)
    texts = common_pb2.EmbedRequest(model="emb", input=["x"])
    assert admit(cluster, chat) is None and admit(cluster, texts) is None
    wrong = admit(cluster, common_pb2.EmbedRequest(model="chat", input=["x"]))
    assert wrong is not None and wrong.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "serves completions, not embeddings" in wrong.message
    asked = admit(cluster, common_pb2.InferRequest(model="emb", prompt="p", max_tokens=4))
    assert asked is not None and "embeddings only" in asked.message
    # The picks agree: each ask's implicit task tag admits only its kind.
    assert cluster.router.pool_size("emb", frozenset({"task=embed"})) == 1
    assert cluster.router.pool_size("emb", frozenset({"task=generate"})) == 0


def test_what_no_worker_does_is_refused_naming_its_parameter(tmp_path: Path) -> None:
    cluster = cluster_of(tmp_path, worker("a", "m", GENERATE, "text"),
                         worker("b", "m", GENERATE, "text", "logprobs"))  # fmt: skip

    def ask(**fields: Any) -> common_pb2.InferRequest:
        return common_pb2.InferRequest(model="m", prompt="p", max_tokens=4, **fields)

    assert admit(cluster, ask(logprobs=True)) is None  # b does
    refused = admit(cluster, ask(frequency_penalty=1.0))
    assert refused is not None and refused.code == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.message.startswith("frequency_penalty is not supported by model 'm'")
    error = from_status(refused.code.name, refused.message)
    assert (error.status, error.param) == (400, "frequency_penalty")
    # A worker that says nothing of itself (an older build) is not judged: it decides.
    quiet = cluster_of(tmp_path, record("q", model="m"))
    assert admit(quiet, ask(n=2)) is None


def test_the_front_names_the_parameter_a_message_opens_with() -> None:
    for message, param in [("tools[0].name 'x y' must be ...", "tools[0].name"),
                           ("n must be within 1..16 (got 20)", "n"),
                           ("continuation cannot be used here: ...", None),
                           ("model 'm' cannot take this request", "model")]:  # fmt: skip
        assert from_status("INVALID_ARGUMENT", message).param == param
