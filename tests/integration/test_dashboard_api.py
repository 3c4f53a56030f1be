"""The dashboard's HTTP side on a real queen (in this process, so its subscriptions can be
counted) with a real hive process: the page and assets, the admin token, the data, the
event stream and what ends it, and the actions through the admin RPCs, refusals included.
Every refusal is a 4xx in the OpenAI error shape, never a traceback."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from apiary.security import Security, TokenSet
from harness import Cluster, wait_until
from protos.v1 import queen_pb2
from queen.server import Queen, QueenConfig, create_server

ADMIN, CLIENT = "dash-admin-token", "dash-client-token"
JSON = {"content-type": "application/json"}


async def start_queen(tmp_path: Path, tokens: TokenSet | None = None) -> tuple[Queen, str]:
    config = QueenConfig(heartbeat_interval=0.2, http_listen="127.0.0.1:0", state_dir=tmp_path)
    security = Security(tokens=tokens or TokenSet())
    queen = await create_server("127.0.0.1:0", config, security=security)
    assert queen.http is not None
    return queen, f"http://127.0.0.1:{queen.http.port}"


@pytest.fixture
async def open_queen(tmp_path: Path) -> AsyncIterator[tuple[Queen, httpx.AsyncClient]]:
    """A queen without tokens, and an HTTP client for its front."""
    queen, base = await start_queen(tmp_path)
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        try:
            yield queen, client
        finally:
            await queen.stop(1)


def error_of(response: httpx.Response, status: int) -> str:
    """The refusal's message, after checking its status and shape."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    return str(body["error"]["message"])


async def test_the_page_is_open_and_its_data_takes_the_admin_token(tmp_path: Path) -> None:
    queen, base = await start_queen(tmp_path, TokenSet(admin=ADMIN, client=CLIENT))
    try:
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            page = await client.get("/")
            assert page.status_code == 200 and "/static/app.js" in page.text
            assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
            script = await client.get("/static/app.js")
            assert script.status_code == 200 and "javascript" in script.headers["content-type"]
            assert (await client.get("/static/style.css")).status_code == 200
            error_of(await client.get("/static/nope.js"), 404)
            error_of(await client.get("/static/..%2F..%2Fserver.py"), 404)
            for path in ("/api/cluster", "/api/series", "/api/requests", "/api/stream"):
                assert "token" in error_of(await client.get(path), 401)
                client_token = {"authorization": f"Bearer {CLIENT}"}
                error_of(await client.get(path, headers=client_token), 403)
            admin = {"authorization": f"Bearer {ADMIN}"}
            cluster = (await client.get("/api/cluster", headers=admin)).json()
            assert cluster["tokens"] is True and cluster["hives"] == []
            drain = await client.post("/api/workers/w-1/drain", headers={**JSON, **client_token})
            error_of(drain, 403)
            # The OpenAI API beside it is untouched: a client token lists models.
            models = await client.get("/v1/models", headers=client_token)
            assert models.status_code == 200 and models.json()["object"] == "list"
            assert "/v1/models" in error_of(await client.get("/nowhere"), 404)
    finally:
        await queen.stop(1)


async def test_a_page_that_goes_away_releases_its_event_subscription(
    open_queen: tuple[Queen, httpx.AsyncClient],
) -> None:
    queen, client = open_queen
    assert queen.dashboard is not None
    live, bus = queen.dashboard.live, queen.cluster.events
    live.max_streams = 2
    async with client.stream("GET", "/api/stream") as stream:
        assert stream.headers["content-type"] == "text/event-stream"
        lines = stream.aiter_lines()
        assert await anext(lines) == "retry: 2000"
        assert len(live.streams) == 1 and bus.watched
        async with client.stream("GET", "/api/stream") as second:
            assert second.status_code == 200
            third = await client.get("/api/stream")
            assert "streams are open" in error_of(third, 429)
            assert third.headers["retry-after"] == "5"
        await wait_until(lambda: len(live.streams) == 1, 5)
        changed = queen_pb2.EVENT_KIND_WORKER_STATE_CHANGED
        queen.cluster.on_event(queen_pb2.Event(kind=changed, worker_id="w-x", detail="by hand"))
        kind, data = await next_message(lines)
        assert kind == "events" and '"worker_id":"w-x"' in data
    # The client went away: its subscription ends at once, not at the next event.
    await wait_until(lambda: not live.streams and not bus.watched, 5)


async def next_message(lines: AsyncIterator[str]) -> tuple[str, str]:
    """The next server-sent event with data: (its kind, its data line)."""
    kind, data = "message", ""
    async for line in lines:
        if line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data = line.removeprefix("data: ")
        elif not line and data:
            return kind, data
    raise AssertionError("the stream ended")


async def test_a_stopping_queen_ends_open_streams_saying_so(tmp_path: Path) -> None:
    queen, base = await start_queen(tmp_path)
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        async with client.stream("GET", "/api/stream") as stream:
            lines = stream.aiter_lines()
            await anext(lines)
            stopping = asyncio.create_task(queen.stop(1))
            rest = [line async for line in lines]
            assert "event: bye" in rest
            await asyncio.wait_for(stopping, 10)
    assert queen.dashboard is not None and not queen.dashboard.live.streams


