"""The chaos benchmark, shorter: under 32 streaming clients a worker, a hive (with its workers)
and the queen are SIGKILLed; nothing may fail before its first token but what the queen took
down with it, and every fault is routed around quickly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from harness import ROOT


@pytest.mark.timeout(120)
def test_chaos_under_load() -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "chaos.py"), "--seconds", "10", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["failed_before_first_token"] == 0, result["errors"]
    assert result["completed"] > 100
    ended = (
        result["completed"]
        + result["failed_before_first_token"]
        + result["failed_after_first_token"]
        + result["lost_with_the_queen"]
    )
    assert ended == result["accepted"]  # every accepted request is accounted for
    took = result["faults_routed_around_seconds"]
    # Generous bounds (the rules are proven on a fake clock in tests/unit; the figures are
    # bench/chaos.py's): a worker by its exit, a hive before its TTL (10 intervals of 0.5 s).
    assert took["worker SIGKILL -> not routed"] < 3.0
    assert took["hive SIGKILL -> not routed"] < 4.0
    assert took["queen SIGKILL -> routing again"] < 10.0
