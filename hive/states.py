"""One worker's lifecycle as a pure state machine: events in, actions out, no I/O.

The supervisor feeds it what happened (the process started or exited, the worker
said it is ready, a health check or status came back, time passed, someone asked
for a stop) and carries out the actions it returns (launch, ask to shut down,
signal, persist the table, heartbeat now, drop the row). Time comes in as `now`
(monotonic seconds); `wake_at()` says when `tick(now)` is next due.

    LOADING  -> IDLE             the worker reported ready
    LOADING  -> FAILED           load error, exit before ready, or load timeout
    IDLE    <-> BUSY             the worker's own status, read by the health monitor
    IDLE/BUSY -> FAILED          unasked exit, or failed health checks in a row
    FAILED   -> RESTART_PENDING  the restart policy wants it back, after a backoff
    RESTART_PENDING -> LOADING   the backoff is over: a new process, same id
    any      -> STOPPING         stop (operator, idle retirement, hive shutdown)
    STOPPING -> GONE             the process is gone; the row goes with it
    ADOPTING -> IDLE/LOADING/FAILED/GONE   a row read back after a hive restart
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field

from hive.policy import HealthTracker, RestartSettings, RestartTracker
from protos.v1 import common_pb2


class Phase(enum.Enum):
    LOADING = "LOADING"
    IDLE = "IDLE"
    BUSY = "BUSY"
    STOPPING = "STOPPING"
    FAILED = "FAILED"
    RESTART_PENDING = "RESTART_PENDING"
    # A row from before a hive restart whose process we are about to check.
    ADOPTING = "ADOPTING"
    GONE = "GONE"


READY = frozenset({Phase.IDLE, Phase.BUSY})
# Phases in which nobody waiting for a spawn has an answer yet.
UNSETTLED = frozenset({Phase.LOADING, Phase.ADOPTING})
# On its way out: it no longer counts towards the workers a hive keeps.
LEAVING = frozenset({Phase.STOPPING, Phase.GONE})


class Stage(enum.Enum):
    """How far ending the process has gone: each stage waits, then the next is harsher."""

    NONE = 0
    ASKED = 1  # Worker.Shutdown sent, waiting for its answer
    DRAINING = 2  # the worker accepted: in-flight streams get their grace
    TERM = 3  # SIGTERM sent
    KILL = 4  # SIGKILL sent: nothing left to do but wait


# ---- actions ------------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    """Start a process for the worker (a restart if `restart`)."""

    restart: bool = False


@dataclass(frozen=True)
class AskShutdown:
    """Worker.Shutdown(grace): in-flight streams finish, then the worker exits."""

    address: str
    grace: float


@dataclass(frozen=True)
class Signal:
    """Signal the worker's process group (its identity checked first)."""

    sig: signal.Signals


@dataclass(frozen=True)
class Persist:
    """The table on disk should say what the machine says now."""


@dataclass(frozen=True)
class Report:
    """Heartbeat now: the queen should not wait an interval to hear of this."""


@dataclass(frozen=True)
class Remove:
    """The worker's row goes (`expired`: a FAILED row outlived its TTL; nobody asked)."""

    expired: bool = False


@dataclass(frozen=True)
class ForgetAddress:
    """The process behind this address is gone: close channels to it."""

    address: str


@dataclass(frozen=True)
class CountCrash:
    """An exit nobody asked for (or a kill for health): the hive counts it."""


@dataclass(frozen=True)
class Log:
    level: str
    event: str
    fields: tuple[tuple[str, object], ...] = ()


Action = (
    Launch | AskShutdown | Signal | Persist | Report | Remove | ForgetAddress | CountCrash | Log
)
CHANGED: tuple[Action, ...] = (Persist(), Report())


class Conflict(Exception):
    """An event that makes no sense in the worker's phase (e.g. ready twice)."""


@dataclass(frozen=True)
class LifecycleSettings:
    # Graceful stop: the worker's own drain time after a Shutdown request.
    stop_grace: float = 10.0
    # After SIGTERM, how long before SIGKILL.
    term_grace: float = 3.0
    health_failures: int = 3
    load_timeout: float = 120.0
    # 0 = never retire idle workers.
    idle_timeout: float = 300.0
    # A FAILED worker nothing will restart keeps its row (for `worker list --state failed`)
    # this long, then goes (0 = keep forever).
    failed_ttl: float = 600.0
    restart: RestartSettings = field(default_factory=RestartSettings)


