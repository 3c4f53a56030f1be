"""The queen's OpenAI-compatible HTTP front against real processes, with clients nobody here
wrote: the official `openai` package, httpx for the raw statuses, curl -N for SSE frames."""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from apiary.security import TlsFiles
from cli.certs import init as certs_init
from harness import Cluster, Proc, wait_until
from harness.ports import free_port
from protos.v1 import queen_pb2

CHAT: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello bees"},
]


def start(cluster: Cluster, hive_id: str, spawn: str, *queen_args: str) -> tuple[Proc, str]:
    """A queen with its HTTP front on a free port, and one hive; (queen, base URL)."""
    port = free_port()
    queen = cluster.start_queen(0, "--http-listen", f"127.0.0.1:{port}", *queen_args)
    cluster.start_hive(queen, hive_id, spawn)
    return queen, f"http://127.0.0.1:{port}/v1"


def sdk(base: str, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base, api_key=key, max_retries=0, timeout=20)


async def test_the_openai_sdk_streams_and_non_streams_chat_and_completions(
    cluster: Cluster,
) -> None:
    queen, base = start(cluster, "oa-h1", "model=demo,count=2,token_delay=0",
                        "--default-max-tokens", "5")  # fmt: skip
    await cluster.wait_workers(queen, "demo", 2)
    client = sdk(base)
    assert [m.id for m in (await client.models.list()).data] == ["demo"]
    assert (await client.models.retrieve("demo")).id == "demo"

    whole = await client.chat.completions.create(model="demo", messages=CHAT, max_tokens=4)
    assert whole.choices[0].message.content == "hello bees hello bees"
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == "length" and whole.object == "chat.completion"
    usage = whole.usage
    assert usage is not None and usage.completion_tokens == 4 and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + 4

    stream = await client.chat.completions.create(
        model="demo", messages=CHAT, max_tokens=4, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "hello bees hello bees"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])

    # Completions; a stop string; no max_tokens: the queen's --default-max-tokens (5 here).
    done = await client.completions.create(model="demo", prompt="one two three", max_tokens=4)
    assert done.choices[0].text == "one two three one" and done.object == "text_completion"
    parts = [c async for c in await client.completions.create(
        model="demo", prompt="one two three", stream=True, stop=["three"])]  # fmt: skip
    assert "".join(p.choices[0].text for p in parts) == "one two "
    assert parts[-1].choices[0].finish_reason == "stop"
    default = await client.completions.create(model="demo", prompt="a")
    assert default.usage is not None and default.usage.completion_tokens == 5


async def test_one_code_path_request_ids_history_and_metrics(cluster: Cluster) -> None:
    queen, base = start(cluster, "oa-h2", "model=demo,count=1,token_delay=0")
    await cluster.wait_workers(queen, "demo", 1)
    raw = await sdk(base).chat.completions.with_raw_response.create(
        model="demo", messages=CHAT, max_tokens=2, extra_headers={"X-Request-Id": "mine-1"},
    )  # fmt: skip
    assert raw.headers["x-request-id"] == "mine-1"
    answer = raw.parse()
    admin = cluster.admin_stub(queen)

    async def recorded() -> queen_pb2.RequestRecord | None:
        rows = (await admin.ListRequests(queen_pb2.ListRequestsRequest())).requests
        return next((r for r in rows if r.client_request_id == "mine-1"), None)

    row = await wait_until(recorded)
    assert row.status == queen_pb2.REQUEST_STATUS_COMPLETED and row.completion_tokens == 2
    assert answer.id == f"chatcmpl-{row.id}"  # the queen's own id
    # Without a reference of its own the client gets the queen's id back.
    async with httpx.AsyncClient() as http:
        reply = await http.post(f"{base}/completions", json={"model": "demo", "prompt": "x"})
    assert reply.headers["x-request-id"] == reply.json()["id"].removeprefix("cmpl-")
    listed = await admin.ListHives(queen_pb2.ListHivesRequest())
    assert listed.queen.requests_completed == 2


async def post(base: str, path: str, body: Any, **kw: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=20) as http:
        if isinstance(body, bytes):
            headers = {"content-type": "application/json", **kw.pop("headers", {})}
            return await http.post(base + path, content=body, headers=headers, **kw)
        return await http.post(base + path, json=body, **kw)


