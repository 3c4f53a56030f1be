"""The queen's Prometheus metrics: requests, latency, tokens, queues, workers, heartbeats, and
the request history's dropped rows."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from apiary.metrics import SnapshotCollector
from apiary.protoutil import READY_STATES, health_name, state_name
from queen.history import History
from queen.registry import Registry
from queen.scheduler import Scheduler

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class QueenMetrics:
    def __init__(
        self, registry: Registry, scheduler: Scheduler, history: History | None = None
    ) -> None:
        self.prometheus = CollectorRegistry()
        r = self.prometheus
        self.requests = Counter(
            "apiary_requests",
            "Requests the queen finished, by status: completed, failed, cancelled (the call was "
            "cancelled), deadline_exceeded",
            ["model", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "apiary_time_to_first_token_seconds",
            "From accepting a request to sending its first chunk (queueing included)",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "apiary_request_duration_seconds", "From accepting a request to its end",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            "apiary_completion_tokens", "Completion tokens relayed (rate() is tokens/s)",
            ["model"], registry=r,
        )  # fmt: skip
        self.tokens_per_second = Histogram(
            "apiary_request_tokens_per_second", "Completion tokens per second, per request",
            ["model"], buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 5000), registry=r,
        )  # fmt: skip
        self.heartbeats = Counter("apiary_heartbeats", "Heartbeats received", registry=r)
        self.failovers = Counter(
            "apiary_failovers", "Requests retried on another worker before their first chunk",
            ["model"], registry=r,
        )  # fmt: skip
        r.register(SnapshotCollector(lambda: self._snapshot(registry, scheduler)))
        if history is not None:
            r.register(SnapshotCollector(lambda: history_metrics(history)))

    def finished(
        self, model: str, status: str, seconds: float, ttft: float | None, tokens: int
    ) -> None:
        self.requests.labels(model, status).inc()
        self.duration.labels(model).observe(seconds)
        if ttft is not None:
            self.ttft.labels(model).observe(ttft)
        if tokens:
            self.tokens.labels(model).inc(tokens)
            if seconds > 0:
                self.tokens_per_second.labels(model).observe(tokens / seconds)

    @staticmethod
    def _snapshot(registry: Registry, scheduler: Scheduler) -> Iterable[Metric]:
        workers = GaugeMetricFamily(
            "apiary_workers",
            "Workers by model and state, as the queen sees them",
            labels=["model", "state"],
        )
        counts: Tally[tuple[str, str]] = Tally()
        for entry in registry.workers.values():
            state = entry.record.state
            if state in READY_STATES:
                name = "BUSY" if entry.in_flight else "IDLE"
            else:
                name = state_name(state)
            counts[(entry.record.model, name)] += 1
        for (model, label), n in sorted(counts.items()):
            workers.add_metric([model, label], n)
        yield workers
        queue = GaugeMetricFamily(
            "apiary_queue_depth", "Requests waiting for a slot", labels=["model"]
        )
        for model in registry.models():
            queue.add_metric([model], scheduler.queue_depth(model))
        yield queue
        hives = GaugeMetricFamily("apiary_hives", "Hives by health", labels=["health"])
        health = Tally(health_name(registry.health_of(h)) for h in registry.hives.values())
        for name, n in sorted(health.items()):
            hives.add_metric([name], n)
        yield hives
        restarts = GaugeMetricFamily(
            "apiary_hive_worker_restarts", "Worker restarts each hive reported", labels=["hive"]
        )
        crashes = GaugeMetricFamily(
            "apiary_hive_worker_crashes", "Worker crashes each hive reported", labels=["hive"]
        )
        for hive in registry.hives.values():
            restarts.add_metric([hive.id], hive.stats.restarts)
            crashes.add_metric([hive.id], hive.stats.crashes)
        yield restarts
        yield crashes


def history_metrics(history: History) -> Iterable[Metric]:
    """Read from the history's own counts (its writer thread keeps them)."""
    yield CounterMetricFamily(
        "apiary_history_rows_dropped",
        "History rows the queen could not write (a full disk, an unwritable file); the "
        "requests themselves were unaffected",
        value=history.drops.total,
    )
    yield GaugeMetricFamily(
        "apiary_history_degraded",
        "1 while the request history is degraded (a write failed within the last minute)",
        value=1 if history.drops.degraded() else 0,
    )