def describe_exit(code: int | None) -> str:
    if code is None:
        return "exited (status unknown: the worker was adopted after a hive restart)"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


@dataclass
class Lifecycle:
    """One worker: its phase and what it takes to decide the next one."""

    worker_id: str
    policy: common_pb2.RestartPolicy.ValueType
    settings: LifecycleSettings = field(default_factory=LifecycleSettings)
    restarts: RestartTracker = field(default_factory=RestartTracker)
    phase: Phase = Phase.LOADING
    # A process of ours is running (from launch or adoption until its exit).
    alive: bool = False
    address: str = ""
    failure_reason: str = ""
    restart_count: int = 0
    loading_since: float = 0.0
    restart_at: float | None = None
    stage: Stage = Stage.NONE
    stage_deadline: float | None = None
    # When it became FAILED for good (nothing runs, no restart coming): its row's TTL starts.
    failed_since: float | None = None
    health: HealthTracker = field(init=False)

    def __post_init__(self) -> None:
        self.health = HealthTracker(self.settings.health_failures)

    # ---- what the phase says ----------------------------------------------------

    @property
    def settled(self) -> bool:
        """Ready or failed: a SpawnWorker(wait_ready) waiting on this worker has its answer."""
        return self.phase not in UNSETTLED

    @property
    def leaving(self) -> bool:
        """Stopping or gone: a boot count is made up without it."""
        return self.phase in LEAVING

    @property
    def serving(self) -> bool:
        """Ready at an address: the health monitor asks after it."""
        return self.phase in READY and bool(self.address)

    def load_progress(self, progress: float) -> float | None:
        """A loading report's fraction, within 0..1; None for a late report (after ready or
        failure), which has nothing to say any more."""
        if self.phase is not Phase.LOADING:
            return None
        return min(max(progress, 0.0), 1.0)

    # ---- starting -------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        """A new worker: launch its first process."""
        return self._relaunch(now, restart=False)

    def _relaunch(self, now: float, restart: bool) -> list[Action]:
        # FAILED/RESTART_PENDING/new -> LOADING: a fresh process under the same id.
        self.phase = Phase.LOADING
        self.address = ""
        self.failure_reason = ""
        self.restart_at = None
        self.stage, self.stage_deadline = Stage.NONE, None
        self.failed_since = None
        self.health = HealthTracker(self.settings.health_failures)
        self.loading_since = now
        if restart:
            self.restart_count += 1
        return [Launch(restart=restart)]

    def launched(self, now: float) -> list[Action]:
        """The process is running; it will call back when its backend is loaded."""
        self.alive = True
        self.restarts.started(now)
        return [*CHANGED]

    def launch_failed(self, now: float, error: str) -> list[Action]:
        # LOADING -> FAILED: no process could be started (bad executable, no resources);
        # not a crash of the worker, so no restart either.
        self.phase = Phase.FAILED
        self.alive = False
        self.failure_reason = f"could not start process: {error}"
        self.failed_since = now
        return [*CHANGED, Log("error", "cannot start worker", (("error", error),))]

    def ready(self, now: float, address: str) -> list[Action]:
        if self.phase is not Phase.LOADING:
            raise Conflict(f"worker {self.worker_id} is {self.phase.value}, not LOADING")
        # LOADING -> IDLE: the ready callback; routable from the next heartbeat (sent now).
        self.phase = Phase.IDLE
        self.address = address
        return [*CHANGED, Log("info", "worker ready", (("address", address),))]

    def load_failed(self, now: float, error: str) -> list[Action]:
        if self.phase is not Phase.LOADING:
            raise Conflict(f"worker {self.worker_id} is {self.phase.value}, not LOADING")
        # LOADING -> FAILED: the backend could not load; the process exits by itself next.
        self.phase = Phase.FAILED
        self.failure_reason = error
        return [*CHANGED, Log("warning", "worker failed to load", (("error", error),))]

    # ---- running --------------------------------------------------------------

    def health_checked(self, now: float, ok: bool, error: str = "") -> list[Action]:
        if self.phase not in READY:
            return []  # changed while the check was under way
        if not self.health.record(ok, error):
            return []
        # IDLE/BUSY -> FAILED: hung or unreachable; kill it and let the policy decide.
        reason = f"failed {self.health.failures} health checks in a row: {error}"
        return self._fail_and_kill(now, reason)

    def status(self, now: float, busy: bool, idle_for: float, keep: bool = False) -> list[Action]:
        """The worker's own view: busy or idle, and seconds since its last request ended.

        `keep`: never retire this worker for idleness (e.g. one the hive keeps from boot).
        """
        if self.phase not in READY:
            return []
        actions: list[Action] = []
        phase = Phase.BUSY if busy else Phase.IDLE
        if phase is not self.phase:
            # IDLE <-> BUSY: only the queen routes by it; a heartbeat carries it.
            self.phase = phase
            actions.append(Report())
        timeout = self.settings.idle_timeout
        if phase is Phase.IDLE and not keep and timeout > 0 and idle_for >= timeout:
            # IDLE -> STOPPING: no request for the idle timeout; health checks do not count.
            actions.append(Log("info", "retiring idle worker", (("idle_timeout", timeout),)))
            actions += self.stop(now)
        return actions

    def _fail_and_kill(self, now: float, reason: str) -> list[Action]:
        # -> FAILED while the process still runs: SIGTERM now, SIGKILL after term_grace; the
        # exit that follows counts as a crash and goes through the restart policy.
        self.phase = Phase.FAILED
        self.failure_reason = reason
        self._enter(Stage.TERM, now + self.settings.term_grace)
        return [
            *CHANGED,
            Log("warning", "killing worker", (("reason", reason),)),
            Signal(signal.SIGTERM),
        ]

    # ---- time -----------------------------------------------------------------

    def wake_at(self) -> float | None:
        """When tick() is next due (None: nothing is waiting on time)."""
        deadlines = (
            self.stage_deadline, self.restart_at, self._load_deadline(), self._failed_deadline()
        )  # fmt: skip
        due = [t for t in deadlines if t]
        return min(due) if due else None

    def _load_deadline(self) -> float | None:
        if self.phase is Phase.LOADING and self.alive and self.settings.load_timeout > 0:
            return self.loading_since + self.settings.load_timeout
        return None

    def _failed_deadline(self) -> float | None:
        if self.failed_since is not None and self.settings.failed_ttl > 0:
            return self.failed_since + self.settings.failed_ttl
        return None

    def tick(self, now: float) -> list[Action]:
        """Whatever was waiting on time and is due now."""
        if self.stage_deadline is not None and now >= self.stage_deadline:
            return self._escalate(now)
        if self.restart_at is not None and now >= self.restart_at:
            # RESTART_PENDING -> LOADING: the backoff is over.
            return [*self._relaunch(now, restart=True), Log("info", "restarting worker")]
        deadline = self._load_deadline()
        if deadline is not None and now >= deadline:
            # LOADING -> FAILED: stuck loading (a hung download, a deadlocked engine).
            timeout = self.settings.load_timeout
            return self._fail_and_kill(now, f"still LOADING after {timeout:g}s (load timeout)")
        failed = self._failed_deadline()
        if failed is not None and now >= failed and self.phase is Phase.FAILED:
            # FAILED -> GONE: kept long enough to be seen; it no longer clutters the table.
            self.phase = Phase.GONE
            ttl = self.settings.failed_ttl
            return [
                Remove(expired=True),
                *CHANGED,
                Log("info", "failed worker removed", (("after", ttl),)),
            ]
        return []

    def _escalate(self, now: float) -> list[Action]:
        if self.stage in (Stage.ASKED, Stage.DRAINING):
            # The grace is over (or the worker never answered): SIGTERM.
            self._enter(Stage.TERM, now + self.settings.term_grace)
            return [Signal(signal.SIGTERM)]
        # SIGTERM was ignored for term_grace: SIGKILL, which cannot be.
        self._enter(Stage.KILL, None)
        return [Log("warning", "worker ignored SIGTERM; killing"), Signal(signal.SIGKILL)]

    def _enter(self, stage: Stage, deadline: float | None) -> None:
        self.stage, self.stage_deadline = stage, deadline

    # ---- stopping -------------------------------------------------------------

    def stop(self, now: float, force: bool = False, grace: float | None = None) -> list[Action]:
        """Stop the worker for good: no restart; the row goes once the process is gone."""
        self.restart_at = None
        self.failed_since = None
        if not self.alive:
            # FAILED/RESTART_PENDING -> GONE: nothing runs; drop the row now.
            self.phase = Phase.GONE
            return [Remove(), *CHANGED]
        if self.phase is Phase.STOPPING and not force:
            return []  # already on its way
        # any -> STOPPING: the queen stops routing at the next heartbeat (sent now).
        self.phase = Phase.STOPPING
        actions: list[Action] = [*CHANGED]
        grace = self.settings.stop_grace if grace is None or grace <= 0 else grace
        if force:
            self._enter(Stage.KILL, None)
            return [*actions, Signal(signal.SIGKILL)]
        if self.address:
            self._enter(Stage.ASKED, now + grace + 1.0)
            return [*actions, AskShutdown(self.address, grace)]
        self._enter(Stage.TERM, now + self.settings.term_grace)
        return [*actions, Signal(signal.SIGTERM)]

    def shutdown_answered(self, now: float, accepted: bool, grace: float) -> list[Action]:
        if self.stage is not Stage.ASKED:
            return []
        if accepted:
            # The worker drains its streams and exits; SIGTERM only if it overstays.
            self._enter(Stage.DRAINING, now + grace + 1.0)
            return []
        self._enter(Stage.TERM, now + self.settings.term_grace)
        return [Signal(signal.SIGTERM)]

    # ---- exits ----------------------------------------------------------------

    def exited(self, now: float, code: int | None) -> list[Action]:
        """The process ended (code None: unknown, it was not our child)."""
        if not self.alive:
            return []  # an older process of this id, already accounted for
        self.alive = False
        self._enter(Stage.NONE, None)
        actions: list[Action] = [ForgetAddress(self.address)] if self.address else []
        self.address = ""
        if self.phase is Phase.STOPPING:
            # STOPPING -> GONE: asked to stop, and it did.
            self.phase = Phase.GONE
            return [*actions, Remove(), *CHANGED, Log("info", "worker stopped", _exit(code))]
        # LOADING/IDLE/BUSY/FAILED -> FAILED: nobody asked it to exit (or we killed it).
        self.phase = Phase.FAILED
        self.failure_reason = self.failure_reason or describe_exit(code)
        actions += [
            CountCrash(),
            Log("warning", "worker failed", (("reason", self.failure_reason),)),
        ]
        return [*actions, *self._after_failure(now, clean_exit=code == 0), *CHANGED]

    def _after_failure(self, now: float, clean_exit: bool) -> list[Action]:
        decision = self.restarts.failed(now, self.policy, clean_exit)
        if not decision.restart:
            # FAILED stays: the policy says no, or it is crash-looping.
            self.failure_reason = f"{self.failure_reason}; {decision.reason}"
            self.failed_since = now
            return [Log("warning", "worker will not be restarted", (("reason", decision.reason),))]
        # FAILED -> RESTART_PENDING: back after a backoff that grows with each failure.
        self.phase = Phase.RESTART_PENDING
        self.restart_at = now + decision.delay
        return [Log("info", "worker restart scheduled", (("delay", round(decision.delay, 2)),))]

    # ---- adoption after a hive restart ------------------------------------------

    def restore(self, address: str, restart_count: int, failure_reason: str) -> None:
        # new -> ADOPTING: a row read back from disk, its process not yet checked.
        self.phase = Phase.ADOPTING
        self.address = address
        self.restart_count, self.failure_reason = restart_count, failure_reason

    def adopted(self, now: float, ready: bool) -> list[Action]:
        # ADOPTING -> IDLE (it answered a health check) or LOADING (it will call back, or
        # run into the load timeout): the same process carries on under its old id.
        self.alive = True
        self.restarts.started(now)
        if ready:
            self.phase = Phase.IDLE
            return [Log("info", "re-adopted worker", (("address", self.address),))]
        self.phase, self.loading_since = Phase.LOADING, now
        return [Log("info", "re-adopted loading worker")]

    def not_adopted(self, now: float, reason: str) -> list[Action]:
        # ADOPTING -> FAILED: gone while the hive was down, or alive but not answering (and
        # killed by the supervisor first); a crash like any other, so the policy decides.
        self.alive = False
        self.address = ""
        self.phase = Phase.FAILED
        self.failure_reason = reason
        actions: list[Action] = [
            CountCrash(),
            Log("warning", "worker not adopted", (("reason", reason),)),
        ]
        return [*actions, *self._after_failure(now, clean_exit=False)]

    def failed_before(self, now: float, restart_pending: bool) -> list[Action]:
        # ADOPTING -> FAILED (or RESTART_PENDING): it had failed before the hive went down;
        # a restart that was scheduled then is scheduled again.
        self.alive = False
        self.address = ""
        self.phase = Phase.FAILED
        if restart_pending:
            return self._after_failure(now, clean_exit=False)
        self.failed_since = now
        return []


