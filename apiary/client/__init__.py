"""The Python client of an Apiary cluster: `Client` (blocking) and `AsyncClient` (asyncio).

    from apiary.client import Client

    with Client("127.0.0.1:7070") as apiary:
        for chunk in apiary.chat("demo", [{"role": "user", "content": "hello bees"}]):
            print(chunk.text, end="")

Both have the same calls: `infer`, `chat`, `send` (streams of InferChunk; the options take
tools, a JSON schema, logprobs, n, penalties and logit bias: see `InferOptions`), `embed`
(vectors of texts; `tool_calls_of` puts a stream's tool-call deltas together), `list_models`,
`lease` / `infer_direct` / `release_lease` (call a worker yourself), and under `.admin` every
QueenAdmin call (hives, workers, drains, events, request history, and each hive's catalog,
processes and backends through the queen).

- Every call has a deadline: the client's `timeout` (60 s) unless the call gives its own;
  `math.inf` for none.
- Given several queens ("10.0.0.1:7070,10.0.0.2:7070"), a call that cannot reach one goes to
  the next, and a stream moves to another queen as long as no chunk has arrived. Only
  failures that prove the request was not served move it: no connection could be made, or the
  queen ended it because it is stopping (it says so in a trailer, `apiary-stopping`).
- An inference stream whose queen goes away mid-stream (killed, cut off, or stopping at the
  end of its grace) continues after the token ids already received, on another queen or the
  same one once back (at most 3 times): nothing is missing or repeated. A stream held to a
  grammar (a JSON schema, tools) or of n > 1 choices cannot continue exactly and is not
  resumed: its error is raised.
- While no queen can be reached (a restart), calls keep trying until their deadline
  (`wait_for_ready=False`: fail at once).
- Credentials as the `apiary` CLI takes them: `token` (default $APIARY_TOKEN), `tls_ca`,
  `tls_cert`, `tls_key`.
- A failed call raises grpc's own `grpc.aio.AioRpcError`, unchanged: `.code()` is the
  `grpc.StatusCode` (NOT_FOUND for an unknown model, UNAVAILABLE when no queen could be
  reached, DEADLINE_EXCEEDED, ...) and `.details()` says what happened.
"""

from __future__ import annotations

from apiary.client.admin import AsyncAdmin
from apiary.client.aio import AsyncClient
from apiary.client.blocking import Admin, Client
from apiary.client.queens import DEFAULT_QUEEN, DEFAULT_TIMEOUT, QUEEN_ENV, TOKEN_ENV, queens_from
from apiary.client.requests import InferOptions, Message, ToolSpec, infer_request
from apiary.protoutil import tool_calls_of

__all__ = [
    "DEFAULT_QUEEN",
    "DEFAULT_TIMEOUT",
    "QUEEN_ENV",
    "TOKEN_ENV",
    "Admin",
    "AsyncAdmin",
    "AsyncClient",
    "Client",
    "InferOptions",
    "Message",
    "ToolSpec",
    "infer_request",
    "queens_from",
    "tool_calls_of",
]
