"""How the CLI shows things to people: tables, detail pages, event lines, progress, the status
summary (the JSON form is `cli.emit`'s; the summary is shared by both)."""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import EnumDescriptor

from apiary.protoutil import READY_STATES, health_name, state_name
from cli.emit import inert_cell
from cli.names import enum_text
from protos.v1 import common_pb2, hive_pb2, queen_pb2

ELLIPSIS = "…"
# A column that may be cut keeps at least this many characters (and its header).
MIN_CUT_WIDTH = 8


def terminal_width() -> int:
    """Columns a table must fit in; 0 for no limit. On a terminal, its width; piped, no limit
    (scripts and `grep` see whole rows) unless COLUMNS is set."""
    if "COLUMNS" in os.environ or sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return 0


def fit_widths(widths: list[int], floors: list[int | None], limit: int) -> list[int]:
    """Narrow the columns that may be cut (a floor; None: never cut), widest first, until a row
    of `widths` separated by two spaces fits in `limit`, or every such column is at its floor."""
    fixed = sum(w for w, f in zip(widths, floors, strict=True) if f is None)
    budget = limit - fixed - 2 * (len(widths) - 1)
    cuttable = [(w, f) for w, f in zip(widths, floors, strict=True) if f is not None]

    def used(cap: int) -> int:
        return sum(min(w, max(cap, f)) for w, f in cuttable)

    cap = max((w for w, _ in cuttable), default=0)
    while cap > 0 and used(cap) > budget:
        cap -= 1
    return [w if f is None else min(w, max(cap, f)) for w, f in zip(widths, floors, strict=True)]


def clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + ELLIPSIS


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    cut: Collection[str] = (),
    width: int | None = None,
) -> str:
    """Aligned columns. The columns named in `cut` are shortened (ending in an ellipsis) so
    rows fit `width` (default: terminal_width(); 0 = no limit); `get` and --json keep the
    whole text."""
    cells = [[str(c) for c in headers], *[[inert_cell(str(c)) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    limit = terminal_width() if width is None else width
    if limit:
        floors = [max(len(h), MIN_CUT_WIDTH) if h in cut else None for h in headers]
        widths = fit_widths(widths, floors, limit)
    return "\n".join(
        "  ".join(
            clip(cell, width).ljust(width) for cell, width in zip(row, widths, strict=True)
        ).rstrip()
        for row in cells
    )


def fields(pairs: Sequence[tuple[str, object]]) -> str:
    return "\n".join(f"{key + ':':<16}{inert_cell(str(value))}" for key, value in pairs)


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def age(ts_seconds: int) -> str:
    return duration(max(time.time() - ts_seconds, 0)) if ts_seconds else "-"


def gib(n: int) -> str:
    return f"{n / 2**30:.1f}G"


def policy_name(policy: common_pb2.RestartPolicy.ValueType) -> str:
    """'on-failure'; '-' when unset (the hive's default applies)."""
    return enum_text(common_pb2.RestartPolicy.DESCRIPTOR, policy) if policy else "-"


def worker_flags(w: common_pb2.WorkerRecord) -> str:
    flags = []
    if w.drained:
        flags.append("drained")
    if w.circuit_open_seconds:
        flags.append(f"circuit-open {w.circuit_open_seconds:.0f}s")
    return ",".join(flags)


def state_label(w: common_pb2.WorkerRecord) -> str:
    """'LOADING 43%' while loading (where the backend tells), else the state."""
    if w.state == common_pb2.WORKER_STATE_LOADING and w.load_progress:
        return f"LOADING {w.load_progress:.0%}"
    return state_name(w.state)


def worker_rows(workers: Sequence[common_pb2.WorkerRecord], width: int | None = None) -> str:
    rows = [
        (
            w.id, w.hive_id, health_name(w.hive_health), w.model, w.backend,
            state_label(w), f"{w.slots_available}/{w.slots_total}", w.pid or "-",
            w.address or "-", age(w.started_at.seconds), w.requests_completed,
            w.requests_failed, ",".join(w.tags), worker_flags(w), w.failure_reason,
        )
        for w in workers
    ]  # fmt: skip
    headers = ("WORKER", "HIVE", "HIVE HEALTH", "MODEL", "BACKEND", "STATE", "FREE", "PID",
               "ADDRESS", "AGE", "DONE", "FAILED", "TAGS", "FLAGS", "REASON")  # fmt: skip
    return table(headers, rows, ("ADDRESS", "TAGS", "FLAGS", "REASON"), width)


def hive_rows(hives: Sequence[queen_pb2.HiveInfo], width: int | None = None) -> str:
    rows = [
        (
            h.id, h.address, health_name(h.health) + (" (drained)" if h.drained else ""),
            f"{h.heartbeat_age_seconds:.1f}s", h.worker_count, f"{h.slots_in_use}/{h.slots_total}",
            f"{h.resources.load_1m:.1f}/{h.resources.cpu_count}",
            f"{gib(h.resources.memory_available_bytes)}/{gib(h.resources.memory_total_bytes)}",
            f"{h.stats.spawns}/{h.stats.crashes}/{h.stats.restarts}",
            duration(h.stats.uptime_seconds), h.health_reason,
        )
        for h in hives
    ]  # fmt: skip
    headers = ("HIVE", "ADDRESS", "HEALTH", "BEAT", "WORKERS", "SLOTS USED", "LOAD/CPUS",
               "MEM FREE", "SPAWN/CRASH/RESTART", "UP", "REASON")  # fmt: skip
    return table(headers, rows, ("ADDRESS", "REASON"), width)


def model_rows(models: Sequence[queen_pb2.ModelInfo], width: int | None = None) -> str:
    return table(
        ("MODEL", "TASK", "CONTEXT", "IDLE", "BUSY", "LOADING", "FAILED", "QUEUED", "HIVES"),
        [
            (
                m.name,
                task_label(m.task),
                m.context_length or "-",
                m.idle,
                m.busy,
                m.loading,
                m.failed,
                m.queued,
                ",".join(m.hives) or "-",
            )
            for m in models
        ],
        ("HIVES",),
        width,
    )


def task_label(task: common_pb2.WorkerTask.ValueType) -> str:
    """What a model's workers serve: 'chat', 'embed', or '-' before any says."""
    return {common_pb2.WORKER_TASK_GENERATE: "chat", common_pb2.WORKER_TASK_EMBED: "embed"}.get(
        task, "-"
    )


def worker_details(worker: common_pb2.WorkerRecord) -> str:
    s = worker.stats
    return fields([
        ("id", worker.id), ("hive", f"{worker.hive_id} ({health_name(worker.hive_health)}, "
                                    f"heartbeat {worker.heartbeat_age_seconds:.1f}s ago)"),
        ("model", worker.model), ("backend", worker.backend), ("device", worker.device),
        ("state", state_label(worker)), ("doing", worker.status_detail or "-"),
        ("slots", f"{worker.slots_available} free of {worker.slots_total}"),
        ("pid", worker.pid or "-"), ("address", worker.address or "-"),
        ("tags", ", ".join(worker.tags) or "-"), ("routing", worker_flags(worker) or "open"),
        ("started", age(worker.started_at.seconds) + " ago"),
        ("last activity", age(worker.last_activity.seconds) + " ago"),
        ("requests", f"{worker.requests_completed} completed, {worker.requests_failed} failed"),
        ("success rate", f"{s.success_rate:.1%}"),
        ("duration", f"mean {s.mean_duration_seconds:.3f}s, p50 {s.p50_duration_seconds:.3f}s"),
        ("tokens/s", f"{s.tokens_per_second:.1f}"), ("score", f"{s.score:.3f}"),
        ("options", ", ".join(f"{k}={v}" for k, v in sorted(worker.backend_options.items()))),
        ("restart policy", policy_name(worker.restart_policy)),
        ("restarts", worker.restart_count),
        ("restart in", f"{worker.restart_in_seconds:.1f}s" if worker.restart_in_seconds else "-"),
        ("health fails", worker.health_failures),
        ("cpu / rss", f"{worker.cpu_percent:.0f}% / {worker.rss_bytes / 2**20:.0f} MiB"),
        ("prompt cache", prompt_cache_text(worker)),
        ("failure", worker.failure_reason or "-"),
    ])  # fmt: skip


def prompt_cache_text(worker: common_pb2.WorkerRecord) -> str:
    """Prompts held and how often requests reused a computed prefix ('-': none kept)."""
    if not worker.HasField("prefix_cache"):
        return "-"
    cache = worker.prefix_cache
    hits = f"{cache.hits / cache.requests:.0%}" if cache.requests else "-"
    reused = (
        f"{cache.cached_prompt_tokens / cache.prompt_tokens:.0%}" if cache.prompt_tokens else "-"
    )
    size = f", {cache.state_bytes / 2**20:.0f} MiB" if cache.state_bytes else ""
    return (
        f"{cache.states} prompt(s) held{size}; "
        f"hit ratio {hits} of {cache.requests} request(s), {reused} of prompt tokens reused; "
        f"{len(cache.blocks)} prefix block(s) held"
    )


def process_details(process: hive_pb2.WorkerProcess) -> str:
    return fields([
        ("pid", process.pid), ("worker", process.worker_id), ("hive", process.hive_id),
        ("model", process.model), ("backend", process.backend), ("status", process.status),
        ("cpu", f"{process.cpu_percent:.0f}%"), ("rss", f"{process.rss_bytes / 2**20:.0f} MiB"),
        ("age", f"{process.age_seconds:.0f}s"),
        ("in table", "yes" if process.known else "no (orphan)"),
        ("owner", enum_text(hive_pb2.ProcessOwner.DESCRIPTOR, process.owner)),
        ("cmdline", " ".join(process.cmdline)),
    ])  # fmt: skip


def process_rows(processes: Sequence[hive_pb2.WorkerProcess]) -> str:
    rows = [
        (p.pid, p.worker_id, p.model, p.backend, f"{p.cpu_percent:.0f}%",
         f"{p.rss_bytes / 2**20:.0f}M", f"{p.age_seconds:.0f}s", p.status,
         "yes" if p.known else "ORPHAN")
        for p in processes
    ]  # fmt: skip
    return table(
        ("PID", "WORKER", "MODEL", "BACKEND", "CPU", "RSS", "AGE", "STATUS", "IN TABLE"), rows
    )


def backend_rows(backends: Sequence[hive_pb2.BackendInfo], width: int | None = None) -> str:
    rows = [
        (b.name, "yes" if b.available else "no", b.version or "-", ",".join(b.devices) or "-",
         "tests/benchmarks only" if b.for_testing else "", b.unavailable_reason)
        for b in backends
    ]  # fmt: skip
    headers = ("BACKEND", "AVAILABLE", "VERSION", "DEVICES", "NOTE", "WHY NOT")
    return table(headers, rows, ("DEVICES", "WHY NOT"), width)


def event_line(event: queen_pb2.Event) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(event.time.seconds))
    when += f".{event.time.nanos // 1_000_000:03d}"
    kind = enum_text(queen_pb2.EventKind.DESCRIPTOR, event.kind)
    parts = [when, f"{kind:<22}"]
    for key, value in (("hive", event.hive_id), ("worker", event.worker_id),
                       ("model", event.model), ("request", event.request_id),
                       ("ref", event.client_request_id)):  # fmt: skip
        if value:
            parts.append(f"{key}={value}")
    if event.state:
        previous = f"{state_name(event.previous_state)}->" if event.previous_state else ""
        parts.append(f"state={previous}{state_name(event.state)}")
    if event.health:
        parts.append(f"health={health_name(event.health)}")
    if event.duration_seconds:
        parts.append(f"duration={event.duration_seconds * 1000:.1f}ms")
    if event.detail:
        parts.append(f"({event.detail})")
    return inert_cell(" ".join(parts))  # one line, whatever a hive put in it


def request_rows(records: Sequence[queen_pb2.RequestRecord], width: int | None = None) -> str:
    def took(r: queen_pb2.RequestRecord) -> str:
        if not r.finished_at.seconds:
            return "-"
        seconds = (r.finished_at.ToNanoseconds() - r.accepted_at.ToNanoseconds()) / 1e9
        return f"{seconds * 1000:.0f}ms"

    rows = [
        (r.id, r.client_request_id or "-", r.client or "-", r.model,
         enum_text(queen_pb2.RequestStatus.DESCRIPTOR, r.status),
         enum_text(common_pb2.RoutingPolicy.DESCRIPTOR, r.policy) if r.policy else "-",
         r.worker_id or "-", r.hive_id or "-", age(r.accepted_at.seconds) + " ago", took(r),
         r.completion_tokens, r.attempts, r.error)
        for r in records
    ]  # fmt: skip
    headers = ("REQUEST", "CLIENT REF", "CLIENT", "MODEL", "STATUS", "POLICY", "WORKER", "HIVE",
               "ACCEPTED", "TOOK", "TOKENS", "ATTEMPTS", "ERROR")  # fmt: skip
    return table(headers, rows, ("CLIENT REF", "CLIENT", "ERROR"), width)


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def catalog_rows(models: Sequence[hive_pb2.CatalogModel], width: int | None = None) -> str:
    rows = [
        (m.name, m.backend, m.file, mib(m.size_bytes), m.sha256[:12], age(m.added_at.seconds),
         ",".join(m.used_by) or "-", m.source)
        for m in models
    ]  # fmt: skip
    headers = ("MODEL", "BACKEND", "FILE", "SIZE", "SHA256", "ADDED", "USED BY", "SOURCE")
    return table(headers, rows, ("FILE", "USED BY", "SOURCE"), width)


def catalog_details(model: hive_pb2.CatalogModel) -> str:
    return fields([
        ("name", model.name), ("backend", model.backend), ("file", model.file),
        ("path", model.path), ("size", f"{mib(model.size_bytes)} ({model.size_bytes} bytes)"),
        ("sha256", model.sha256), ("source", model.source),
        ("added", age(model.added_at.seconds) + " ago"),
        ("used by", ", ".join(model.used_by) or "-"),
    ])  # fmt: skip


def progress_bar(update: hive_pb2.PullProgress, width: int = 30) -> str:
    if update.bytes_total:
        fraction = min(update.bytes_done / update.bytes_total, 1.0)
        bar = "#" * int(fraction * width)
        head = (
            f"[{bar:<{width}}] {fraction:4.0%} {mib(update.bytes_done)}/{mib(update.bytes_total)}"
        )
    else:
        head = f"[{'?' * width}] {mib(update.bytes_done)}"
    return f"{head} {mib(int(update.bytes_per_second))}/s {update.stage:<24}"


class PullProgressLines:
    """What `model pull` shows of each progress update: on a terminal one bar redrawn in place;
    elsewhere (a pipe, a log file) a plain line at each 10 % step, at each new stage, and every
    `every_seconds` when the size is unknown."""

    def __init__(
        self, live: bool, every_seconds: float = 5.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.live = live
        self.every_seconds = every_seconds
        self.clock = clock
        self.drawn = False
        self.step = -1
        self.stage = ""
        self.printed_at = -float("inf")

    def update(self, update: hive_pb2.PullProgress) -> tuple[str, str] | None:
        """(text, end) to print, or None."""
        bar = progress_bar(update)
        if self.live:
            self.drawn = True
            return "\r" + bar, ""
        now = self.clock()
        if update.bytes_total:
            step = min(update.bytes_done * 10 // update.bytes_total, 10)
            due = step > self.step
        else:
            step, due = -1, now - self.printed_at >= self.every_seconds
        if not due and update.stage == self.stage:
            return None
        self.step, self.stage, self.printed_at = step, update.stage, now
        return bar.rstrip(), "\n"

    def finish(self) -> tuple[str, str] | None:
        """The newline that ends a redrawn bar."""
        return ("", "\n") if self.drawn else None


def count_by(enum: EnumDescriptor, numbers: Sequence[int]) -> dict[str, int]:
    """{name: count} with every known value (zeros included), and any other value seen."""
    counts = {enum_text(enum, value.number): 0 for value in enum.values if value.number}
    for number in numbers:
        name = enum_text(enum, number)
        counts[name] = counts.get(name, 0) + 1
    return counts


def routable_worker(w: common_pb2.WorkerRecord) -> bool:
    return (
        w.state in READY_STATES
        and not w.drained
        and w.hive_health != common_pb2.HIVE_HEALTH_UNHEALTHY
        and not w.circuit_open_seconds
    )


@dataclass(frozen=True)
class ClusterStatus:
    """What `apiary status` reads: the queen (its address and own status) and its tables."""

    address: str
    queen: queen_pb2.QueenStatus
    hives: Sequence[queen_pb2.HiveInfo] = ()
    workers: Sequence[common_pb2.WorkerRecord] = ()
    models: Sequence[queen_pb2.ModelInfo] = ()


def status_summary(cluster: ClusterStatus) -> dict[str, Any]:
    """The cluster at a glance, as `status` prints it and as its JSON `summary`. Request
    totals are the queen's own since it started (workers come and go with theirs)."""
    hives, workers, queen = cluster.hives, cluster.workers, cluster.queen
    # Capacity is what can be routed to: not failed, loading, stopping, drained or unreachable.
    routable = [w for w in workers if routable_worker(w)]
    done, failed = queen.requests_completed, queen.requests_failed
    top = sorted((w for w in workers if w.state in READY_STATES), key=lambda w: -w.stats.score)
    return {
        "queen": cluster.address,
        "degraded": queen.degraded,
        "hives": {
            "total": len(hives),
            "by_health": count_by(common_pb2.HiveHealth.DESCRIPTOR, [h.health for h in hives]),
        },
        "workers": {
            "total": len(workers),
            "by_state": count_by(common_pb2.WorkerState.DESCRIPTOR, [w.state for w in workers]),
        },
        "capacity": {
            "slots_total": sum(w.slots_total for w in routable),
            "slots_in_use": sum(w.slots_total - w.slots_available for w in routable),
        },
        "queued": {m.name: m.queued for m in cluster.models},
        "requests": {
            "since": queen.started_at.ToJsonString() if queen.HasField("started_at") else None,
            "completed": done,
            "failed": failed,
            "cancelled": queen.requests_cancelled,
            "refused": queen.requests_refused,
            "success_rate": done / (done + failed) if done + failed else None,
        },
        "top_workers": [{"id": w.id, "score": w.stats.score} for w in top[:5]],
        # A problem of the queen's own has "hive": null.
        "problems": [{"hive": None, "problem": p} for p in queen.problems]
        + [{"hive": h.id, "problem": p} for h in hives for p in h.problems],
    }


def counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {name.lower()}" for name, n in sorted(counts.items()) if n) or "none"


def summary_text(summary: dict[str, Any]) -> list[str]:
    hives, workers, capacity = summary["hives"], summary["workers"], summary["capacity"]
    requests = summary["requests"]
    rate = requests["success_rate"]
    queued = ", ".join(f"{name} {n}" for name, n in summary["queued"].items() if n) or "none"
    lines = [
        f"queen {summary['queen']}" + (" DEGRADED" if summary["degraded"] else ""),
        f"hives     {hives['total']}: {counts_text(hives['by_health'])}",
        f"workers   {workers['total']}: {counts_text(workers['by_state'])}",
        f"capacity  {capacity['slots_in_use']}/{capacity['slots_total']} slots in use",
        f"queued    {queued}",
        f"requests  {requests['completed']} completed, {requests['failed']} failed, "
        f"{requests['cancelled']} cancelled, {requests['refused']} refused "
        f"(success {'-' if rate is None else f'{rate:.1%}'}) since the queen started",
    ]
    if summary["top_workers"]:
        top = ", ".join(f"{w['id']} ({w['score']:.2f})" for w in summary["top_workers"])
        lines.append(f"top       {top}")
    lines += [
        inert_cell(
            f"PROBLEM   {'queen' if p['hive'] is None else 'hive ' + p['hive']}: {p['problem']}"
        )
        for p in summary["problems"]
    ]
    return lines


def status_text(cluster: ClusterStatus, width: int | None = None) -> str:
    """The cluster at a glance (health, states, capacity, queues, requests, top workers),
    then the hive, worker and model tables."""
    lines = summary_text(status_summary(cluster))
    lines += [
        "",
        hive_rows(cluster.hives, width) if cluster.hives else "no hives",
        "",
        worker_rows(cluster.workers, width) if cluster.workers else "no workers",
        "",
        model_rows(cluster.models, width) if cluster.models else "no models",
    ]
    return "\n".join(lines)


def hive_details(reply: queen_pb2.GetHiveResponse) -> str:
    """The hive's whole row (nothing cut: this is the `get` view), then its workers."""
    workers = worker_rows(reply.workers) if reply.workers else "no workers"
    return f"{hive_rows([reply.hive], width=0)}\n\n{workers}"


def backend_details(backend: hive_pb2.BackendInfo) -> str:
    options = [f"  option {name}: {text}" for name, text in sorted(backend.options.items())]
    return "\n".join([backend_rows([backend], width=0), *options])


def infer_summary(last: common_pb2.InferChunk) -> str:
    reason = enum_text(common_pb2.FinishReason.DESCRIPTOR, last.finish_reason)
    return f"[{last.completion_tokens} tokens, finish={reason}]"
