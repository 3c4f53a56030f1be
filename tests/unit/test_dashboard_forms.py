"""What the dashboard takes from a browser (forms.py) and whom it answers (gate.py): every
value untrusted, every refusal a 4xx saying why, decisions the gRPC door's own."""

from __future__ import annotations

from typing import Any

import pytest

from apiary.security import AuthInterceptor, TokenSet
from protos.v1 import common_pb2, queen_pb2
from queen.http.dashboard import forms
from queen.http.dashboard.gate import Gate, metadata
from queen.http.errors import ApiError
from queen.http.hosts import host_name, is_address_or_localhost
from queen.server import METHODS

ADMIN, CLIENT = "admin-secret", "client-secret"


def test_a_spawn_form_becomes_the_clis_spawn_request() -> None:
    asked = forms.spawn_request({
        "hive_id": "h1", "model": " demo ", "backend": "echo", "slots": 2,
        "options": {"token_delay": "0"}, "tags": ["gpu", " "], "restart": "on-failure",
    })  # fmt: skip
    assert asked == queen_pb2.QueenSpawnWorkerRequest(
        hive_id="h1", model="demo", backend="echo", slots=2, backend_options={"token_delay": "0"},
        tags=["gpu"], restart_policy=common_pb2.RESTART_POLICY_ON_FAILURE, wait_ready=False,
    )  # fmt: skip
    assert forms.spawn_request({"model": "m", "slots": None}).slots == 0  # the hive's default


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ([], "JSON object"),
        ({}, "model is required"),
        ({"model": 5}, "model must be a string"),
        ({"model": "m" * 129}, "longer than 128"),
        ({"model": "m", "slots": "2"}, "slots must be a whole number"),
        ({"model": "m", "slots": True}, "slots must be a whole number"),
        ({"model": "m", "slots": 10**9}, "slots must be within"),
        ({"model": "m", "options": ["a=b"]}, "options must be an object"),
        ({"model": "m", "options": {"k": 1}}, "must be a string"),
        ({"model": "m", "options": {f"k{n}": "v" for n in range(33)}}, "at most 32 options"),
        ({"model": "m", "options": {"": "v"}}, "option names"),
        ({"model": "m", "tags": "gpu"}, "tags must be a list"),
        ({"model": "m", "tags": ["t"] * 17}, "at most 16 tags"),
        ({"model": "m", "restart": "sometimes"}, "unknown restart policy"),
    ],
)
def test_a_spawn_form_is_refused_saying_why(body: Any, says: str) -> None:
    with pytest.raises(forms.BadInput, match=says):
        forms.spawn_request(body)


def test_retire_force_and_the_history_filter() -> None:
    assert forms.force(None) is False and forms.force({"force": True}) is True
    with pytest.raises(forms.BadInput):
        forms.force({"force": "yes"})
    asked = forms.requests_filter({"status": "deadline-exceeded", "model": "demo", "limit": "7"})
    assert asked == queen_pb2.ListRequestsRequest(
        status=queen_pb2.REQUEST_STATUS_DEADLINE_EXCEEDED, model="demo", limit=7
    )
    assert forms.requests_filter({}).limit == forms.DEFAULT_REQUESTS
    for limit in ("0", "501", "-1", "1e3", "²", "9" * 5000):
        with pytest.raises(forms.BadInput, match="limit"):
            forms.requests_filter({"limit": limit})
    with pytest.raises(forms.BadInput, match="unknown status"):
        forms.requests_filter({"status": "REQUEST_STATUS_FAILED"})


def test_messages_become_json_under_their_proto_names_zeros_included() -> None:
    record = common_pb2.WorkerRecord(id="w-1", state=common_pb2.WORKER_STATE_IDLE, rss_bytes=7)
    out = forms.to_json(record)
    assert out["id"] == "w-1" and out["state"] == "WORKER_STATE_IDLE"
    assert out["slots_total"] == 0 and out["drained"] is False and out["rss_bytes"] == "7"


def gate(tokens: TokenSet) -> Gate:
    return Gate(AuthInterceptor(tokens, METHODS).verdict, tokens.enabled)


def refusal(check: Gate, rpc: str, write: bool = False, **headers: str) -> ApiError | None:
    headers = {key.replace("_", "-"): value for key, value in headers.items()}
    headers.setdefault("host", "127.0.0.1:8080")
    try:
        check.check(rpc, headers, "http", write)
    except ApiError as error:
        return error
    return None


def test_with_tokens_the_admin_token_is_needed_as_for_the_admin_rpcs() -> None:
    check = gate(TokenSet(admin=ADMIN, client=CLIENT))
    missing = refusal(check, "ListWorkers")
    assert missing is not None and missing.status == 401 and missing.code == "invalid_api_key"
    wrong = refusal(check, "ListWorkers", authorization="Bearer nope")
    assert wrong is not None and (wrong.status, wrong.message) == (401, "invalid token")
    client = refusal(check, "DrainWorker", authorization=f"Bearer {CLIENT}")
    assert client is not None and client.status == 403 and "client" in client.message
    assert client.code == "permission_denied"
    assert refusal(check, "ListWorkers", authorization=f"bearer {ADMIN}") is None
    # The dashboard's own reads (no RPC of that name) fall under the admin service's rule.
    assert refusal(check, "Series", authorization=f"Bearer {CLIENT}") is not None
    # Any host name will do: a rebinding page has no token.
    assert refusal(check, "Series", authorization=f"Bearer {ADMIN}", host="queen.example") is None


def test_without_tokens_only_addresses_and_localhost_are_answered() -> None:
    check = gate(TokenSet())
    for host in ("127.0.0.1:8080", "[::1]:8080", "localhost:8080", "10.0.0.1", "LOCALHOST"):
        assert refusal(check, "ListWorkers", host=host) is None, host
    rebound = refusal(check, "ListWorkers", host="evil.example:8080")
    assert rebound is not None and rebound.status == 403 and "DNS rebinding" in rebound.message
    assert refusal(check, "ListWorkers", host="") is not None


def test_actions_take_json_from_this_origin_only() -> None:
    check = gate(TokenSet())
    form = refusal(check, "DrainWorker", True, content_type="application/x-www-form-urlencoded")
    assert form is not None and form.status == 415
    json_type = "application/json; charset=utf-8"
    assert refusal(check, "DrainWorker", True, content_type=json_type) is None
    same = "http://127.0.0.1:8080"
    assert refusal(check, "DrainWorker", True, content_type=json_type, origin=same) is None
    foreign = refusal(check, "DrainWorker", True, content_type=json_type, origin="http://a.example")
    assert foreign is not None and foreign.status == 403 and foreign.code == "foreign_origin"
    assert refusal(check, "DrainWorker", True, content_type=json_type, origin="null") is not None


def test_headers_are_read_as_http_says() -> None:
    assert metadata({"authorization": "BEARER  tok "}) == [("authorization", "Bearer tok")]
    assert metadata({"authorization": "Basic dXNlcg=="}) == []
    assert metadata({}) == []
    assert host_name("[::1]:80") == "::1" and host_name("h:80") == "h" and host_name("::1") == "::1"
    assert not is_address_or_localhost("127.0.0.1.evil.example")
