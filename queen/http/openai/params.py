"""An OpenAI request body, read into the InferRequest the queen routes. Pure.

Every parameter OpenAI's API defines is either carried out or refused, naming it (a 400):
nothing asked for is silently ignored. Parameters that only describe the caller
(`user`, `metadata`, `safety_identifier`, `prompt_cache_key`) are taken as such. A name
OpenAI does not define is refused as OpenAI refuses it. Ranges (temperature, prompt size,
max_tokens cap, ...) are the queen's admission's to check, the same as for gRPC.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from apiary.validation import MAX_NAME_LENGTH
from protos.v1 import common_pb2

# Chat roles as the contract has them; OpenAI's newer `developer` is the system's voice.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
         "tool": "tool"}  # fmt: skip


class BadRequest(Exception):
    """A 400 in OpenAI's shape: what is wrong, and the parameter it is about."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


@dataclass(frozen=True)
class Wanted:
    """A request as the queen routes it, and how the client wants the answer."""

    request: common_pb2.InferRequest
    chat: bool
    stream: bool = False
    include_usage: bool = False
    user: str = ""


def unsupported(param: str, why: str = "") -> BadRequest:
    return BadRequest(
        f"{param} is not supported by this server{': ' + why if why else ''}",
        param, "unsupported_parameter",
    )  # fmt: skip


# ---- typed reads ------------------------------------------------------------


def wrong(name: str, expected: str, value: object) -> BadRequest:
    """A parameter of the wrong type (or missing: `value` None)."""
    if value is None:
        return BadRequest(f"{name} is required", name, "missing_required_parameter")
    return BadRequest(f"{name} must be {expected} (got {type_name(value)})", name, "invalid_type")


