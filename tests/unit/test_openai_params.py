"""queen/http/openai/params.py and shapes.py: OpenAI bodies read into InferRequests (every
parameter carried out or refused by name), and answers written in OpenAI's shapes."""

from __future__ import annotations

import base64
import json
import re
import struct
from typing import Any

import pytest

from protos.v1 import common_pb2
from queen.http.errors import from_status
from queen.http.openai import params
from queen.http.openai.shapes import Answer, embeddings

USER = [{"role": "user", "content": "hi"}]


def chat(**body: Any) -> params.Wanted:
    return params.chat_request({"model": "m", "messages": USER, **body})


def test_a_full_chat_request_maps_every_field() -> None:
    wanted = chat(
        messages=[
            {"role": "developer", "content": "rules"},
            {"role": "user", "content": [{"type": "text", "text": t} for t in ("a", "b")]},
            {"role": "assistant", "content": None},
            {"role": "tool", "content": "42", "tool_call_id": "t1"},
        ],
        max_completion_tokens=9,
        temperature=0.5,
        top_p=1,
        top_k=4,
        seed=3,
        stop="x",
        stream=True,
        stream_options={"include_usage": True},
        user="u-1",
        n=1,
        logprobs=False,
        tools=[],
        tool_choice="none",
        response_format={"type": "text"},
        metadata={"a": "b"},
        prompt_cache_key="tenant-1",
        presence_penalty=0,
        store=False,
    )
    request = wanted.request
    assert [(m.role, m.content) for m in request.messages] == [
        ("system", "rules"),
        ("user", "ab"),
        ("assistant", ""),
        ("tool", "42"),
    ]
    assert (request.model, request.max_tokens, request.top_k, request.seed) == ("m", 9, 4, 3)
    assert request.temperature == pytest.approx(0.5) and request.top_p == pytest.approx(1.0)
    assert list(request.stop) == ["x"] and not request.prompt
    assert (wanted.chat, wanted.stream, wanted.include_usage, wanted.user) == (
        True,
        True,
        True,
        "u-1",
    )


def test_the_session_is_prompt_cache_key_else_user_and_long_keys_go_as_a_digest() -> None:
    assert chat(prompt_cache_key="tenant-1", user="u-1").request.session_id == "tenant-1"
    assert chat(user="u-1").request.session_id == "u-1"
    assert chat().request.session_id == ""
    long = chat(user="x" * 500).request.session_id
    assert long.startswith("sha256:") and len(long) <= 128
    assert long == chat(user="x" * 500).request.session_id
    assert long != chat(user="y" * 500).request.session_id


def test_absent_and_null_parameters_leave_the_defaults() -> None:
    request = chat(temperature=None, max_tokens=None, stop=None, stream=None).request
    assert request.max_tokens == 0  # the queen's default
    assert not request.HasField("temperature") and not request.HasField("seed")
    assert list(request.stop) == []


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"n": 0}, "n", "invalid_value"),
        ({"n": "2"}, "n", "invalid_type"),
        ({"best_of": 3}, "best_of", "unsupported_parameter"),
        ({"logprobs": 1}, "logprobs", "invalid_type"),
        ({"top_logprobs": 2}, "top_logprobs", "invalid_value"),
        ({"frequency_penalty": "x"}, "frequency_penalty", "invalid_type"),
        ({"logit_bias": {"a": 5}}, "logit_bias", "invalid_value"),
        ({"logit_bias": {"1": "5"}}, "logit_bias[1]", "invalid_type"),
        ({"tools": [{"type": "custom"}]}, "tools[0].type", "unsupported_parameter"),
        ({"tools": [{"type": "function"}]}, "tools[0].function", "missing_required_parameter"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
            "tools[0].function.parameters",
            "invalid_type",
        ),
        ({"tools": {"type": "function"}}, "tools", "invalid_type"),
        ({"tool_choice": "sometimes"}, "tool_choice", "invalid_value"),
        ({"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
        ({"response_format": {"type": "xml"}}, "response_format.type", "invalid_value"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
            "missing_required_parameter",
        ),
        ({"audio": {}}, "audio", "unsupported_parameter"),
        ({"reasoning_effort": "low"}, "reasoning_effort", "unsupported_parameter"),
        ({"store": True}, "store", "unsupported_parameter"),
        ({"bogus": 1}, "bogus", "unknown_parameter"),
        ({"temperature": "hot"}, "temperature", "invalid_type"),
        ({"temperature": True}, "temperature", "invalid_type"),
        ({"seed": 1.5}, "seed", "invalid_type"),
        ({"max_tokens": "8"}, "max_tokens", "invalid_type"),
        ({"max_tokens": 0}, "max_tokens", "invalid_value"),
        ({"max_tokens": 4, "max_completion_tokens": 5}, "max_completion_tokens", "invalid_value"),
        ({"stop": [1]}, "stop", "invalid_type"),
        ({"stream": "yes"}, "stream", "invalid_type"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
        ({"stream": True, "stream_options": {"other": 1}}, "other", "unknown_parameter"),
        ({"model": None}, "model", "missing_required_parameter"),
        ({"messages": "hi"}, "messages", "invalid_type"),
        (
            {"messages": [{"role": "user", "content": "x", "name": "bob"}]},
            "messages[0].name",
            "unsupported_parameter",
        ),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"id": "1"}]}]},
            "messages[0].tool_calls[0].function",
            "missing_required_parameter",
        ),
        (
            {"messages": [{"role": "assistant", "function_call": {"name": "f"}}]},
            "messages[0].function_call",
            "unsupported_parameter",
        ),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_type"),
        ({"messages": ["hi"]}, "messages[0]", "invalid_type"),
    ],
)
def test_what_cannot_be_carried_out_is_refused_by_name(
    body: dict[str, Any], param: str, code: str
) -> None:
    with pytest.raises(params.BadRequest) as refused:
        chat(**body)
    assert (refused.value.param, refused.value.code) == (param, code)
    assert param.split(".")[0].split("[")[0] in refused.value.message


