"""What /health and /ready say (the router's routing_problem and model_ready, and the service's
draining), by the queen's own clock: starting, no worker, and which models would be served
now."""

from __future__ import annotations

from protos.v1 import common_pb2, queen_pb2
from queen.registry import Registry, RegistrySettings
from queen.routing.router import Router
from tests.fakes import FakeClock


def worker(worker_id: str, state: int = common_pb2.WORKER_STATE_IDLE) -> common_pb2.WorkerRecord:
    return common_pb2.WorkerRecord(
        id=worker_id, hive_id="h1", model="m", state=state,  # type: ignore[arg-type]
        slots_total=1, address=f"h1:{worker_id}",
    )  # fmt: skip


def heard(registry: Registry, *workers: common_pb2.WorkerRecord) -> None:
    registry.apply_heartbeat(queen_pb2.HiveHeartbeat(hive_id="h1", address="h1:1", workers=workers))


def test_a_new_queen_is_starting_until_its_hives_had_time_then_says_no_worker() -> None:
    clock = FakeClock()
    registry = Registry(clock, RegistrySettings(interval=1.0))
    router = Router(registry)
    assert router.routing_problem() == ("starting: the hives have not all reported yet")
    clock.advance(60)
    assert router.routing_problem() == "no worker is registered"
    heard(registry, worker("a", common_pb2.WORKER_STATE_LOADING))
    assert router.routing_problem() == "no worker is ready"
    heard(registry, worker("a"))
    assert router.routing_problem() is None


def test_a_ready_worker_routes_at_once_even_while_starting_and_busy_ones_count() -> None:
    clock = FakeClock()
    registry = Registry(clock, RegistrySettings(interval=1.0))
    router = Router(registry)
    heard(registry, worker("a", common_pb2.WORKER_STATE_BUSY))
    assert registry.warming_up() and router.routing_problem() is None
    assert router.model_ready("m") and not router.model_ready("other")


def test_a_model_is_not_ready_on_drained_unreachable_or_silent_workers() -> None:
    clock = FakeClock()
    registry = Registry(clock, RegistrySettings(interval=1.0))
    router = Router(registry)
    heard(registry, worker("a"))
    registry.drain_worker("a", True)
    assert not router.model_ready("m")
    registry.drain_worker("a", False)
    registry.mark_unreachable("a")
    assert not router.model_ready("m")
    heard(registry, worker("a"))  # its hive lists it again
    assert router.model_ready("m")
    clock.advance(3.5)  # the hive went silent: unhealthy
    assert not router.model_ready("m")
    assert router.routing_problem() == "no worker is ready"
