"""The requests whose calls are not over, so a stopping queen can wait for them to finish and
cut the rest (queen/server.py says when)."""

from __future__ import annotations

import asyncio
from typing import Protocol


class Cuttable(Protocol):
    """A request a stopping queen can end (see Route.cut)."""

    def cut(self, grace: float) -> None: ...


class InFlight:
    """The routes whose calls are not over, so a stopping queen can wait for them to finish
    and cut the rest."""

    def __init__(self) -> None:
        self.routes: set[Cuttable] = set()
        self._none = asyncio.Event()
        self._none.set()

    def __len__(self) -> int:
        return len(self.routes)

    def add(self, route: Cuttable) -> None:
        self.routes.add(route)
        self._none.clear()

    def discard(self, route: Cuttable) -> None:
        self.routes.discard(route)
        if not self.routes:
            self._none.set()

    async def finished(self, timeout: float, hurry: asyncio.Event | None = None) -> bool:
        """Whether every route ended within `timeout` seconds (or before `hurry` was set)."""
        waits = [asyncio.ensure_future(self._none.wait())]
        if hurry is not None:
            waits.append(asyncio.ensure_future(hurry.wait()))
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
        return not self.routes

    def cut(self, grace: float) -> int:
        """End every route still in flight (see Route.cut); how many there were."""
        routes = list(self.routes)
        for route in routes:
            route.cut(grace)
        return len(routes)
