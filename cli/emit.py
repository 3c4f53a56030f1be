"""The one way client verbs print: JSON for programs (--json), text for people otherwise.

A command states what it shows in both forms; only this module looks at --json. A result is one
JSON document; a stream (inference chunks, events) is one JSON object per line.

The JSON is a contract scripts may rely on (README, "The CLI"): every field of a message is
present, zeros, false and empty lists included; field names are the proto's; integers (64-bit
too) are numbers; enums are the names the text view prints (`IDLE`, `least-loaded`, or
`UNKNOWN(n)` for a value this build does not know); timestamps are RFC 3339 strings in UTC, or
null when unset; an optional field that is unset is null.
"""

from __future__ import annotations

import base64
import json
import math
import re
import struct
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from cli.names import enum_text


def float32(value: float) -> float:
    """The shortest decimal that is the same float32 (0.43, not 0.4300000071525574)."""
    for digits in range(6, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.unpack("<f", struct.pack("<f", candidate))[0] == value:
            return candidate
    return value


def scalar_json(field: FieldDescriptor, value: Any) -> Any:
    """One non-message value: enums by name, 64-bit integers as numbers (json_format makes
    them strings), floats finite or null, bytes as base64."""
    if field.enum_type is not None:
        return enum_text(field.enum_type, value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return float32(value) if field.type == FieldDescriptor.TYPE_FLOAT else value
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return value


def value_json(field: FieldDescriptor, value: Any) -> Any:
    if field.message_type is None:
        return scalar_json(field, value)
    if isinstance(value, Timestamp):
        return value.ToJsonString() if value.seconds or value.nanos else None
    if field.message_type.full_name.startswith("google.protobuf."):
        return MessageToDict(value)  # another well-known type: its canonical JSON form
    return to_json(value)


def field_json(message: Message, field: FieldDescriptor) -> Any:
    value = getattr(message, field.name)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value_field = field.message_type.fields_by_name["value"]
        return {str(key): value_json(value_field, item) for key, item in value.items()}
    if field.is_repeated:
        return [value_json(field, item) for item in value]
    if field.message_type is None and field.has_presence:
        if not message.HasField(field.name):
            return None  # `optional` or a oneof member, unset: not the same as zero
    return value_json(field, value)


def to_json(message: Message) -> dict[str, Any]:
    """Every field of `message`, by its proto name, as the contract above says."""
    fields: list[FieldDescriptor] = list(message.DESCRIPTOR.fields)  # type: ignore[arg-type]
    return {field.name: field_json(message, field) for field in fields}


def jsonable(value: object) -> object:
    """Messages (alone, in lists, in dicts) as plain JSON values."""
    if isinstance(value, Message):
        return to_json(value)
    if isinstance(value, Mapping):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, Iterable) and not isinstance(value, str | bytes):
        return [jsonable(item) for item in value]
    return value


# Control characters a terminal acts on (escape sequences, carriage returns, bells...), from
# C0, DEL and C1: what a hive, a worker or a model said is shown, never obeyed. Tabs and
# newlines of a whole text are kept (a model's answer has lines); a table cell or a field's
# value escapes them too (inert_cell), so no line can be rewritten or added.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_CELL_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _escaped(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()):02x}"


def inert(text: str) -> str:
    """`text` with every control character but tab and newline written out (`\\x1b`)."""
    return _CONTROL.sub(_escaped, text)


def inert_cell(text: str) -> str:
    """`text` with every control character written out, tab and newline too."""
    return _CELL_CONTROL.sub(_escaped, text)


class Emitter:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def result(self, value: object, text: str) -> None:
        """A command's answer: `value` as one JSON document, or `text`."""
        if self.as_json:
            print(json.dumps(jsonable(value), indent=2, sort_keys=True))
        else:
            print(inert(text))

    def item(self, value: Message, text: str, end: str = "\n") -> None:
        """One item of a stream, shown at once: a JSON line, or `text` and `end`."""
        if self.as_json:
            print(json.dumps(to_json(value), sort_keys=True), flush=True)
        else:
            sys.stdout.write(inert(text) + end)
            sys.stdout.flush()

    def aside(self, text: str, end: str = "\n", stdout: bool = False) -> None:
        """What only people want (progress, totals, a stream's last newline): nothing with
        --json. On stderr unless `stdout`."""
        if not self.as_json:
            stream = sys.stdout if stdout else sys.stderr
            stream.write(inert(text) + end)
            stream.flush()

    def asides_live(self) -> bool:
        """Whether asides reach a terminal, where a line may be redrawn in place (`\\r`)."""
        return not self.as_json and sys.stderr.isatty()

    def note(self, text: str) -> None:
        """A remark on stderr in both forms (stdout stays one parseable answer)."""
        print(inert(text), file=sys.stderr)
