"""What the HTTP front answers, in OpenAI's shapes: stream chunks, whole results, usage, model
lists, and errors with the HTTP status a gRPC status maps to. Pure."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from protos.v1 import common_pb2
from queen.http.errors import ApiError

FINISH = {common_pb2.FINISH_REASON_LENGTH: "length", common_pb2.FINISH_REASON_STOP: "stop"}


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
