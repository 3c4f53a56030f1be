"""The worker lifecycle (hive/states.py) driven event by event with plain values: no processes."""

from __future__ import annotations

import random
import signal

import pytest

from hive.policy import RestartSettings, RestartTracker
from hive.states import (
    Adoption,
    AskShutdown,
    Conflict,
    CountCrash,
    ForgetAddress,
    Launch,
    Lifecycle,
    LifecycleSettings,
    Phase,
    Remove,
    Signal,
    adoption,
    recovered_phase,
    stored_state,
)
from protos.v1 import common_pb2

ON_FAILURE = common_pb2.RESTART_POLICY_ON_FAILURE
SETTINGS = LifecycleSettings(stop_grace=10, term_grace=3, load_timeout=120, idle_timeout=300)


def lifecycle(
    policy: common_pb2.RestartPolicy.ValueType = ON_FAILURE,
    settings: LifecycleSettings = SETTINGS,
    seed: int = 1,
) -> Lifecycle:
    tracker = RestartTracker(settings.restart, random.Random(seed))
    return Lifecycle("w-1", policy, settings, tracker)


def ready_worker(now: float = 0.0, **kwargs: object) -> Lifecycle:
    life = lifecycle(**kwargs)  # type: ignore[arg-type]
    assert life.start(now) == [Launch(restart=False)]
    life.launched(now)
    life.ready(now, "127.0.0.1:5000")
    return life


def phase_of(life: Lifecycle) -> Phase:
    """A call, so mypy's narrowing from an earlier assert does not stick across events."""
    return life.phase


def test_a_new_worker_launches_loads_and_becomes_idle() -> None:
    life = lifecycle()
    assert life.start(0.0) == [Launch(restart=False)]
    assert phase_of(life) is Phase.LOADING and not life.alive
    life.launched(0.0)
    assert life.alive
    life.ready(1.0, "127.0.0.1:5000")
    assert (life.phase, life.address) == (Phase.IDLE, "127.0.0.1:5000")
    with pytest.raises(Conflict, match="is IDLE, not LOADING"):
        life.ready(2.0, "127.0.0.1:5001")


def test_a_crash_is_restarted_after_a_jittered_backoff_with_the_same_id() -> None:
    life = ready_worker()
    actions = life.exited(10.0, -9)
    assert CountCrash() in actions and ForgetAddress("127.0.0.1:5000") in actions
    assert phase_of(life) is Phase.RESTART_PENDING and life.failure_reason == "killed by SIGKILL"
    wake = life.wake_at()
    assert wake is not None and 10.8 <= wake <= 11.2  # 1 s +- 20 %
    assert life.tick(wake - 0.01) == []
    actions = life.tick(wake)
    assert Launch(restart=True) in actions
    assert (life.phase, life.restart_count, life.failure_reason) == (Phase.LOADING, 1, "")


def test_backoff_doubles_within_jitter_bounds_until_a_crash_loop_stops_it() -> None:
    life = ready_worker()
    now, delays = 0.0, []
    for _ in range(4):
        life.exited(now, 1)
        wake = life.wake_at()
        assert wake is not None
        delays.append(wake - now)
        now = wake
        life.tick(now)
        life.launched(now)
    for delay, base in zip(delays, (1, 2, 4, 8), strict=True):
        assert 0.8 * base <= delay <= 1.2 * base
    life.exited(now + 1, 1)  # the fifth failure within 5 minutes
    assert phase_of(life) is Phase.FAILED and life.wake_at() == now + 1 + 600  # the row's TTL
    assert life.failure_reason == (
        "exited with code 1; crash loop: 5 failures in 300s; "
        "not restarting (spawn it again once fixed)"
    )


