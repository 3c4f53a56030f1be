"""worker/backends/engine_chunks.py: the engine's chunks read as events, and its nonsense as a
fault (engine output is untrusted)."""

from __future__ import annotations

from typing import Any

import pytest

from worker.backends.base import BackendOptionError, GenerationRequest, RequestRefused
from worker.backends.cpu import cpu_flags, missing_features
from worker.backends.engine_body import completion_body, embeddings_of
from worker.backends.engine_chunks import (
    EngineFault,
    Failed,
    Finished,
    PromptProgress,
    Tokens,
    read_chunk,
)
from worker.backends.llamacpp import LlamaCppBackend


def choice(text: str = "", ids: tuple[int, ...] = (), reason: str | None = None) -> Any:
    logprobs = {"content": [{"id": i, "logprob": -0.1} for i in ids]} if ids else None
    return {"text": text, "index": 0, "logprobs": logprobs, "finish_reason": reason}


def test_progress_tokens_and_the_end_are_read() -> None:
    progress = {"choices": [choice()], "prompt_progress": {"total": 37, "cache": 20}}
    assert read_chunk(progress) == [PromptProgress(37, 20)]
    assert read_chunk({"choices": [choice(" la", (2618,))]}) == [Tokens(" la", (2618,))]
    # A character split over tokens arrives with both ids; an id may come without text yet.
    assert read_chunk({"choices": [choice("", (226, 105))]}) == [Tokens("", (226, 105))]
    end = {
        "choices": [choice(reason="length")],
        "usage": {"prompt_tokens": 37, "prompt_tokens_details": {"cached_tokens": 36}},
    }
    assert read_chunk(end) == [Finished("length", 37, 36)]


def test_errors_are_failures_with_their_status() -> None:
    error = {"error": {"code": 400, "message": "the request exceeds the available context"}}
    assert read_chunk(error) == [Failed(400, "the request exceeds the available context")]
    assert read_chunk({"code": 500, "message": "boom", "type": "server_error"}) == [
        Failed(500, "boom")
    ]
    assert read_chunk({"error": "weird"}) == [Failed(500, "weird")]


@pytest.mark.parametrize(
    "chunk",
    [
        None,
        [],
        "text",
        {"choices": "no"},
        {"choices": [7]},
        {"choices": [{"text": 5}]},
        {"choices": [choice()], "prompt_progress": {"total": -1}},
        {"choices": [{"text": "a", "logprobs": {"content": [{"id": "x"}]}}]},
        {"choices": [{"text": "a", "logprobs": {"content": [{"id": True}]}}]},
        {"choices": [{"text": "a", "logprobs": {"content": "x"}}]},
        {"choices": [{"text": "", "finish_reason": "stop"}], "usage": {"prompt_tokens": 1.5}},
    ],
)
def test_a_chunk_of_another_shape_is_a_fault_not_a_crash(chunk: Any) -> None:
    with pytest.raises(EngineFault):
        read_chunk(chunk)


def test_the_engine_needs_avx2_on_x86_and_says_what_is_missing() -> None:
    flags = cpu_flags("processor: 0\nflags\t\t: fpu sse avx avx2 fma f16c amx_tile avx512f\n")
    assert missing_features("x86_64", flags) == []
    assert missing_features("x86_64", {"sse", "avx"}) == ["avx2", "fma", "f16c"]
    assert missing_features("aarch64", set()) == []
    assert cpu_flags("no flags here") == set()


