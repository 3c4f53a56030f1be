"""bench/flood.py, shorter: two hostile hives flooding maximal heartbeats barely slow a client."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from harness import ROOT


@pytest.mark.timeout(120)
def test_a_heartbeat_flood_keeps_client_latency_within_twice_the_baseline() -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "flood.py"), "--seconds", "3", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["ratio"] <= 2.0, result
    for counts in result["senders"].values():
        assert counts.get("OK", 0) > 0  # a valid hive is heard...
        assert counts.get("RESOURCE_EXHAUSTED", 0) > counts["OK"]  # ...and told to slow down