def _exit(code: int | None) -> tuple[tuple[str, object], ...]:
    return (("exit", describe_exit(code)),)


class Adoption(enum.Enum):
    """What to do with a row of the worker table read back after a hive restart."""

    CHECK_HEALTH = "check health"  # alive and was ready: adopt if it answers a health check
    ADOPT_LOADING = "adopt loading"  # alive and loading: it will call back
    KILL_AND_DROP = "kill and drop"  # was stopping: finish the job
    RESTORE_FAILED = "restore failed"  # had failed before: keep the row (and its restart)
    KILL_AND_FAIL = "kill and fail"  # alive but in no state to adopt
    GONE = "gone"  # its process died while the hive was down (or the pid is another's)


def adoption(saved_phase: str, alive: bool, has_address: bool) -> Adoption:
    """The decision for one persisted row; `alive`: the pid still names our worker process."""
    if saved_phase == Phase.STOPPING.value:
        return Adoption.KILL_AND_DROP
    if saved_phase in (Phase.FAILED.value, Phase.RESTART_PENDING.value):
        return Adoption.KILL_AND_FAIL if alive else Adoption.RESTORE_FAILED
    if not alive:
        return Adoption.GONE
    if saved_phase in (Phase.IDLE.value, Phase.BUSY.value) and has_address:
        return Adoption.CHECK_HEALTH
    if saved_phase == Phase.LOADING.value:
        return Adoption.ADOPT_LOADING
    return Adoption.KILL_AND_FAIL