def test_every_choice_is_read_with_its_logprobs_when_asked() -> None:
    entry = {
        "id": 5,
        "token": "Hi",
        "bytes": [72, 105],
        "logprob": -0.25,
        "top_logprobs": [
            {"id": 5, "token": "Hi", "bytes": [72, 105], "logprob": -0.25},
            {"id": 6, "token": "Yo", "bytes": [89, 111], "logprob": -2.0},
        ],
    }
    chunk = {
        "choices": [
            {"text": "Hi", "index": 1, "logprobs": {"content": [entry]}, "finish_reason": None},
            {"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"},
        ]
    }
    tokens, finished = read_chunk(chunk, top_logprobs=1)
    assert isinstance(tokens, Tokens) and (tokens.choice, tokens.ids) == (1, (5,))
    (probs,) = tokens.logprobs
    assert (probs.token, probs.logprob, probs.bytes) == ("Hi", -0.25, b"Hi")
    assert [t.token for t in probs.top] == ["Hi"]  # cut to what was asked
    assert finished == Finished("stop", 0, 0, 0)
    assert read_chunk(chunk)[0] == Tokens("Hi", (5,), 1)  # not asked: no logprobs built
    bad = dict(entry, logprob="high")
    with pytest.raises(EngineFault, match="logprob"):
        read_chunk({"choices": [dict(chunk["choices"][0], logprobs={"content": [bad]})]}, 1)
    banned = dict(entry, bytes=[300])
    with pytest.raises(EngineFault, match="bytes"):
        read_chunk({"choices": [dict(chunk["choices"][0], logprobs={"content": [banned]})]}, 0)


def test_the_engine_is_asked_for_what_the_request_asks() -> None:
    request = GenerationRequest(
        prompt="p",
        max_tokens=8,
        continuation=(4, 5),
        n=3,
        logprobs=True,
        top_logprobs=2,
        presence_penalty=0.5,
        repetition_penalty=1.1,
        logit_bias=((7, -100.0),),
        seed=-1,
        json_schema='{"type": "object", "properties": {"a": {}}}',
    )
    body = completion_body(request)
    assert body["prompt"] == ["p", 4, 5] and body["n_cmpl"] == 3 and body["logprobs"] == 2
    assert body["presence_penalty"] == 0.5 and body["repeat_penalty"] == 1.1
    assert "frequency_penalty" not in body and body["logit_bias"] == [[7, -100.0]]
    assert body["json_schema"]["additionalProperties"] is False
    assert body["seed"] == 0xFFFFFFFF
    plain = completion_body(GenerationRequest(prompt="p", max_tokens=8, grammar="start: x"))
    assert plain["logprobs"] == 1 and "n_cmpl" not in plain and plain["grammar"] == "start: x"


def test_an_embeddings_answer_is_checked_before_it_is_believed() -> None:
    good = {
        "data": [{"index": 1, "embedding": [0.0, 1.0]}, {"index": 0, "embedding": [1.0, 0.0]}],
        "usage": {"prompt_tokens": 4},
    }
    assert embeddings_of(good, 2) == ([[1.0, 0.0], [0.0, 1.0]], 4)
    for answer in [
        {"data": []},
        {"data": [{"index": 3, "embedding": [1.0]}]},
        {"data": [{"index": 0, "embedding": [float("nan")]}]},
        [1, 2],
    ]:
        with pytest.raises(EngineFault):
            embeddings_of(answer, 1)
    with pytest.raises(RequestRefused, match="too long"):
        embeddings_of({"error": {"code": 400, "message": "input is too long"}}, 1)


def test_template_and_embedding_options_are_checked(tmp_path: Any) -> None:
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages }}")
    base = {"model_path": "/m.gguf"}
    backend = LlamaCppBackend.from_options("m", {**base, "chat_template_file": str(template)})
    assert backend.config.chat_template == "{{ messages }}"
    embedder = LlamaCppBackend.from_options("m", {**base, "embeddings": "mean"})
    assert embedder.embeds and embedder.context_length == 2048
    binary = tmp_path / "b.jinja"
    binary.write_bytes(b"\xff\xfe")
    for options, words in [
        ({"chat_template_file": str(tmp_path / "none.jinja")}, "No such file"),
        ({"chat_template_file": str(binary)}, "not UTF-8"),
        ({"chat_template_file": str(template), "chat_format": "chatml"}, "not both"),
        ({"embeddings": "median"}, "not one of mean, cls, last"),
    ]:
        with pytest.raises(BackendOptionError, match=words):
            LlamaCppBackend.from_options("m", {**base, **options})
