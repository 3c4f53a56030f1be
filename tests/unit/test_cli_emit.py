"""cli.emit: one answer as JSON or text; streams as JSON lines or text; asides for people only;
and the JSON contract: every field present with its JSON type, 64-bit integers as numbers, enums
by the names the text view prints."""

from __future__ import annotations

import json
from typing import Any

import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from apiary.protoutil import timestamp
from cli.emit import Emitter, to_json
from cli.output import ClusterStatus, status_summary
from protos.v1 import common_pb2, hive_pb2, queen_pb2

# Every message type a CLI verb prints (alone, in a list, or as a stream item).
PRINTED: list[type[Message]] = [
    common_pb2.WorkerRecord,
    common_pb2.InferChunk,
    queen_pb2.HiveInfo,
    queen_pb2.GetHiveResponse,
    queen_pb2.ModelInfo,
    queen_pb2.Event,
    queen_pb2.RequestRecord,
    queen_pb2.QueenStatus,
    hive_pb2.CatalogModel,
    hive_pb2.WorkerProcess,
    hive_pb2.BackendInfo,
]

INTEGERS = {
    FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED32,
    FieldDescriptor.TYPE_SFIXED64,
}  # fmt: skip


def check_value(field: FieldDescriptor, value: Any, where: str) -> None:
    if field.message_type is not None:
        if field.message_type.full_name == "google.protobuf.Timestamp":
            assert value is None or (isinstance(value, str) and value.endswith("Z")), where
        else:
            check_schema(field.message_type, value, where)
    elif field.type in INTEGERS:
        assert isinstance(value, int) and not isinstance(value, bool), where
    elif field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        assert isinstance(value, float | int) and not isinstance(value, bool), where
    elif field.type == FieldDescriptor.TYPE_BOOL:
        assert isinstance(value, bool), where
    else:  # strings, enums (by name), bytes (base64)
        assert isinstance(value, str), where


def check_schema(descriptor: Any, data: Any, where: str = "") -> None:
    """`data` has exactly the message's fields, each with its JSON type."""
    where = where or descriptor.name
    assert isinstance(data, dict), where
    assert set(data) == {f.name for f in descriptor.fields}, where
    for field in descriptor.fields:
        value, at = data[field.name], f"{where}.{field.name}"
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            assert isinstance(value, dict), at
            for item in value.values():
                check_value(field.message_type.fields_by_name["value"], item, at)
        elif field.is_repeated:
            assert isinstance(value, list), at
            for item in value:
                check_value(field, item, at)
        elif field.has_presence and field.message_type is None and value is None:
            continue  # an unset optional field
        else:
            check_value(field, value, at)


def through_json(message: Message) -> Any:
    return json.loads(json.dumps(to_json(message)))


@pytest.mark.parametrize("kind", PRINTED, ids=lambda k: k.DESCRIPTOR.name)
def test_every_field_is_present_with_its_json_type(kind: type[Message]) -> None:
    check_schema(kind.DESCRIPTOR, through_json(kind()))


def worker() -> common_pb2.WorkerRecord:
    return common_pb2.WorkerRecord(
        id="w1", state=common_pb2.WORKER_STATE_IDLE, hive_health=common_pb2.HIVE_HEALTH_HEALTHY,
        restart_policy=common_pb2.RESTART_POLICY_ON_FAILURE, requests_completed=2**53 + 1,
        rss_bytes=3 * 2**40, started_at=timestamp(1_700_000_000.5), tags=["gpu"],
        backend_options={"threads": "4"}, load_progress=0.43, slots_total=2,
    )  # fmt: skip


def test_filled_messages_keep_the_schema() -> None:
    check_schema(common_pb2.WorkerRecord.DESCRIPTOR, through_json(worker()))
    reply = queen_pb2.GetHiveResponse(
        hive=queen_pb2.HiveInfo(id="h", problems=["disk full"]), workers=[worker()]
    )
    check_schema(queen_pb2.GetHiveResponse.DESCRIPTOR, through_json(reply))