@pytest.mark.parametrize(
    ("policy", "code", "restarts"),
    [
        (common_pb2.RESTART_POLICY_NEVER, 1, False),
        (ON_FAILURE, 0, False),
        (ON_FAILURE, 1, True),
        (common_pb2.RESTART_POLICY_ALWAYS, 0, True),
    ],
)
def test_restart_policy_decides_after_an_unasked_exit(
    policy: common_pb2.RestartPolicy.ValueType, code: int, restarts: bool
) -> None:
    life = ready_worker(policy=policy)
    life.exited(5.0, code)
    assert (phase_of(life) is Phase.RESTART_PENDING) is restarts
    if not restarts:
        assert "not restarting (restart policy" in life.failure_reason


def test_failed_health_checks_in_a_row_kill_it_term_then_kill() -> None:
    life = ready_worker()
    assert life.health_checked(1.0, False, "DEADLINE_EXCEEDED") == []
    assert life.health_checked(2.0, True) == []  # a success starts the count over
    life.health_checked(3.0, False, "DEADLINE_EXCEEDED")
    life.health_checked(4.0, False, "DEADLINE_EXCEEDED")
    actions = life.health_checked(5.0, False, "DEADLINE_EXCEEDED")
    assert Signal(signal.SIGTERM) in actions and phase_of(life) is Phase.FAILED
    assert life.failure_reason == "failed 3 health checks in a row: DEADLINE_EXCEEDED"
    assert life.wake_at() == 8.0  # term_grace later
    assert Signal(signal.SIGKILL) in life.tick(8.0)
    actions = life.exited(8.1, -9)
    assert CountCrash() in actions and phase_of(life) is Phase.RESTART_PENDING
    assert life.failure_reason.startswith("failed 3 health checks")  # the cause, not the kill


def test_a_worker_stuck_loading_is_failed_and_killed_at_the_load_timeout() -> None:
    life = lifecycle()
    life.start(0.0)
    life.launched(0.0)
    assert life.wake_at() == 120.0
    assert life.tick(119.9) == []
    actions = life.tick(120.0)
    assert Signal(signal.SIGTERM) in actions
    assert life.failure_reason == "still LOADING after 120s (load timeout)"


def test_idle_retirement_counts_only_requests_and_spares_kept_and_busy_workers() -> None:
    life = ready_worker()
    assert life.status(1.0, busy=False, idle_for=299.0) == []
    assert life.status(1.0, busy=False, idle_for=400.0, keep=True) == []
    life.status(2.0, busy=True, idle_for=400.0)
    assert phase_of(life) is Phase.BUSY  # busy: never idle, whatever the clock says
    actions = life.status(3.0, busy=False, idle_for=300.0)
    assert phase_of(life) is Phase.STOPPING
    assert AskShutdown("127.0.0.1:5000", 10.0) in actions
    never = ready_worker(settings=LifecycleSettings(idle_timeout=0))
    assert never.status(1.0, busy=False, idle_for=1e9) == []


def test_graceful_stop_escalates_to_sigterm_then_sigkill() -> None:
    life = ready_worker()
    actions = life.stop(0.0)
    assert AskShutdown("127.0.0.1:5000", 10.0) in actions and phase_of(life) is Phase.STOPPING
    assert life.shutdown_answered(0.1, accepted=True, grace=10.0) == []
    assert life.wake_at() == pytest.approx(11.1)  # in-flight streams get their grace
    assert life.tick(11.1) == [Signal(signal.SIGTERM)]
    assert Signal(signal.SIGKILL) in life.tick(14.1)
    actions = life.exited(14.2, -9)
    assert Remove() in actions and CountCrash() not in actions
    assert phase_of(life) is Phase.GONE


def test_stop_variants() -> None:
    refused = ready_worker()
    refused.stop(0.0, grace=2.0)
    assert refused.shutdown_answered(0.5, accepted=False, grace=2.0) == [Signal(signal.SIGTERM)]
    forced = ready_worker()
    assert Signal(signal.SIGKILL) in forced.stop(0.0, force=True)
    loading = lifecycle()
    loading.start(0.0)
    loading.launched(0.0)
    assert Signal(signal.SIGTERM) in loading.stop(0.0)  # no address to ask: SIGTERM
    pending = ready_worker()
    pending.exited(1.0, 1)
    assert pending.stop(1.5)[0] == Remove()  # nothing runs: the row goes at once
    assert phase_of(pending) is Phase.GONE and pending.wake_at() is None


