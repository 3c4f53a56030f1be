"""The queen's I/O edges faked (worker calls, the client's context) around a Cluster of real
parts, so the code that waits can be driven by a FakeClock in unit tests."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

import grpc

from protos.v1 import common_pb2, queen_pb2, worker_pb2, worker_pb2_grpc
from queen.autospawn import Autospawner
from queen.channels import Channels
from queen.cluster import Cluster
from queen.events import EventBus
from queen.history import History
from queen.leases.manager import LeaseManager
from queen.members import WorkerEntry
from queen.metrics import QueenMetrics
from queen.registry import Registry, RegistrySettings
from queen.requests.progress import DEFAULT_MIGRATION_LIMIT
from queen.routing.ask import Ask, Outcome, Slot
from queen.routing.desk import Desk
from queen.routing.prefix_index import Want
from queen.routing.router import Router, RoutingSettings
from tests.fakes import FakeClock

# The end of a stream as grpc.aio says it (grpc-stubs does not declare it).
EOF = grpc.aio.EOF  # type: ignore[attr-defined]
Script = list[common_pb2.InferChunk | grpc.aio.AioRpcError]


def rpc_error(code: grpc.StatusCode, details: str = "") -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, "")


def chunk(text: str, completion_tokens: int = 0) -> common_pb2.InferChunk:
    return common_pb2.InferChunk(text=text, completion_tokens=completion_tokens)


class FakeCall:
    """A worker's Infer stream that plays a script: chunks, then EOF or an error."""

    def __init__(self, script: Script) -> None:
        self.script = list(script)
        self.cancelled = False

    async def read(self) -> object:
        await asyncio.sleep(0)
        if not self.script:
            return EOF
        item = self.script.pop(0)
        if isinstance(item, grpc.aio.AioRpcError):
            self.script.clear()
            raise item
        return item

    def done(self) -> bool:
        return self.cancelled or not self.script

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class FakeLeaseCall:
    """A worker's Leases stream: notices the queen writes are kept; reports the test sends
    are read; `end(error)` ends it as the worker (or the network) would."""

    def __init__(self) -> None:
        self.notices: list[worker_pb2.LeaseNotice] = []
        self.reports: asyncio.Queue[worker_pb2.LeaseReport | grpc.aio.AioRpcError | None] = (
            asyncio.Queue()
        )
        self.cancelled = False

    async def write(self, notice: worker_pb2.LeaseNotice) -> None:
        self.notices.append(notice)

    def report(self, *events: worker_pb2.LeaseEvent) -> None:
        self.reports.put_nowait(worker_pb2.LeaseReport(events=events))

    def end(self, error: grpc.aio.AioRpcError | None = None) -> None:
        self.reports.put_nowait(error)

    def __aiter__(self) -> FakeLeaseCall:
        return self

    async def __anext__(self) -> worker_pb2.LeaseReport:
        item = await self.reports.get()
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, grpc.aio.AioRpcError):
            raise item
        return item

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class FakeWorkerStub:
    def __init__(self, calls: list[FakeCall]) -> None:
        self.calls = calls
        self.requests: list[common_pb2.InferRequest] = []
        self.lease_calls: list[FakeLeaseCall] = []

    def Leases(self) -> FakeLeaseCall:
        self.lease_calls.append(FakeLeaseCall())
        return self.lease_calls[-1]

    def Infer(self, request: common_pb2.InferRequest, timeout: float | None = None) -> FakeCall:
        self.requests.append(request)
        return self.calls.pop(0)


class FakeChannels(Channels):
    """Workers answer from scripts per address; discarded addresses are remembered."""

    def __init__(self, scripts: dict[str, list[Script]] | None = None) -> None:
        super().__init__()
        self.stubs = {
            address: FakeWorkerStub([FakeCall(s) for s in calls])
            for address, calls in (scripts or {}).items()
        }
        self.discarded: list[str] = []

    def worker(self, address: str) -> worker_pb2_grpc.WorkerAsyncStub:
        return cast("worker_pb2_grpc.WorkerAsyncStub", self.stubs[address])

    def discard(self, address: str) -> None:
        self.discarded.append(address)

    def discard_all(self, addresses: list[str]) -> None:
        self.discarded.extend(addresses)


