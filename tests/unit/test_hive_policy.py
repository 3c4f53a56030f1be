"""Restart backoff, crash-loop window, health counting and idle clock, on a fake clock."""

from __future__ import annotations

import random

from hive.policy import (
    HealthTracker,
    RestartSettings,
    RestartTracker,
    idle_expired,
    loading_expired,
    wants_restart,
)
from protos.v1 import common_pb2

NO_JITTER = RestartSettings(jitter=0.0)


def test_backoff_doubles_to_the_cap() -> None:
    tracker = RestartTracker(RestartSettings(jitter=0.0, crash_loop_failures=100))
    now = 0.0
    delays = []
    for _ in range(9):
        tracker.started(now)
        now += 0.5
        decision = tracker.failed(now, common_pb2.RESTART_POLICY_ON_FAILURE, clean_exit=False)
        assert decision.restart
        delays.append(decision.delay)
        now += decision.delay
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_jitter_stays_within_bounds_and_varies() -> None:
    settings = RestartSettings(jitter=0.2, crash_loop_failures=1000, crash_loop_window=1)
    delays = set()
    for seed in range(50):
        tracker = RestartTracker(settings, random.Random(seed))
        tracker.started(0)
        delay = tracker.failed(1, common_pb2.RESTART_POLICY_ON_FAILURE, False).delay
        assert 0.8 <= delay <= 1.2
        delays.add(round(delay, 6))
    assert len(delays) > 10


def test_backoff_resets_after_staying_up() -> None:
    tracker = RestartTracker(NO_JITTER)
    tracker.started(0)
    assert tracker.failed(1, common_pb2.RESTART_POLICY_ON_FAILURE, False).delay == 1
    tracker.started(2)
    assert tracker.failed(3, common_pb2.RESTART_POLICY_ON_FAILURE, False).delay == 2
    tracker.started(5)
    # Up for 60 s: healthy again, back to the first delay.
    assert tracker.failed(65, common_pb2.RESTART_POLICY_ON_FAILURE, False).delay == 1


def test_crash_loop_stops_restarts_within_the_window_only() -> None:
    tracker = RestartTracker(NO_JITTER)
    decisions = []
    for t in (0, 10, 20, 30, 40):
        tracker.started(t)
        decisions.append(tracker.failed(t + 1, common_pb2.RESTART_POLICY_ALWAYS, False))
    assert [d.restart for d in decisions] == [True, True, True, True, False]
    assert decisions[-1].reason.startswith("crash loop: 5 failures in 300s")

    spread = RestartTracker(NO_JITTER)
    for t in (0, 100, 200, 300, 400, 500):  # never 5 inside any 300 s window
        spread.started(t)
        assert spread.failed(t + 1, common_pb2.RESTART_POLICY_ALWAYS, False).restart


def test_policies() -> None:
    assert not wants_restart(common_pb2.RESTART_POLICY_NEVER, clean_exit=False)
    assert wants_restart(common_pb2.RESTART_POLICY_ON_FAILURE, clean_exit=False)
    assert not wants_restart(common_pb2.RESTART_POLICY_ON_FAILURE, clean_exit=True)
    assert wants_restart(common_pb2.RESTART_POLICY_UNSPECIFIED, clean_exit=False)
    assert wants_restart(common_pb2.RESTART_POLICY_ALWAYS, clean_exit=True)
    decision = RestartTracker(NO_JITTER).failed(0, common_pb2.RESTART_POLICY_NEVER, False)
    assert not decision.restart and decision.reason == "not restarting (restart policy never)"


def test_health_needs_three_failures_in_a_row() -> None:
    health = HealthTracker()
    assert [health.record(False, "timeout"), health.record(False, "timeout")] == [False, False]
    assert not health.record(True)  # a success resets the count
    assert [health.record(False, "x") for _ in range(3)] == [False, False, True]
    assert health.failures == 3 and health.last_error == "x"
    assert not health.record(False)  # reported once, at the threshold


def test_idle_and_load_clocks() -> None:
    assert not idle_expired(last_activity=100, now=399, idle_timeout=300)
    assert idle_expired(last_activity=100, now=400, idle_timeout=300)
    assert not idle_expired(last_activity=0, now=10**9, idle_timeout=0)
    assert loading_expired(loading_since=0, now=120, load_timeout=120)
    assert not loading_expired(loading_since=0, now=119.9, load_timeout=120)
    assert not loading_expired(loading_since=0, now=10**9, load_timeout=0)
