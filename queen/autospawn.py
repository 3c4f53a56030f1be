"""On-demand spawn: a request for a model nobody serves makes the queen start one worker.

Concurrent requests for the model cause exactly one spawn; they wait in the
desk's queue (within their own deadlines) until the worker is ready.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import structlog

from apiary.options import parse_key_values
from apiary.protoutil import naming
from protos.v1 import common_pb2, hive_pb2
from queen.channels import Channels
from queen.members import HiveEntry
from queen.registry import Registry

log = structlog.get_logger("queen.autospawn")

# Backends that run a model file a hive must have in its catalog.
FILE_BACKENDS = frozenset({"llamacpp"})


@dataclass(frozen=True)
class SpawnPlan:
    model: str
    backend: str
    backend_options: dict[str, str] = field(default_factory=dict)


def parse_plan(text: str) -> SpawnPlan:
    """'MODEL=BACKEND[,key=value...]', e.g. 'demo=echo,token_delay=0.05'."""
    head, *options = text.split(",")
    model, sep, backend = head.partition("=")
    if not sep or not model or not backend:
        raise ValueError(f"--autospawn {text!r} is not MODEL=BACKEND[,KEY=VALUE...]")
    return SpawnPlan(model, backend, parse_key_values(options, "--autospawn option"))


class Autospawner:
    def __init__(
        self,
        registry: Registry,
        channels: Channels,
        plans: dict[str, SpawnPlan],
        from_catalogs: bool = False,
        on_failure: Callable[[str, str], None] = lambda model, reason: None,
        on_spawned: Callable[[common_pb2.WorkerRecord], None] = lambda record: None,
    ) -> None:
        self.registry = registry
        self.channels = channels
        self.plans = plans
        # Also spawn any model a healthy hive has in its catalog, with the backend it names.
        self.from_catalogs = from_catalogs
        self.on_failure = on_failure
        self.on_spawned = on_spawned
        self.pending: dict[str, asyncio.Task[None]] = {}
        self.spawns = 0

    def plan(self, model: str) -> SpawnPlan | None:
        if model in self.plans:
            return self.plans[model]
        if self.from_catalogs:
            for hive in self.registry.catalog_hives(model):
                return SpawnPlan(model, hive.catalog[model])
        return None

    def spawnable(self) -> list[str]:
        models = set(self.plans)
        if self.from_catalogs:
            models |= self.registry.catalog_models()
        return sorted(models)

    def can_spawn(self, model: str) -> bool:
        return self.plan(model) is not None

    def expecting(self, model: str) -> bool:
        return model in self.pending

    def ensure(self, model: str) -> None:
        """Start one spawn for `model` unless one is already under way."""
        plan = self.plan(model)
        if model in self.pending or plan is None:
            return
        task = asyncio.get_running_loop().create_task(self._spawn(plan))
        self.pending[model] = task

    def choose_hive(self, plan: SpawnPlan) -> HiveEntry | None:
        """A healthy, undrained hive that offers the backend (and, for a backend that needs a
        model file, has the model in its catalog); the one with most free memory."""
        candidates = [
            hive
            for hive in self.registry.hives.values()
            if not hive.drained
            and self.registry.health_of(hive) == common_pb2.HIVE_HEALTH_HEALTHY
            and plan.backend in hive.backends
            and (plan.backend not in FILE_BACKENDS or plan.model in hive.catalog)
        ]
        return max(
            candidates,
            key=lambda h: (h.resources.memory_available_bytes, -len(h.worker_ids)),
            default=None,
        )

    async def _spawn(self, plan: SpawnPlan) -> None:
        try:
            hive = self.choose_hive(plan)
            if hive is None:
                raise RuntimeError(
                    f"no healthy hive offers backend {plan.backend!r}; "
                    f"hives: {naming(self.registry.hives)}"
                )
            request = hive_pb2.SpawnWorkerRequest(
                model=plan.model, backend=plan.backend, backend_options=plan.backend_options
            )
            try:
                reply = await self.channels.hive(hive.id, hive.address).SpawnWorker(
                    request, timeout=30
                )
            except grpc.aio.AioRpcError as exc:
                raise RuntimeError(f"hive {hive.id}: {exc.details()}") from None
            self.spawns += 1
            log.info(
                "autospawned worker", model=plan.model, hive_id=hive.id, worker_id=reply.worker.id
            )
            self.on_spawned(reply.worker)
        except Exception as exc:
            log.warning("autospawn failed", model=plan.model, error=str(exc))
            self.pending.pop(plan.model, None)
            self.on_failure(plan.model, f"autospawn of model {plan.model!r} failed: {exc}")
            return
        self.pending.pop(plan.model, None)

    async def close(self) -> None:
        for task in self.pending.values():
            task.cancel()
        await asyncio.gather(*self.pending.values(), return_exceptions=True)