def test_a_load_error_fails_it_and_the_exit_that_follows_is_a_crash() -> None:
    life = lifecycle()
    life.start(0.0)
    life.launched(0.0)
    life.load_failed(1.0, "load failed: no such file")
    assert phase_of(life) is Phase.FAILED
    actions = life.exited(1.1, 3)
    assert CountCrash() in actions and life.failure_reason == "load failed: no such file"
    assert phase_of(life) is Phase.RESTART_PENDING


def test_a_process_that_cannot_start_is_failed_without_restart() -> None:
    life = lifecycle()
    life.start(0.0)
    life.launch_failed(0.0, "No such file or directory")
    assert phase_of(life) is Phase.FAILED and life.wake_at() == 600.0  # only its row's TTL
    assert life.exited(1.0, 1) == []  # nothing of ours was running


def test_a_failed_row_goes_after_its_ttl_but_not_while_a_restart_is_coming() -> None:
    never = ready_worker(policy=common_pb2.RESTART_POLICY_NEVER)
    never.exited(10.0, 1)
    assert never.tick(609.9) == [] and phase_of(never) is Phase.FAILED
    assert Remove(expired=True) in never.tick(610.0) and phase_of(never) is Phase.GONE
    pending = ready_worker()
    pending.exited(10.0, 1)
    assert pending.failed_since is None  # a restart is coming: not FAILED for good
    killing = ready_worker(settings=LifecycleSettings(health_failures=1, failed_ttl=5))
    killing.health_checked(1.0, False, "UNAVAILABLE")
    assert killing.failed_since is None  # the process still runs until it is killed
    keep = ready_worker(
        policy=common_pb2.RESTART_POLICY_NEVER, settings=LifecycleSettings(failed_ttl=0)
    )
    keep.exited(1.0, 1)
    assert keep.wake_at() is None  # 0: failed rows stay until removed by hand


@pytest.mark.parametrize(
    ("saved", "alive", "address", "plan"),
    [
        ("IDLE", True, True, Adoption.CHECK_HEALTH),
        ("BUSY", True, True, Adoption.CHECK_HEALTH),
        ("IDLE", True, False, Adoption.KILL_AND_FAIL),
        ("LOADING", True, False, Adoption.ADOPT_LOADING),
        ("IDLE", False, True, Adoption.GONE),  # dead, or the pid is now another process's
        ("LOADING", False, False, Adoption.GONE),
        ("STOPPING", True, True, Adoption.KILL_AND_DROP),
        ("STOPPING", False, False, Adoption.KILL_AND_DROP),
        ("FAILED", False, False, Adoption.RESTORE_FAILED),
        ("FAILED", True, False, Adoption.KILL_AND_FAIL),
        ("NONSENSE", True, True, Adoption.KILL_AND_FAIL),
    ],
)
def test_adoption_decision(saved: str, alive: bool, address: bool, plan: Adoption) -> None:
    assert adoption(saved, alive, address) is plan


def test_adopted_rows_carry_on_fail_or_restart() -> None:
    life = lifecycle()
    life.restore("", 0, "")
    life.adopted(0.0, ready=True)
    assert phase_of(life) is Phase.IDLE and life.alive
    gone = lifecycle()
    gone.restore("", 0, "")
    actions = gone.not_adopted(0.0, "process was gone when the hive restarted")
    assert CountCrash() in actions and phase_of(gone) is Phase.RESTART_PENDING
    before = lifecycle(settings=LifecycleSettings(restart=RestartSettings(jitter=0.0)))
    before.restore("", 0, "")
    before.failed_before(0.0, restart_pending=True)
    assert phase_of(before) is Phase.RESTART_PENDING and before.wake_at() == 1.0
    kept = lifecycle()
    kept.restore("", 0, "")
    assert kept.failed_before(0.0, restart_pending=False) == []
    assert phase_of(kept) is Phase.FAILED


