"""Tool calls for a model whose chat template has no tool support: the generic format. Pure.

The format (documented in the README's API section):
- The tools go into the system message, each as {"name", "description", "parameters"} JSON,
  with how to call one.
- A call is written `<tool_call>{"name": "NAME", "arguments": {...}}</tool_call>`, one after
  another for several calls. An assistant turn of the history that made calls is rendered
  the same way; a tool's result is a user turn `<tool_response>{"name": ..., "content":
  ...}</tool_response>` (consecutive results in one turn), which any template can render.
- A grammar holds the answer to the format: `required` must be one or more calls, a named
  function exactly that function, `auto` either calls or text (text then may not begin with
  `<`), each call's arguments held to its tool's JSON schema. One call unless the request
  allows parallel calls (as llama-server: a small model that may call again tends to go on
  calling until max_tokens).
- The answer is read back as it streams (ToolCallReader): text as content; one call as it is
  written (its name, then its arguments piece by piece, as OpenAI streams them); with
  parallel calls, each once complete, and one repeating a call already made ends the answer
  (a small model that may call again tends to repeat itself; running the same call twice in
  one turn is never wanted).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from worker.backends.base import Message, ToolCall, Tools
from worker.schemas import COMPACT, closed

OPEN, CLOSE = "<tool_call>", "</tool_call>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"


@dataclass(frozen=True)
class Layout:
    """How a call is written around its JSON: the generic format's, or a model's own where
    its template has tool support in that family (Hermes, Qwen: one call per block, newlines
    inside it and between blocks)."""

    open: str = OPEN
    close: str = CLOSE
    between: str = ""


GENERIC = Layout()
HERMES = Layout(OPEN + "\n", "\n" + CLOSE, "\n")
LAYOUTS = {"generic": GENERIC, "hermes": HERMES}


def header(name: str) -> str:
    return '{"name": "' + name + '", "arguments": '


def call_text(call: ToolCall) -> str:
    """A call as the model writes it."""
    return f"{OPEN}{header(call.name)}{call.arguments or '{}'}}}{CLOSE}"


def system_text(tools: Tools) -> str:
    """What the system message says of the tools (nothing when the model may not call)."""
    if tools.mode == "none":
        return ""
    listed = [
        {"name": t.name, "description": t.description, "parameters": t.schema()}
        for t in tools.tools
        if tools.mode != "function" or t.name == tools.function
    ]
    lines = [
        "You can call these functions (their arguments as JSON schemas):",
        json.dumps(listed, ensure_ascii=False),
        f'To call a function, answer with {OPEN}{{"name": "<function>", "arguments": '
        f"{{<arguments>}}}}{CLOSE}"
        + (" (one after another for several calls)." if tools.parallel else "."),
        f"Each result comes back as {RESPONSE_OPEN}...{RESPONSE_CLOSE}.",
    ]
    if tools.mode == "required":
        lines.append("You must call at least one function.")
    elif tools.mode == "function":
        lines.append(f"You must call the function {tools.function}.")
    return "\n".join(lines)


def openai_messages(messages: tuple[Message, ...]) -> list[dict[str, Any]]:
    """The chat as OpenAI has it, for a template with tool support to render itself."""
    out: list[dict[str, Any]] = []
    for m in messages:
        message: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.name, "arguments": c.arguments or "{}"}}
                for c in m.tool_calls
            ]  # fmt: skip
        if m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    return out


def openai_tools(tools: Tools) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": t.name, "description": t.description,
             "parameters": t.schema()}} for t in tools.tools]  # fmt: skip


def rendered_messages(messages: tuple[Message, ...], tools: Tools | None) -> list[dict[str, str]]:
    """The chat as a template without tool support can render it: the tools in the system
    message, calls as text, tool results as user turns."""
    names = {call.id: call.name for m in messages for call in m.tool_calls}
    out: list[dict[str, str]] = []
    for message in messages:
        if message.role == "tool":
            response = json.dumps({"name": names.get(message.tool_call_id, ""),
                                   "content": message.content}, ensure_ascii=False)  # fmt: skip
            text = f"{RESPONSE_OPEN}{response}{RESPONSE_CLOSE}"
            if out and out[-1]["role"] == "user" and out[-1]["content"].endswith(RESPONSE_CLOSE):
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text})
            continue
        content = message.content + "".join(call_text(c) for c in message.tool_calls)
        out.append({"role": message.role, "content": content})
    said = system_text(tools) if tools else ""
    if said and out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + said}
    elif said:
        out.insert(0, {"role": "system", "content": said})
    return out


def grammar(tools: Tools, layout: Layout = GENERIC) -> str:
    """The llguidance grammar that holds the answer to the format ('' for mode none)."""
    if tools.mode == "none":
        return ""
    chosen = [t for t in tools.tools if tools.mode != "function" or t.name == tools.function]
    rules = []
    for i, tool in enumerate(chosen):
        # Compact JSON inside calls: the reader's header is then a fixed string.
        schema = {"x-guidance": COMPACT, **closed(tool.schema())}
        rules.append(f'call_{i}: {json.dumps(header(tool.name))} args_{i} "}}"')
        rules.append(f"args_{i}: %json {json.dumps(schema, ensure_ascii=False)}")
    alternatives = " | ".join(f"call_{i}" for i in range(len(chosen)))
    calls = "call"
    if tools.parallel:
        calls = f"call ({json.dumps(layout.between)} call)*" if layout.between else "call+"
    start = f"start: {calls} | TEXT" if tools.mode == "auto" else f"start: {calls}"
    lines = ["%llguidance {}", start, f"call: {json.dumps(layout.open)} ({alternatives}) "
             f"{json.dumps(layout.close)}", *rules]  # fmt: skip
    if tools.mode == "auto":
        lines.append(r"TEXT: /[^<][\s\S]*/")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Delta:
    """A piece of a call as OpenAI streams it: the first of a call has its id and name, the
    next ones more of its arguments."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass
