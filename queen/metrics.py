"""The queen's Prometheus metrics: requests and leases by gRPC status code, latency, queue
waits, tokens, queues, workers, hives, heartbeats, and the request history's dropped rows.

Prometheus conventions: one name and type per quantity, counters end in `_total`, every state
a gauge counts is reported (0 included), label values stay bounded: a model name that no
worker or catalog has is counted as `other`.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from apiary.metrics import SnapshotCollector, hive_counters
from apiary.protoutil import health_name, state_name
from protos.v1 import common_pb2, queen_pb2
from queen.history import History
from queen.members import live_state
from queen.registry import Registry
from queen.routing.desk import Desk

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# The model label of a request for a model the cluster has never heard of.
OTHER_MODEL = "other"
WORKER_STATES = tuple(
    state_name(value) for value in common_pb2.WorkerState.values() if value
)  # LOADING, IDLE, BUSY, STOPPING, FAILED
HIVE_HEALTHS = tuple(health_name(value) for value in common_pb2.HiveHealth.values() if value)


@dataclass(frozen=True)
class Usage:
    """A request's tokens: its prompt's, how many of those a worker had cached, its
    completion's."""

    prompt: int = 0
    cached: int = 0
    completion: int = 0


# How requests ended, as `apiary status` totals them: a client's cancel is not a failure,
# and a request the queen never took was refused (its own count).
COMPLETED, FAILED, CANCELLED, REFUSED = "completed", "failed", "cancelled", "refused"


def outcome(code: str) -> str:
    """A taken request's outcome by the code it ended with."""
    if code == "OK":
        return COMPLETED
    return CANCELLED if code == "CANCELLED" else FAILED