@pytest.mark.parametrize("body", [None, [], "text", 3])
def test_a_body_that_is_no_object_is_refused(body: object) -> None:
    with pytest.raises(params.BadRequest, match="must be a JSON object"):
        params.chat_request(body)


def test_completions_take_one_text_prompt() -> None:
    assert params.completion_request({"model": "m", "prompt": ["one"]}).request.prompt == "one"
    for prompt, words in [
        (["a", "b"], "one prompt"),
        ([1, 2], "token ids"),
        (None, "required"),
        (7, "a string"),
    ]:
        with pytest.raises(params.BadRequest, match=words):
            params.completion_request({"model": "m", "prompt": prompt})
    with pytest.raises(params.BadRequest, match="echo"):
        params.completion_request({"model": "m", "prompt": "p", "echo": True})
    with pytest.raises(params.BadRequest, match="Unrecognized request argument supplied: messages"):
        params.completion_request({"model": "m", "prompt": "p", "messages": USER})


def chunk(text: str = "", finish: int = 0, **counts: int) -> common_pb2.InferChunk:
    return common_pb2.InferChunk(text=text, finish_reason=finish, **counts)  # type: ignore[arg-type]


def events(answer: Answer, *chunks: common_pb2.InferChunk) -> list[dict[str, Any]]:
    frames = b"".join(answer.event(c) for c in chunks) + answer.closing()
    data = [f.removeprefix(b"data: ") for f in frames.split(b"\n\n") if f]
    assert data[-1] == b"[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_a_chat_stream_in_openai_chunks_with_usage_last() -> None:
    answer = Answer("chatcmpl-1", "m", 100, chat=True, include_usage=True)
    got = events(
        answer,
        chunk("he"),
        chunk(""),
        chunk(
            "llo",
            common_pb2.FINISH_REASON_STOP,
            prompt_tokens=5,
            completion_tokens=2,
            cached_prompt_tokens=3,
        ),
    )
    assert [e["choices"] for e in got] == [
        [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": "he"},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
        [{"index": 0, "delta": {"content": "llo"}, "logprobs": None, "finish_reason": "stop"}],
        [],
    ]
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == "chatcmpl-1" for e in got)
    assert [e["usage"] for e in got[:-1]] == [None, None]
    assert got[-1]["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 2,
        "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 3},
    }


