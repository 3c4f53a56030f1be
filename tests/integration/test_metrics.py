"""Prometheus metrics from a real queen and hive, scraped over HTTP: every name and type as
the list below says (one name and type per quantity, counters ending in _total), requests
counted by gRPC code with refused ones under a bounded model label, and the queen's request
totals in `ListHives`."""

from __future__ import annotations

import asyncio
import urllib.request
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import Cluster, wait_until
from harness.ports import free_port
from protos.v1 import common_pb2, queen_pb2

# Every metric family each server serves, with its type: a new metric is added here on purpose.
QUEEN_FAMILIES = {
    "apiary_requests": "counter",
    "apiary_leases": "counter",
    "apiary_embed_requests": "counter",
    "apiary_embedded_texts": "counter",
    "apiary_time_to_first_token_seconds": "histogram",
    "apiary_request_duration_seconds": "histogram",
    "apiary_queue_wait_seconds": "histogram",
    "apiary_prompt_tokens": "counter",
    "apiary_cached_prompt_tokens": "counter",
    "apiary_prompt_cache_hits": "counter",
    "apiary_prompt_cache_hit_ratio": "gauge",
    "apiary_completion_tokens": "counter",
    "apiary_request_tokens_per_second": "histogram",
    "apiary_heartbeats": "counter",
    "apiary_failovers": "counter",
    "apiary_migrations": "counter",
    "apiary_workers": "gauge",
    "apiary_queue_depth": "gauge",
    "apiary_hives": "gauge",
    "apiary_hive_spawns": "counter",
    "apiary_hive_crashes": "counter",
    "apiary_hive_restarts": "counter",
    "apiary_history_rows_dropped": "counter",
    "apiary_history_degraded": "gauge",
}
HIVE_FAMILIES = {
    "apiary_hive_workers": "gauge",
    "apiary_hive_spawns": "counter",
    "apiary_hive_crashes": "counter",
    "apiary_hive_restarts": "counter",
    "apiary_hive_uptime_seconds": "gauge",
    "apiary_hive_worker_rss_bytes": "gauge",
    "apiary_hive_worker_cpu_ratio": "gauge",
}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> tuple[dict[str, str], Samples, dict[str, set[str]]]:
    """Family types by name, samples, and the label names each sample name carries."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    types: dict[str, str] = {}
    samples: Samples = {}
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
            labels.setdefault(sample.name, set()).update(sample.labels)
    return types, samples, labels


def check_conventions(types: dict[str, str], samples: Samples) -> None:
    """Counters' samples end in _total, and nothing but our own families is served."""
    for name, _ in samples:
        family = next(f for f in types if name == f or name.startswith(f + "_"))
        if types[family] == "counter":
            assert name == f"{family}_total", name
        assert not name.endswith("_created"), name


async def test_names_types_codes_tokens_and_totals(cluster: Cluster) -> None:
    queen_port, hive_port = free_port(), free_port()
    queen = cluster.start_queen(0, "--metrics-port", str(queen_port), "--default-max-tokens", "7")
    cluster.start_hive(
        queen, "mx-h1", "model=demo,count=2,token_delay=0.01",
        extra=("--metrics-port", str(hive_port)),
    )  # fmt: skip
    await cluster.wait_workers(queen, "demo", 2)
    stub = cluster.queen_stub(queen)

    async def one(max_tokens: int) -> list[common_pb2.InferChunk]:
        request = common_pb2.InferRequest(model="demo", prompt="a b c", max_tokens=max_tokens)
        return [c async for c in stub.Infer(request, timeout=20)]

    # Six with max_tokens, two without: those get the queen's --default-max-tokens.
    done = await asyncio.gather(*(one(5) for _ in range(6)), one(0), one(0))
    assert [c.completion_tokens for c in done[-1] if c.finish_reason] == [7]
    for model, code in [("no-such-model", grpc.StatusCode.NOT_FOUND),
                        ("demo", grpc.StatusCode.INVALID_ARGUMENT)]:  # fmt: skip
        invalid = code == grpc.StatusCode.INVALID_ARGUMENT
        bad = common_pb2.InferRequest(model=model, prompt="x", max_tokens=-1 if invalid else 1)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await one_call(stub, bad)
        assert refused.value.code() == code

    types, q, labels = await asyncio.to_thread(scrape, queen_port)
    assert types == QUEEN_FAMILIES
    check_conventions(types, q)
    assert labels["apiary_requests_total"] == {"model", "code"}
    assert q[("apiary_requests_total", (("code", "OK"), ("model", "demo")))] == 8
    # An unknown model is counted, under "other" so made-up names cannot grow the label set.
    assert q[("apiary_requests_total", (("code", "NOT_FOUND"), ("model", "other")))] == 1
    assert q[("apiary_requests_total", (("code", "INVALID_ARGUMENT"), ("model", "demo")))] == 1
    assert not any(dict(k[1]).get("model") == "no-such-model" for k in q)
    assert q[("apiary_completion_tokens_total", (("model", "demo"),))] == 6 * 5 + 2 * 7
    assert q[("apiary_prompt_tokens_total", (("model", "demo"),))] == 8 * 3
    assert q[("apiary_queue_wait_seconds_count", (("model", "demo"),))] == 8
    assert q[("apiary_time_to_first_token_seconds_count", (("model", "demo"),))] == 8
    # Every state reads, 0 included.
    states = {dict(k[1])["state"]: v for k, v in q.items() if k[0] == "apiary_workers"}
    assert states == {"LOADING": 0, "IDLE": 2, "BUSY": 0, "STOPPING": 0, "FAILED": 0}
    assert q[("apiary_hives", (("health", "UNHEALTHY"),))] == 0
    assert q[("apiary_hive_spawns_total", (("hive", "mx-h1"),))] == 2

    listed = await cluster.admin_stub(queen).ListHives(queen_pb2.ListHivesRequest(), timeout=5)
    totals = listed.queen
    assert (totals.requests_completed, totals.requests_cancelled) == (8, 0)
    # The unknown model: refused, or (asked while the new queen still waits for hives to
    # heartbeat in) accepted, then failed NOT_FOUND. The invalid request: refused.
    assert totals.requests_refused >= 1
    assert totals.requests_failed + totals.requests_refused == 2
    assert totals.HasField("started_at")

    async def hive_scrape() -> Any:
        scraped = await asyncio.to_thread(scrape, hive_port)
        idle = scraped[1].get(("apiary_hive_workers", (("model", "demo"), ("state", "IDLE"))))
        return scraped if idle == 2 else None

    hive_types, h, hive_labels = await wait_until(hive_scrape)
    assert hive_types == HIVE_FAMILIES
    check_conventions(hive_types, h)
    # One quantity, one name and type on both servers (and the same labels).
    for shared in set(hive_types) & set(types):
        assert hive_types[shared] == types[shared]
        assert hive_labels[shared + "_total"] == labels[shared + "_total"] == {"hive"}
    assert h[("apiary_hive_spawns_total", (("hive", "mx-h1"),))] == 2
    assert h[("apiary_hive_crashes_total", (("hive", "mx-h1"),))] == 0
    assert h[("apiary_hive_workers", (("model", "demo"), ("state", "FAILED")))] == 0
    cpu = [v for k, v in h.items() if k[0] == "apiary_hive_worker_cpu_ratio"]
    assert len(cpu) == 2 and all(0 <= v <= 1 for v in cpu)


async def one_call(stub: Any, request: common_pb2.InferRequest) -> None:
    async for _ in stub.Infer(request, timeout=10):
        pass
