"""What the HTTP front answers, in OpenAI's shapes: stream chunks, whole results, usage, model
lists, and errors with the HTTP status a gRPC status maps to. Pure."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from protos.v1 import common_pb2

FINISH = {common_pb2.FINISH_REASON_LENGTH: "length", common_pb2.FINISH_REASON_STOP: "stop"}

# gRPC status -> HTTP status, OpenAI error type, and OpenAI error code.
STATUS: dict[str, tuple[int, str, str | None]] = {
    "INVALID_ARGUMENT": (400, "invalid_request_error", "invalid_value"),
    "FAILED_PRECONDITION": (400, "invalid_request_error", None),
    "OUT_OF_RANGE": (400, "invalid_request_error", None),
    "UNAUTHENTICATED": (401, "authentication_error", "invalid_api_key"),
    "PERMISSION_DENIED": (403, "permission_error", None),
    "NOT_FOUND": (404, "invalid_request_error", "model_not_found"),
    "ALREADY_EXISTS": (409, "invalid_request_error", "duplicate_request_id"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error", "rate_limit_exceeded"),
    "CANCELLED": (499, "invalid_request_error", "cancelled"),
    "UNAVAILABLE": (503, "server_error", "service_unavailable"),
    "DEADLINE_EXCEEDED": (504, "timeout_error", "timeout"),
}
SERVER_ERROR = (500, "server_error", None)
# Seconds a client is told to wait (Retry-After) when the queen's queue or its quota is full.
RETRY_AFTER_SECONDS = 1
# Fields whose name opens the queen's own validation messages ("temperature must be ...").
PARAMS = ("model", "messages", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop",
          "seed", "request_id")  # fmt: skip


@dataclass(eq=False)
class ApiError(Exception):
    """An answer that is an error: its HTTP status and OpenAI's error object."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}  # fmt: skip


def from_status(code_name: str, message: str) -> ApiError:
    """The queen's answer to a gRPC call, as the HTTP front gives it."""
    status, kind, code = STATUS.get(code_name, SERVER_ERROR)
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status in (429, 503) else {}
    if code_name == "NOT_FOUND" and not message.startswith("unknown model"):
        code = "not_found"  # e.g. no worker carries the tags asked for
    param = next((p for p in PARAMS if message.startswith(p + " ")), None)
    if code_name == "NOT_FOUND" and code == "model_not_found":
        param = "model"
    return ApiError(status, message, kind, code, param, headers)


def usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


@dataclass
class Answer:
    """One request's answer as it comes: the chunks' text, finish reason and usage, and the
    OpenAI objects (stream chunks, or the whole result) made from them."""

    id: str
    model: str
    created: int
    chat: bool
    include_usage: bool = False
    texts: list[str] = field(default_factory=list)
    finish: str | None = None
    counts: tuple[int, int, int] = (0, 0, 0)  # prompt, completion, cached prompt tokens
    started: bool = False

    def take(self, chunk: common_pb2.InferChunk) -> None:
        if chunk.text:
            self.texts.append(chunk.text)
        if chunk.finish_reason:
            self.finish = FINISH.get(chunk.finish_reason, "stop")
        if chunk.prompt_tokens or chunk.completion_tokens:
            self.counts = (chunk.prompt_tokens, chunk.completion_tokens,
                           chunk.cached_prompt_tokens)  # fmt: skip

    def event(self, chunk: common_pb2.InferChunk) -> bytes:
        """The chunk as one server-sent event (b"" when it says nothing)."""
        self.take(chunk)
        if not chunk.text and not chunk.finish_reason:
            return b""
        if self.chat:
            delta: dict[str, str] = {} if self.started else {"role": "assistant"}
            if chunk.text or not self.started:
                delta["content"] = chunk.text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None,
                                      "finish_reason": self.finish}  # fmt: skip
        else:
            choice = {"index": 0, "text": chunk.text, "logprobs": None,
                      "finish_reason": self.finish}  # fmt: skip
        self.started = True
        return sse(self.envelope([choice], stream=True))

    def closing(self) -> bytes:
        """What ends a stream: the usage chunk when asked for, then [DONE]."""
        tail = b""
        if self.include_usage:
            body = self.envelope([], stream=True)
            body["usage"] = usage(*self.counts[:2], self.counts[2])
            tail = sse(body)
        return tail + b"data: [DONE]\n\n"

    def whole(self) -> dict[str, Any]:
        """The non-streamed result, once every chunk was taken."""
        text = "".join(self.texts)
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None, "finish_reason": self.finish,
            }  # fmt: skip
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": self.finish}
        body = self.envelope([choice], stream=False)
        body["usage"] = usage(*self.counts[:2], self.counts[2])
        return body

    def envelope(self, choices: list[dict[str, Any]], stream: bool) -> dict[str, Any]:
        kind = ("chat.completion" if self.chat else "text_completion") + (
            ".chunk" if stream and self.chat else ""
        )
        body: dict[str, Any] = {"id": self.id, "object": kind, "created": self.created,
                                "model": self.model, "system_fingerprint": None,
                                "choices": choices}  # fmt: skip
        if stream and self.include_usage:
            body["usage"] = None
        return body


def sse(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def error_event(error: ApiError) -> bytes:
    """An error after the stream began (its 200 is sent): one event, and no [DONE]."""
    return sse(error.body())


def model_list(names: list[str], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_object(name, created) for name in names]}


def model_object(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "apiary"}