class QueenMetrics:
    def __init__(self, registry: Registry, desk: Desk, history: History | None = None) -> None:
        self.registry = registry
        self.prometheus = CollectorRegistry()
        r = self.prometheus
        self.requests = Counter(
            "apiary_requests",
            "Infer requests by how they ended, as the gRPC status code the client got (OK, "
            "CANCELLED, NOT_FOUND, ...); refused ones included",
            ["model", "code"], registry=r,
        )  # fmt: skip
        self.leases = Counter(
            "apiary_leases", "Lease calls by the gRPC status code the client got",
            ["model", "code"], registry=r,
        )  # fmt: skip
        self.embeds = Counter(
            "apiary_embed_requests", "Embed requests by the gRPC status code the client got "
            "(refused ones included)", ["model", "code"], registry=r,
        )  # fmt: skip
        self.embedded_texts = Counter(
            "apiary_embedded_texts", "Texts embedded", ["model"], registry=r
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
        self.queue_wait = Histogram(
            "apiary_queue_wait_seconds",
            "How long a request or lease waited for a free slot (0 when one was free)",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self._token_counters(r)
        self.tokens_per_second = Histogram(
            "apiary_request_tokens_per_second", "Completion tokens per second, per request",
            ["model"], buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 5000), registry=r,
        )  # fmt: skip
        self.heartbeats = Counter("apiary_heartbeats", "Heartbeats received", registry=r)
        self.failovers = Counter(
            "apiary_failovers", "Requests retried on another worker before their first chunk",
            ["model"], registry=r,
        )  # fmt: skip
        self.migrations = Counter(
            "apiary_migrations",
            "Streams moved mid-stream to another worker, continuing from the token reached",
            ["model"], registry=r,
        )  # fmt: skip
        # Requests by outcome since this queen started (`apiary status` reads them).
        self.outcomes: Tally[str] = Tally()
        self.started_at = time.time()
        # Told of every request's end (ok, time to first chunk): the dashboard's chart.
        self.on_finished: list[Callable[[bool, float | None], None]] = []
        r.register(SnapshotCollector(lambda: cluster_metrics(registry, desk)))
        r.register(SnapshotCollector(self._hit_ratio))
        if history is not None:
            r.register(SnapshotCollector(lambda: history_metrics(history)))

    def _token_counters(self, r: CollectorRegistry) -> None:
        self.prompt_tokens = Counter(
            "apiary_prompt_tokens", "Prompt tokens of finished requests", ["model"], registry=r
        )
        self.cached_prompt_tokens = Counter(
            "apiary_cached_prompt_tokens",
            "Prompt tokens a worker had already computed (its prefix cache) and so skipped",
            ["model"], registry=r,
        )  # fmt: skip
        self.cache_hits = Counter(
            "apiary_prompt_cache_hits",
            "Finished requests whose worker reused a computed prefix of their prompt",
            ["model"], registry=r,
        )  # fmt: skip
        # Prompt and cached prompt tokens per model, for the hit ratio gauge.
        self._prompt_totals: dict[str, list[int]] = {}
        self.completion_tokens = Counter(
            "apiary_completion_tokens", "Completion tokens relayed (rate() is tokens/s)",
            ["model"], registry=r,
        )  # fmt: skip

    def model_label(self, model: str) -> str:
        """The model as a label value: `other` unless a worker or a catalog has it, so a
        client cannot grow the label set with made-up names."""
        known = self.registry.has_model(model) or model in self.registry.catalog_models()
        return model if known else OTHER_MODEL

    def _hit_ratio(self) -> Iterable[Metric]:
        ratio = GaugeMetricFamily(
            "apiary_prompt_cache_hit_ratio",
            "Share of prompt tokens that workers reused from a computed prefix instead of "
            "computing them (0-1, since the queen started)",
            labels=["model"],
        )
        for model, (prompt, cached) in sorted(self._prompt_totals.items()):
            ratio.add_metric([model], cached / prompt if prompt else 0.0)
        yield ratio

    def embedded(self, model: str, code: str, texts: int = 0) -> None:
        """An Embed request, at its end (or refused)."""
        label = self.model_label(model)
        self.embeds.labels(label, code).inc()
        if texts:
            self.embedded_texts.labels(label).inc(texts)

    def refused(self, model: str, code: str) -> None:
        """An Infer request the queen did not take (unknown model, bad field, full queue)."""
        self.requests.labels(self.model_label(model), code).inc()
        self.outcomes[REFUSED] += 1

    def finished(
        self, model: str, code: str, seconds: float, ttft: float | None, usage: Usage
    ) -> None:
        """A request the queen took, at its end."""
        label = self.model_label(model)
        self.requests.labels(label, code).inc()
        ended = outcome(code)
        self.outcomes[ended] += 1
        for listener in self.on_finished:
            listener(ended != FAILED, ttft)
        self.duration.labels(label).observe(seconds)
        if ttft is not None:
            self.ttft.labels(label).observe(ttft)
        if usage.prompt:
            self.prompt_tokens.labels(label).inc(usage.prompt)
            totals = self._prompt_totals.setdefault(label, [0, 0])
            totals[0] += usage.prompt
            totals[1] += usage.cached
        if usage.cached:
            self.cached_prompt_tokens.labels(label).inc(usage.cached)
            self.cache_hits.labels(label).inc()
        if usage.completion:
            self.completion_tokens.labels(label).inc(usage.completion)
            if seconds > 0:
                self.tokens_per_second.labels(label).observe(usage.completion / seconds)

    def status(self, into: queen_pb2.QueenStatus) -> queen_pb2.QueenStatus:
        """The request totals since the queen started, added to its status."""
        into.started_at.FromNanoseconds(int(self.started_at * 1e9))
        into.requests_completed = self.outcomes[COMPLETED]
        into.requests_failed = self.outcomes[FAILED]
        into.requests_cancelled = self.outcomes[CANCELLED]
        into.requests_refused = self.outcomes[REFUSED]
        return into


def cluster_metrics(registry: Registry, desk: Desk) -> Iterable[Metric]:
    """Gauges of the live registry, read at scrape time."""
    yield worker_gauge(registry)
    queue = GaugeMetricFamily("apiary_queue_depth", "Requests waiting for a slot", labels=["model"])
    for model in registry.models():
        queue.add_metric([model], desk.queue_depth(model))
    yield queue
    hives = GaugeMetricFamily("apiary_hives", "Hives by health", labels=["health"])
    health = Tally(health_name(registry.health_of(h)) for h in registry.hives.values())
    for name in HIVE_HEALTHS:
        hives.add_metric([name], health[name])
    yield hives
    yield from hive_counters(
        (hive.id, hive.stats.spawns, hive.stats.crashes, hive.stats.restarts)
        for hive in registry.hives.values()
    )


def worker_gauge(registry: Registry) -> Metric:
    """Workers by model and every state (0 included); IDLE and BUSY as the queen's slots
    see them."""
    workers = GaugeMetricFamily(
        "apiary_workers", "Workers by model and state, as the queen sees them",
        labels=["model", "state"],
    )  # fmt: skip
    counts: Tally[tuple[str, str]] = Tally()
    for entry in registry.workers.values():
        counts[(entry.record.model, state_name(live_state(entry)))] += 1
    for model in registry.models():
        for name in WORKER_STATES:
            workers.add_metric([model, name], counts[(model, name)])
    return workers


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
