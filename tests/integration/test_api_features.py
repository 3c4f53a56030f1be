"""What real applications use, end to end on the real model (SmolLM2-135M-Instruct) with the
official openai SDK, httpx and gRPC: tool calls (the generic format: SmolLM2's template has no
tool support), structured outputs, logprobs, n, penalties, logit bias and embeddings.

One cluster for the module (a queen with its HTTP front, a hive, a chat engine worker and an
embedding worker of the same GGUF): each test asks it something else.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import jsonschema
import openai
import pydantic
import pytest
import pytest_asyncio

from apiary.client import AsyncClient
from apiary.protoutil import tool_calls_of
from harness import Cluster, Proc, wait_until
from harness.ports import free_port
from protos.v1 import common_pb2, hive_pb2, queen_pb2

pytest.importorskip("xllamacpp", reason="the llamacpp extra is not installed")
pytestmark = pytest.mark.asyncio(loop_scope="module")

CHAT, EMBED, NATIVE = "smollm2", "smollm2-embed", "smollm2-hermes"
# A template with tool support (the Hermes / Qwen family) for the same model: calls go through
# the model's own format instead of the generic one.
HERMES_TEMPLATE = Path(__file__).resolve().parents[1] / "data" / "hermes_tools.jinja"
WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
ASK_WEATHER: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]


@dataclass
class Api:
    cluster: Cluster
    queen: Proc
    url: str
    sdk: openai.AsyncOpenAI


async def _spawn(
    cluster: Cluster, queen: Proc, model: str, hive: str = "h1", **options: str
) -> None:
    reply = await cluster.admin_stub(queen).SpawnWorker(
        queen_pb2.QueenSpawnWorkerRequest(
            hive_id=hive, model=model, backend="llamacpp", slots=4, wait_ready=True,
            backend_options={"context_size": "1024", "cache_ram_mb": "64", "threads": "1",
                             **options},
        ),
        timeout=90,
    )  # fmt: skip
    assert reply.worker.state == common_pb2.WORKER_STATE_IDLE


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def api(real_model: Path) -> AsyncIterator[Api]:
    cluster = Cluster()
    sdk = None
    try:
        port = free_port()
        queen = cluster.start_queen(0, "--http-listen", f"127.0.0.1:{port}")
        hive = cluster.start_hive(queen, "h1")
        # A second hive for the third engine: each hive shares its machine's cores among its
        # own engines, and this one has two (the tests ask one engine at a time).
        cluster.start_hive(queen, "h2")
        admin = cluster.admin_stub(queen)

        async def known() -> bool:
            return len((await admin.ListHives(queen_pb2.ListHivesRequest())).hives) == 2

        await wait_until(known, timeout=15)
        pull = hive_pb2.PullModelRequest(source=str(real_model), name=CHAT)
        assert [p async for p in cluster.hive_stub(hive).PullModel(pull)][-1].stage == "done"
        await _spawn(cluster, queen, CHAT)
        await _spawn(cluster, queen, EMBED, model_path=str(real_model), embeddings="mean")
        await _spawn(cluster, queen, NATIVE, "h2", model_path=str(real_model),
                     chat_template_file=str(HERMES_TEMPLATE))  # fmt: skip
        url = f"http://127.0.0.1:{port}/v1"
        sdk = openai.AsyncOpenAI(base_url=url, api_key="-", max_retries=0, timeout=60)
        yield Api(cluster, queen, url, sdk)
    finally:
        if sdk is not None:
            await sdk.close()
        await cluster.close()


# ---- tool calls -------------------------------------------------------------


async def test_a_tool_call_round_trip_with_the_sdk(api: Api) -> None:
    """required -> a call whose arguments validate; the tool's result -> a final answer."""
    asked = await api.sdk.chat.completions.create(
        model=CHAT, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required",
        temperature=0, max_tokens=80,
    )  # fmt: skip
    choice = asked.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls, choice.message
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    history: list[Any] = [
        *ASK_WEATHER,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'},
    ]
    final = await api.sdk.chat.completions.create(
        model=CHAT, messages=history, tools=[WEATHER], temperature=0, max_tokens=40
    )
    answer = final.choices[0]
    assert not answer.message.tool_calls and answer.message.content
    assert "21" in answer.message.content  # it read the tool's result


