"""bench/flood.py, shorter: two hostile hives flooding maximal heartbeats are told to slow
down while a client's requests all complete. How much the flood slows the client is the
bench's to measure (bench/flood.py prints the ratio against its own baseline): a busy shared
machine makes any latency bound in a test flaky."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from harness import ROOT


@pytest.mark.timeout(120)
def test_a_heartbeat_flood_is_told_to_slow_down_and_clients_are_served() -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "flood.py"), "--seconds", "3", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    baseline, flooded = result["requests"]
    assert baseline > 0 and flooded > 0, result  # every request completed (a failure ends the run)
    # Far from the bench's own bound (2x), so only a flood that really stalls clients fails it.
    assert flooded >= baseline / 10, result
    for counts in result["senders"].values():
        assert counts.get("OK", 0) > 0  # a valid hive is heard...
        assert counts.get("RESOURCE_EXHAUSTED", 0) > counts["OK"]  # ...and told to slow down
