"""What the worker asks llama.cpp's server engine, and how its embeddings answer reads. Pure.

A completion goes as token-exact input (a raw prompt, a rendered chat, a continuation's ids
after it), always asking each token's log-probability, which carries its id. The request's
controls map onto the engine's: n -> n_cmpl (the prompt computed once, its state copied to
each choice's sequence), penalties, logit_bias as [id, bias] pairs, a JSON schema or the tool
format's grammar.
"""

from __future__ import annotations

import json
import math
from typing import Any

from worker.backends.base import GenerationRequest, RequestRefused
from worker.backends.engine_chunks import EngineFault
from worker.schemas import COMPACT, closed

DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 40


def completion_body(request: GenerationRequest) -> dict[str, Any]:
    prompt: object = request.prompt
    if request.continuation:
        # Text then ids: the engine tokenizes the text and appends the ids as they are.
        prompt = [request.prompt, *request.continuation]
    body: dict[str, Any] = {
        "prompt": prompt,
        "max_tokens": request.max_tokens,
        "stream": True,
        "return_progress": True,
        # The ids always; with logprobs, the alternatives asked for too.
        "logprobs": max(request.top_logprobs, 1) if request.logprobs else 1,
        "cache_prompt": True,
        "temperature": _given(request.temperature, DEFAULT_TEMPERATURE),
        "top_p": _given(request.top_p, DEFAULT_TOP_P),
        "top_k": _given(request.top_k, DEFAULT_TOP_K),
        "seed": -1 if request.seed is None else request.seed & 0xFFFFFFFF,
    }
    if request.n > 1:
        body["n_cmpl"] = request.n
    for name, key in (("presence_penalty", "presence_penalty"),
                      ("frequency_penalty", "frequency_penalty"),
                      ("repetition_penalty", "repeat_penalty")):  # fmt: skip
        value = getattr(request, name)
        if value is not None:
            body[key] = value
    if request.logit_bias:
        body["logit_bias"] = [[token, bias] for token, bias in request.logit_bias]
    if request.grammar:
        body["grammar"] = request.grammar
    elif request.json_schema:
        # Compact JSON: free whitespace is room for a small model to wander until max_tokens.
        body["json_schema"] = {"x-guidance": COMPACT, **closed(json.loads(request.json_schema))}
    return body


def _given(value: float | None, default: float) -> float:
    return default if value is None else value


def embeddings_of(answer: Any, count: int) -> tuple[list[list[float]], int]:
    """The vectors (in input order) and prompt tokens of the engine's embeddings answer;
    EngineFault if it is not one for `count` inputs, RequestRefused for its own refusal."""
    if isinstance(answer, dict) and "error" in answer:
        error = answer["error"]
        message = error.get("message", "") if isinstance(error, dict) else str(error)
        code = error.get("code", 500) if isinstance(error, dict) else 500
        if isinstance(code, int) and 400 <= code < 500:
            raise RequestRefused(str(message)[:2000])
        raise EngineFault(f"engine embeddings error {code}: {str(message)[:2000]}")
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, list) or len(data) != count:
        raise EngineFault(f"engine embeddings answer is not {count} embeddings")
    vectors: list[list[float] | None] = [None] * count
    for item in data:
        index = item.get("index") if isinstance(item, dict) else None
        vector = item.get("embedding") if isinstance(item, dict) else None
        if not isinstance(index, int) or not 0 <= index < count or vectors[index] is not None:
            raise EngineFault(f"engine embedding index {index!r} is not one of the inputs")
        vectors[index] = _vector(vector)
    usage = answer.get("usage")
    tokens = usage.get("prompt_tokens", 0) if isinstance(usage, dict) else 0
    return [v for v in vectors if v is not None], tokens if isinstance(tokens, int) else 0


def _vector(value: Any) -> list[float]:
    if (
        not isinstance(value, list)
        or not value
        or not all(
            isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
            for x in value
        )
    ):
        raise EngineFault("engine embedding is not a list of finite numbers")
    return [float(x) for x in value]
