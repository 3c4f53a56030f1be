"""How the CLI shows things to people: tables, detail pages, event lines, progress (the JSON
form is `cli.emit`'s)."""

from __future__ import annotations

import collections
import time
from collections.abc import Sequence

from apiary.protoutil import READY_STATES, enum_name, health_name, state_name
from protos.v1 import common_pb2, hive_pb2, queen_pb2


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def fields(pairs: Sequence[tuple[str, object]]) -> str:
    return "\n".join(f"{key + ':':<16}{value}" for key, value in pairs)


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


def label(enum_name: str, prefix: str) -> str:
    """'ROUTING_POLICY_LEAST_LOADED' -> 'least-loaded'."""
    return enum_name.removeprefix(prefix).lower().replace("_", "-")


def policy_name(policy: common_pb2.RestartPolicy.ValueType) -> str:
    return (
        label(enum_name(common_pb2.RestartPolicy, policy, ""), "RESTART_POLICY_") if policy else "-"
    )


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


def worker_rows(workers: Sequence[common_pb2.WorkerRecord]) -> str:
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
    return table(headers, rows)


def hive_rows(hives: Sequence[queen_pb2.HiveInfo]) -> str:
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
    return table(headers, rows)


def model_rows(models: Sequence[queen_pb2.ModelInfo]) -> str:
    return table(
        ("MODEL", "IDLE", "BUSY", "LOADING", "FAILED", "QUEUED"),
        [(m.name, m.idle, m.busy, m.loading, m.failed, m.queued) for m in models],
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
        ("failure", worker.failure_reason or "-"),
    ])  # fmt: skip


def process_details(process: hive_pb2.WorkerProcess) -> str:
    return fields([
        ("pid", process.pid), ("worker", process.worker_id), ("hive", process.hive_id),
        ("model", process.model), ("backend", process.backend), ("status", process.status),
        ("cpu", f"{process.cpu_percent:.0f}%"), ("rss", f"{process.rss_bytes / 2**20:.0f} MiB"),
        ("age", f"{process.age_seconds:.0f}s"),
        ("in table", "yes" if process.known else "no (orphan)"),
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


def backend_rows(backends: Sequence[hive_pb2.BackendInfo]) -> str:
    rows = [
        (b.name, "yes" if b.available else "no", b.version or "-", ",".join(b.devices) or "-",
         "tests/benchmarks only" if b.for_testing else "", b.unavailable_reason)
        for b in backends
    ]  # fmt: skip
    return table(("BACKEND", "AVAILABLE", "VERSION", "DEVICES", "NOTE", "WHY NOT"), rows)


def event_line(event: queen_pb2.Event) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(event.time.seconds))
    when += f".{event.time.nanos // 1_000_000:03d}"
    kind = label(enum_name(queen_pb2.EventKind, event.kind, ""), "EVENT_KIND_")
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
    return " ".join(parts)


def request_rows(records: Sequence[queen_pb2.RequestRecord]) -> str:
    def took(r: queen_pb2.RequestRecord) -> str:
        if not r.finished_at.seconds:
            return "-"
        seconds = (r.finished_at.ToNanoseconds() - r.accepted_at.ToNanoseconds()) / 1e9
        return f"{seconds * 1000:.0f}ms"

    rows = [
        (r.id, r.client_request_id or "-", r.client or "-", r.model,
         label(enum_name(queen_pb2.RequestStatus, r.status, ""), "REQUEST_STATUS_"),
         r.worker_id or "-", r.hive_id or "-", age(r.accepted_at.seconds) + " ago", took(r),
         r.completion_tokens, r.attempts, r.error)
        for r in records
    ]  # fmt: skip
    headers = ("REQUEST", "CLIENT REF", "CLIENT", "MODEL", "STATUS", "WORKER", "HIVE", "ACCEPTED",
               "TOOK", "TOKENS", "ATTEMPTS", "ERROR")  # fmt: skip
    return table(headers, rows)


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def catalog_rows(models: Sequence[hive_pb2.CatalogModel]) -> str:
    rows = [
        (m.name, m.backend, m.file, mib(m.size_bytes), m.sha256[:12], age(m.added_at.seconds),
         ",".join(m.used_by) or "-", m.source)
        for m in models
    ]  # fmt: skip
    return table(("MODEL", "BACKEND", "FILE", "SIZE", "SHA256", "ADDED", "USED BY", "SOURCE"), rows)


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


def _counts(counter: collections.Counter[str]) -> str:
    return ", ".join(f"{n} {name.lower()}" for name, n in sorted(counter.items()))


def routable_worker(w: common_pb2.WorkerRecord) -> bool:
    return (
        w.state in READY_STATES
        and not w.drained
        and w.hive_health != common_pb2.HIVE_HEALTH_UNHEALTHY
        and not w.circuit_open_seconds
    )


def status_text(
    queen: str,
    hives: Sequence[queen_pb2.HiveInfo],
    workers: Sequence[common_pb2.WorkerRecord],
    models: Sequence[queen_pb2.ModelInfo],
) -> str:
    """The cluster at a glance (health, states, capacity, queues, success, top workers), then
    the hive, worker and model tables."""
    by_health = collections.Counter(health_name(h.health) for h in hives)
    by_state = collections.Counter(state_name(w.state) for w in workers)
    # Capacity is what can be routed to: not failed, loading, stopping, drained or unreachable.
    routable = [w for w in workers if routable_worker(w)]
    slots = sum(w.slots_total for w in routable)
    used = sum(w.slots_total - w.slots_available for w in routable)
    done = sum(w.requests_completed for w in workers)
    failed = sum(w.requests_failed for w in workers)
    rate = f"{done / (done + failed):.1%}" if done + failed else "-"
    queued = ", ".join(f"{m.name} {m.queued}" for m in models if m.queued) or "none"
    lines = [
        f"queen {queen}",
        f"hives     {len(hives)}: " + (_counts(by_health) or "none"),
        f"workers   {len(workers)}: " + (_counts(by_state) or "none"),
        f"capacity  {used}/{slots} slots in use",
        f"queued    {queued}",
        f"requests  {done} completed, {failed} failed (success {rate})",
    ]
    top = sorted((w for w in workers if w.state in READY_STATES), key=lambda w: -w.stats.score)[:5]
    if top:
        lines.append("top       " + ", ".join(f"{w.id} ({w.stats.score:.2f})" for w in top))
    lines += [f"PROBLEM   hive {h.id}: {problem}" for h in hives for problem in h.problems]
    lines += [
        "",
        hive_rows(hives) if hives else "no hives",
        "",
        worker_rows(workers) if workers else "no workers",
        "",
        model_rows(models) if models else "no models",
    ]
    return "\n".join(lines)


def hive_details(reply: queen_pb2.GetHiveResponse) -> str:
    workers = worker_rows(reply.workers) if reply.workers else "no workers"
    return f"{hive_rows([reply.hive])}\n\n{workers}"


def backend_details(backend: hive_pb2.BackendInfo) -> str:
    options = [f"  option {name}: {text}" for name, text in sorted(backend.options.items())]
    return "\n".join([backend_rows([backend]), *options])


def infer_summary(last: common_pb2.InferChunk) -> str:
    reason = enum_name(common_pb2.FinishReason, last.finish_reason, "FINISH_REASON_")
    return f"[{last.completion_tokens} tokens, finish={reason.lower()}]"
