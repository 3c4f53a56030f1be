"""Inference requests as Python values: the options a request may carry, typed once for every
method that takes them, and the InferRequest they make."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TypedDict, Unpack

from protos.v1 import common_pb2

# A chat message: {"role": "user", "content": "..."} or the proto itself.
Message = Mapping[str, str] | common_pb2.ChatMessage


class InferOptions(TypedDict, total=False):
    """What a request may set besides its model and prompt or messages (common.proto's
    InferRequest says what each means); unset: the queen's or the backend's default."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: Sequence[str]
    policy: common_pb2.RoutingPolicy.ValueType
    required_tags: Sequence[str]
    request_id: str


def chat_message(message: Message) -> common_pb2.ChatMessage:
    if isinstance(message, common_pb2.ChatMessage):
        return message
    return common_pb2.ChatMessage(role=message["role"], content=message["content"])


def infer_request(
    model: str,
    prompt: str = "",
    messages: Iterable[Message] = (),
    **options: Unpack[InferOptions],
) -> common_pb2.InferRequest:
    """An InferRequest of a prompt or a chat (exactly one of them), for `send` and
    `infer_direct`."""
    return common_pb2.InferRequest(
        model=model, prompt=prompt, messages=[chat_message(m) for m in messages], **options
    )
