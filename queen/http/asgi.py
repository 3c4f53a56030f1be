"""Plain ASGI sending for the HTTP side's streams (the API's completions, the dashboard's
events): the response's start and body parts, server-sent events' headers, an error as JSON,
and noticing that the client left."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable

from starlette.types import Message, Receive, Send

from queen.http.errors import ApiError

# Server-sent events go out as they come: no cache, no proxy buffering.
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class ClientGone(Exception):
    """The HTTP client disconnected."""


async def until_disconnect(receive: Receive, work: Awaitable[None]) -> None:
    """Run `work`; if the client disconnects first, cancel it and raise ClientGone. One
    watcher per request, not per chunk: the token path stays a plain await."""
    task = asyncio.current_task()
    assert task is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        await work
    except asyncio.CancelledError:
        if not gone:
            raise
        task.uncancel()
        raise ClientGone() from None
    finally:
        watcher.cancel()


async def send_start(send: Send, status: int, content_type: str, headers: dict[str, str]) -> None:
    raw = [(b"content-type", content_type.encode())]
    raw += [(k.lower().encode(), v.encode("latin-1", "replace")) for k, v in headers.items()]
    message: Message = {"type": "http.response.start", "status": status, "headers": raw}
    await send(message)


async def send_body(send: Send, body: bytes, last: bool = False) -> None:
    await send({"type": "http.response.body", "body": body, "more_body": not last})


async def send_error(send: Send, error: ApiError, extra: dict[str, str]) -> None:
    body = json.dumps(error.body()).encode()
    await send_start(send, error.status, "application/json", {**extra, **error.headers})
    await send_body(send, body, last=True)
