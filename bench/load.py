"""Streaming load for the fault benchmarks: closed-loop clients counting how requests end."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from protos.v1 import common_pb2


@dataclass
class Tally:
    accepted: int = 0
    completed: int = 0
    failed_before_first: int = 0
    failed_after_first: int = 0
    lost_with_queen: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    # While the queen is down, a request ending without a worker's word is one it took with it.
    queen_down: bool = False

    @property
    def ended(self) -> int:
        return (
            self.completed
            + self.failed_before_first
            + self.failed_after_first
            + self.lost_with_queen
        )


async def client(
    stub: Any, tally: Tally, model: str, tokens: int, stop_at: float, cap: int
) -> None:
    """Stream requests one after another until `stop_at` (monotonic) or `cap` requests in all."""
    request = common_pb2.InferRequest(model=model, prompt="one two three", max_tokens=tokens)
    while time.monotonic() < stop_at and tally.accepted < cap:
        tally.accepted += 1
        received = 0
        try:
            async for _ in stub.Infer(request, timeout=30):
                received += 1
            tally.completed += 1
        except grpc.aio.AioRpcError as exc:
            details = exc.details() or ""
            key = f"{exc.code().name}: {details[:70]}"
            tally.errors[key] = tally.errors.get(key, 0) + 1
            if tally.queen_down and not details.startswith("worker "):
                tally.lost_with_queen += 1
                await asyncio.sleep(0.05)  # a client's pause before it retries
            elif received:
                tally.failed_after_first += 1
            else:
                tally.failed_before_first += 1