def test_a_whole_completion_and_an_empty_one() -> None:
    answer = Answer("cmpl-1", "m", 100, chat=False)
    for piece in (
        chunk("a "),
        chunk("b", common_pb2.FINISH_REASON_LENGTH, prompt_tokens=1, completion_tokens=2),
    ):
        answer.take(piece)
    whole = answer.whole()
    assert whole["object"] == "text_completion" and "usage" in whole
    assert whole["choices"] == [
        {"index": 0, "text": "a b", "logprobs": None, "finish_reason": "length"}
    ]
    # A stream whose only chunk ends it still says who speaks and why it ended.
    empty = events(Answer("c", "m", 1, chat=True), chunk("", common_pb2.FINISH_REASON_STOP))
    assert empty[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert empty[0]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("code", "message", "status", "kind", "error_code", "param"),
    [
        (
            "NOT_FOUND",
            "unknown model 'x'; models served: m",
            404,
            "invalid_request_error",
            "model_not_found",
            "model",
        ),
        (
            "NOT_FOUND",
            "no worker of model 'm' carries tags gpu",
            404,
            "invalid_request_error",
            "not_found",
            None,
        ),
        (
            "INVALID_ARGUMENT",
            "temperature must be within 0..10 (got 11)",
            400,
            "invalid_request_error",
            "invalid_value",
            "temperature",
        ),
        (
            "RESOURCE_EXHAUSTED",
            "queen queue is full",
            429,
            "rate_limit_error",
            "rate_limit_exceeded",
            None,
        ),
        ("UNAVAILABLE", "queen shutting down", 503, "server_error", "service_unavailable", None),
        ("DEADLINE_EXCEEDED", "no free worker", 504, "timeout_error", "timeout", None),
        ("UNAUTHENTICATED", "no token", 401, "authentication_error", "invalid_api_key", None),
        ("PERMISSION_DENIED", "not yours", 403, "permission_error", None, None),
        ("INTERNAL", "backend error", 500, "server_error", None, None),
    ],
)
def test_grpc_statuses_map_to_http_errors(
    code: str, message: str, status: int, kind: str, error_code: str | None, param: str | None
) -> None:
    error = from_status(code, message)
    assert (error.status, error.type, error.code, error.param) == (status, kind, error_code, param)
    assert error.body() == {
        "error": {"message": message, "type": kind, "param": param, "code": error_code}
    }
    assert ("Retry-After" in error.headers) == (status in (429, 503))


def test_a_chat_with_tools_formats_and_controls_reads_into_the_contract() -> None:
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "d",
            "parameters": {"type": "object"},
            "strict": True,
        },
    }
    wanted = params.chat_request(
        {
            "model": "m",
            "tools": [weather],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "parallel_tool_calls": True,
            "n": 3,
            "logprobs": True,
            "top_logprobs": 4,
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "repetition_penalty": 1.2,
            "logit_bias": {"42": -100},
            "seed": 9,
            "response_format": {"type": "text"},
            "messages": [
                {"role": "user", "content": "q"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"a": 1}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "21C"},
            ],
        }
    )
    r = wanted.request
    assert [(t.name, t.description, json.loads(t.parameters_json), t.strict) for t in r.tools] == [
        ("get_weather", "d", {"type": "object"}, True)
    ]
    assert (r.tool_choice.mode, r.tool_choice.function) == (
        common_pb2.ToolChoice.MODE_FUNCTION,
        "get_weather",
    )
    assert r.parallel_tool_calls and r.n == 3 and r.logprobs and r.top_logprobs == 4
    assert (r.presence_penalty, r.frequency_penalty) == (0.5, -0.5)
    assert r.repetition_penalty == pytest.approx(1.2) and dict(r.logit_bias) == {42: -100.0}
    assert r.response_format.type == common_pb2.ResponseFormat.TYPE_TEXT
    call = r.messages[1].tool_calls[0]
    assert (call.id, call.name, call.arguments) == ("call_1", "get_weather", '{"a": 1}')
    assert r.messages[2].tool_call_id == "call_1"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    formatted = params.chat_request(
        {
            "model": "m",
            "messages": USER,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "n", "schema": schema, "strict": True},
            },
        }
    )
    form = formatted.request.response_format
    assert (form.type, json.loads(form.schema_json), form.name, form.strict) == (
        common_pb2.ResponseFormat.TYPE_JSON_SCHEMA,
        schema,
        "n",
        True,
    )
    legacy = params.completion_request({"model": "m", "prompt": "p", "logprobs": 0})
    assert legacy.request.logprobs and legacy.request.top_logprobs == 0


