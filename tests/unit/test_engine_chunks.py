"""worker/backends/engine_chunks.py: the engine's chunks read as events, and its nonsense as a
fault (engine output is untrusted)."""

from __future__ import annotations

from typing import Any

import pytest

from worker.backends.cpu import cpu_flags, missing_features
from worker.backends.engine_chunks import (
    EngineFault,
    Failed,
    Finished,
    PromptProgress,
    Tokens,
    read_chunk,
)


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