def error_of(reply: httpx.Response) -> dict[str, Any]:
    """The OpenAI error object, after checking the shape is exactly OpenAI's."""
    body = reply.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    return error


# fmt: off
BAD_BODIES: list[tuple[object, int, str | None, str]] = [
    (b"{not json", 400, None, "not valid JSON"),
    # Each of these was a 500 with tracebacks (issue 24).
    (b'{"model": "demo", "messages": [{"role": "user", "content": "\\ud800"}]}', 400,
     "messages[0].content", "lone surrogate"),
    (b"[" * 100_000 + b"]" * 100_000, 400, None, "nests deeper"),
    ({"model": "demo", "messages": CHAT, "seed": 2**70}, 400, "seed", "must be within"),
    ({"model": "demo", "messages": [{"role": ["user"], "content": "x"}]}, 400,
     "messages[0].role", "one of"),
    ([1, 2], 400, None, "must be a JSON object"),
    # Echo (tests only) does not do n or logprobs, as its workers say (llamacpp does them).
    ({"model": "demo", "messages": CHAT, "n": 2}, 400, "n", "backend (echo) does not do n"),
    ({"model": "demo", "messages": CHAT, "logprobs": True}, 400, "logprobs", "not supported"),
    ({"model": "demo", "messages": CHAT, "tools": [{"type": "function"}]}, 400,
     "tools[0].function", "is required"),
    ({"model": "demo", "messages": CHAT, "foo": 1}, 400, "foo", "Unrecognized request argument"),
    ({"model": "demo", "messages": CHAT, "temperature": "hot"}, 400, "temperature", "a number"),
    ({"model": "demo", "messages": CHAT, "temperature": 11}, 400, "temperature", "0..10"),
    ({"model": "demo"}, 400, "messages", "is required"),
    ({"model": 7, "messages": CHAT}, 400, "model", "a string"),
    (
        {
            "model": "demo",
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ],
        },
        400,
        "messages[0].content[0].type",
        "text parts only",
    ),
    (
        {"model": "demo", "messages": [{"role": "robot", "content": "x"}]},
        400,
        "messages[0].role",
        "one of",
    ),
    ({"model": "demo", "messages": CHAT, "max_tokens": 0}, 400, "max_tokens", "at least 1"),
    ({"model": "demo", "messages": CHAT, "max_tokens": 100000}, 400, "max_tokens", "cap"),
    (
        {"model": "demo", "messages": CHAT, "stream_options": {"include_usage": True}},
        400,
        "stream_options",
        "only allowed with stream",
    ),
    ({"model": "demo", "messages": CHAT, "x": "y" * (2 << 20)}, 413, None, "larger than"),
    ({"model": "nope", "messages": CHAT}, 404, "model", "models served: demo"),
]
# fmt: on


async def test_bad_input_of_every_kind_is_a_4xx_in_openai_shape(cluster: Cluster) -> None:
    queen, base = start(cluster, "oa-h3", "model=demo,count=1,token_delay=0")
    await cluster.wait_workers(queen, "demo", 1)
    for body, status, param, words in BAD_BODIES:
        reply = await post(base, "/chat/completions", body)
        error = error_of(reply)
        assert (reply.status_code, error["param"]) == (status, param), (body, error)
        assert words in error["message"], error
    with pytest.raises(openai.NotFoundError) as missing:
        await sdk(base).chat.completions.create(model="nope", messages=CHAT)
    assert missing.value.code == "model_not_found"
    for prompt, words in [(["a", "b"], "one prompt per request"), ([1, 2], "token ids")]:
        reply = await post(base, "/completions", {"model": "demo", "prompt": prompt})
        assert reply.status_code == 400 and words in error_of(reply)["message"]
    async with httpx.AsyncClient() as http:
        nowhere = await http.get(f"{base}/engines")
        wrong = await http.get(f"{base}/chat/completions")
    assert nowhere.status_code == 404 and "/v1/chat/completions" in error_of(nowhere)["message"]
    assert wrong.status_code == 405 and error_of(wrong)["code"] == "method_not_allowed"
    # Every refusal is counted, as gRPC counts its own.
    listed = await cluster.admin_stub(queen).ListHives(queen_pb2.ListHivesRequest())
    # (The unknown model may instead be accepted, then fail NOT_FOUND, if asked while the new
    # queen still waits for hives to heartbeat in.)
    totals = listed.queen
    assert totals.requests_refused + totals.requests_failed == len(BAD_BODIES) + 3
    assert totals.requests_refused >= len(BAD_BODIES) + 2
    # After all that the front serves as before.
    done = await sdk(base).completions.create(model="demo", prompt="still here", max_tokens=2)
    assert done.choices[0].text == "still here"