def test_tool_calls_logprobs_and_choices_come_out_in_openai_shapes() -> None:
    answer = Answer("chatcmpl-1", "m", 100, chat=True, logprobs=True)
    top = common_pb2.TopLogprob(token="Hi", logprob=-0.1, bytes=b"Hi")
    hi = common_pb2.TokenLogprob(token="Hi", logprob=-0.1, bytes=b"Hi", top=[top])
    call = common_pb2.ToolCallDelta(index=0, id="call_9", name="f", arguments="{}")
    stream = events(
        answer,
        common_pb2.InferChunk(text="Hi", choice=1, logprobs=[hi]),
        common_pb2.InferChunk(tool_calls=[call], finish_reason=common_pb2.FINISH_REASON_TOOL_CALLS),
        common_pb2.InferChunk(choice=1, finish_reason=common_pb2.FINISH_REASON_STOP),
    )
    first = stream[0]["choices"][0]
    assert first["index"] == 1 and first["delta"] == {"role": "assistant", "content": "Hi"}
    assert first["logprobs"]["content"] == [
        {
            "token": "Hi",
            "logprob": -0.1,
            "bytes": [72, 105],
            "top_logprobs": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105]}],
        }
    ]
    second = stream[1]["choices"][0]
    assert second["index"] == 0 and second["finish_reason"] == "tool_calls"
    assert second["delta"]["tool_calls"] == [
        {
            "index": 0,
            "id": "call_9",
            "type": "function",
            "function": {"name": "f", "arguments": "{}"},
        }
    ]
    whole = answer.whole()["choices"]
    assert whole[0]["message"]["content"] is None and whole[0]["message"]["tool_calls"][0]["id"]
    assert whole[1]["message"]["content"] == "Hi" and whole[1]["finish_reason"] == "stop"
    legacy = Answer("cmpl-1", "m", 100, chat=False, logprobs=True)
    legacy.take(common_pb2.InferChunk(text="Hi", logprobs=[hi, hi]))
    probs = legacy.whole()["choices"][0]["logprobs"]
    assert probs == {
        "tokens": ["Hi", "Hi"],
        "token_logprobs": [-0.1, -0.1],
        "top_logprobs": [{"Hi": -0.1}, {"Hi": -0.1}],
        "text_offset": [0, 2],
    }


def test_embeddings_read_and_answer_in_openai_shape() -> None:
    wanted = params.embed_request({"model": "e", "input": "one", "encoding_format": "base64"})
    assert list(wanted.request.input) == ["one"] and wanted.encoding == "base64"
    for body, words in [
        ({"model": "e", "input": []}, "non-empty"),
        ({"model": "e", "input": [[1, 2]]}, "token ids"),
        ({"model": "e", "input": "x", "encoding_format": "int8"}, "float or base64"),
        ({"model": "e", "input": "x", "dimensions": 0}, "at least 1"),
        ({"model": "e", "input": "x", "bogus": 1}, "Unrecognized"),
    ]:
        with pytest.raises(params.BadRequest, match=words):
            params.embed_request(body)
    answer = common_pb2.EmbedResponse(
        embeddings=[common_pb2.Embedding(values=[0.5, -0.25])], prompt_tokens=3
    )
    floats = embeddings(answer, "e", "float")
    assert floats["data"] == [{"object": "embedding", "index": 0, "embedding": [0.5, -0.25]}]
    assert floats["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    packed = base64.b64decode(embeddings(answer, "e", "base64")["data"][0]["embedding"])
    assert struct.unpack("<2f", packed) == (0.5, -0.25)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"model": "m", "messages": USER, "max_tokens": 2**31}, "max_tokens must be within"),
        ({"model": "m", "messages": USER, "top_k": 2**40}, "top_k must be within"),
        ({"model": "m", "messages": USER, "seed": 2**70}, "seed must be within"),
        ({"model": "\ud800", "messages": USER}, "model is not valid Unicode"),
        ({"model": "m", "messages": [{"role": "user", "content": "a\udfffb"}]},
         "messages[0].content is not valid Unicode"),
        ({"model": "m", "messages": USER, "stop": ["\ud800"]}, "stop[0] is not valid"),
        ({"model": "m", "messages": USER, "user": "\ud800"}, "user is not valid"),
        ({"model": "m", "messages": USER, "\ud800": 1}, "key is not valid"),
        ({"model": "m", "messages": [{"role": ["user"], "content": "x"}]}, "role must be one of"),
        ({"model": "m", "messages": USER, "metadata": json.loads("[" * 70 + "]" * 70)},
         "nests deeper than 64"),
    ],
)  # fmt: skip
def test_inputs_that_protobuf_or_python_cannot_take_are_400s(body: Any, words: str) -> None:
    """Each was a 500 with tracebacks (issue 24): out-of-range integers, lone surrogates, a
    role that is a list, nesting without bound."""
    with pytest.raises(params.BadRequest, match=re.escape(words)):
        params.check_body(body)
        params.chat_request(body)
    assert params.chat_request({"model": "m", "messages": USER, "seed": 2**62}).request.seed