async def streamed_call(model: str, api: Api, tool_choice: Any) -> tuple[Any, str]:
    """A streamed chat that must call get_weather: its first delta and the arguments all its
    deltas make, once checked that it ended with tool_calls and the arguments validate."""
    stream = await api.sdk.chat.completions.create(
        model=model, messages=ASK_WEATHER, tools=[WEATHER], max_tokens=80, stream=True,
        tool_choice=tool_choice, temperature=0,
    )  # fmt: skip
    deltas: list[Any] = []
    finish = None
    async for chunk in stream:
        for choice in chunk.choices:
            deltas.extend(choice.delta.tool_calls or [])
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and deltas
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])
    return deltas[0], arguments


async def test_a_named_function_streams_openai_shaped_tool_call_deltas(api: Api) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    first, _ = await streamed_call(CHAT, api, named)
    assert first.index == 0 and first.id and first.type == "function"
    assert first.function is not None and first.function.name == "get_weather"


async def test_a_template_with_tool_support_is_called_through_its_own_format(api: Api) -> None:
    """The template renders the tools and the chat's calls; the answer is held to its layout
    (<tool_call>\n{...}\n</tool_call>) and read back as OpenAI's tool_calls."""
    first, arguments = await streamed_call(NATIVE, api, "required")
    assert first.function.name == "get_weather"
    history: list[Any] = [
        *ASK_WEATHER,
        {"role": "assistant", "tool_calls": [{"id": first.id, "type": "function",
         "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": first.id, "content": '{"temperature": 21}'},
    ]  # fmt: skip
    final = await api.sdk.chat.completions.create(
        model=NATIVE, messages=history, tools=[WEATHER], tool_choice="none", temperature=0,
        max_tokens=30,
    )  # fmt: skip
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls


async def test_tool_requests_that_cannot_be_carried_out_are_precise_400s(api: Api) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "get_weather"),
        ({"tools": [WEATHER, WEATHER]}, "twice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters":
                     {"type": "object", "not": {"required": ["a"]}}}}]}, "'not'"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters":
                     {"type": "strnig"}}}]}, "not a valid JSON schema"),
    ]  # fmt: skip
    for extra, words in cases:
        body = {"model": CHAT, "messages": ASK_WEATHER, "max_tokens": 8, "tools": [WEATHER],
                **extra}  # fmt: skip
        with pytest.raises(openai.BadRequestError) as refused:
            await api.sdk.chat.completions.create(**body)
        assert words in str(refused.value), (extra, str(refused.value))


# ---- structured outputs -----------------------------------------------------

SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"name": {"type": "string"},
     "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"city": {"type": "object", "properties": {
        "name": {"type": "string"}, "country": {"type": "string"}},
        "required": ["name", "country"]}, "population": {"type": "integer"}},
     "required": ["city", "population"]},
    {"type": "object", "properties": {"colors": {"type": "array", "minItems": 2, "maxItems": 4,
     "items": {"type": "string", "enum": ["red", "green", "blue"]}}},
     "required": ["colors"]},
    {"type": "array", "items": {"type": "object", "properties": {"step": {"type": "integer"},
     "done": {"type": "boolean"}}, "required": ["step", "done"]}, "minItems": 1, "maxItems": 3},
]  # fmt: skip


@pytest.mark.parametrize("schema", SCHEMAS)
async def test_every_answer_validates_against_its_json_schema(
    api: Api, schema: dict[str, Any]
) -> None:
    for temperature in (0.0, 1.0):
        answer = await api.sdk.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "Answer in JSON."}],
            response_format={"type": "json_schema",
                             "json_schema": {"name": "answer", "schema": schema}},
            temperature=temperature, seed=3, max_tokens=160,
        )  # fmt: skip
        assert answer.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(answer.choices[0].message.content or ""), schema)