def text(body: Mapping[str, Any], name: str, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise BadRequest(f"{name} is required", name, "missing_required_parameter")
        return None
    if not isinstance(value, str):
        raise wrong(name, "a string", value)
    return value


def integer(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(
            f"{name} must be an integer (got {type_name(value)})", name, "invalid_type"
        )
    return value


def number(body: Mapping[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise wrong(name, "a number", value)
    return float(value)


def flag(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(
            f"{name} must be true or false (got {type_name(value)})", name, "invalid_type"
        )
    return value


def type_name(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "an object"}  # fmt: skip
    return "null" if value is None else names.get(type(value), type(value).__name__)


# ---- parameters a request may carry ---------------------------------------


def refuse_unless(
    body: Mapping[str, Any], name: str, fine: Callable[[Any], bool], why: str
) -> None:
    """A parameter we cannot carry out: fine when absent or at a value that asks nothing."""
    if name in body and body[name] is not None and not fine(body[name]):
        raise unsupported(name, why)


def check_unsupported(body: Mapping[str, Any]) -> None:
    """Parameters both endpoints define that would change the answer in ways we cannot."""
    refuse_unless(body, "n", lambda v: v == 1, "one choice per request (n=1)")
    refuse_unless(body, "best_of", lambda v: v == 1, "one candidate per request")
    refuse_unless(body, "logprobs", lambda v: v is False or v == 0, "no log probabilities")
    refuse_unless(body, "top_logprobs", lambda v: v == 0, "no log probabilities")
    for penalty in ("presence_penalty", "frequency_penalty"):
        refuse_unless(body, penalty, lambda v: v == 0, "no repetition penalties")
    refuse_unless(body, "logit_bias", lambda v: v == {}, "no logit bias")
    refuse_unless(body, "tools", lambda v: v == [], "no tool calling")
    refuse_unless(body, "functions", lambda v: v == [], "no function calling")
    refuse_unless(body, "tool_choice", lambda v: v == "none", "no tool calling")
    refuse_unless(body, "function_call", lambda v: v == "none", "no function calling")
    refuse_unless(body, "response_format", lambda v: v == {"type": "text"}, "text answers only")
    refuse_unless(body, "store", lambda v: v is False, "completions are not stored")
    refuse_unless(body, "service_tier", lambda v: v in ("auto", "default"), "one service tier")
    refuse_unless(body, "modalities", lambda v: v == ["text"], "text only")
    for name in ("audio", "prediction", "web_search_options", "reasoning_effort", "verbosity"):
        refuse_unless(body, name, lambda _: False, "")
    refuse_unless(body, "echo", lambda v: v is False, "the prompt is not echoed")
    refuse_unless(body, "suffix", lambda v: v == "", "no suffix (insertion)")


# Parameters that only describe the caller: taken, and used only as such (logs).
DESCRIPTIVE = frozenset({"user", "metadata", "safety_identifier", "prompt_cache_key",
                         "parallel_tool_calls"})  # fmt: skip
SAMPLING = frozenset({"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                      "stream", "stream_options"})  # fmt: skip
REFUSED_UNLESS_PLAIN = frozenset({
    "n", "best_of", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty",
    "logit_bias", "tools", "functions", "tool_choice", "function_call", "response_format",
    "store", "service_tier", "modalities", "audio", "prediction", "web_search_options",
    "reasoning_effort", "verbosity", "echo", "suffix",
})  # fmt: skip
CHAT_PARAMS = SAMPLING | DESCRIPTIVE | REFUSED_UNLESS_PLAIN | {"messages", "max_completion_tokens"}
COMPLETION_PARAMS = SAMPLING | DESCRIPTIVE | REFUSED_UNLESS_PLAIN | {"prompt"}


def check_known(body: Mapping[str, Any], known: frozenset[str]) -> None:
    for name in body:
        if name not in known:
            raise BadRequest(
                f"Unrecognized request argument supplied: {name}", name, "unknown_parameter"
            )


def sampling(body: Mapping[str, Any], request: common_pb2.InferRequest) -> None:
    """model, temperature, top_p, top_k, seed, stop, into `request`."""
    request.model = text(body, "model", required=True) or ""
    for name in ("temperature", "top_p"):
        value = number(body, name)
        if value is not None:
            setattr(request, name, value)
    top_k, seed = integer(body, "top_k"), integer(body, "seed")
    if top_k is not None:
        request.top_k = top_k
    if seed is not None:
        request.seed = seed
    stop = body.get("stop")
    if isinstance(stop, str):
        request.stop.append(stop)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        request.stop.extend(stop)
    elif stop is not None:
        raise BadRequest("stop must be a string or an array of strings", "stop", "invalid_type")


def streaming(body: Mapping[str, Any]) -> tuple[bool, bool]:
    """stream, and stream_options.include_usage (only with stream, as OpenAI has it)."""
    stream = flag(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise BadRequest(
            "stream_options is only allowed with stream: true", "stream_options", "invalid_value"
        )
    if not isinstance(options, dict):
        raise BadRequest("stream_options must be an object", "stream_options", "invalid_type")
    check_known(options, frozenset({"include_usage", "include_obfuscation"}))
    return stream, flag(options, "include_usage")


def common(body: object, known: frozenset[str], request: common_pb2.InferRequest) -> Wanted:
    """What both endpoints share: a JSON object, known parameters, sampling, streaming."""
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object (got {type_name(body)})")
    check_known(body, known)
    check_unsupported(body)
    sampling(body, request)
    stream, include_usage = streaming(body)
    user = text(body, "user") or ""
    request.session_id = session_key(text(body, "prompt_cache_key") or user)
    return Wanted(request, chat=False, stream=stream, include_usage=include_usage, user=user)


def session_key(name: str) -> str:
    """The session a request sticks to (cache-aware routing): `prompt_cache_key`, else `user`
    (an X-Session-Affinity header overrides both). A name too long for session_id goes as
    its digest, so any caller-chosen key works and stays stable."""
    if len(name) <= MAX_NAME_LENGTH:
        return name
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


def max_tokens(body: Mapping[str, Any], *names: str) -> int:
    """The first of `names` given (0 when none is: the queen's default); two that disagree
    are refused."""
    given = [(name, value) for name in names if (value := integer(body, name)) is not None]
    if len({value for _, value in given}) > 1:
        raise BadRequest(f"{' and '.join(names)} disagree; give one", names[0])
    if not given:
        return 0
    name, value = given[0]
    if value < 1:
        raise BadRequest(f"{name} must be at least 1 (got {value})", name)
    return value


# ---- the two endpoints ------------------------------------------------------


def chat_request(body: object) -> Wanted:
    """POST /v1/chat/completions."""
    request = common_pb2.InferRequest()
    wanted = common(body, CHAT_PARAMS, request)
    assert isinstance(body, dict)  # common() said so
    request.max_tokens = max_tokens(body, "max_completion_tokens", "max_tokens")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise wrong("messages", "a non-empty array", messages)
    request.messages.extend(chat_message(i, m) for i, m in enumerate(messages))
    return Wanted(request, True, wanted.stream, wanted.include_usage, wanted.user)


def chat_message(index: int, message: object) -> common_pb2.ChatMessage:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise BadRequest(f"{where} must be an object with role and content", where, "invalid_type")
    for name in message:
        if name in ("tool_calls", "function_call") and message[name]:
            raise unsupported(f"{where}.{name}", "no tool calling")
        if name not in ("role", "content", "tool_call_id", "tool_calls", "function_call",
                        "refusal"):  # fmt: skip
            raise unsupported(f"{where}.{name}")
    role = message.get("role")
    if role not in ROLES:
        raise BadRequest(f"{where}.role must be one of {', '.join(ROLES)} (got {role!r})",
                         f"{where}.role")  # fmt: skip
    return common_pb2.ChatMessage(role=ROLES[role], content=content_text(where, message))


def content_text(where: str, message: Mapping[str, Any]) -> str:
    """A message's content: a string, or text parts joined (images, audio and files are
    refused: these models read text)."""
    content = message.get("content")
    if content is None and message.get("role") == "assistant":
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"{where}.content must be a string or an array of parts",
                         f"{where}.content", "invalid_type")  # fmt: skip
    texts = []
    for i, part in enumerate(content):
        name = f"{where}.content[{i}]"
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type_name(part)
            raise unsupported(f"{name}.type", f"text parts only (got {kind!r})")
        if not isinstance(part.get("text"), str):
            raise BadRequest(f"{name}.text must be a string", f"{name}.text", "invalid_type")
        texts.append(part["text"])
    return "".join(texts)


def completion_request(body: object) -> Wanted:
    """POST /v1/completions: one prompt, as a string (or an array holding one string)."""
    request = common_pb2.InferRequest()
    wanted = common(body, COMPLETION_PARAMS, request)
    assert isinstance(body, dict)
    request.max_tokens = max_tokens(body, "max_tokens")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        raise unsupported("prompt", "one prompt per request (send several requests)")
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        raise unsupported("prompt", "token ids as a prompt; send text")
    if not isinstance(prompt, str):
        raise wrong("prompt", "a string", prompt)
    request.prompt = prompt
    return Wanted(request, False, wanted.stream, wanted.include_usage, wanted.user)
