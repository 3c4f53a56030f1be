"""Checks on names and ids that arrive over the wire; each returns a message a person can act on."""

from __future__ import annotations

import re

from apiary.controls import controls_problem, embed_inputs_problem
from protos.v1 import common_pb2

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]*")
MAX_NAME_LENGTH = 128


def name_problem(kind: str, value: str) -> str | None:
    """None if `value` is a usable model/hive/worker name, else why not."""
    if not value:
        return f"{kind} is required"
    if len(value) > MAX_NAME_LENGTH:
        return f"{kind} is {len(value)} characters long; at most {MAX_NAME_LENGTH} are allowed"
    if not _NAME.fullmatch(value):
        return (
            f"{kind} {value[:40]!r} has characters that are not allowed; use letters, digits "
            "and . _ : / @ + - (starting with a letter or digit)"
        )
    return None


_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+=-]*")


def tag_problem(kind: str, value: str) -> str | None:
    """None if `value` is a usable worker tag ('gpu', 'region=eu'), else why not."""
    if not value or len(value) > MAX_NAME_LENGTH or not _TAG.fullmatch(value):
        return (
            f"{kind} {value[:40]!r} is not a tag: 1..{MAX_NAME_LENGTH} letters, digits and "
            ". _ : / @ + = - (starting with a letter or digit), e.g. gpu or region=eu"
        )
    return None


def grace_problem(grace_seconds: float) -> str | None:
    """None if a stop's grace is usable (0: the server's own default), else why not. Checked
    by the hive's StopWorker and again by the worker's Shutdown, which each take it from a
    caller."""
    if grace_seconds < 0:
        return f"grace_seconds must be >= 0 (got {grace_seconds})"
    return None


DEFAULT_MAX_TOKENS_CAP = 4096
# What a request without max_tokens (0) gets, as every LLM API treats it as optional.
DEFAULT_MAX_TOKENS = 256
DEFAULT_MAX_PROMPT_BYTES = 64 * 1024


def infer_request_problem(
    request: common_pb2.InferRequest,
    max_tokens_cap: int,
    max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES,
) -> str | None:
    """Why an InferRequest is malformed, or None. Checked by the queen and again by the worker,
    each after putting its default in for a max_tokens of 0."""
    problem = name_problem("model", request.model) or input_problem(request, max_prompt_bytes)
    if problem:
        return problem
    if request.max_tokens <= 0:
        return f"max_tokens must be > 0, or 0 for the server's default (got {request.max_tokens})"
    if request.max_tokens > max_tokens_cap:
        return f"max_tokens {request.max_tokens} is above this server's cap of {max_tokens_cap}"
    if len(request.request_id) > MAX_NAME_LENGTH:
        return f"request_id is longer than {MAX_NAME_LENGTH} characters"
    if len(request.session_id) > MAX_NAME_LENGTH:
        return f"session_id is longer than {MAX_NAME_LENGTH} characters"
    return continuation_problem(request) or sampling_problem(request) or controls_problem(request)


def embed_request_problem(
    request: common_pb2.EmbedRequest, max_bytes: int = DEFAULT_MAX_PROMPT_BYTES
) -> str | None:
    """Why an EmbedRequest is malformed, or None (the queen's check, and the worker's)."""
    return name_problem("model", request.model) or embed_inputs_problem(request, max_bytes)


def continuation_problem(request: common_pb2.InferRequest) -> str | None:
    """A continuation leaves something to generate, and names tokens (ids are never negative;
    the worker checks them against its vocabulary)."""
    ids = request.continuation.token_ids
    if len(ids) >= request.max_tokens:
        return (
            f"continuation has {len(ids)} token(s), so max_tokens {request.max_tokens} leaves "
            "nothing to generate"
        )
    if any(token < 0 for token in ids):
        return "continuation.token_ids must not be negative"
    return None


CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_MESSAGES = 512


def input_problem(request: common_pb2.InferRequest, max_prompt_bytes: int) -> str | None:
    """Exactly one of prompt and messages, within the prompt size limit."""
    if request.prompt and request.messages:
        return "send either prompt or messages, not both"
    if not request.prompt and not request.messages:
        return "prompt (or messages, for a chat) is required and must not be empty"
    if len(request.messages) > MAX_MESSAGES:
        return f"at most {MAX_MESSAGES} messages are allowed (got {len(request.messages)})"
    for i, message in enumerate(request.messages):
        if message.role not in CHAT_ROLES:
            return f"messages[{i}].role {message.role[:20]!r} is not one of {', '.join(CHAT_ROLES)}"
    size = len(request.prompt.encode()) + sum(len(m.content.encode()) for m in request.messages)
    size += sum(len(t.parameters_json) + len(t.description) for t in request.tools)
    size += sum(len(c.arguments) for m in request.messages for c in m.tool_calls)
    if size > max_prompt_bytes:
        what = "prompt" if request.prompt else "the messages"
        return f"{what} is {size} bytes; this server accepts at most {max_prompt_bytes}"
    return None


MAX_STOP_STRINGS = 8
MAX_STOP_LENGTH = 64


def sampling_problem(request: common_pb2.InferRequest) -> str | None:
    if request.HasField("temperature") and not 0.0 <= request.temperature <= 10.0:
        return f"temperature must be within 0..10 (got {request.temperature:g})"
    if request.HasField("top_p") and not 0.0 < request.top_p <= 1.0:
        return f"top_p must be within (0, 1] (got {request.top_p:g})"
    if request.HasField("top_k") and request.top_k < 0:
        return f"top_k must be >= 0 (got {request.top_k}); 0 means no limit"
    if len(request.stop) > MAX_STOP_STRINGS:
        return f"at most {MAX_STOP_STRINGS} stop strings are allowed (got {len(request.stop)})"
    for stop in request.stop:
        if not stop or len(stop) > MAX_STOP_LENGTH:
            return f"each stop string must be 1..{MAX_STOP_LENGTH} characters long"
    return None
