"""What the dashboard's page sends, read into the admin RPCs' requests, and their answers as
JSON. Pure: every value arrives from a browser, so each is checked for type and size here
(names and options are checked again, by the same code as the CLI's, where the RPC goes)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from apiary.protoutil import enum_labels
from apiary.validation import MAX_NAME_LENGTH
from protos.v1 import common_pb2, queen_pb2

# Bounds on what one spawn may carry; the hive checks what the values mean.
MAX_OPTIONS = 32
MAX_TAGS = 16
MAX_VALUE_LENGTH = 1024
MAX_SLOTS = 1024
# Rows of request history one page may ask for (ListRequests allows more; a page shows less).
MAX_REQUESTS = 500
DEFAULT_REQUESTS = 100


class BadInput(ValueError):
    """The page sent something the dashboard does not take (a 400, saying what)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


def to_json(message: Message) -> dict[str, Any]:
    """A message as JSON under its proto field names, unset scalars included (uint64s as
    strings, enums by full name, timestamps in RFC 3339: protobuf's own JSON mapping)."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def text(body: Mapping[str, Any], key: str, limit: int = MAX_NAME_LENGTH) -> str:
    value = body.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadInput(f"{key} must be a string", key)
    if len(value) > limit:
        raise BadInput(f"{key} is longer than {limit} characters", key)
    return value.strip()


def whole_number(body: Mapping[str, Any], key: str, low: int, high: int) -> int:
    value = body.get(key, 0)
    if value is None or value == "":
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadInput(f"{key} must be a whole number", key)
    if not low <= value <= high:
        raise BadInput(f"{key} must be within {low}..{high}", key)
    return value


def options(body: Mapping[str, Any]) -> dict[str, str]:
    value = body.get("options") or {}
    if not isinstance(value, dict):
        raise BadInput("options must be an object of strings", "options")
    if len(value) > MAX_OPTIONS:
        raise BadInput(f"at most {MAX_OPTIONS} options", "options")
    out: dict[str, str] = {}
    for key, item in value.items():
        if not key or len(key) > MAX_NAME_LENGTH:
            raise BadInput(f"option names are 1..{MAX_NAME_LENGTH} characters", "options")
        if not isinstance(item, str) or len(item) > MAX_VALUE_LENGTH:
            raise BadInput(f"option {key[:40]!r} must be a string of at most "
                           f"{MAX_VALUE_LENGTH} characters", "options")  # fmt: skip
        out[key] = item
    return out


def tags(body: Mapping[str, Any]) -> list[str]:
    value = body.get("tags") or []
    if not isinstance(value, list) or not all(isinstance(tag, str) for tag in value):
        raise BadInput("tags must be a list of strings", "tags")
    if len(value) > MAX_TAGS:
        raise BadInput(f"at most {MAX_TAGS} tags", "tags")
    return [tag.strip() for tag in value if tag.strip()]


def restart_policy(label: str) -> common_pb2.RestartPolicy.ValueType:
    if not label:
        return common_pb2.RESTART_POLICY_UNSPECIFIED
    labels = enum_labels(common_pb2.RestartPolicy, "RESTART_POLICY_")
    if label not in labels:
        raise BadInput(f"unknown restart policy {label[:40]!r}; choose {', '.join(labels)}",
                       "restart")  # fmt: skip
    return common_pb2.RestartPolicy.Value("RESTART_POLICY_" + label.upper().replace("-", "_"))


def spawn_request(body: object) -> queen_pb2.QueenSpawnWorkerRequest:
    """A spawn from the page's form. It does not wait for the worker to be ready: the page
    shows it LOADING, with its progress, as it comes."""
    if not isinstance(body, dict):
        raise BadInput("the body must be a JSON object")
    model = text(body, "model")
    if not model:
        raise BadInput("model is required", "model")
    return queen_pb2.QueenSpawnWorkerRequest(
        hive_id=text(body, "hive_id"), model=model, backend=text(body, "backend"),
        slots=whole_number(body, "slots", 0, MAX_SLOTS), device=text(body, "device"),
        backend_options=options(body), tags=tags(body),
        restart_policy=restart_policy(text(body, "restart")), wait_ready=False,
    )  # fmt: skip


def force(body: object) -> bool:
    """A retire's `force` (graceful unless true)."""
    if body is None:
        return False
    if not isinstance(body, dict) or not isinstance(body.get("force", False), bool):
        raise BadInput('the body must be {"force": true|false}', "force")
    return bool(body.get("force", False))


def status_value(label: str) -> queen_pb2.RequestStatus.ValueType:
    if not label:
        return queen_pb2.REQUEST_STATUS_UNSPECIFIED
    labels = enum_labels(queen_pb2.RequestStatus, "REQUEST_STATUS_")
    if label not in labels:
        raise BadInput(f"unknown status {label[:40]!r}; choose {', '.join(labels)}", "status")
    return queen_pb2.RequestStatus.Value("REQUEST_STATUS_" + label.upper().replace("-", "_"))


def requests_filter(query: Mapping[str, str]) -> queen_pb2.ListRequestsRequest:
    """?status=failed&model=demo&limit=50: the history's filters, the limit bounded."""
    limit_text = query.get("limit", "") or str(DEFAULT_REQUESTS)
    good = limit_text.isascii() and limit_text.isdigit() and len(limit_text) <= 6
    if not good or not 1 <= int(limit_text) <= MAX_REQUESTS:
        raise BadInput(f"limit must be a whole number within 1..{MAX_REQUESTS}", "limit")
    return queen_pb2.ListRequestsRequest(
        status=status_value(text(query, "status")), model=text(query, "model"),
        limit=int(limit_text),
    )  # fmt: skip
