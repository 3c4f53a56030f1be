"""The hive's Prometheus metrics: its workers by state, and its supervision counters."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from apiary.metrics import SnapshotCollector
from apiary.protoutil import state_name
from hive.records import hive_stats
from hive.supervisor import Supervisor


def hive_metrics(supervisor: Supervisor) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(lambda: _snapshot(supervisor)))
    return registry


def _snapshot(supervisor: Supervisor) -> Iterable[Metric]:
    workers = GaugeMetricFamily(
        "apiary_hive_workers", "Workers by model and state", labels=["model", "state"]
    )
    for (model, state), n in sorted(
        Tally((w.spec.model, state_name(w.state)) for w in supervisor.workers.values()).items()
    ):
        workers.add_metric([model, state], n)
    yield workers
    for name, value, help_text in [
        ("apiary_hive_spawns", supervisor.spawns, "Worker processes started"),
        (
            "apiary_hive_crashes",
            supervisor.crashes,
            "Worker exits no one asked for, kills for health",
        ),
        ("apiary_hive_restarts", supervisor.restarts_done, "Workers restarted by their policy"),
    ]:
        counter = CounterMetricFamily(name, help_text)
        counter.add_metric([], value)
        yield counter
    uptime = GaugeMetricFamily("apiary_hive_uptime_seconds", "Seconds since the hive started")
    uptime.add_metric([], hive_stats(supervisor).uptime_seconds)
    yield uptime
    rss = GaugeMetricFamily(
        "apiary_hive_worker_rss_bytes", "Resident memory per worker", labels=["worker"]
    )
    cpu = GaugeMetricFamily("apiary_hive_worker_cpu_percent", "CPU % per worker", labels=["worker"])
    for worker in supervisor.workers.values():
        rss.add_metric([worker.id], worker.rss_bytes)
        cpu.add_metric([worker.id], worker.cpu_percent)
    yield rss
    yield cpu
