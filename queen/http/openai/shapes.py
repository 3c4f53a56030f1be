"""What the HTTP front answers, in OpenAI's shapes: stream chunks, whole results, usage, model
lists, and errors with the HTTP status a gRPC status maps to. Pure."""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass, field
from typing import Any

from apiary.protoutil import tool_calls_of
from protos.v1 import common_pb2
from queen.http.errors import ApiError

FINISH = {common_pb2.FINISH_REASON_LENGTH: "length", common_pb2.FINISH_REASON_STOP: "stop",
          common_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls"}  # fmt: skip


def usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


@dataclass
class Choice:
    """What one choice said so far."""

    texts: list[str] = field(default_factory=list)
    deltas: list[common_pb2.ToolCallDelta] = field(default_factory=list)
    logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)
    finish: str | None = None
    started: bool = False


@dataclass
class Answer:
    """One request's answer as it comes: each choice's text, tool calls, logprobs and finish
    reason, the usage, and the OpenAI objects (stream chunks, or the whole result) made from
    them."""

    id: str
    model: str
    created: int
    chat: bool
    include_usage: bool = False
    logprobs: bool = False
    choices: dict[int, Choice] = field(default_factory=dict)
    counts: tuple[int, int, int] = (0, 0, 0)  # prompt, completion, cached prompt tokens

    def take(self, chunk: common_pb2.InferChunk) -> Choice:
        choice = self.choices.setdefault(chunk.choice, Choice())
        if chunk.text:
            choice.texts.append(chunk.text)
        choice.deltas.extend(chunk.tool_calls)
        if self.logprobs:
            choice.logprobs.extend(chunk.logprobs)
        if chunk.finish_reason:
            choice.finish = FINISH.get(chunk.finish_reason, "stop")
        if chunk.prompt_tokens or chunk.completion_tokens:
            self.counts = (chunk.prompt_tokens, chunk.completion_tokens,
                           chunk.cached_prompt_tokens)  # fmt: skip
        return choice

    def event(self, chunk: common_pb2.InferChunk) -> bytes:
        """The chunk as one server-sent event (b"" when it says nothing)."""
        choice = self.take(chunk)
        if not (chunk.text or chunk.finish_reason or chunk.tool_calls or
                (self.logprobs and chunk.logprobs)):  # fmt: skip
            return b""
        probs = self._logprobs(list(chunk.logprobs)) if self.logprobs else None
        if self.chat:
            delta: dict[str, Any] = {} if choice.started else {"role": "assistant"}
            if chunk.text or not (choice.started or chunk.tool_calls):
                delta["content"] = chunk.text
            if chunk.tool_calls:
                delta["tool_calls"] = [tool_call_delta(d) for d in chunk.tool_calls]
            body: dict[str, Any] = {"index": chunk.choice, "delta": delta, "logprobs": probs,
                                    "finish_reason": choice.finish}  # fmt: skip
        else:
            body = {"index": chunk.choice, "text": chunk.text, "logprobs": probs,
                    "finish_reason": choice.finish}  # fmt: skip
        choice.started = True
        return sse(self.envelope([body], stream=True))

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
        choices = [self._whole_choice(i, self.choices.get(i, Choice()))
                   for i in range(max(self.choices, default=0) + 1)]  # fmt: skip
        body = self.envelope(choices, stream=False)
        body["usage"] = usage(*self.counts[:2], self.counts[2])
        return body

    def _whole_choice(self, index: int, choice: Choice) -> dict[str, Any]:
        text = "".join(choice.texts)
        probs = self._logprobs(choice.logprobs) if self.logprobs else None
        if not self.chat:
            return {"index": index, "text": text, "logprobs": probs, "finish_reason": choice.finish}
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        if choice.deltas:
            message["content"] = text or None
            message["tool_calls"] = [tool_call(c) for c in tool_calls_of(choice.deltas)]
        return {"index": index, "message": message, "logprobs": probs,
                "finish_reason": choice.finish}  # fmt: skip

    def _logprobs(self, entries: list[common_pb2.TokenLogprob]) -> dict[str, Any]:
        return chat_logprobs(entries) if self.chat else completion_logprobs(entries)

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


def tool_call(call: common_pb2.ToolCall) -> dict[str, Any]:
    """A call as OpenAI's message.tool_calls has it."""
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}  # fmt: skip


def tool_call_delta(delta: common_pb2.ToolCallDelta) -> dict[str, Any]:
    """A piece of a call as OpenAI streams it: id, type and name on its first piece only."""
    out: dict[str, Any] = {"index": delta.index, "function": {"arguments": delta.arguments}}
    if delta.id:
        out.update(id=delta.id, type="function")
        out["function"]["name"] = delta.name
    return out


def chat_logprobs(entries: list[common_pb2.TokenLogprob]) -> dict[str, Any]:
    """Chat completions' shape: per token its text, logprob, bytes and top alternatives."""
    content = [
        {"token": e.token, "logprob": e.logprob, "bytes": list(e.bytes),
         "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)}
                          for t in e.top]}
        for e in entries
    ]  # fmt: skip
    return {"content": content, "refusal": None}


def completion_logprobs(entries: list[common_pb2.TokenLogprob]) -> dict[str, Any]:
    """Legacy completions' shape: parallel lists, top alternatives as token -> logprob."""
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t.token: t.logprob for t in e.top} for e in entries],
        "text_offset": offsets,
    }


def sse(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def error_event(error: ApiError) -> bytes:
    """An error after the stream began (its 200 is sent): one event, and no [DONE]."""
    return sse(error.body())


TASKS: dict[int, str] = {common_pb2.WORKER_TASK_EMBED: "embedding"}


def model_list(models: list[tuple[str, int, int]], created: int) -> dict[str, Any]:
    """(name, task, context length) of each model."""
    return {"object": "list", "data": [model_object(*model, created) for model in models]}


def model_object(name: str, task: int, context_length: int, created: int) -> dict[str, Any]:
    """OpenAI's model object, saying too what the model serves (chat or embedding) and its
    context length per request (null where no worker says yet)."""
    return {"id": name, "object": "model", "created": created, "owned_by": "apiary",
            "task": TASKS.get(task, "chat"), "context_length": context_length or None}  # fmt: skip


def embeddings(answer: common_pb2.EmbedResponse, model: str, encoding: str) -> dict[str, Any]:
    """OpenAI's embeddings list: float lists, or base64 of little-endian float32s."""
    data = []
    for i, vector in enumerate(answer.embeddings):
        values: Any = list(vector.values)
        if encoding == "base64":
            values = base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
        data.append({"object": "embedding", "index": i, "embedding": values})
    tokens = answer.prompt_tokens
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # fmt: skip
