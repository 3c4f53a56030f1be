"""An OpenAI request body, read into the InferRequest the queen routes. Pure.

Every parameter OpenAI's API defines is either carried out or refused, naming it (a 400):
nothing asked for is silently ignored. Parameters that only describe the caller
(`user`, `metadata`, `safety_identifier`, `prompt_cache_key`) are taken as such. A name
OpenAI does not define is refused as OpenAI refuses it. Ranges (temperature, prompt size,
max_tokens cap, ...) are the queen's admission's to check, the same as for gRPC.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from apiary.validation import MAX_NAME_LENGTH
from protos.v1 import common_pb2
from queen.http.json_body import body_problem

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


# ---- the body as a whole ----------------------------------------------------


def check_body(body: object) -> None:
    """A BadRequest naming where the body has text protobuf cannot carry or nests too deep
    (queen/http/json_body.py)."""
    problem = body_problem(body)
    if problem is not None:
        raise BadRequest(*problem)


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


def integer(body: Mapping[str, Any], name: str, bits: int = 32) -> int | None:
    """An integer that fits the contract's field (int32 unless said: seed is int64)."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(
            f"{name} must be an integer (got {type_name(value)})", name, "invalid_type"
        )
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if not low <= value <= high:
        raise BadRequest(f"{name} must be within {low}..{high} (got {value})", name)
    return value


