"""The one HTTP application the queen serves on --http-listen: the operator dashboard (`/`,
`/static/`, `/api/`) beside the OpenAI-compatible API (`/v1/`, and every other path, so its
errors keep OpenAI's shape)."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.routing import Mount

from queen.http.dashboard.routes import ERROR_HANDLERS, Dashboard
from queen.http.openai.app import openai_app
from queen.rpc.queen import QueenService


def web_app(service: QueenService, dashboard: Dashboard) -> Starlette:
    return Starlette(
        routes=[*dashboard.routes(), Mount("", app=openai_app(service))],
        exception_handlers=ERROR_HANDLERS,
    )
