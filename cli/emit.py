"""The one way client verbs print: JSON for programs (--json), text for people otherwise.

A command states what it shows in both forms; only this module looks at --json. A result is one
JSON document; a stream (inference chunks, events) is one JSON object per line.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message


def to_json(message: Message) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True)


def jsonable(value: object) -> object:
    """Messages (alone, in lists, in dicts) as plain JSON values."""
    if isinstance(value, Message):
        return to_json(value)
    if isinstance(value, Mapping):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, Iterable) and not isinstance(value, str | bytes):
        return [jsonable(item) for item in value]
    return value


class Emitter:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def result(self, value: object, text: str) -> None:
        """A command's answer: `value` as one JSON document, or `text`."""
        if self.as_json:
            print(json.dumps(jsonable(value), indent=2, sort_keys=True))
        else:
            print(text)

    def item(self, value: Message, text: str, end: str = "\n") -> None:
        """One item of a stream, shown at once: a JSON line, or `text` and `end`."""
        if self.as_json:
            print(json.dumps(to_json(value), sort_keys=True), flush=True)
        else:
            sys.stdout.write(text + end)
            sys.stdout.flush()

    def aside(self, text: str, end: str = "\n", stdout: bool = False) -> None:
        """What only people want (progress, totals, a stream's last newline): nothing with
        --json. On stderr unless `stdout`."""
        if not self.as_json:
            stream = sys.stdout if stdout else sys.stderr
            stream.write(text + end)
            stream.flush()

    def note(self, text: str) -> None:
        """A remark on stderr in both forms (stdout stays one parseable answer)."""
        print(text, file=sys.stderr)
