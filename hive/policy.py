"""The hive's rules about time, with no I/O: restart backoff, crash loops, health, idleness.

Driven by the monotonic clock the supervisor passes in, so tests move a fake one.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

from protos.v1 import common_pb2

DEFAULT_POLICY = common_pb2.RESTART_POLICY_ON_FAILURE


@dataclass(frozen=True)
class RestartSettings:
    initial_backoff: float = 1.0
    max_backoff: float = 60.0
    # Each delay is scaled by a random factor in [1 - jitter, 1 + jitter], so workers that
    # failed together (an OOM, a bad driver) do not all come back in the same instant.
    jitter: float = 0.2
    # A worker that stayed up this long is healthy again: its backoff starts over.
    stable_after: float = 60.0
    crash_loop_failures: int = 5
    crash_loop_window: float = 300.0


@dataclass(frozen=True)
class RestartDecision:
    restart: bool
    delay: float = 0.0
    # Why not, for the worker's failure_reason.
    reason: str = ""


def wants_restart(policy: common_pb2.RestartPolicy.ValueType, clean_exit: bool) -> bool:
    if policy == common_pb2.RESTART_POLICY_NEVER:
        return False
    if policy == common_pb2.RESTART_POLICY_ALWAYS:
        return True
    # on-failure (and unspecified, which means the default)
    return not clean_exit


@dataclass
class RestartTracker:
    """One worker's failure history: when to restart it next, or that it is crash-looping."""

    settings: RestartSettings = field(default_factory=RestartSettings)
    rng: random.Random = field(default_factory=random.Random)
    failures: deque[float] = field(default_factory=deque)
    consecutive: int = 0
    started_at: float | None = None

    def started(self, now: float) -> None:
        self.started_at = now

    def failed(
        self, now: float, policy: common_pb2.RestartPolicy.ValueType, clean_exit: bool
    ) -> RestartDecision:
        s = self.settings
        if self.started_at is not None and now - self.started_at >= s.stable_after:
            self.consecutive = 0
        self.started_at = None
        self.failures.append(now)
        while self.failures and now - self.failures[0] > s.crash_loop_window:
            self.failures.popleft()
        if not wants_restart(policy, clean_exit):
            name = common_pb2.RestartPolicy.Name(policy).removeprefix("RESTART_POLICY_").lower()
            return RestartDecision(False, reason=f"not restarting (restart policy {name})")
        if len(self.failures) >= s.crash_loop_failures:
            return RestartDecision(
                False,
                reason=(
                    f"crash loop: {len(self.failures)} failures in {s.crash_loop_window:g}s; "
                    "not restarting (spawn it again once fixed)"
                ),
            )
        base = min(s.initial_backoff * 2**self.consecutive, s.max_backoff)
        self.consecutive += 1
        factor = 1.0 + self.rng.uniform(-s.jitter, s.jitter)
        return RestartDecision(True, delay=min(base * factor, s.max_backoff))


@dataclass
class HealthTracker:
    """Consecutive failed health checks; `threshold` in a row make the worker FAILED."""

    threshold: int = 3
    failures: int = 0
    last_error: str = ""

    def record(self, ok: bool, error: str = "") -> bool:
        """Count one check; True when this failure reaches the threshold."""
        if ok:
            self.failures = 0
            self.last_error = ""
            return False
        self.failures += 1
        self.last_error = error
        return self.failures == self.threshold


def idle_expired(last_activity: float, now: float, idle_timeout: float) -> bool:
    """Only requests count as activity; 0 disables idle retirement."""
    return idle_timeout > 0 and now - last_activity >= idle_timeout


def loading_expired(loading_since: float, now: float, load_timeout: float) -> bool:
    return load_timeout > 0 and now - loading_since >= load_timeout