def test_a_spawn_is_answered_once_the_worker_is_ready_or_failed() -> None:
    life = lifecycle()
    life.start(0.0)
    life.launched(0.0)
    assert not life.settled  # LOADING: a SpawnWorker(wait_ready) keeps waiting
    life.ready(1.0, "127.0.0.1:5000")
    assert life.settled
    failed = lifecycle()
    failed.start(0.0)
    failed.launch_failed(0.0, "No such file or directory")
    assert failed.settled
    adopting = lifecycle()
    adopting.restore("127.0.0.1:5000", 0, "")
    assert not adopting.settled  # its process not yet checked


def test_load_progress_is_kept_within_bounds_and_only_while_loading() -> None:
    life = lifecycle()
    life.start(0.0)
    life.launched(0.0)
    assert life.load_progress(0.25) == 0.25
    assert (life.load_progress(-1.0), life.load_progress(7.0)) == (0.0, 1.0)
    life.ready(1.0, "127.0.0.1:5000")
    assert life.load_progress(0.5) is None  # a late report after ready: nothing to say
    failed = lifecycle()
    failed.start(0.0)
    failed.launched(0.0)
    failed.load_failed(1.0, "no such model")
    assert failed.load_progress(0.5) is None


def test_only_ready_workers_with_an_address_are_health_checked() -> None:
    life = lifecycle()
    life.start(0.0)
    life.launched(0.0)
    assert not life.serving  # LOADING
    life.ready(1.0, "127.0.0.1:5000")
    assert life.serving
    life.status(2.0, busy=True, idle_for=0.0)
    assert phase_of(life) is Phase.BUSY and life.serving
    adopting = lifecycle()
    adopting.restore("", 0, "")
    adopting.adopted(0.0, ready=True)
    assert phase_of(adopting) is Phase.IDLE and not adopting.serving  # no address to ask


def test_stopping_and_gone_workers_are_leaving() -> None:
    life = ready_worker()
    assert not life.leaving
    life.stop(1.0)
    assert phase_of(life) is Phase.STOPPING and life.leaving
    life.exited(2.0, 0)
    assert phase_of(life) is Phase.GONE and life.leaving
    failed = ready_worker(policy=common_pb2.RESTART_POLICY_NEVER)
    failed.exited(1.0, 1)
    assert phase_of(failed) is Phase.FAILED and not failed.leaving  # its row still counts


@pytest.mark.parametrize(
    ("phase", "stored"),
    [
        (Phase.LOADING, "LOADING"),
        (Phase.IDLE, "IDLE"),
        (Phase.BUSY, "IDLE"),  # flips too often to be worth a write
        (Phase.STOPPING, "STOPPING"),
        (Phase.FAILED, "FAILED"),
        (Phase.RESTART_PENDING, "FAILED"),  # with restart_pending set on the row
    ],
)
def test_stored_state(phase: Phase, stored: str) -> None:
    assert stored_state(phase) == stored


def test_stored_states_are_read_back_by_the_adoption_decision() -> None:
    live = {Phase.IDLE: Adoption.CHECK_HEALTH, Phase.LOADING: Adoption.ADOPT_LOADING}
    for phase, plan in live.items():
        assert adoption(stored_state(phase), True, phase is Phase.IDLE) is plan
    assert adoption(stored_state(Phase.BUSY), True, True) is Adoption.CHECK_HEALTH
    assert adoption(stored_state(Phase.RESTART_PENDING), False, False) is Adoption.RESTORE_FAILED


def test_a_recovered_process_is_idle_if_it_published_an_address() -> None:
    assert recovered_phase(has_address=True) is Phase.IDLE
    assert recovered_phase(has_address=False) is Phase.LOADING
    assert adoption(recovered_phase(True).value, True, True) is Adoption.CHECK_HEALTH
    assert adoption(recovered_phase(False).value, True, False) is Adoption.ADOPT_LOADING