def test_values_read_as_in_the_text_view() -> None:
    data = through_json(worker())
    assert data["requests_completed"] == 2**53 + 1  # a number, not "9007199254740993"
    assert data["rss_bytes"] == 3 * 2**40
    assert data["state"] == "IDLE" and data["hive_health"] == "HEALTHY"
    assert data["restart_policy"] == "on-failure"
    assert data["started_at"] == "2023-11-14T22:13:20.500Z" and data["last_activity"] is None
    assert data["load_progress"] == 0.43  # not 0.4300000071525574
    assert data["drained"] is False and data["pid"] == 0 and data["failure_reason"] == ""
    assert data["stats"]["score"] == 0.0  # nested messages are always objects
    event = through_json(queen_pb2.Event(kind=queen_pb2.EVENT_KIND_REQUEST_COMPLETED))
    assert event["kind"] == "request-completed" and event["state"] == "UNSPECIFIED"
    chunk = through_json(common_pb2.InferChunk(finish_reason=common_pb2.FINISH_REASON_LENGTH))
    assert chunk["finish_reason"] == "length"
    record = through_json(queen_pb2.RequestRecord(status=queen_pb2.REQUEST_STATUS_COMPLETED))
    assert record["status"] == "completed"
    process = through_json(hive_pb2.WorkerProcess(owner=hive_pb2.PROCESS_OWNER_ORPHAN))
    assert process["owner"] == "orphan"


def test_unknown_enum_values_and_unset_optionals() -> None:
    newer = common_pb2.WorkerRecord(state=42, restart_policy=9)  # type: ignore[arg-type]
    data = through_json(newer)
    assert data["state"] == "UNKNOWN(42)" and data["restart_policy"] == "UNKNOWN(9)"
    request = through_json(common_pb2.InferRequest(temperature=0.0))
    assert request["temperature"] == 0.0 and request["top_p"] is None
    assert request["policy"] == "unspecified"


def test_status_summary_has_every_field() -> None:
    workers = [
        worker(),
        common_pb2.WorkerRecord(id="w2", state=common_pb2.WORKER_STATE_FAILED, slots_total=8,
                                requests_failed=1),
    ]  # fmt: skip
    hives = [queen_pb2.HiveInfo(id="h1", health=common_pb2.HIVE_HEALTH_HEALTHY)]
    models = [queen_pb2.ModelInfo(name="demo", queued=3), queen_pb2.ModelInfo(name="idle")]
    queen = queen_pb2.QueenStatus(
        started_at=timestamp(1_700_000_000), requests_completed=2**53 + 1, requests_failed=1,
        requests_cancelled=4, requests_refused=5, degraded=True, problems=["history: disk full"],
    )  # fmt: skip
    status = ClusterStatus("q:1", queen, hives, workers, models)
    summary = json.loads(json.dumps(status_summary(status)))
    assert summary == {
        "queen": "q:1",
        "degraded": True,
        "hives": {"total": 1, "by_health": {"HEALTHY": 1, "DEGRADED": 0, "UNHEALTHY": 0}},
        "workers": {
            "total": 2,
            "by_state": {"LOADING": 0, "IDLE": 1, "BUSY": 0, "STOPPING": 0, "FAILED": 1},
        },
        "capacity": {"slots_total": 2, "slots_in_use": 2},  # the failed worker is no capacity
        "queued": {"demo": 3, "idle": 0},
        "requests": {
            "since": "2023-11-14T22:13:20Z",
            "completed": 2**53 + 1,
            "failed": 1,
            "cancelled": 4,
            "refused": 5,
            "success_rate": pytest.approx(1.0),
        },
        "top_workers": [{"id": "w1", "score": 0.0}],
        "problems": [{"hive": None, "problem": "history: disk full"}],
    }
    empty = status_summary(ClusterStatus("q:1", queen_pb2.QueenStatus()))
    assert empty["requests"]["since"] is None
    assert empty["requests"]["success_rate"] is None
    assert empty["hives"]["by_health"] == {"HEALTHY": 0, "DEGRADED": 0, "UNHEALTHY": 0}


def models() -> list[queen_pb2.ModelInfo]:
    return [queen_pb2.ModelInfo(name="demo", idle=2), queen_pb2.ModelInfo(name="tiny")]


def test_a_result_is_one_json_document_or_the_text(capsys: pytest.CaptureFixture[str]) -> None:
    Emitter(as_json=True).result(models(), "a table")
    printed = json.loads(capsys.readouterr().out)
    assert [(m["name"], m["idle"]) for m in printed] == [("demo", 2), ("tiny", 0)]
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
