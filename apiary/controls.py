"""Checks on what a request may ask beyond a prompt: tools, response formats, logprobs, n,
penalties and logit bias, and on embedding requests. Each returns a message a person can act
on, or None. Checked by the queen and again by the worker, like the rest of a request.

A JSON schema (a tool's parameters, a response format's) must be a valid schema by the JSON
Schema metaschema (jsonschema checks it); which keywords a grammar can enforce is the
engine's to say (worker/schemas.py).
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import jsonschema

from protos.v1 import common_pb2

MAX_TOOLS = 128
MAX_TOP_LOGPROBS = 20
MAX_CHOICES = 16
MAX_LOGIT_BIAS = 1024
MAX_EMBED_INPUTS = 256
MAX_ID_LENGTH = 256
# OpenAI's rule for function names.
_FUNCTION = re.compile(r"[A-Za-z0-9_-]{1,64}")

Mode = common_pb2.ToolChoice.Mode
Format = common_pb2.ResponseFormat


def controls_problem(request: common_pb2.InferRequest) -> str | None:
    return (
        tools_problem(request)
        or history_problem(request)
        or format_problem(request)
        or sampling_controls_problem(request)
        or moving_problem(request)
    )


def tools_problem(request: common_pb2.InferRequest) -> str | None:
    choice, tools = request.tool_choice, request.tools
    if not tools:
        if choice.mode in (Mode.MODE_REQUIRED, Mode.MODE_FUNCTION, Mode.MODE_AUTO):
            return "tool_choice asks for a tool call, but the request gives no tools"
        return None
    if not request.messages:
        return "tools need a chat (messages), not a raw prompt"
    if len(tools) > MAX_TOOLS:
        return f"at most {MAX_TOOLS} tools are allowed (got {len(tools)})"
    names = set()
    for i, tool in enumerate(tools):
        if not _FUNCTION.fullmatch(tool.name):
            return f"tools[{i}].name {tool.name[:70]!r} must be 1..64 letters, digits, _ or -"
        if tool.name in names:
            return f"tools[{i}].name {tool.name!r} is given twice"
        names.add(tool.name)
        problem = tool.parameters_json and schema_text_problem(
            f"tools[{i}].parameters", tool.parameters_json
        )
        if problem:
            return problem
    if choice.mode == Mode.MODE_FUNCTION and choice.function not in names:
        return (f"tool_choice names function {choice.function[:70]!r}, which is not among the "
                f"tools: {', '.join(sorted(names))}")  # fmt: skip
    if choice.mode not in Mode.values():
        return f"tool_choice.mode {choice.mode} is not a known mode"
    return None


def history_problem(request: common_pb2.InferRequest) -> str | None:
    """Calls only on assistant turns; a tool result names the call it answers."""
    for i, message in enumerate(request.messages):
        if message.tool_calls and message.role != "assistant":
            return f"messages[{i}] has tool_calls, but only an assistant message may"
        if message.role == "tool" and not message.tool_call_id:
            return f"messages[{i}] (role tool) needs tool_call_id: the id of the call it answers"
        if len(message.tool_call_id) > MAX_ID_LENGTH:
            return f"messages[{i}].tool_call_id is longer than {MAX_ID_LENGTH} characters"
        for j, call in enumerate(message.tool_calls):
            where = f"messages[{i}].tool_calls[{j}]"
            if not _FUNCTION.fullmatch(call.name):
                return f"{where}.function.name {call.name[:70]!r} is not a function name"
            if not call.id or len(call.id) > MAX_ID_LENGTH:
                return f"{where}.id must be 1..{MAX_ID_LENGTH} characters"
    return None


def format_problem(request: common_pb2.InferRequest) -> str | None:
    form = request.response_format
    if form.type not in Format.Type.values():
        return f"response_format.type {form.type} is not a known type"
    if form.type != Format.TYPE_JSON_SCHEMA:
        return "response_format.schema is only for type json_schema" if form.schema_json else None
    if not form.schema_json:
        return "response_format json_schema needs its schema"
    problem = schema_text_problem("response_format.json_schema.schema", form.schema_json)
    if problem:
        return problem
    calls = request.tools and request.tool_choice.mode != Mode.MODE_NONE
    if calls:
        return "tools and a JSON response_format cannot hold one answer together; use one"
    return None


def schema_text_problem(where: str, text: str) -> str | None:
    """`text` is a JSON object that is a valid JSON schema."""
    try:
        schema: Any = json.loads(text)
    except ValueError as exc:
        return f"{where} is not valid JSON: {exc}"
    if not isinstance(schema, dict):
        return f"{where} must be a JSON schema object"
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        at = "/".join(str(p) for p in exc.path)
        return f"{where} is not a valid JSON schema{' at ' + at if at else ''}: {exc.message}"
    return None


def sampling_controls_problem(request: common_pb2.InferRequest) -> str | None:
    if request.top_logprobs > MAX_TOP_LOGPROBS:
        return f"top_logprobs must be within 0..{MAX_TOP_LOGPROBS} (got {request.top_logprobs})"
    if request.top_logprobs and not request.logprobs:
        return "top_logprobs needs logprobs: true"
    if request.n > MAX_CHOICES:
        return f"n must be within 1..{MAX_CHOICES} (got {request.n})"
    for name in PENALTIES[:2]:
        if request.HasField(name) and not -2.0 <= getattr(request, name) <= 2.0:
            return f"{name} must be within -2..2 (got {getattr(request, name):g})"
    if request.HasField("repetition_penalty") and not 0 < request.repetition_penalty <= 10:
        return (f"repetition_penalty must be within (0, 10], 1 for none "
                f"(got {request.repetition_penalty:g})")  # fmt: skip
    if len(request.logit_bias) > MAX_LOGIT_BIAS:
        return f"logit_bias may name at most {MAX_LOGIT_BIAS} tokens"
    for token, bias in request.logit_bias.items():
        if token < 0 or not -100.0 <= bias <= 100.0:
            return f"logit_bias {{{token}: {bias:g}}}: token ids are >= 0, biases within -100..100"
    return None


# What a request may ask beyond a plain completion, as workers list what their backend does
# (WorkerRecord.features); the parameter each is said by.
FEATURES = {"tools": "tools", "response_format": "response_format", "logprobs": "logprobs",
            "n": "n", "penalties": "presence_penalty", "logit_bias": "logit_bias"}  # fmt: skip
PENALTIES: tuple[Literal["presence_penalty", "frequency_penalty", "repetition_penalty"], ...] = (
    "presence_penalty", "frequency_penalty", "repetition_penalty",
)  # fmt: skip


def asked_features(request: common_pb2.InferRequest) -> list[str]:
    """The FEATURES this request asks for."""
    asked = {
        "tools": bool(request.tools) and request.tool_choice.mode != Mode.MODE_NONE,
        "response_format": request.response_format.type
        in (Format.TYPE_JSON_OBJECT, Format.TYPE_JSON_SCHEMA),
        "logprobs": request.logprobs,
        "n": request.n > 1,
        "penalties": any(request.HasField(name) for name in PENALTIES),
        "logit_bias": bool(request.logit_bias),
    }
    return [name for name in FEATURES if asked[name]]


def feature_param(request: common_pb2.InferRequest, feature: str) -> str:
    """The parameter that asked for `feature` (the first penalty given, for penalties)."""
    if feature == "penalties":
        return next(name for name in PENALTIES if request.HasField(name))
    return FEATURES[feature]


def held_to_grammar(request: common_pb2.InferRequest) -> str:
    """What holds the answer to a grammar ('' if nothing does)."""
    if request.response_format.type in (Format.TYPE_JSON_OBJECT, Format.TYPE_JSON_SCHEMA):
        return "a JSON response_format"
    if request.tools and request.tool_choice.mode != Mode.MODE_NONE:
        return "tools"
    return ""


def unmovable(request: common_pb2.InferRequest) -> str:
    """Why a stream of this request cannot go on exactly on another worker ('' if it can).
    A grammar's state and n choices are the engine's and are not carried in token ids;
    logprobs, penalties and logit bias are (the penalties see the continued tokens)."""
    if grammar := held_to_grammar(request):
        return f"its answer is held to a grammar ({grammar}), which cannot resume mid-answer"
    if request.n > 1:
        return f"it asks for n={request.n} choices, which cannot resume one by one"
    return ""


def moving_problem(request: common_pb2.InferRequest) -> str | None:
    """A continuation (a resumed stream) of a request that cannot move exactly."""
    if request.continuation.token_ids and (why := unmovable(request)):
        return f"continuation cannot be used here: {why}; send the request again instead"
    return None


def embed_inputs_problem(request: common_pb2.EmbedRequest, max_bytes: int) -> str | None:
    if not request.input:
        return "input is required: one text or a list of texts"
    if len(request.input) > MAX_EMBED_INPUTS:
        return f"at most {MAX_EMBED_INPUTS} inputs per request (got {len(request.input)})"
    if any(not text for text in request.input):
        return "each input must be a non-empty text"
    size = sum(len(text.encode()) for text in request.input)
    if size > max_bytes:
        return f"the inputs are {size} bytes; this server accepts at most {max_bytes}"
    if len(request.request_id) > 128:
        return "request_id is longer than 128 characters"
    return None
