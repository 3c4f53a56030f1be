"""Hostile heartbeat contents, generated: the checks never raise, and the fast path the queen
takes for each changed record is never more lenient than the detailed check."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from protos.v1 import common_pb2, queen_pb2
from queen.beats import BeatLimits, beat_problem, record_fine, record_problem

LIMITS = BeatLimits(max_workers=8, max_worker_slots=16)
NASTY = st.sampled_from(
    ["", "a", "w-1", "a\nb", "a b", "x" * 128, "x" * 129, "é", "\x00", "-a", "a/b:c@d+e", "\r"]
)
TEXT = NASTY | st.text(max_size=140)
ADDRESS = st.sampled_from(
    ["", "127.0.0.1:5000", "h:0", "h:65536", "h:99999", "[::1]:80", "h", ":80", "a b:1", "h:1\n"]
) | st.text(max_size=30)
NUMBER = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 0.5, 1.0, -1.0])


def valid_record() -> common_pb2.WorkerRecord:
    return common_pb2.WorkerRecord(
        id="w-1", hive_id="h1", model="m", backend="echo", device="cpu",
        address="127.0.0.1:5000", state=common_pb2.WORKER_STATE_IDLE,
        restart_policy=common_pb2.RESTART_POLICY_ON_FAILURE, slots_total=2, slots_available=1,
        tags=["gpu"], backend_options={"token_delay": "0.01"}, load_progress=0.5,
    )  # fmt: skip


FIELDS: dict[str, st.SearchStrategy[object]] = {
    "id": TEXT,
    "hive_id": st.sampled_from(["", "h1", "h2"]),
    "model": TEXT,
    "backend": TEXT,
    "device": TEXT,
    "address": ADDRESS,
    "state": st.integers(0, 9),
    "restart_policy": st.integers(0, 6),
    "slots_total": st.integers(0, 40),
    "slots_available": st.integers(0, 40),
    "failure_reason": st.text(max_size=30).map(lambda t: t * 100),
    "status_detail": st.text(max_size=300),
    "tags": st.lists(TEXT, max_size=18),
    "backend_options": st.dictionaries(TEXT, TEXT | st.just("v" * 1100), max_size=34),
    "load_progress": NUMBER,
}


@st.composite
def records(draw: st.DrawFn) -> common_pb2.WorkerRecord:
    """A valid record with one to three fields made hostile (all hostile would almost never
    be valid, and so would never test the fast path's acceptance)."""
    record = valid_record()
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=3)):
        value = draw(FIELDS[name])
        if name == "tags":
            del record.tags[:]
            record.tags.extend(value)  # type: ignore[arg-type]
        elif name == "backend_options":
            record.backend_options.clear()
            record.backend_options.update(value)  # type: ignore[call-overload]
        else:
            setattr(record, name, value)
    return record


@settings(max_examples=1500, deadline=None)
@given(records())
def test_the_fast_check_agrees_with_the_detailed_one(record: common_pb2.WorkerRecord) -> None:
    beat = queen_pb2.HiveHeartbeat(hive_id="h1", address="127.0.0.1:7071")
    fine = record_fine(record, "h1", LIMITS)
    problem = record_problem(record, beat, LIMITS)
    assert fine == (problem is None), (problem, record)


@settings(max_examples=300, deadline=None)
@given(
    hive_id=TEXT,
    address=ADDRESS,
    workers=st.lists(records(), max_size=10),
    backends=st.lists(TEXT, max_size=34),
    load=NUMBER,
)
def test_whole_beats_never_break_the_checks(
    hive_id: str, address: str, workers: list[common_pb2.WorkerRecord], backends: list[str],
    load: float,
) -> None:  # fmt: skip
    beat = queen_pb2.HiveHeartbeat(
        hive_id=hive_id, address=address, workers=workers, backends=backends,
        resources=queen_pb2.HiveResources(load_1m=load),
    )  # fmt: skip
    problem = beat_problem(beat, LIMITS)
    assert problem is None or isinstance(problem, str)
