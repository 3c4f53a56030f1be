"""Heartbeats as untrusted input: what a hive may say, checked before anything is applied.

Pure: a heartbeat and limits in, the first problem found (a message naming the field) out.
A record the registry already holds unchanged was checked when it arrived, so a steady
table costs one equality test per worker (`changed_records`), not a full check.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from apiary.security import is_loopback
from apiary.validation import MAX_NAME_LENGTH, name_problem, tag_problem
from protos.v1 import common_pb2, queen_pb2

DEFAULT_MAX_WORKERS_PER_HIVE = 1024
DEFAULT_MAX_WORKER_SLOTS = 256
MAX_ADDRESS_LENGTH = 261  # a DNS name (253), ':' and a port
MAX_REASON_LENGTH = 2048
MAX_DETAIL_LENGTH = 256
MAX_TAGS = 16
MAX_OPTIONS = 32
MAX_OPTION_VALUE = 1024
MAX_BACKENDS = 32
MAX_CATALOG = 1024
MAX_PROBLEMS = 16
MAX_PROBLEM_LENGTH = 1024
DEFAULT_BEATS_PER_INTERVAL = 2.0
# Beats a hive may send at once before the per-interval rate applies (a restart, a burst of
# changes).
BEAT_BURST = 16.0
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})")


@dataclass(frozen=True)
class BeatLimits:
    max_workers: int = DEFAULT_MAX_WORKERS_PER_HIVE
    max_worker_slots: int = DEFAULT_MAX_WORKER_SLOTS
    beats_per_interval: float = DEFAULT_BEATS_PER_INTERVAL


def host_of(address: str) -> str:
    """'10.0.0.2' of '10.0.0.2:7071', '::1' of '[::1]:7071'."""
    return address.rsplit(":", 1)[0].strip("[]")


def same_host(worker_address: str, hive_address: str, also: Iterable[str] = ()) -> bool:
    """A worker must listen on its hive's own host (or a name in the hive's certificate)."""
    worker, hive = host_of(worker_address), host_of(hive_address)
    return worker == hive or worker in also or (is_loopback(worker) and is_loopback(hive))


# The prefix blocks one worker may report (what the prefix index takes from it).
MAX_PREFIX_BLOCKS = 4096


def address_problem(field: str, value: str) -> str | None:
    if len(value) > MAX_ADDRESS_LENGTH or not _HOST_PORT.fullmatch(value):
        return f"{field} {value[:60]!r} is not host:port"
    if not 0 < int(value.rsplit(":", 1)[1]) < 65536:
        return f"{field} {value[:60]!r} has no valid port"
    return None


def text_problem(field: str, value: str, limit: int) -> str | None:
    if len(value) > limit:
        return f"{field} is {len(value)} characters long; at most {limit} are allowed"
    return None


def enum_problem(field: str, value: int, valid: Callable[[], Sequence[int]]) -> str | None:
    if value not in valid():
        return f"{field} {value} is not a value this queen knows ({', '.join(map(str, valid()))})"
    return None


def beat_problem(beat: queen_pb2.HiveHeartbeat, limits: BeatLimits) -> str | None:
    """Everything about the beat but its worker records (see changed_records)."""
    problem = name_problem("hive_id", beat.hive_id) or text_problem(
        "instance", beat.instance, MAX_NAME_LENGTH
    )
    if problem or beat.leaving:
        return problem
    problem = address_problem("address", beat.address)
    if not problem and max(len(beat.workers), len(beat.samples)) > limits.max_workers:
        problem = (
            f"workers: {len(beat.workers)} records, {len(beat.samples)} samples; a hive may "
            f"report at most {limits.max_workers} (--max-workers-per-hive)"
        )
    return problem or _lists_problem(beat) or _numbers_problem(beat)


def _lists_problem(beat: queen_pb2.HiveHeartbeat) -> str | None:
    if len(beat.backends) > MAX_BACKENDS:
        return f"backends: at most {MAX_BACKENDS} are allowed"
    for backend in beat.backends:
        if problem := name_problem("backends[]", backend):
            return problem
    if len(beat.catalog) > MAX_CATALOG:
        return f"catalog: at most {MAX_CATALOG} entries are allowed"
    for entry in beat.catalog:
        if problem := name_problem("catalog[].model", entry.model) or name_problem(
            "catalog[].backend", entry.backend
        ):
            return problem
    if len(beat.problems) > MAX_PROBLEMS:
        return f"problems: at most {MAX_PROBLEMS} are allowed"
    for sample in beat.samples:
        if len(sample.prefix_cache.blocks) > MAX_PREFIX_BLOCKS:
            return (
                f"samples[{sample.id[:40]}].prefix_cache.blocks: at most {MAX_PREFIX_BLOCKS} "
                "are allowed"
            )
    for text in beat.problems:
        if problem := text_problem("problems[]", text, MAX_PROBLEM_LENGTH):
            return problem
    return None


def _numbers_problem(beat: queen_pb2.HiveHeartbeat) -> str | None:
    resources = beat.resources
    for name, value in (("resources.load_1m", resources.load_1m),
                        ("stats.uptime_seconds", beat.stats.uptime_seconds)):  # fmt: skip
        if not math.isfinite(value) or value < 0:
            return f"{name} must be a finite number >= 0 (got {value})"
    return None


def record_problem(
    record: common_pb2.WorkerRecord, beat: queen_pb2.HiveHeartbeat, limits: BeatLimits
) -> str | None:
    """What is wrong with one worker record of `beat`, naming the field (None: nothing)."""
    where = f"workers[{record.id[:MAX_NAME_LENGTH]!r}]"
    problem = (
        name_problem("worker id", record.id)
        or name_problem(f"{where}.model", record.model)
        or name_problem(f"{where}.backend", record.backend)
        or (name_problem(f"{where}.device", record.device) if record.device else None)
        or (address_problem(f"{where}.address", record.address) if record.address else None)
        or enum_problem(f"{where}.state", record.state, common_pb2.WorkerState.values)
        or enum_problem(
            f"{where}.restart_policy", record.restart_policy, common_pb2.RestartPolicy.values
        )
        or text_problem(f"{where}.failure_reason", record.failure_reason, MAX_REASON_LENGTH)
        or text_problem(f"{where}.status_detail", record.status_detail, MAX_DETAIL_LENGTH)
    )
    if problem:
        return problem
    if record.hive_id and record.hive_id != beat.hive_id:
        return (
            f"worker {record.id} says it belongs to hive {record.hive_id!r}, not {beat.hive_id!r}"
        )
    if not 1 <= record.slots_total <= limits.max_worker_slots:
        return (
            f"{where}.slots_total {record.slots_total} is not within 1..{limits.max_worker_slots}"
            " (--max-worker-slots)"
        )
    if record.slots_available > record.slots_total:
        return f"{where}.slots_available {record.slots_available} exceeds slots_total"
    return _record_lists_problem(record, where)


def _record_lists_problem(record: common_pb2.WorkerRecord, where: str) -> str | None:
    if len(record.features) > MAX_TAGS or any(
        tag_problem("", feature) for feature in record.features
    ):
        return f"{where}.features: at most {MAX_TAGS} names like tools or logprobs"
    if len(record.tags) > MAX_TAGS:
        return f"{where}.tags: at most {MAX_TAGS} are allowed"
    for tag in record.tags:
        if problem := tag_problem(f"{where}.tags[]", tag):
            return problem
    if len(record.backend_options) > MAX_OPTIONS:
        return f"{where}.backend_options: at most {MAX_OPTIONS} are allowed"
    for key, value in record.backend_options.items():
        problem = name_problem(f"{where}.backend_options key", key) or text_problem(
            f"{where}.backend_options[{key[:40]!r}]", value, MAX_OPTION_VALUE
        )
        if problem or _CONTROL.search(value):
            return problem or f"{where}.backend_options[{key[:40]!r}] has control characters"
    if not (math.isfinite(record.load_progress) and 0 <= record.load_progress <= 1):
        return f"{where}.load_progress must be within 0..1"
    return None


_NAMES = re.compile(rf"(?:[A-Za-z0-9][A-Za-z0-9._:/@+-]{{0,{MAX_NAME_LENGTH - 1}}}\n)*")
_TAG_OK = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._:/@+=-]{{0,{MAX_NAME_LENGTH - 1}}}").fullmatch
VALID_STATES = frozenset(common_pb2.WorkerState.values())
VALID_POLICIES = frozenset(common_pb2.RestartPolicy.values())


def record_fine(record: common_pb2.WorkerRecord, hive_id: str, limits: BeatLimits) -> bool:
    """The checks of record_problem, in as few steps as Python allows (a hive may send a
    thousand changed records a beat); False sends the record to record_problem for the
    message. Never more lenient than record_problem."""
    tags, options = record.tags, record.backend_options
    names = [record.id, record.model, record.backend, record.device or "cpu"]
    values: list[str] = []
    if options:
        names += options.keys()
        values = list(options.values())
    address = record.address
    joined = "\n".join(names)
    return (
        # One check for every name: each between separators (and none holding one itself).
        joined.count("\n") == len(names) - 1
        and _NAMES.fullmatch(joined + "\n") is not None
        and all(_TAG_OK(tag) for tag in tags)
        and record.state in VALID_STATES
        and record.restart_policy in VALID_POLICIES
        and (not record.hive_id or record.hive_id == hive_id)
        and 1 <= record.slots_total <= limits.max_worker_slots
        and record.slots_available <= record.slots_total
        and len(record.failure_reason) <= MAX_REASON_LENGTH
        and len(record.status_detail) <= MAX_DETAIL_LENGTH
        and len(tags) <= MAX_TAGS
        and len(options) <= MAX_OPTIONS
        and (not values or all(len(v) <= MAX_OPTION_VALUE for v in values))
        and (not values or _CONTROL.search("".join(values)) is None)
        and 0 <= record.load_progress <= 1
        and (not address or address_problem("", address) is None)
    )


def changed_records(
    beat: queen_pb2.HiveHeartbeat,
    known: Callable[[str], common_pb2.WorkerRecord | None],
    limits: BeatLimits,
) -> tuple[list[common_pb2.WorkerRecord], str | None]:
    """The records that differ from what the registry holds (`known(id)`), each checked;
    with the first problem found, if any (then nothing of the beat may be applied)."""
    changed = []
    seen: set[str] = set()
    for record in beat.workers:
        if record.id in seen:
            return [], f"worker {record.id[:MAX_NAME_LENGTH]!r} is listed twice"
        seen.add(record.id)
        if known(record.id) == record:
            continue
        if not record_fine(record, beat.hive_id, limits):
            return [], record_problem(record, beat, limits) or "a worker record is invalid"
        changed.append(record)
    return changed, None


class BeatBudget:
    """How often each hive may heartbeat: `burst` beats at once, then `per_interval` per
    heartbeat interval (an honest hive sends one, and one more on each change). Beyond
    that a hive is told to slow down, so a flood costs the queen little."""

    MAX_HIVES = 100_000

    def __init__(
        self, interval: float, burst: float = BEAT_BURST,
        per_interval: float = DEFAULT_BEATS_PER_INTERVAL,
    ) -> None:  # fmt: skip
        self.rate = per_interval / interval
        self.burst = burst
        self._level: dict[str, tuple[float, float]] = {}  # hive id -> (beats left, when)

    def allow(self, hive_id: str, now: float) -> bool:
        left, then = self._level.get(hive_id, (self.burst, now))
        left = min(self.burst, left + (now - then) * self.rate)
        if len(self._level) >= self.MAX_HIVES and hive_id not in self._level:
            self._level.clear()  # bounded: ids are chosen by whoever sends
        if left < 1.0:
            self._level[hive_id] = (left, now)
            return False
        self._level[hive_id] = (left - 1.0, now)
        return True

    def wait_hint(self, hive_id: str) -> float:
        """Seconds until the hive may send again."""
        left, _ = self._level.get(hive_id, (self.burst, 0.0))
        return max(1.0 - left, 0.0) / self.rate
