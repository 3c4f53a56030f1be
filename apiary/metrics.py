"""Serving Prometheus text metrics from a process's own registry (queen, hive)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, disable_created_metrics, start_http_server
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

# One series per counter: `_created` twins double every counter for no reader of ours.
disable_created_metrics()  # type: ignore[no-untyped-call]


@dataclass
class MetricsServer:
    server: WSGIServer
    port: int

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> MetricsServer:
    """Serve /metrics on host:port (0 = any free port) from a thread of its own."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server, server.server_port)


class SnapshotCollector(Collector):
    """Gauges read at scrape time from the live state (no bookkeeping on the hot path)."""

    def __init__(self, read: Callable[[], Iterable[Metric]]) -> None:
        self.read = read

    def collect(self) -> Iterable[Metric]:
        return list(self.read())


def publish(
    listen: str, metrics_port: int, registry: CollectorRegistry, log: Any
) -> MetricsServer | None:
    """Serve metrics on the listen host if a port was asked for (-1: no metrics)."""
    if metrics_port < 0:
        return None
    host = listen.rsplit(":", 1)[0] or "127.0.0.1"
    server = serve_metrics(registry, host, metrics_port)
    log.info("metrics served", url=f"http://{host}:{server.port}/metrics")
    return server


def hive_counters(hives: Iterable[tuple[str, int, int, int]]) -> Iterable[Metric]:
    """Each hive's supervision counters (hive id, spawns, crashes, restarts), by the names
    and type on the queen (every hive) and on each hive (its own)."""
    spawns = CounterMetricFamily("apiary_hive_spawns", HIVE_SPAWNS, labels=["hive"])
    crashes = CounterMetricFamily("apiary_hive_crashes", HIVE_CRASHES, labels=["hive"])
    restarts = CounterMetricFamily("apiary_hive_restarts", HIVE_RESTARTS, labels=["hive"])
    for hive, spawned, crashed, restarted in hives:
        spawns.add_metric([hive], spawned)
        crashes.add_metric([hive], crashed)
        restarts.add_metric([hive], restarted)
    return (spawns, crashes, restarts)


HIVE_SPAWNS = "Worker processes a hive started"
HIVE_CRASHES = "Worker exits no one asked for, and kills for health, on a hive"
HIVE_RESTARTS = "Workers a hive restarted by their restart policy"
