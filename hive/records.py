"""The hive's workers and counters as protos, for the Hive service and heartbeats."""

from __future__ import annotations

from apiary.protoutil import READY_STATES, timestamp
from hive.managed import ManagedWorker
from hive.supervisor import Supervisor
from protos.v1 import common_pb2, queen_pb2


def worker_record(supervisor: Supervisor, worker: ManagedWorker) -> common_pb2.WorkerRecord:
    life = worker.life
    state = worker.state
    restart_in = 0.0
    if life.restart_at is not None:
        restart_in = max(life.restart_at - supervisor.clock.monotonic(), 0.0)
    ident = worker.identity
    loading = state == common_pb2.WORKER_STATE_LOADING
    return common_pb2.WorkerRecord(
        id=worker.id,
        hive_id=supervisor.hive_id,
        address=life.address,
        model=worker.spec.model,
        backend=worker.spec.backend,
        device=worker.spec.device,
        state=state,
        slots_total=worker.spec.slots,
        slots_available=worker.spec.slots if state == common_pb2.WORKER_STATE_IDLE else 0,
        pid=ident.pid if ident else 0,
        started_at=timestamp(worker.started_at),
        last_activity=timestamp(worker.last_activity if state in READY_STATES else 0.0),
        requests_completed=worker.requests_completed,
        requests_failed=worker.requests_failed,
        failure_reason=life.failure_reason,
        backend_options=worker.spec.backend_options,
        restart_policy=life.policy,
        restart_count=life.restart_count,
        cpu_percent=worker.cpu_percent,
        rss_bytes=worker.rss_bytes,
        health_failures=life.health.failures,
        restart_in_seconds=restart_in,
        tags=worker.spec.tags,
        load_progress=worker.load_progress if loading else 0.0,
        status_detail=worker.status_detail if loading else "",
        prefix_cache=worker.prefix_cache if state in READY_STATES else None,
        task=worker.task,
        context_length=worker.context_length,
        features=worker.features,
    )


def worker_records(supervisor: Supervisor) -> list[common_pb2.WorkerRecord]:
    return [worker_record(supervisor, w) for w in supervisor.workers.values()]


def heartbeat_table(
    supervisor: Supervisor,
) -> tuple[list[common_pb2.WorkerRecord], list[common_pb2.WorkerSample]]:
    """The table as a heartbeat carries it: records that change only when a worker does, and
    samples of what changes all the time (so the queen re-checks only real changes)."""
    records, samples = [], []
    for worker in supervisor.workers.values():
        record = worker_record(supervisor, worker)
        samples.append(
            common_pb2.WorkerSample(
                id=record.id,
                cpu_percent=record.cpu_percent,
                rss_bytes=record.rss_bytes,
                requests_completed=record.requests_completed,
                requests_failed=record.requests_failed,
                last_activity=record.last_activity,
                prefix_cache=record.prefix_cache if record.HasField("prefix_cache") else None,
            )
        )
        record.cpu_percent, record.rss_bytes = 0.0, 0
        record.requests_completed, record.requests_failed = 0, 0
        record.ClearField("last_activity")
        record.ClearField("prefix_cache")
        records.append(record)
    return records, samples


def hive_stats(supervisor: Supervisor) -> queen_pb2.HiveStats:
    return queen_pb2.HiveStats(
        spawns=supervisor.spawns,
        crashes=supervisor.crashes,
        restarts=supervisor.restarts_done,
        uptime_seconds=supervisor.clock.monotonic() - supervisor.started,
    )
