"""What llama.cpp's server engine streams for one completion, read as events. Pure: no I/O.

The engine answers an OpenAI-style streamed completion with one dict per SSE chunk: prompt
progress (`return_progress`: the prompt's token count and how much of it came from a cache),
tokens (text, and with `logprobs` the id of every token), and a last chunk with the finish
reason and usage; or an error. An engine's output is untrusted like any input: a chunk of
another shape is an EngineFault, never a crash.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from protos.v1 import common_pb2

# The engine's finish reasons that mean "a length limit", as against its end of turn.
LENGTH_REASONS = frozenset({"length"})


class EngineFault(RuntimeError):
    """The engine said something that is not a completion chunk."""


@dataclass(frozen=True)
class PromptProgress:
    total: int
    cached: int


@dataclass(frozen=True)
class Tokens:
    text: str
    ids: tuple[int, ...]
    choice: int = 0
    # Asked for (top_logprobs >= 0): each token's log-probability and its top alternatives.
    logprobs: tuple[common_pb2.TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    reason: str
    prompt_tokens: int
    cached_tokens: int
    choice: int = 0


@dataclass(frozen=True)
class Failed:
    """The engine refused the request; `code` is its HTTP-like status (400: the request's)."""

    code: int
    message: str


Event = PromptProgress | Tokens | Finished | Failed


def read_chunk(chunk: Any, top_logprobs: int = -1) -> list[Event]:
    """The events in one chunk (one may carry progress, tokens and the end together), of
    every choice in it. top_logprobs >= 0: the tokens' log-probabilities are read too, with
    that many alternatives each."""
    if not isinstance(chunk, dict):
        raise EngineFault(f"engine sent a {type(chunk).__name__}, not a chunk")
    if "error" in chunk or ("code" in chunk and "message" in chunk):
        return [_failure(chunk)]
    events: list[Event] = []
    progress = chunk.get("prompt_progress")
    if isinstance(progress, dict):
        events.append(PromptProgress(_count(progress, "total"), _count(progress, "cache")))
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        raise EngineFault("engine chunk has no choices list")
    for choice in choices:
        if not isinstance(choice, dict):
            raise EngineFault("engine chunk choice is not an object")
        index = _count(choice, "index")
        ids = _token_ids(choice.get("logprobs"))
        text = choice.get("text") or ""
        if not isinstance(text, str):
            raise EngineFault("engine chunk text is not a string")
        if text or ids:
            probs = _logprobs(choice["logprobs"], top_logprobs) if top_logprobs >= 0 else ()
            events.append(Tokens(text, ids, index, probs))
        reason = choice.get("finish_reason")
        if reason is not None:
            events.append(_finished(str(reason), chunk.get("usage"), index))
    return events


def _logprobs(logprobs: dict[str, Any], top: int) -> tuple[common_pb2.TokenLogprob, ...]:
    """The engine's per-token entries (their ids checked already) as TokenLogprobs."""
    out = []
    for entry in logprobs["content"]:
        alternatives = entry.get("top_logprobs") or []
        if not isinstance(alternatives, list):
            raise EngineFault("engine top_logprobs is not a list")
        out.append(common_pb2.TokenLogprob(
            token_id=entry["id"], token=_text(entry, "token"), logprob=_logprob(entry),
            bytes=_bytes(entry),
            top=[common_pb2.TopLogprob(token_id=_id(a), token=_text(a, "token"),
                                       logprob=_logprob(a), bytes=_bytes(a))
                 for a in alternatives[:top]],
        ))  # fmt: skip
    return tuple(out)


def _id(entry: Any) -> int:
    token = entry.get("id") if isinstance(entry, dict) else None
    if not isinstance(token, int) or isinstance(token, bool) or token < 0:
        raise EngineFault(f"engine token id {token!r} is not a token id")
    return token


def _text(entry: dict[str, Any], key: str) -> str:
    value = entry.get(key, "")
    if not isinstance(value, str):
        raise EngineFault(f"engine {key} {value!r} is not a string")
    return value


def _logprob(entry: dict[str, Any]) -> float:
    value = entry.get("logprob")
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise EngineFault(f"engine logprob {value!r} is not a number")
    return max(float(value), -9999.0)  # -inf (a banned token) as OpenAI writes it


def _bytes(entry: dict[str, Any]) -> bytes:
    value = entry.get("bytes") or []
    if not isinstance(value, list) or not all(
        isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 256 for b in value
    ):
        raise EngineFault("engine token bytes are not bytes")
    return bytes(value)


def _failure(chunk: dict[str, Any]) -> Failed:
    error = chunk.get("error", chunk)
    if not isinstance(error, dict):
        return Failed(500, str(error)[:500])
    code = error.get("code", 500)
    return Failed(code if isinstance(code, int) else 500, str(error.get("message", ""))[:2000])


def _finished(reason: str, usage: Any, choice: int) -> Finished:
    if not isinstance(usage, dict):
        return Finished(reason, 0, 0, choice)
    details = usage.get("prompt_tokens_details")
    cached = _count(details, "cached_tokens") if isinstance(details, dict) else 0
    return Finished(reason, _count(usage, "prompt_tokens"), cached, choice)


def _token_ids(logprobs: Any) -> tuple[int, ...]:
    if logprobs is None:
        return ()
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list):
        raise EngineFault("engine logprobs carry no content list")
    return tuple(_id(entry) for entry in content)


def _count(mapping: dict[str, Any], key: str) -> int:
    value = mapping.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise EngineFault(f"engine {key} {value!r} is not a count")
    return value