async def test_requests_the_dashboard_does_not_take_are_4xx_saying_why(
    open_queen: tuple[Queen, httpx.AsyncClient],
) -> None:
    _, client = open_queen
    drain = "/api/workers/w-1/drain"
    assert "JSON" in error_of(await client.post(drain, content=b"{}"), 415)
    form = {"content-type": "application/x-www-form-urlencoded"}
    error_of(await client.post(drain, content=b"a=b", headers=form), 415)
    error_of(await client.post(drain, content=b"{nope", headers=JSON), 400)
    error_of(await client.post(drain, content=b"\xff\xfe", headers=JSON), 400)
    error_of(await client.post(drain, content=b"[" * 70_000, headers=JSON), 413)
    assert "unknown worker 'w-1'" in error_of(await client.post(drain, json={}), 404)
    error_of(await client.post("/api/workers/" + "w" * 200 + "/drain", json={}), 400)
    foreign = {**JSON, "origin": "http://evil.example"}
    error_of(await client.post(drain, content=b"{}", headers=foreign), 403)
    rebound = await client.get("/api/cluster", headers={"host": "evil.example"})
    assert "DNS rebinding" in error_of(rebound, 403)
    error_of(await client.post("/api/workers", json={"model": 5}), 400)
    error_of(await client.post("/api/workers", json=["model"]), 400)
    # Each was a 500 with tracebacks (issue 24): a lone surrogate in a spawn field, nesting.
    surrogate = b'{"model": "\\ud800"}'
    assert "lone surrogate" in error_of(await client.post("/api/workers", content=surrogate,
                                                          headers=JSON), 400)  # fmt: skip
    deep = b'{"model": "m", "backend_options": ' + b"[" * 100 + b"]" * 100 + b"}"
    assert "nests deeper" in error_of(await client.post("/api/workers", content=deep,
                                                        headers=JSON), 400)  # fmt: skip
    error_of(await client.post("/api/workers/w-1/retire", json={"force": "yes"}), 400)
    error_of(await client.get("/api/requests?status=lost"), 400)
    error_of(await client.get("/api/requests?limit=100000"), 400)
    error_of(await client.get("/api/workers"), 405)
    error_of(await client.delete("/api/cluster"), 405)
    error_of(await client.get("/api/nothing"), 404)
    assert "unknown hive" in error_of(await client.post("/api/hives/nohive/drain", json={}), 404)
    series = (await client.get("/api/series")).json()
    assert (series["interval"], series["span"]) == (5.0, 900.0)


async def workers(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    answer = (await client.get("/api/cluster")).json()
    return list(answer["workers"])


async def test_actions_go_through_the_admin_rpcs_to_a_real_hive(
    cluster: Cluster, open_queen: tuple[Queen, httpx.AsyncClient]
) -> None:
    queen, client = open_queen
    hive_id = f"dash-{uuid.uuid4().hex[:6]}"
    address = f"127.0.0.1:{queen.running.port}"
    cluster.start_hive(address, hive_id, "model=demo,count=1,token_delay=0")

    async def ready() -> list[dict[str, Any]] | None:
        found = [w for w in await workers(client) if w["state"] == "WORKER_STATE_IDLE"]
        return found or None

    (first,) = await wait_until(ready, 20)
    drained = await client.post(f"/api/workers/{first['id']}/drain", json={})
    assert drained.status_code == 200 and drained.json()["worker"]["drained"] is True
    assert (await workers(client))[0]["drained"] is True  # not an old snapshot
    await client.post(f"/api/workers/{first['id']}/undrain", json={})
    hive = (await client.post(f"/api/hives/{hive_id}/drain", json={})).json()["hive"]
    assert hive["drained"] is True
    await client.post(f"/api/hives/{hive_id}/undrain", json={})

    refused = await client.post("/api/workers", json={"hive_id": hive_id, "model": "demo",
                                                     "backend": "nope"})  # fmt: skip
    assert f"hive {hive_id}: unknown backend 'nope'" in error_of(refused, 400)
    spawned = await client.post("/api/workers", json={
        "hive_id": hive_id, "model": "demo", "backend": "echo", "slots": 2,
        "options": {"token_delay": "0"}, "tags": ["dash"], "restart": "never",
    })  # fmt: skip
    assert spawned.status_code == 200, spawned.text
    second = spawned.json()["worker"]
    assert second["slots_total"] == 2 and second["tags"] == ["dash"]
    await wait_until(lambda: ready_count(client, 2), 20)

    completion = await client.post("/v1/completions", json={"model": "demo", "prompt": "a b",
                                                            "max_tokens": 2})  # fmt: skip
    assert completion.status_code == 200
    history = (await client.get("/api/requests?status=completed&model=demo")).json()["requests"]
    assert [r["status"] for r in history] == ["REQUEST_STATUS_COMPLETED"]
    assert (await client.get("/api/requests?status=failed")).json()["requests"] == []

    retired = await client.post(f"/api/workers/{second['id']}/retire", json={"force": False})
    assert retired.status_code == 200, retired.text
    await wait_until(lambda: gone(client, second["id"]), 20)
    assert "unknown worker" in error_of(
        await client.post(f"/api/workers/{second['id']}/retire", json={}), 404
    )


async def ready_count(client: httpx.AsyncClient, count: int) -> bool:
    states = [w["state"] for w in await workers(client)]
    return states.count("WORKER_STATE_IDLE") >= count


async def gone(client: httpx.AsyncClient, worker_id: str) -> bool:
    return all(w["id"] != worker_id for w in await workers(client))
