"""apiary/controls.py: what a request may ask beyond a prompt, checked with messages a person
can act on; and which streams can move to another worker (queen/requests/progress.py)."""

from __future__ import annotations

import json

import pytest

from apiary.controls import controls_problem, unmovable
from apiary.validation import embed_request_problem, infer_request_problem
from protos.v1 import common_pb2
from queen.requests.progress import Progress

Mode = common_pb2.ToolChoice
Format = common_pb2.ResponseFormat
OBJECT = json.dumps({"type": "object", "properties": {"city": {"type": "string"}}})


def chat(**fields: object) -> common_pb2.InferRequest:
    request = common_pb2.InferRequest(
        model="m", max_tokens=16, messages=[common_pb2.ChatMessage(role="user", content="hi")]
    )
    for name, value in fields.items():
        if name == "tools":
            request.tools.extend(value)  # type: ignore[arg-type]
        elif name in ("tool_choice", "response_format", "continuation"):
            getattr(request, name).CopyFrom(value)
        elif name == "logit_bias":
            request.logit_bias.update(value)  # type: ignore[call-overload]
        else:
            setattr(request, name, value)
    return request


def tool(name: str = "get_weather", parameters: str = OBJECT) -> common_pb2.Tool:
    return common_pb2.Tool(name=name, parameters_json=parameters)


def test_a_full_request_passes() -> None:
    request = chat(tools=[tool(), tool("get_time", "")], logprobs=True, top_logprobs=5, n=4,
                   presence_penalty=1.5, frequency_penalty=-1.0, repetition_penalty=1.1,
                   logit_bias={15: -100.0, 7: 3.5},
                   tool_choice=Mode(mode=Mode.MODE_FUNCTION, function="get_time"))  # fmt: skip
    assert controls_problem(request) is None
    assert infer_request_problem(request, 4096) is None


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"tool_choice": Mode(mode=Mode.MODE_REQUIRED)}, "gives no tools"),
        ({"tools": [tool("bad name")]}, "1..64 letters"),
        ({"tools": [tool(), tool()]}, "given twice"),
        ({"tools": [tool(parameters="{")]}, "not valid JSON"),
        ({"tools": [tool(parameters="[]")]}, "JSON schema object"),
        ({"tools": [tool(parameters='{"type": "strnig"}')]}, "not a valid JSON schema"),
        ({"tools": [tool()], "tool_choice": Mode(mode=Mode.MODE_FUNCTION, function="nope")},
         "not among the tools: get_weather"),
        ({"response_format": Format(type=Format.TYPE_JSON_SCHEMA)}, "needs its schema"),
        ({"response_format": Format(type=Format.TYPE_JSON_SCHEMA, schema_json=OBJECT),
          "tools": [tool()]}, "cannot hold one answer together"),
        ({"top_logprobs": 21, "logprobs": True}, "within 0..20"),
        ({"top_logprobs": 2}, "needs logprobs"),
        ({"n": 17}, "within 1..16"),
        ({"presence_penalty": 2.5}, "presence_penalty must be within -2..2"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"logit_bias": {3: 101.0}}, "within -100..100"),
        ({"logit_bias": {-1: 1.0}}, "token ids are >= 0"),
    ],
)  # fmt: skip
def test_what_cannot_be_done_says_why(fields: dict[str, object], words: str) -> None:
    assert words in (controls_problem(chat(**fields)) or "")


def test_tools_need_a_chat_and_history_is_checked() -> None:
    raw = common_pb2.InferRequest(model="m", prompt="p", max_tokens=4, tools=[tool()])
    assert "need a chat" in (controls_problem(raw) or "")
    calling = chat()
    calling.messages.add(role="user", tool_calls=[common_pb2.ToolCall(id="1", name="f")])
    assert "only an assistant" in (controls_problem(calling) or "")
    answer = chat()
    answer.messages.add(role="tool", content="21C")
    assert "needs tool_call_id" in (controls_problem(answer) or "")


def test_grammar_held_and_many_choice_streams_cannot_move() -> None:
    assert unmovable(chat(logprobs=True, presence_penalty=1.0)) == ""
    held = chat(response_format=Format(type=Format.TYPE_JSON_OBJECT))
    assert "grammar" in unmovable(held)
    assert "grammar (tools)" in unmovable(chat(tools=[tool()]))
    assert unmovable(chat(tools=[tool()], tool_choice=Mode(mode=Mode.MODE_NONE))) == ""
    assert "n=2" in unmovable(chat(n=2))
    progress = Progress.of(held)
    progress.add(common_pb2.InferChunk(text="{", token_ids=[90]))
    assert not progress.movable(16, 3) and "grammar" in progress.why_not(16, 3)
    # Nor may a client resume one with a continuation.
    resumed = chat(response_format=Format(type=Format.TYPE_JSON_OBJECT),
                   continuation=common_pb2.Continuation(token_ids=[90]))  # fmt: skip
    assert "continuation cannot be used" in (controls_problem(resumed) or "")


def test_embedding_requests_are_checked() -> None:
    def problem(**fields: object) -> str:
        return embed_request_problem(common_pb2.EmbedRequest(**fields)) or ""  # type: ignore[arg-type]

    assert problem(model="m", input=["a", "b"]) == ""
    assert "required" in problem(model="m")
    assert "non-empty" in problem(model="m", input=["a", ""])
    assert "at most 256" in problem(model="m", input=["a"] * 257)
    assert "at most" in problem(model="m", input=["x" * 70000])
    assert "model" in problem(input=["a"])