class Read:
    """What a piece of the answer said: content text, pieces of calls, and whether the
    answer is to end here (a repeated call)."""

    text: str = ""
    deltas: list[Delta] = field(default_factory=list)
    stop: bool = False


_HEADER = re.compile(r'\{"name": "([A-Za-z0-9_-]{1,64})", "arguments": ')


class ToolCallReader:
    """Reads the answer in the generic format as it streams. One call (parallel calls off) is
    streamed as it is written: its name once known, then its arguments piece by piece. With
    parallel calls each goes out once complete, so a repeated one can be dropped."""

    def __init__(self, forced: bool, parallel: bool = False, layout: Layout = GENERIC) -> None:
        # forced: the grammar allows only calls (required, a named function).
        self.forced, self.parallel = forced, parallel
        self.open, self.close = layout.open, layout.close
        # What follows a call's arguments, exactly as the grammar writes it.
        self.trailer = "}" + layout.close
        self.buffer = ""
        self.text_mode = False
        self.calls: list[ToolCall] = []
        # The call being streamed (parallel off), and its arguments so far.
        self.current: ToolCall | None = None
        # A call repeated one made before: nothing more is read.
        self.stopped = False

    def feed(self, text: str) -> Read:
        if self.stopped:
            return Read()
        if self.text_mode:
            return Read(text=text)
        self.buffer += text
        read = Read()
        if not (self.calls or self.current or self.forced or self._could_be_a_call()):
            self.text_mode = True  # the answer is text
            read.text, self.buffer = self.buffer, ""
            return read
        if self.parallel:
            self._whole_calls(read)
        else:
            self._streamed_call(read)
        return read

    def _could_be_a_call(self) -> bool:
        stripped = self.buffer.lstrip()
        return self.open.startswith(stripped[: len(self.open)])

    def _streamed_call(self, read: Read) -> None:
        if self.current is None:
            stripped = self.buffer.lstrip()
            opened = stripped.startswith(self.open)
            header = _HEADER.match(stripped, len(self.open)) if opened else None
            if header is None:
                return  # not yet known
            self.current = ToolCall(new_call_id(), header.group(1), "")
            read.deltas.append(Delta(len(self.calls), self.current.id, self.current.name))
            self.buffer = stripped[header.end() :]
        end = self.buffer.find(self.trailer)
        cut = end if end >= 0 else max(len(self.buffer) - len(self.trailer) + 1, 0)
        self._arguments(read, self.buffer[:cut])
        self.buffer = self.buffer[cut:]
        if end >= 0:
            self.calls.append(self.current)
            self.current, self.buffer = None, ""

    def _arguments(self, read: Read, piece: str) -> None:
        assert self.current is not None
        if piece:
            call = self.current
            self.current = ToolCall(call.id, call.name, call.arguments + piece)
            read.deltas.append(Delta(len(self.calls), arguments=piece))

    def _whole_calls(self, read: Read) -> None:
        while self.buffer:
            stripped = self.buffer.lstrip()
            end = stripped.find(self.close)
            if end < 0:
                return  # a call still being written
            call = self._parse(stripped[:end])
            self.buffer = stripped[end + len(self.close) :]
            if call is None:
                continue
            if any((c.name, c.arguments) == (call.name, call.arguments) for c in self.calls):
                self.stopped = read.stop = True
                self.buffer = ""
                return
            read.deltas.append(Delta(len(self.calls), call.id, call.name, call.arguments))
            self.calls.append(call)

    def flush(self) -> Read:
        """The end of the answer: a call cut short (max_tokens) goes out with what it has."""
        if self.stopped:
            return Read()
        read = Read()
        if self.current is not None:
            self._arguments(read, self.buffer)
            self.calls.append(self.current)
            self.current, self.buffer = None, ""
            return read
        rest, self.buffer = self.buffer.strip(), ""
        if not rest or self.text_mode or not rest.startswith(self.open.strip()):
            return Read(text=rest)
        body = rest[len(self.open.strip()) :]
        name, quoted, _ = body.partition('"name": "')[2].partition('"')
        _, started, arguments = body.partition('"arguments": ')
        if not (quoted and started):
            return Read()  # cut before its arguments began: no call to speak of
        call = ToolCall(new_call_id(), name, arguments)
        read.deltas.append(Delta(len(self.calls), call.id, call.name, call.arguments))
        self.calls.append(call)
        return read

    def _parse(self, block: str) -> ToolCall | None:
        """One `<tool_call>...` block (without its close); None if it is not a call."""
        if not block.startswith(self.open):
            return None
        try:
            value = json.loads(block[len(self.open) :])
        except ValueError:
            return None
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return None
        arguments = json.dumps(value.get("arguments", {}), ensure_ascii=False)
        return ToolCall(new_call_id(), value["name"], arguments)


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)