def number(body: Mapping[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise wrong(name, "a number", value)
    return float(value)


def mapping(body: Mapping[str, Any], name: str, expected: str) -> Mapping[str, Any]:
    """An optional object parameter ({} when absent)."""
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise wrong(name, expected, value)
    return value


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
    refuse_unless(body, "best_of", lambda v: v == 1, "one candidate per choice (use n)")
    refuse_unless(body, "functions", lambda v: v == [], "the deprecated functions; use tools")
    refuse_unless(body, "function_call", lambda v: v == "none",
                  "the deprecated function_call; use tool_choice")  # fmt: skip
    refuse_unless(body, "store", lambda v: v is False, "completions are not stored")
    refuse_unless(body, "service_tier", lambda v: v in ("auto", "default"), "one service tier")
    refuse_unless(body, "modalities", lambda v: v == ["text"], "text only")
    for name in ("audio", "prediction", "web_search_options", "reasoning_effort", "verbosity"):
        refuse_unless(body, name, lambda _: False, "")
    refuse_unless(body, "echo", lambda v: v is False, "the prompt is not echoed")
    refuse_unless(body, "suffix", lambda v: v == "", "no suffix (insertion)")


# Parameters that only describe the caller: taken, and used only as such (logs).
DESCRIPTIVE = frozenset({"user", "metadata", "safety_identifier", "prompt_cache_key"})
# repetition_penalty is llama.cpp's (and vLLM's) extension, as top_k is.
SAMPLING = frozenset({"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                      "stream", "stream_options", "n", "logprobs", "presence_penalty",
                      "frequency_penalty", "repetition_penalty", "logit_bias"})  # fmt: skip
REFUSED_UNLESS_PLAIN = frozenset({
    "best_of", "functions", "function_call", "store", "service_tier", "modalities", "audio",
    "prediction", "web_search_options", "reasoning_effort", "verbosity", "echo", "suffix",
})  # fmt: skip
CHAT_PARAMS = SAMPLING | DESCRIPTIVE | REFUSED_UNLESS_PLAIN | {
    "messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
    "parallel_tool_calls", "response_format",
}  # fmt: skip
COMPLETION_PARAMS = SAMPLING | DESCRIPTIVE | REFUSED_UNLESS_PLAIN | {"prompt"}


def check_known(body: Mapping[str, Any], known: frozenset[str]) -> None:
    for name in body:
        if name not in known:
            raise BadRequest(
                f"Unrecognized request argument supplied: {name}", name, "unknown_parameter"
            )


def sampling(body: Mapping[str, Any], request: common_pb2.InferRequest) -> None:
    """model, temperature, top_p, top_k, seed, stop, n, penalties, logit_bias into `request`
    (their ranges are the admission's to check)."""
    request.model = text(body, "model", required=True) or ""
    n = integer(body, "n")
    if n is not None:
        if n < 1:
            raise BadRequest(f"n must be at least 1 (got {n})", "n")
        request.n = n
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty"):  # fmt: skip
        value = number(body, name)
        if value is not None:
            setattr(request, name, value)
    top_k, seed = integer(body, "top_k"), integer(body, "seed", bits=64)
    if top_k is not None:
        request.top_k = top_k
    if seed is not None:
        request.seed = seed
    logit_bias(body, request)
    stop = body.get("stop")
    if isinstance(stop, str):
        request.stop.append(stop)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        request.stop.extend(stop)
    elif stop is not None:
        raise BadRequest("stop must be a string or an array of strings", "stop", "invalid_type")


def logit_bias(body: Mapping[str, Any], request: common_pb2.InferRequest) -> None:
    """{"token id": bias}: ids as strings, as JSON object keys are."""
    bias = mapping(body, "logit_bias", "an object of token id -> bias")
    for key, value in bias.items():
        if not key.isdigit() or len(key) > 9:
            raise BadRequest(f"logit_bias key {key[:20]!r} is not a token id", "logit_bias")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong(f"logit_bias[{key}]", "a number", value)
        request.logit_bias[int(key)] = float(value)


def chat_logprobs(body: Mapping[str, Any], request: common_pb2.InferRequest) -> None:
    """Chat: logprobs true, and top_logprobs alternatives per token."""
    request.logprobs = flag(body, "logprobs")
    top = integer(body, "top_logprobs")
    if top is not None:
        if top < 0:
            raise BadRequest(f"top_logprobs must be >= 0 (got {top})", "top_logprobs")
        if top and not request.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
        request.top_logprobs = top


def completion_logprobs(body: Mapping[str, Any], request: common_pb2.InferRequest) -> None:
    """Completions: logprobs N, the alternatives per token (0: each token's own only)."""
    top = integer(body, "logprobs")
    if top is not None:
        if top < 0:
            raise BadRequest(f"logprobs must be >= 0 (got {top})", "logprobs")
        request.logprobs, request.top_logprobs = True, top


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
    chat_logprobs(body, request)
    tools(body, request)
    response_format(body, request)
    return Wanted(request, True, wanted.stream, wanted.include_usage, wanted.user)


def tools(body: Mapping[str, Any], request: common_pb2.InferRequest) -> None:
    """tools (functions only), tool_choice and parallel_tool_calls into `request`."""
    given = body.get("tools")
    if given is not None and not isinstance(given, list):
        raise wrong("tools", "an array", given)
    for i, tool in enumerate(given or []):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else type_name(tool)
            raise unsupported(f"{where}.type", f"function tools only (got {kind!r})")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise wrong(f"{where}.function", "an object", function)
        check_known(function, frozenset({"name", "description", "parameters", "strict"}))
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise wrong(f"{where}.function.parameters", "a JSON schema object", parameters)
        request.tools.add(
            name=text(function, "name", required=True) or "",
            description=text(function, "description") or "",
            parameters_json=json.dumps(parameters) if parameters else "",
            strict=flag(function, "strict"),
        )
    tool_choice(body.get("tool_choice"), request)
    if body.get("parallel_tool_calls") is not None:
        request.parallel_tool_calls = flag(body, "parallel_tool_calls")


CHOICES = {"auto": common_pb2.ToolChoice.MODE_AUTO, "none": common_pb2.ToolChoice.MODE_NONE,
           "required": common_pb2.ToolChoice.MODE_REQUIRED}  # fmt: skip


def tool_choice(choice: object, request: common_pb2.InferRequest) -> None:
    if choice is None:
        return
    if isinstance(choice, str) and choice in CHOICES:
        request.tool_choice.mode = CHOICES[choice]
        return
    function = choice.get("function") if isinstance(choice, dict) else None
    if not (isinstance(choice, dict) and choice.get("type") == "function"
            and isinstance(function, dict) and isinstance(function.get("name"), str)):  # fmt: skip
        raise BadRequest(
            'tool_choice must be "none", "auto", "required" or {"type": "function", '
            '"function": {"name": ...}}', "tool_choice", "invalid_value",
        )  # fmt: skip
    request.tool_choice.mode = common_pb2.ToolChoice.MODE_FUNCTION
    request.tool_choice.function = function["name"]


def response_format(body: Mapping[str, Any], request: common_pb2.InferRequest) -> None:
    """text, json_object, or json_schema {name, schema, strict, description}."""
    form = mapping(body, "response_format", "an object")
    if body.get("response_format") is None:
        return
    kind = form.get("type")
    out = request.response_format
    if kind == "text" or kind == "json_object":
        check_known(form, frozenset({"type"}))
        out.type = (common_pb2.ResponseFormat.TYPE_TEXT if kind == "text"
                    else common_pb2.ResponseFormat.TYPE_JSON_OBJECT)  # fmt: skip
        return
    if kind != "json_schema":
        raise BadRequest(f"response_format.type must be text, json_object or json_schema "
                         f"(got {kind!r})", "response_format.type")  # fmt: skip
    spec = form.get("json_schema")
    if not isinstance(spec, dict):
        raise wrong("response_format.json_schema", "an object", spec)
    check_known(spec, frozenset({"name", "description", "schema", "strict"}))
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise wrong("response_format.json_schema.schema", "a JSON schema object", schema)
    out.type = common_pb2.ResponseFormat.TYPE_JSON_SCHEMA
    out.schema_json, out.name = json.dumps(schema), text(spec, "name") or ""
    out.strict = flag(spec, "strict")


def chat_message(index: int, message: object) -> common_pb2.ChatMessage:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise BadRequest(f"{where} must be an object with role and content", where, "invalid_type")
    for name in message:
        if name == "function_call" and message[name]:
            raise unsupported(f"{where}.{name}", "the deprecated function_call; use tool_calls")
        if name not in ("role", "content", "tool_call_id", "tool_calls", "function_call",
                        "refusal"):  # fmt: skip
            raise unsupported(f"{where}.{name}")
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise BadRequest(f"{where}.role must be one of {', '.join(ROLES)} (got {role!r})",
                         f"{where}.role")  # fmt: skip
    out = common_pb2.ChatMessage(role=ROLES[role], content=content_text(where, message),
                                 tool_call_id=text(message, "tool_call_id") or "")  # fmt: skip
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise wrong(f"{where}.tool_calls", "an array", calls)
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise wrong(f"{where}.tool_calls[{j}].function", "an object", function)
        out.tool_calls.add(id=text(call, "id", required=True) or "",
                           name=text(function, "name", required=True) or "",
                           arguments=text(function, "arguments") or "{}")  # fmt: skip
    return out


def content_text(where: str, message: Mapping[str, Any]) -> str:
    """A message's content: a string, or text parts joined (images, audio and files are
    refused: these models read text)."""
    content = message.get("content")
    if content is None and message.get("role") == "assistant":
        return ""  # a turn that only called tools
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
    completion_logprobs(body, request)
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


EMBED_PARAMS = frozenset({"model", "input", "encoding_format", "dimensions", "user"})


@dataclass(frozen=True)
class WantedEmbeddings:
    request: common_pb2.EmbedRequest
    encoding: str
    user: str = ""


def embed_request(body: object) -> WantedEmbeddings:
    """POST /v1/embeddings: a text or a list of texts (token ids are refused: send text)."""
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object (got {type_name(body)})")
    check_known(body, EMBED_PARAMS)
    request = common_pb2.EmbedRequest(model=text(body, "model", required=True) or "")
    given = body.get("input")
    if isinstance(given, str):
        given = [given]
    if isinstance(given, list) and given and all(isinstance(x, int | list) for x in given):
        raise unsupported("input", "token ids as input; send text")
    if not isinstance(given, list) or not given or not all(isinstance(x, str) for x in given):
        raise wrong("input", "a string or a non-empty array of strings", given)
    request.input.extend(given)
    encoding = text(body, "encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise BadRequest(f"encoding_format must be float or base64 (got {encoding!r})",
                         "encoding_format")  # fmt: skip
    dimensions = integer(body, "dimensions")
    if dimensions is not None:
        if dimensions < 1:
            raise BadRequest(f"dimensions must be at least 1 (got {dimensions})", "dimensions")
        request.dimensions = dimensions
    return WantedEmbeddings(request, encoding, text(body, "user") or "")