async def test_sampled_answers_with_free_integers_end_and_parse(api: Api) -> None:
    """Unbounded integers and free whitespace are where a small model wanders until max_tokens
    (measured: 7 of 30 sampled answers before the grammar bounded them); now each ends."""
    schema = {"type": "object", "properties": {"name": {"type": "string"},
              "population": {"type": "integer"}}, "required": ["name", "population"]}  # fmt: skip
    form: Any = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}
    for seed in range(6):
        answer = await api.sdk.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "A city as JSON"}],
            response_format=form, max_tokens=60, seed=seed,
        )  # fmt: skip
        assert answer.choices[0].finish_reason == "stop", answer.choices[0].message.content
        jsonschema.validate(json.loads(answer.choices[0].message.content or ""), schema)


async def test_json_object_answers_parse(api: Api) -> None:
    answer = await api.sdk.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "Describe a cat."}], max_tokens=120,
        response_format={"type": "json_object"}, temperature=0,
    )  # fmt: skip
    assert answer.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(answer.choices[0].message.content or ""), dict)


class Person(pydantic.BaseModel):
    name: str
    age: int
    city: str


async def test_the_sdk_parses_into_a_pydantic_model(api: Api) -> None:
    parsed = await api.sdk.chat.completions.parse(
        model=CHAT, messages=[{"role": "user", "content": "Invent a person."}],
        response_format=Person, temperature=0, max_tokens=120,
    )  # fmt: skip
    person = parsed.choices[0].message.parsed
    assert isinstance(person, Person) and person.name


async def test_a_schema_the_grammar_cannot_enforce_is_a_400_naming_the_keyword(api: Api) -> None:
    schema = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
    with pytest.raises(openai.BadRequestError) as refused:
        await api.sdk.chat.completions.create(
            model=CHAT, messages=ASK_WEATHER, max_tokens=8,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        )  # fmt: skip
    assert "'uniqueItems'" in str(refused.value)


async def test_a_grammar_held_answer_is_not_resumed_elsewhere(api: Api) -> None:
    """A continuation (how a stream moves) of a grammar-held request cannot be exact: refused."""
    request = common_pb2.InferRequest(
        model=CHAT, messages=[common_pb2.ChatMessage(role="user", content="JSON please")],
        max_tokens=16, continuation=common_pb2.Continuation(token_ids=[90]),
    )  # fmt: skip
    request.response_format.type = common_pb2.ResponseFormat.TYPE_JSON_OBJECT
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        _ = [c async for c in api.cluster.queen_stub(api.queen).Infer(request, timeout=30)]
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "grammar" in (refused.value.details() or "")


# ---- sampling controls ------------------------------------------------------


async def test_chat_logprobs_come_in_openai_shape(api: Api) -> None:
    answer = await api.sdk.chat.completions.create(
        model=CHAT, messages=ASK_WEATHER, max_tokens=12, temperature=0, logprobs=True,
        top_logprobs=3,
    )  # fmt: skip
    choice = answer.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    content = choice.logprobs.content
    assert "".join(t.token for t in content) == choice.message.content
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        assert token.top_logprobs[0].logprob >= token.top_logprobs[-1].logprob
        # Greedy: the sampled token is the likeliest.
        assert token.top_logprobs[0].token == token.token


async def test_completion_logprobs_come_in_the_legacy_shape(api: Api) -> None:
    answer = await api.sdk.completions.create(
        model=CHAT, prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=2
    )
    probs = answer.choices[0].logprobs
    assert probs is not None and probs.tokens and probs.token_logprobs and probs.top_logprobs
    assert "".join(probs.tokens) == answer.choices[0].text
    assert len(probs.tokens) == len(probs.token_logprobs) == len(probs.top_logprobs)
    assert all(len(top) <= 2 for top in probs.top_logprobs)


