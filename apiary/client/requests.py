"""Inference requests as Python values: the options a request may carry, typed once for every
method that takes them, and the InferRequest they make."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypedDict, Unpack

from protos.v1 import common_pb2

# A chat message: {"role": "user", "content": "..."} (a tool result: with "tool_call_id"; an
# assistant turn that called tools: with "tool_calls", each {"id", "name", "arguments"}), or
# the proto itself.
Message = Mapping[str, Any] | common_pb2.ChatMessage
# A tool: {"name", "description", "parameters": JSON schema} (or OpenAI's {"type":
# "function", "function": {...}}), or the proto itself.
ToolSpec = Mapping[str, Any] | common_pb2.Tool
TOOL_CHOICES = {"auto": common_pb2.ToolChoice.MODE_AUTO, "none": common_pb2.ToolChoice.MODE_NONE,
                "required": common_pb2.ToolChoice.MODE_REQUIRED}  # fmt: skip


class InferOptions(TypedDict, total=False):
    """What a request may set besides its model and prompt or messages (common.proto's
    InferRequest says what each means); unset: the queen's or the backend's default.

    tool_choice: "auto", "none", "required", or the name of the function to call.
    json_schema: the answer must be JSON valid against this schema; json_object: any JSON
    object. logit_bias: token id -> bias."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: Sequence[str]
    policy: common_pb2.RoutingPolicy.ValueType
    required_tags: Sequence[str]
    request_id: str
    session_id: str
    tools: Sequence[ToolSpec]
    tool_choice: str
    parallel_tool_calls: bool
    json_schema: Mapping[str, Any]
    json_object: bool
    logprobs: bool
    top_logprobs: int
    n: int
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    logit_bias: Mapping[int, float]


def chat_message(message: Message) -> common_pb2.ChatMessage:
    if isinstance(message, common_pb2.ChatMessage):
        return message
    calls = [common_pb2.ToolCall(id=c["id"], name=c["name"], arguments=c.get("arguments", "{}"))
             for c in message.get("tool_calls", ())]  # fmt: skip
    return common_pb2.ChatMessage(
        role=message["role"], content=message.get("content") or "",
        tool_call_id=message.get("tool_call_id", ""), tool_calls=calls,
    )  # fmt: skip


def tool(spec: ToolSpec) -> common_pb2.Tool:
    if isinstance(spec, common_pb2.Tool):
        return spec
    function = spec.get("function", spec) if spec.get("type") == "function" else spec
    parameters = function.get("parameters")
    return common_pb2.Tool(
        name=function["name"], description=function.get("description", ""),
        parameters_json=json.dumps(parameters) if parameters else "",
    )  # fmt: skip


def infer_request(
    model: str,
    prompt: str = "",
    messages: Iterable[Message] = (),
    **options: Unpack[InferOptions],
) -> common_pb2.InferRequest:
    """An InferRequest of a prompt or a chat (exactly one of them), for `send` and
    `infer_direct`."""
    given: dict[str, Any] = dict(options)
    tools = [tool(spec) for spec in given.pop("tools", ())]
    choice = given.pop("tool_choice", None)
    schema, as_object = given.pop("json_schema", None), given.pop("json_object", False)
    bias = given.pop("logit_bias", {})
    request = common_pb2.InferRequest(
        model=model, prompt=prompt, messages=[chat_message(m) for m in messages], tools=tools,
        logit_bias=dict(bias), **given,
    )  # fmt: skip
    if choice is not None:
        request.tool_choice.mode = TOOL_CHOICES.get(choice, common_pb2.ToolChoice.MODE_FUNCTION)
        if choice not in TOOL_CHOICES:
            request.tool_choice.function = choice
    if schema is not None:
        request.response_format.type = common_pb2.ResponseFormat.TYPE_JSON_SCHEMA
        request.response_format.schema_json = json.dumps(schema)
    elif as_object:
        request.response_format.type = common_pb2.ResponseFormat.TYPE_JSON_OBJECT
    return request
