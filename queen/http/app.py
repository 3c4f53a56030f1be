"""The one HTTP application the queen serves on --http-listen: the operator dashboard (`/`,
`/static/`, `/api/`) beside the OpenAI-compatible API (`/v1/`, and every other path, so its
errors keep OpenAI's shape)."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.routing import Mount

from queen.http.dashboard.routes import ERROR_HANDLERS, Dashboard
from queen.http.openai.app import DEFAULT_WRITE_TIMEOUT, openai_app
from queen.rpc.queen import QueenService


def web_app(
    service: QueenService, dashboard: Dashboard, write_timeout: float = DEFAULT_WRITE_TIMEOUT
) -> Starlette:
    api = openai_app(service, write_timeout=write_timeout)
    return Starlette(
        routes=[*dashboard.routes(), Mount("", app=api)],
        exception_handlers=ERROR_HANDLERS,
    )
