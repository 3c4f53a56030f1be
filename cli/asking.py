"""What `apiary infer` asks beyond a prompt, read from its flags and files (tools, a JSON
schema, logit bias), and how an answer of several choices, tool calls and logprobs reads as
text. Files and values are the user's: a bad one is a CliError saying which and why."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from apiary.protoutil import tool_calls_of
from cli.errors import CliError
from protos.v1 import common_pb2


def json_file(flag: str, path: str) -> Any:
    """The JSON in `path` ('-': standard input)."""
    try:
        text = Path("/dev/stdin").read_text() if path == "-" else Path(path).read_text()
        return json.loads(text)
    except OSError as exc:
        raise CliError(f"{flag} {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise CliError(f"{flag} {path} is not JSON: {exc}") from None


def tools_of(paths: list[str]) -> list[dict[str, Any]]:
    """Each --tool FILE: one tool ({"name", "description", "parameters"}, or OpenAI's
    {"type": "function", "function": {...}}) or a list of them."""
    tools: list[dict[str, Any]] = []
    for path in paths:
        value = json_file("--tool", path)
        for spec in value if isinstance(value, list) else [value]:
            function = spec.get("function", spec) if isinstance(spec, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise CliError(f"--tool {path}: each tool is an object with a name "
                               '(e.g. {"name": "f", "parameters": {...}})')  # fmt: skip
            tools.append(function)
    return tools


def logit_bias_of(pairs: list[str]) -> dict[int, float]:
    """Each --logit-bias ID=BIAS."""
    bias = {}
    for pair in pairs:
        token, _, value = pair.partition("=")
        try:
            bias[int(token)] = float(value)
        except ValueError:
            raise CliError(f"--logit-bias {pair!r} is not TOKEN_ID=BIAS (e.g. 1234=-100)") from None
    return bias


def asking(args: argparse.Namespace) -> dict[str, Any]:
    """The InferOptions the flags give (those left out stay unset)."""
    options: dict[str, Any] = {}
    if args.tool:
        options["tools"] = tools_of(args.tool)
    if args.tool_choice:
        options["tool_choice"] = args.tool_choice
    if args.parallel_tool_calls:
        options["parallel_tool_calls"] = True
    if args.json_schema:
        options["json_schema"] = json_file("--json-schema", args.json_schema)
    elif args.json_object:
        options["json_object"] = True
    if args.logprobs is not None:
        options["logprobs"], options["top_logprobs"] = True, args.logprobs
    if args.n > 1:
        options["n"] = args.n
    if args.logit_bias:
        options["logit_bias"] = logit_bias_of(args.logit_bias)
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    return options


def call_line(call: common_pb2.ToolCall) -> str:
    return f"[tool call {call.id}] {call.name}({call.arguments})"


def logprob_lines(entries: list[common_pb2.TokenLogprob]) -> str:
    """One line a token: its text, log-probability, and the alternatives."""
    lines = []
    for e in entries:
        top = "  ".join(f"{t.token!r} {t.logprob:.3f}" for t in e.top)
        lines.append(f"{e.token!r:>16} {e.logprob:8.3f}" + (f"   | {top}" if top else ""))
    return "\n".join(lines)


class Choices:
    """An answer of several choices, gathered, to show one after another at its end."""

    def __init__(self) -> None:
        self.texts: dict[int, list[str]] = {}
        self.calls: dict[int, list[common_pb2.ToolCallDelta]] = {}
        self.logprobs: dict[int, list[common_pb2.TokenLogprob]] = {}
        self.finish: dict[int, common_pb2.FinishReason.ValueType] = {}

    def take(self, chunk: common_pb2.InferChunk) -> None:
        self.texts.setdefault(chunk.choice, []).append(chunk.text)
        self.calls.setdefault(chunk.choice, []).extend(chunk.tool_calls)
        self.logprobs.setdefault(chunk.choice, []).extend(chunk.logprobs)
        if chunk.finish_reason:
            self.finish[chunk.choice] = chunk.finish_reason

    def text(self, headed: bool) -> str:
        parts = []
        for i in sorted(self.texts):
            finish = self.finish.get(i, common_pb2.FINISH_REASON_UNSPECIFIED)
            reason = common_pb2.FinishReason.Name(finish).removeprefix("FINISH_REASON_").lower()
            head = [f"[choice {i}, finish={reason}]"] if headed else []
            body = "".join(self.texts[i])
            calls = [call_line(c) for c in tool_calls_of(self.calls[i])]
            probs = [logprob_lines(self.logprobs[i])] if self.logprobs[i] else []
            parts.append("\n".join([*head, *([body] if body else []), *calls, *probs]))
        return "\n\n".join(parts)
