"""Small conversions between Python values and proto messages."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from google.protobuf.timestamp_pb2 import Timestamp

from protos.v1 import common_pb2

# A worker that can take requests (whether or not one is in flight right now).
READY_STATES = frozenset({common_pb2.WORKER_STATE_IDLE, common_pb2.WORKER_STATE_BUSY})


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    if seconds > 0:
        ts.FromNanoseconds(int(seconds * 1e9))
    return ts


class NamedEnum(Protocol):
    def Name(self, number: Any) -> str: ...


def enum_name(enum: NamedEnum, value: int, prefix: str) -> str:
    """'IDLE' for WORKER_STATE_IDLE; 'UNKNOWN(9)' for a value a newer peer sent that this
    build does not know (listings and metrics must not break on it)."""
    try:
        return enum.Name(value).removeprefix(prefix)
    except ValueError:
        return f"UNKNOWN({value})"


def state_name(state: common_pb2.WorkerState.ValueType) -> str:
    """'IDLE' for WORKER_STATE_IDLE: what people read and type."""
    return enum_name(common_pb2.WorkerState, state, "WORKER_STATE_")


def health_name(health: common_pb2.HiveHealth.ValueType) -> str:
    """'HEALTHY' for HIVE_HEALTH_HEALTHY ('-' when unset)."""
    return enum_name(common_pb2.HiveHealth, health, "HIVE_HEALTH_") if health else "-"


def parse_state(name: str) -> common_pb2.WorkerState.ValueType:
    """Inverse of state_name; raises ValueError naming the valid states."""
    try:
        return common_pb2.WorkerState.Value("WORKER_STATE_" + name.upper())
    except ValueError:
        valid = ", ".join(state_name(v) for v in common_pb2.WorkerState.values() if v)
        raise ValueError(f"unknown worker state {name!r}; valid states: {valid}") from None


def naming(known: Iterable[str], limit: int = 20) -> str:
    """'a, b, c' (or 'none'), cut to `limit` names, for messages about unknown ids."""
    names = sorted(known)
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} (+{len(names) - limit} more)"


class EnumWrapper(Protocol):
    def keys(self) -> list[str]: ...
    def Value(self, name: str) -> int: ...


def enum_labels(enum: EnumWrapper, prefix: str) -> list[str]:
    """What people type for a proto enum: 'least-loaded' for ROUTING_POLICY_LEAST_LOADED."""
    return [k.removeprefix(prefix).lower().replace("_", "-") for k in enum.keys()[1:]]


def enum_parser(enum: EnumWrapper, prefix: str, what: str) -> Callable[[str], Any]:
    """An argparse `type=` for a proto enum, by label; the error names every valid label."""

    def parse(label: str) -> Any:
        try:
            return enum.Value(prefix + label.upper().replace("-", "_"))
        except ValueError:
            choices = ", ".join(enum_labels(enum, prefix))
            raise argparse.ArgumentTypeError(
                f"unknown {what} {label!r}; choose {choices}"
            ) from None

    parse.__name__ = what  # argparse shows it in usage errors
    return parse


def continued(request: common_pb2.InferRequest, token_ids: list[int]) -> common_pb2.InferRequest:
    """`request`, continuing a completion after `token_ids` (InferRequest.continuation): what a
    queen sends the next worker when one fails mid-stream, and a client the next queen."""
    again = common_pb2.InferRequest()
    again.CopyFrom(request)
    again.continuation.token_ids[:] = token_ids
    return again


def tool_calls_of(deltas: Iterable[common_pb2.ToolCallDelta]) -> list[common_pb2.ToolCall]:
    """The calls a stream's tool-call deltas make: a call's first delta has its id and name,
    the next ones more of its arguments (InferChunk.tool_calls)."""
    calls: dict[int, common_pb2.ToolCall] = {}
    for delta in deltas:
        call = calls.setdefault(delta.index, common_pb2.ToolCall())
        call.id = call.id or delta.id
        call.name = call.name or delta.name
        call.arguments += delta.arguments
    return [calls[i] for i in sorted(calls)]