async def test_n_choices_come_from_one_prompt_and_a_seed_reproduces_them(api: Api) -> None:
    def ask() -> Any:
        return api.sdk.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "Tell me a story"}],
            max_tokens=12, temperature=1.0, seed=11, n=3,
        )  # fmt: skip

    first, again = await ask(), await ask()
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert len(set(texts)) > 1  # the choices are sampled apart
    assert [c.message.content for c in again.choices] == texts  # the seed reproduces all
    one = await api.sdk.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=12,
        temperature=1.0, seed=11,
    )  # fmt: skip
    assert first.usage is not None and one.usage is not None
    assert first.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    assert first.usage.completion_tokens == 3 * 12


async def test_n_choices_stream_by_index_with_usage_last(api: Api) -> None:
    stream = await api.sdk.chat.completions.create(
        model=CHAT, messages=ASK_WEATHER, max_tokens=8, temperature=1.0, seed=2, n=2,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    texts: dict[int, str] = {}
    finishes, usage = {}, None
    async for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
        usage = chunk.usage or usage
    assert set(texts) == {0, 1} and finishes == {0: "length", 1: "length"}
    assert usage is not None and usage.completion_tokens == 16


async def test_logit_bias_bans_a_token_and_penalties_change_a_greedy_answer(api: Api) -> None:
    stub = api.cluster.queen_stub(api.queen)
    prompt = "List the numbers: one, two, one, two, one, two,"
    plain = [c async for c in stub.Infer(common_pb2.InferRequest(
        model=CHAT, prompt=prompt, max_tokens=12, temperature=0), timeout=30)]  # fmt: skip
    ids = [t for c in plain for t in c.token_ids]
    banned = common_pb2.InferRequest(model=CHAT, prompt=prompt, max_tokens=12, temperature=0)
    banned.logit_bias[ids[0]] = -100
    biased = [t for c in [c async for c in stub.Infer(banned, timeout=30)] for t in c.token_ids]
    assert ids[0] not in biased
    base = "".join(c.text for c in plain)
    body = {"model": CHAT, "prompt": prompt, "max_tokens": 12, "temperature": 0}
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
        for extra in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0},
                      {"repetition_penalty": 1.8}):  # fmt: skip
            answer = (await http.post("/completions", json={**body, **extra})).json()
            assert answer["choices"][0]["text"] != base, extra
        refused = await http.post("/completions", json={**body, "presence_penalty": 3})
        assert refused.status_code == 400 and "presence_penalty" in refused.text


# ---- embeddings and models --------------------------------------------------


