"""The echo backend (tests/benchmarks only), option parsing and request validation."""

from __future__ import annotations

import argparse

import pytest

from apiary.validation import infer_request_problem, name_problem
from hive.__main__ import parse_spawn
from protos.v1 import common_pb2
from worker.backends import BackendOptionError, GenerationRequest, backend_names, create_backend
from worker.backends.echo import EchoBackend
from worker.completion import Completion


async def test_echo_is_deterministic_and_honours_max_tokens() -> None:
    backend = create_backend("echo", "m", {})
    await backend.load(lambda fraction, detail: None)
    request = GenerationRequest(prompt="to be or", max_tokens=5)
    tokens = [p.text async for p in backend.generate(request)]
    assert tokens == ["to", " be", " or", " to", " be"]
    again = [p.text async for p in backend.generate(request)]
    assert again == tokens
    assert backend.count_tokens("to be or") == 3


def test_echo_options_are_validated() -> None:
    backend = create_backend("echo", "m", {"token_delay": "0.5", "load_delay": "2"})
    assert isinstance(backend, EchoBackend)
    assert (backend.token_delay, backend.load_delay) == (0.5, 2.0)
    with pytest.raises(
        BackendOptionError, match=r"known options: fault_crash_after, .*, load_delay, token_delay"
    ):
        create_backend("echo", "m", {"tokn_delay": "1"})
    for bad in ("-1", "soon", "nan", "inf"):
        with pytest.raises(BackendOptionError):
            create_backend("echo", "m", {"token_delay": bad})


def test_unknown_backend_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="known backends: echo"):
        create_backend("vllm", "m", {})
    assert "echo" in backend_names()


@pytest.mark.parametrize(
    ("request_", "problem"),
    [
        (common_pb2.InferRequest(model="m", prompt="p", max_tokens=1), None),
        (common_pb2.InferRequest(prompt="p", max_tokens=1), "model is required"),
        (
            common_pb2.InferRequest(model="m", max_tokens=1),
            "prompt (or messages, for a chat) is required and must not be empty",
        ),
        (
            common_pb2.InferRequest(model="m", prompt="p", max_tokens=-2),
            "max_tokens must be > 0, or 0 for the server's default (got -2)",
        ),
        (
            common_pb2.InferRequest(model="m", prompt="p", max_tokens=11),
            "max_tokens 11 is above this server's cap of 10",
        ),
        (
            common_pb2.InferRequest(model="m", prompt="p", max_tokens=1, request_id="x" * 200),
            "request_id is longer than 128 characters",
        ),
    ],
)
def test_infer_request_problems(request_: common_pb2.InferRequest, problem: str | None) -> None:
    assert infer_request_problem(request_, max_tokens_cap=10) == problem


def test_names() -> None:
    assert name_problem("model", "meta-llama/Llama-3.1-8B:Q4_K_M") is None
    assert name_problem("model", "") == "model is required"
    assert "not allowed" in (name_problem("model", "a b") or "")
    assert "not allowed" in (name_problem("model", "-x") or "")
    assert "at most 128" in (name_problem("model", "a" * 129) or "")


def test_spawn_spec_parsing() -> None:
    spec, count = parse_spawn("model=demo,backend=echo,count=2,slots=3,token_delay=0.05")
    assert (spec.model, spec.backend, spec.slots, count) == ("demo", "echo", 3, 2)
    assert spec.backend_options == {"token_delay": "0.05"}
    with pytest.raises(argparse.ArgumentTypeError, match="model=NAME"):
        parse_spawn("backend=echo")
    with pytest.raises(argparse.ArgumentTypeError, match="KEY=VALUE"):
        parse_spawn("model=x,oops")


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": -5, "stop": ["\n"]}, None),
        ({"temperature": -0.1}, "temperature must be within 0..10 (got -0.1)"),
        ({"top_p": 0.0}, "top_p must be within (0, 1] (got 0)"),
        ({"top_k": -1}, "top_k must be >= 0 (got -1); 0 means no limit"),
        ({"stop": [""]}, "each stop string must be 1..64 characters long"),
        ({"stop": ["x"] * 9}, "at most 8 stop strings are allowed (got 9)"),
    ],
)
def test_sampling_problems(fields: dict[str, object], problem: str | None) -> None:
    request = common_pb2.InferRequest(model="m", prompt="p", max_tokens=1, **fields)  # type: ignore[arg-type]
    assert infer_request_problem(request, max_tokens_cap=10) == problem


@pytest.mark.parametrize(
    ("pieces", "stops", "expected"),
    [
        (["hel", "lo wor", "ld"], [], (["hel", "lo wor", "ld"], False)),
        # Holds back only what might still start a stop string.
        (["hel", "lo", " STOP here"], ["STOP"], (["hel", "lo", " "], True)),
        (["a", "S", "T", "x"], ["STOP"], (["a", "", "", "STx"], False)),
        (["ab", "cST", "OP"], ["STOP", "c"], (["ab", ""], True)),
    ],
)
def test_stop_strings(
    pieces: list[str], stops: list[str], expected: tuple[list[str], bool]
) -> None:
    completion = Completion(stops)
    out, hit = [], False
    for piece in pieces:
        release = completion.feed(piece, [])
        out.append(release.text)
        hit = release.stopped
        if hit:
            break
    if not hit:
        out[-1] += completion.flush().text
    assert (out, hit) == expected
