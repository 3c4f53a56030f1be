"""cli.emit: one answer as JSON or text; streams as JSON lines or text; asides for people only."""

from __future__ import annotations

import json

import pytest

from cli.emit import Emitter
from protos.v1 import common_pb2, queen_pb2


def models() -> list[queen_pb2.ModelInfo]:
    return [queen_pb2.ModelInfo(name="demo", idle=2), queen_pb2.ModelInfo(name="tiny")]


def test_a_result_is_one_json_document_or_the_text(capsys: pytest.CaptureFixture[str]) -> None:
    Emitter(as_json=True).result(models(), "a table")
    assert json.loads(capsys.readouterr().out) == [{"name": "demo", "idle": 2}, {"name": "tiny"}]
    Emitter(as_json=True).result({"models": models(), "hives": []}, "a table")
    assert json.loads(capsys.readouterr().out)["models"][0]["name"] == "demo"
    Emitter(as_json=False).result(models(), "a table")
    assert capsys.readouterr().out == "a table\n"


def test_streams_and_asides(capsys: pytest.CaptureFixture[str]) -> None:
    chunks = [common_pb2.InferChunk(text="a"), common_pb2.InferChunk(text=" b")]
    for as_json in (True, False):
        out = Emitter(as_json)
        out.note("[lease l-1]")
        for chunk in chunks:
            out.item(chunk, chunk.text, end="")
        out.aside("", stdout=True)
        out.aside("[2 tokens]")
        printed = capsys.readouterr()
        if as_json:
            assert [json.loads(line)["text"] for line in printed.out.splitlines()] == ["a", " b"]
            assert printed.err == "[lease l-1]\n"
        else:
            assert printed.out == "a b\n"
            assert printed.err == "[lease l-1]\n[2 tokens]\n"
