"""The hive's Prometheus metrics: its workers by state, its supervision counters (under the
names and type the queen serves them for every hive), and each worker's memory and CPU."""

from __future__ import annotations

import os
from collections import Counter as Tally
from collections.abc import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric

from apiary.metrics import SnapshotCollector, hive_counters
from apiary.protoutil import state_name
from hive.records import hive_stats
from hive.supervisor import Supervisor
from protos.v1 import common_pb2

WORKER_STATES = tuple(state_name(value) for value in common_pb2.WorkerState.values() if value)


def hive_metrics(supervisor: Supervisor) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(lambda: _snapshot(supervisor)))
    return registry


def _snapshot(supervisor: Supervisor) -> Iterable[Metric]:
    yield worker_gauge(supervisor)
    yield from hive_counters(
        [(supervisor.hive_id, supervisor.spawns, supervisor.crashes, supervisor.restarts_done)]
    )
    uptime = GaugeMetricFamily("apiary_hive_uptime_seconds", "Seconds since the hive started")
    uptime.add_metric([], hive_stats(supervisor).uptime_seconds)
    yield uptime
    yield from usage_gauges(supervisor)


def worker_gauge(supervisor: Supervisor) -> Metric:
    """Workers by model and every state (0 included) for each model the hive runs."""
    workers = GaugeMetricFamily(
        "apiary_hive_workers", "Workers by model and state", labels=["model", "state"]
    )
    counts = Tally((w.spec.model, state_name(w.state)) for w in supervisor.workers.values())
    for model in sorted({w.spec.model for w in supervisor.workers.values()}):
        for state in WORKER_STATES:
            workers.add_metric([model, state], counts[(model, state)])
    return workers


def usage_gauges(supervisor: Supervisor) -> Iterable[Metric]:
    rss = GaugeMetricFamily(
        "apiary_hive_worker_rss_bytes", "Resident memory per worker", labels=["worker"]
    )
    cpu = GaugeMetricFamily(
        "apiary_hive_worker_cpu_ratio",
        "Share of the machine's CPU each worker used over the last health interval (0-1)",
        labels=["worker"],
    )
    cores = os.cpu_count() or 1
    for worker in supervisor.workers.values():
        rss.add_metric([worker.id], worker.rss_bytes)
        cpu.add_metric([worker.id], worker.cpu_percent / 100 / cores)
    return (rss, cpu)