class FakeContext:
    """What a route asks of the client's call: the time left before its deadline."""

    def __init__(self, remaining: float | None = None) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining


def make_cluster(
    clock: FakeClock,
    tmp: Path,
    channels: Channels | None = None,
    interval: float = 1.0,
    hive_ttl_intervals: float = 10.0,
) -> Cluster:
    """Real registry, router, desk and events; the history is never opened (nothing is
    written)."""
    settings = RegistrySettings(interval=interval, hive_ttl_intervals=hive_ttl_intervals)
    registry = Registry(clock, settings)
    router = Router(registry, seed=1)
    channels = channels or FakeChannels()
    desk = Desk(router)
    return Cluster(
        registry=registry,
        router=router,
        desk=desk,
        channels=channels,
        events=EventBus(),
        history=History(tmp / "history.sqlite3"),
        autospawn=Autospawner(registry, channels, {}),
        leases=LeaseManager(desk, channels, clock),
        clock=clock,
        max_tokens_cap=1000,
        max_prompt_bytes=10_000,
        max_streams_per_client=0,
        metrics=QueenMetrics(registry, desk),
        migration_limit=DEFAULT_MIGRATION_LIMIT,
    )


def record(worker_id: str, hive: str = "h1", model: str = "m") -> common_pb2.WorkerRecord:
    return common_pb2.WorkerRecord(
        id=worker_id,
        hive_id=hive,
        model=model,
        state=common_pb2.WORKER_STATE_IDLE,
        slots_total=1,
        address=f"{hive}:w{worker_id}",
    )


def beat(hive: str, *workers: common_pb2.WorkerRecord) -> queen_pb2.HiveHeartbeat:
    return queen_pb2.HiveHeartbeat(hive_id=hive, address=f"{hive}:1", workers=workers)


class Fleet:
    """A registry with its router on it, as the cluster wires them (no I/O), for tests of
    membership and picks together: the registry's calls and the router's are its own
    (`fleet.apply_heartbeat`, `fleet.policy_for`), and `take_slot` asks the router as the desk
    would."""

    def __init__(
        self,
        clock: FakeClock,
        settings: RegistrySettings | None = None,
        routing: RoutingSettings | None = None,
        events: list[queen_pb2.Event] | None = None,
    ) -> None:
        record_event = events.append if events is not None else lambda event: None
        self.registry = Registry(clock, settings, on_event=record_event)
        self.router = Router(self.registry, routing, seed=1, on_event=record_event,
                             on_health=self.registry.note_health)  # fmt: skip

    def __getattr__(self, name: str) -> Any:
        """The registry's attribute, else the router's (`fleet.policy_for`)."""
        if hasattr(self.registry, name):
            return getattr(self.registry, name)
        return getattr(self.router, name)

    def take(
        self,
        model: str,
        exclude: frozenset[str] | set[str] = frozenset(),
        policy: common_pb2.RoutingPolicy.ValueType = common_pb2.ROUTING_POLICY_UNSPECIFIED,
        tags: frozenset[str] | list[str] = frozenset(),
        want: Want | None = None,
        affinity: bool = True,
    ) -> Slot | None:
        ask = Ask(model, frozenset(tags), policy, want, frozenset(exclude))
        return self.router.take(ask, affinity)

    def give_back(self, slot: Slot, outcome: Outcome) -> None:
        self.router.give_back(slot, outcome)

    def view(self, entry: WorkerEntry) -> common_pb2.WorkerRecord:
        return self.registry.view(entry, self.router.score(entry))

    def sweep(self) -> list[str]:
        removed = self.registry.sweep()
        self.router.sweep()
        return removed


def split_settings(**settings: object) -> tuple[RegistrySettings, RoutingSettings]:
    """Keyword settings of either kind, each to its own."""
    names = set(RegistrySettings.__dataclass_fields__)
    mine = {k: v for k, v in settings.items() if k in names}
    theirs = {k: v for k, v in settings.items() if k not in names}
    return RegistrySettings(**mine), RoutingSettings(**theirs)  # type: ignore[arg-type]
