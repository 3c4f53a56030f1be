"""The HTTP side's errors: an answer that is an error (OpenAI's error object, which the dashboard
speaks too), and the queen's gRPC statuses as HTTP ones."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from apiary.errors import STOPPING_KEY, StatusError

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
# Fields whose name opens the queen's own validation messages ("temperature must be ...",
# "tools[0].name ...").
PARAMS = frozenset({
    "model", "messages", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop",
    "seed", "request_id", "tools", "tool_choice", "response_format", "logprobs", "top_logprobs",
    "n", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "input",
})  # fmt: skip


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
    first = message.split(" ", 1)[0]
    param = first if re.split(r"[.\[]", first, maxsplit=1)[0] in PARAMS and " " in message else None
    if code_name == "NOT_FOUND" and code == "model_not_found":
        param = "model"
    return ApiError(status, message, kind, code, param, headers)


def from_error(error: StatusError) -> ApiError:
    """A StatusError as the HTTP front gives it; a stopping queen's answer carries the
    `apiary-stopping` header, as its gRPC statuses carry the trailer: another queen may take
    the request."""
    answer = from_status(error.code.name, error.message)
    if error.stopping:
        answer.headers[STOPPING_KEY] = "1"
    return answer