def recovered_phase(has_address: bool) -> Phase:
    """The phase of a row rebuilt from a live worker process the table did not name: one that
    published an address was serving, the others are still loading."""
    return Phase.IDLE if has_address else Phase.LOADING


def stored_state(phase: Phase) -> str:
    """The state a row on disk says for `phase`. BUSY and IDLE flip often and do not matter
    after a restart (so they cause no write); a pending restart is a FAILED row whose
    restart_pending is set."""
    return {Phase.BUSY: "IDLE", Phase.RESTART_PENDING: "FAILED"}.get(phase, phase.value)


PROTO_STATES: Mapping[Phase, common_pb2.WorkerState.ValueType] = {
    Phase.LOADING: common_pb2.WORKER_STATE_LOADING,
    Phase.ADOPTING: common_pb2.WORKER_STATE_LOADING,
    Phase.IDLE: common_pb2.WORKER_STATE_IDLE,
    Phase.BUSY: common_pb2.WORKER_STATE_BUSY,
    Phase.STOPPING: common_pb2.WORKER_STATE_STOPPING,
    Phase.FAILED: common_pb2.WORKER_STATE_FAILED,
    Phase.RESTART_PENDING: common_pb2.WORKER_STATE_FAILED,
    Phase.GONE: common_pb2.WORKER_STATE_STOPPING,
}
