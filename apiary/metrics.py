"""Serving Prometheus text metrics from a process's own registry (queen, hive)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import Metric
from prometheus_client.registry import Collector


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