def _norm(vector: list[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


async def test_embeddings_of_texts_in_floats_and_base64(api: Api) -> None:
    texts = ["The cat sat on the mat.", "Stock markets fell today.", "The cat sat on the mat."]
    floats = await api.sdk.embeddings.create(model=EMBED, input=texts)
    vectors = [d.embedding for d in floats.data]
    assert [d.index for d in floats.data] == [0, 1, 2] and len({len(v) for v in vectors}) == 1
    assert all(abs(_norm(v) - 1) < 1e-3 for v in vectors)
    assert vectors[0] == pytest.approx(vectors[2], abs=1e-5) and vectors[0] != vectors[1]
    assert floats.usage.prompt_tokens > 0
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
        asked: dict[str, Any] = {"model": EMBED, "input": texts[0], "encoding_format": "base64"}
        raw = (await http.post("/embeddings", json=asked)).json()
        packed = base64.b64decode(raw["data"][0]["embedding"])
        decoded = struct.unpack(f"<{len(packed) // 4}f", packed)
        assert list(decoded) == pytest.approx(vectors[0], abs=1e-5)
        for body, words in [
            ({"model": EMBED, "input": "x", "dimensions": 7}, "dimensions"),
            ({"model": CHAT, "input": "x"}, "serves completions"),
            ({"model": EMBED, "input": [1, 2]}, "token ids"),
        ]:
            refused = await http.post("/embeddings", json=body)
            assert refused.status_code == 400 and words in refused.text, refused.text
    with pytest.raises(openai.BadRequestError, match="embeddings only"):
        await api.sdk.chat.completions.create(model=EMBED, messages=ASK_WEATHER, max_tokens=4)


async def test_models_say_which_embed_and_which_chat_with_their_context(api: Api) -> None:
    listed = {m.id: m.model_dump() for m in (await api.sdk.models.list()).data}
    assert listed[CHAT]["task"] == listed[NATIVE]["task"] == "chat"
    assert listed[EMBED]["task"] == "embedding"
    assert listed[CHAT]["context_length"] == listed[EMBED]["context_length"] == 1024


# ---- the Python client and the CLI ------------------------------------------


async def test_the_python_client_asks_for_tools_schemas_logprobs_and_embeddings(api: Api) -> None:
    async with AsyncClient(api.queen.address) as client:
        chunks = [c async for c in client.chat(
            CHAT, ASK_WEATHER, tools=[WEATHER], tool_choice="get_weather", temperature=0.0,
            max_tokens=80,
        )]  # fmt: skip
        (call,) = tool_calls_of(d for c in chunks for d in c.tool_calls)
        assert call.name == "get_weather" and json.loads(call.arguments)["city"]
        assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS
        schema = SCHEMAS[0]
        text = "".join([c.text async for c in client.chat(
            CHAT, [{"role": "user", "content": "A person"}], json_schema=schema, max_tokens=100,
            logprobs=True, top_logprobs=1, temperature=0.0,
        )])  # fmt: skip
        jsonschema.validate(json.loads(text), schema)
        vectors = await client.embed(EMBED, ["one", "two"])
        assert len(vectors) == 2 and abs(_norm(vectors[0]) - 1) < 1e-3


def _apiary(queen: Proc, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "apiary"), *args], capture_output=True, text=True,
        timeout=120, env=dict(os.environ, APIARY_QUEEN=queen.address),
    )  # fmt: skip


async def test_the_cli_takes_schema_and_tool_files_logprobs_n_and_embeds(
    api: Api, tmp_path: Path
) -> None:
    schema_file, tool_file = tmp_path / "schema.json", tmp_path / "tool.json"
    schema_file.write_text(json.dumps(SCHEMAS[0]))
    tool_file.write_text(json.dumps(WEATHER["function"]))
    shaped = await asyncio.to_thread(
        _apiary, api.queen, "infer", CHAT, "A person", "--json-schema", str(schema_file),
        "--temperature", "0", "--max-tokens", "100",
    )  # fmt: skip
    assert shaped.returncode == 0, shaped.stderr
    jsonschema.validate(json.loads(shaped.stdout), SCHEMAS[0])
    called = await asyncio.to_thread(
        _apiary, api.queen, "infer", CHAT, "Weather in Paris?", "--tool", str(tool_file),
        "--tool-choice", "required", "--temperature", "0", "--max-tokens", "80",
    )  # fmt: skip
    assert called.returncode == 0 and "] get_weather({" in called.stdout, called.stdout
    many = await asyncio.to_thread(
        _apiary, api.queen, "infer", CHAT, "Hi", "-n", "2", "--logprobs", "2", "--seed", "1",
        "--max-tokens", "4",
    )  # fmt: skip
    assert many.returncode == 0 and "[choice 0" in many.stdout and "[choice 1" in many.stdout
    embedded = await asyncio.to_thread(_apiary, api.queen, "embed", EMBED, "a", "b", "--json")
    assert embedded.returncode == 0, embedded.stderr
    assert [len(item["embedding"]) for item in json.loads(embedded.stdout)] == [576, 576]
    bad = await asyncio.to_thread(
        _apiary, api.queen, "infer", CHAT, "x", "--json-schema", str(tmp_path / "missing.json")
    )
    assert bad.returncode == 2 and "missing.json" in bad.stderr