async def test_a_full_queue_is_429_with_retry_after(cluster: Cluster) -> None:
    queen, base = start(cluster, "oa-h4", "model=demo,count=1,token_delay=0.2",
                        "--max-queue", "1")  # fmt: skip
    await cluster.wait_workers(queen, "demo", 1)
    body = {"model": "demo", "prompt": "slow", "max_tokens": 50, "stream": True}
    async with httpx.AsyncClient(timeout=30) as http:
        async with http.stream("POST", f"{base}/completions", json=body) as holding:
            assert holding.status_code == 200  # its first token came: it holds the only slot
            waiting = asyncio.ensure_future(http.post(f"{base}/completions", json=body))

            async def queued() -> bool:
                models = await cluster.queen_stub(queen).ListModels(queen_pb2.ListModelsRequest())
                return models.models[0].queued == 1

            await wait_until(queued)
            full = await http.post(f"{base}/completions", json=body)
            assert full.status_code == 429 and full.headers["retry-after"] == "1"
            assert "queue is full" in error_of(full)["message"]
            waiting.cancel()


def curl_stream(url: str, body: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["curl", "-sN", url, "-H", "content-type: application/json", "-d", json.dumps(body)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


async def test_curl_sees_frames_as_they_come_and_a_disconnect_frees_the_slot(
    cluster: Cluster,
) -> None:
    queen, base = start(cluster, "oa-h5", "model=demo,count=1,token_delay=0.2")
    await cluster.wait_workers(queen, "demo", 1)
    stub = cluster.queen_stub(queen)
    body = {"model": "demo", "messages": CHAT, "max_tokens": 100, "stream": True}
    curl = curl_stream(f"{base}/chat/completions", body)
    try:
        assert curl.stdout is not None
        began = time.monotonic()
        first = await asyncio.to_thread(curl.stdout.readline)
        # The first frame while the 100-token (20 s) stream is still going: streamed, not buffered.
        assert first.startswith("data: {") and time.monotonic() - began < 10
        assert json.loads(first[6:])["choices"][0]["delta"]["content"] == "hello"
        assert curl.poll() is None
        curl.send_signal(signal.SIGTERM)  # the client goes away mid-stream
        curl.wait(10)
        gone = time.monotonic()

        async def idle() -> bool:
            models = (await stub.ListModels(queen_pb2.ListModelsRequest())).models
            return models[0].idle == 1

        await wait_until(idle, timeout=5)
        freed_after = time.monotonic() - gone
        assert freed_after < 2, freed_after  # at once, not at the end of the 20 s stream
    finally:
        if curl.poll() is None:
            curl.kill()
            curl.wait()
    rows = (await cluster.admin_stub(queen).ListRequests(queen_pb2.ListRequestsRequest())).requests
    assert [r.status for r in rows] == [queen_pb2.REQUEST_STATUS_CANCELLED]
    # The slot serves the next request.
    done = await sdk(base).chat.completions.create(model="demo", messages=CHAT, max_tokens=2)
    assert done.choices[0].message.content == "hello bees"


async def test_a_draining_queen_refuses_new_http_requests_with_503_and_finishes_streams(
    cluster: Cluster,
) -> None:
    queen, base = start(cluster, "oa-h6", "model=demo,count=2,token_delay=0.05")
    await cluster.wait_workers(queen, "demo", 2)
    client = sdk(base)
    stream = await client.completions.create(model="demo", prompt="a b", max_tokens=40, stream=True)
    first = await anext(aiter(stream))
    queen.signal(signal.SIGTERM)
    await wait_until(lambda: "queen draining" in queen.log())
    with pytest.raises(openai.APIStatusError) as refused:
        await client.completions.create(model="demo", prompt="x", max_tokens=2)
    assert refused.value.status_code == 503
    assert "queen shutting down" in refused.value.message
    assert refused.value.response.headers.get("apiary-stopping") == "1"  # another queen may
    async with httpx.AsyncClient(base_url=base.removesuffix("/v1")) as probe:
        health = await probe.get("/health")
    assert (health.status_code, health.json()) == (
        503, {"status": "unavailable", "reason": "draining: the queen is shutting down"},
    )  # fmt: skip
    rest = [part async for part in stream]
    assert len([first, *rest]) == 40 and rest[-1].choices[0].finish_reason == "length"


async def test_https_with_the_queens_certificate_and_client_tokens_only(
    cluster: Cluster, tmp_path: Path
) -> None:
    certs = tmp_path / "certs"
    certs_init(certs, [("queen", ["127.0.0.1"]), ("oa-h7", ["127.0.0.1"])])
    tokens = json.loads((certs / "tokens.json").read_text())
    cluster.server_args = ["--tokens-file", str(certs / "tokens.json"),
                           "--tls-ca", str(certs / "ca.pem")]  # fmt: skip
    cluster.token = tokens["admin"]
    cluster.tls = TlsFiles(ca=str(certs / "ca.pem"))
    port = free_port()
    queen = cluster.start_queen(
        0, "--tls-cert", str(certs / "queen.pem"), "--tls-key", str(certs / "queen.key"),
        "--http-listen", f"127.0.0.1:{port}",
    )  # fmt: skip
    hive_tls = ("--tls-cert", str(certs / "oa-h7.pem"), "--tls-key", str(certs / "oa-h7.key"))
    cluster.start_hive(queen, "oa-h7", "model=demo,count=1,token_delay=0", extra=hive_tls)
    await cluster.wait_workers(queen, "demo", 1, timeout=20)
    base = f"https://127.0.0.1:{port}/v1"
    trust = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    body = {"model": "demo", "prompt": "over tls", "max_tokens": 2}
    async with httpx.AsyncClient(verify=trust, timeout=20) as http:
        # A load balancer's probes need no token (and the API still does: below).
        probed = await http.get(f"https://127.0.0.1:{port}/health")
        assert (probed.status_code, probed.json()) == (200, {"status": "ok"})
        statuses = []
        for key in (None, "wrong", tokens["hives"]["oa-h7"]):
            headers = {"authorization": f"Bearer {key}"} if key else {}
            reply = await http.post(f"{base}/completions", json=body, headers=headers)
            statuses.append((reply.status_code, error_of(reply)["type"]))
        assert statuses == [(401, "authentication_error"), (401, "authentication_error"),
                            (403, "permission_error")]  # fmt: skip
        client = openai.AsyncOpenAI(
            base_url=base, api_key=tokens["clients"]["client"], max_retries=0,
            http_client=openai.DefaultAsyncHttpxClient(verify=trust),
        )  # fmt: skip
        done = await client.completions.create(model="demo", prompt="over tls", max_tokens=2)
        assert done.choices[0].text == "over tls"
    rows = (await cluster.admin_stub(queen).ListRequests(queen_pb2.ListRequestsRequest())).requests
    assert [r.client for r in rows] == ["client"]  # counted as the token's client, as gRPC is


async def test_health_and_ready_answer_load_balancers(cluster: Cluster) -> None:
    """No worker yet: 503 and why; a ready worker: 200; /ready per model; nothing else said."""
    port = free_port()
    queen = cluster.start_queen(0, "--http-listen", f"127.0.0.1:{port}")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as probe:
        await wait_until(lambda: "OpenAI API listening" in queen.log())
        first = await probe.get("/health")
        assert first.status_code == 503 and first.headers["cache-control"] == "no-store"
        assert first.json()["reason"] in (
            "starting: the hives have not all reported yet", "no worker is registered",
        )  # fmt: skip
        cluster.start_hive(queen, "oa-hz", "model=demo,count=1,token_delay=0")

        async def routes() -> bool:
            return (await probe.get("/health")).status_code == 200

        await wait_until(routes, timeout=30)
        assert (await probe.get("/health")).json() == {"status": "ok"}
        ready = await probe.get("/ready", params={"model": "demo"})
        assert (ready.status_code, ready.json()) == (200, {"model": "demo", "ready": True})
        unknown = await probe.get("/ready", params={"model": "nope"})
        assert (unknown.status_code, unknown.json()) == (503, {"model": "nope", "ready": False})
        missing = await probe.get("/ready")
        assert missing.status_code == 400 and "?model=" in missing.json()["error"]["message"]


async def test_another_sites_page_cannot_use_a_queen_without_tokens(cluster: Cluster) -> None:
    """Played as the attacks of issue 24: a cross-site form or text/plain POST (no CORS
    preflight) is 415 before any inference; a rebound host name is 403; a forged
    X-Forwarded-For is not believed (the history records the real peer)."""
    queen, base = start(cluster, "oa-h5", "model=demo,count=1,token_delay=0")
    await cluster.wait_workers(queen, "demo", 1)
    body = json.dumps({"model": "demo", "prompt": "x", "max_tokens": 2})
    async with httpx.AsyncClient(timeout=20) as http:
        for kind in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {"content-type": kind} if kind else {}
            refused = await http.post(f"{base}/completions", content=body, headers=headers)
            assert refused.status_code == 415 and "application/json" in refused.text, kind
        rebound = await http.get(f"{base}/models", headers={"host": "evil.example"})
        assert rebound.status_code == 403 and "DNS rebinding" in rebound.text
        named = await http.get(f"{base}/models", headers={"host": "localhost:1234"})
        assert named.status_code == 200
        forged = await http.post(f"{base}/completions", content=body, headers={
            "content-type": "application/json", "x-forwarded-for": "6.6.6.6",
            "x-request-id": "forged-1"})  # fmt: skip
        assert forged.status_code == 200
    admin = cluster.admin_stub(queen)

    async def recorded() -> queen_pb2.RequestRecord | None:
        rows = (await admin.ListRequests(queen_pb2.ListRequestsRequest())).requests
        return next((r for r in rows if r.client_request_id == "forged-1"), None)

    row = await wait_until(recorded)
    assert row.client == "127.0.0.1"
    assert len((await admin.ListRequests(queen_pb2.ListRequestsRequest())).requests) == 1


async def test_a_client_that_stops_reading_is_cut_and_its_slot_freed(cluster: Cluster) -> None:
    """Played as issue 24's attack: a stream whose client reads nothing past its headers held
    a worker slot for as long as it liked. With --client-write-timeout it is cut: the slot is
    free again and the history says why."""
    queen, base = start(cluster, "oa-h6", "model=demo,count=1,slots=1,token_delay=0",
                        "--client-write-timeout", "1")  # fmt: skip
    await cluster.wait_workers(queen, "demo", 1)
    # Long words make a long answer (40 MB): more than any socket buffer holds.
    body = json.dumps({"model": "demo", "prompt": ("x" * 10000 + " ") * 5, "max_tokens": 4000,
                       "stream": True}).encode()  # fmt: skip
    host, port = base.removeprefix("http://").removesuffix("/v1").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: "
                     b"application/json\r\nx-request-id: stalled-1\r\ncontent-length: %d\r\n\r\n%s"
                     % (len(body), body))  # fmt: skip
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head + await reader.read(2000)
        admin = cluster.admin_stub(queen)

        async def recorded() -> queen_pb2.RequestRecord | None:
            rows = (await admin.ListRequests(queen_pb2.ListRequestsRequest())).requests
            row = next((r for r in rows if r.client_request_id == "stalled-1"), None)
            ended = row is not None and row.status >= queen_pb2.REQUEST_STATUS_COMPLETED
            return row if ended else None

        row = await wait_until(recorded, timeout=20)
        assert row.status == queen_pb2.REQUEST_STATUS_CANCELLED
        assert "--client-write-timeout" in row.error
        # The slot is free: another request is served by the one worker.
        answer = await sdk(base).completions.create(model="demo", prompt="hi", max_tokens=2)
        assert answer.choices[0].text
    finally:
        writer.close()
