"""worker/tool_format.py: the generic tool-call format (for templates without tool support):
the tools in the system message, the grammar that holds answers to the format, and the answer
read back as it streams, in pieces cut anywhere."""

from __future__ import annotations

import json

import pytest

from worker.backends.base import Message, Tool, ToolCall, Tools
from worker.backends.llama_engine import tool_family
from worker.tool_format import (
    CLOSE,
    HERMES,
    OPEN,
    Delta,
    ToolCallReader,
    call_text,
    grammar,
    rendered_messages,
)

WEATHER = Tool(
    "get_weather",
    "Weather of a city",
    json.dumps(
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    ),
)
TIME = Tool("get_time")


def read_all(reader: ToolCallReader, text: str, size: int) -> tuple[str, list[ToolCall], bool]:
    """Feed `text` in pieces of `size` characters, then flush; the calls their deltas make,
    as a client that follows OpenAI's stream would put them together."""
    content, deltas, stopped = "", list[Delta](), False
    for i in range(0, len(text), size):
        read = reader.feed(text[i : i + size])
        content, deltas, stopped = content + read.text, deltas + read.deltas, stopped or read.stop
    tail = reader.flush()
    calls: dict[int, ToolCall] = {}
    for d in deltas + tail.deltas:
        if d.id:
            assert d.index not in calls and d.name  # a call's first delta names it, once
            calls[d.index] = ToolCall(d.id, d.name, d.arguments)
        else:
            call = calls[d.index]
            calls[d.index] = ToolCall(call.id, call.name, call.arguments + d.arguments)
    return content + tail.text, [calls[i] for i in sorted(calls)], stopped


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_calls_are_read_whole_however_the_text_is_cut(size: int) -> None:
    text = (
        f'{OPEN}{{"name": "get_weather", "arguments": {{"city": "Paris"}}}}{CLOSE}'
        f'{OPEN}{{"name": "get_time", "arguments": {{}}}}{CLOSE}'
    )
    content, calls, stopped = read_all(ToolCallReader(forced=True, parallel=True), text, size)
    assert content == "" and not stopped
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {}),
    ]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


@pytest.mark.parametrize("size", [1, 2, 5, 1000])
def test_one_call_streams_its_name_then_its_arguments_piece_by_piece(size: int) -> None:
    text = f'{OPEN}{{"name": "get_weather", "arguments": {{"city": "Pa}}ris"}}}}{CLOSE}'
    reader = ToolCallReader(forced=True)
    pieces = [reader.feed(text[i : i + size]) for i in range(0, len(text), size)]
    deltas = [d for read in pieces for d in read.deltas]
    assert deltas[0].name == "get_weather" and deltas[0].arguments == ""
    if size < 5:
        assert len(deltas) > 3  # the arguments came in pieces, as they were written
    _, (call,), _ = read_all(ToolCallReader(forced=True), text, size)
    assert json.loads(call.arguments) == {"city": "Pa}ris"}
    # Cut by max_tokens mid-arguments: what was written is the call's arguments.
    _, (cut,), _ = read_all(ToolCallReader(forced=True), text[:-20], size)
    assert cut.arguments == '{"city": "Pa}ris'[: len(text) - 20 - len(OPEN) - 37]


@pytest.mark.parametrize("size", [1, 4, 1000])
def test_in_auto_mode_text_is_content_and_a_leading_angle_bracket_waits(size: int) -> None:
    content, calls, _ = read_all(ToolCallReader(forced=False), "Hello <b>there</b>", size)
    assert (content, calls) == ("Hello <b>there</b>", [])
    # Text that begins like a call but is not one is still said, at the end.
    content, calls, _ = read_all(ToolCallReader(forced=False), "<tool", size)
    assert (content, calls) == ("<tool", [])


def test_a_repeated_call_ends_the_answer_and_is_dropped() -> None:
    once = f'{OPEN}{{"name": "get_time", "arguments": {{}}}}{CLOSE}'
    _, calls, stopped = read_all(ToolCallReader(forced=True, parallel=True), once * 3, 5)
    assert len(calls) == 1 and stopped


def test_a_call_cut_by_max_tokens_keeps_what_it_has_once_its_arguments_began() -> None:
    for parallel in (False, True):
        cut = f'{OPEN}{{"name": "get_weather", "arguments": {{"city": "Pa'
        _, (call,), _ = read_all(ToolCallReader(forced=True, parallel=parallel), cut, 4)
        assert (call.name, call.arguments) == ("get_weather", '{"city": "Pa')
        # No arguments yet: nothing to call.
        reader = ToolCallReader(forced=True, parallel=parallel)
        reader.feed(f'{OPEN}{{"name": "get_we')
        assert reader.flush().deltas == []


def test_the_history_renders_for_any_template() -> None:
    call = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
    messages = (
        Message("system", "Be brief."),
        Message("user", "Weather in Paris?"),
        Message("assistant", "", tool_calls=(call,)),
        Message("tool", "21C", tool_call_id="call_1"),
        Message("tool", "sunny", tool_call_id="call_1"),
    )
    out = rendered_messages(messages, Tools((WEATHER,), "auto"))
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.") and "get_weather" in out[0]["content"]
    assert out[2]["content"] == call_text(call)
    # Consecutive results are one user turn, each naming the function it answers.
    assert out[3]["content"].count("<tool_response>") == 2 and '"get_weather"' in out[3]["content"]
    none = rendered_messages(messages[:2], Tools((WEATHER,), "none"))
    assert none[0]["content"] == "Be brief."  # mode none: the tools are not offered


def test_the_grammar_follows_the_choice() -> None:
    tools = (WEATHER, TIME)
    auto = grammar(Tools(tools, "auto", parallel=True))
    assert "start: call+ | TEXT" in auto and "call_1" in auto and "TEXT:" in auto
    required = grammar(Tools(tools, "required"))
    assert "start: call\n" in required and "TEXT" not in required
    named = grammar(Tools(tools, "function", "get_time"))
    assert "get_time" in named and "get_weather" not in named
    assert grammar(Tools(tools, "none")) == ""
    # Each call's arguments are its tool's schema, closed to properties it does not list.
    args = next(line for line in required.splitlines() if line.startswith("args_0"))
    schema = json.loads(args.split("%json ", 1)[1])
    assert schema["properties"] == {"city": {"type": "string"}}
    assert schema["additionalProperties"] is False


def test_the_hermes_layout_is_read_and_written_with_its_newlines() -> None:
    text = f'{OPEN}\n{{"name": "get_time", "arguments": {{}}}}\n{CLOSE}'
    for parallel in (False, True):
        reader = ToolCallReader(forced=True, parallel=parallel, layout=HERMES)
        _, (call,), _ = read_all(reader, text, 3)
        assert (call.name, json.loads(call.arguments)) == ("get_time", {})
    written = grammar(Tools((WEATHER,), "required", parallel=True), HERMES)
    assert 'call: "<tool_call>\\n" (call_0) "\\n</tool_call>"' in written
    assert 'start: call ("\\n" call)*' in written


def test_a_template_family_is_only_used_when_it_renders_tools() -> None:
    hermes = {"chat_template_caps": {"supports_tools": True}, "chat_template": "<tool_call>"}
    assert tool_family(hermes) == "hermes"
    assert tool_family({**hermes, "chat_template_caps": {"supports_tools": False}}) == ""
    assert tool_family({**hermes, "chat_template": "[TOOL_CALLS]"}) == ""  # not read: generic
    assert tool_family({}) == ""
