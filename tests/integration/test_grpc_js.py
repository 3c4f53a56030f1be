"""A client nobody here wrote: grpc-js (Node.js) against a real cluster, Health.Watch included.

The Node.js modules are installed by `make test` (npm ci in tests/interop/js); without Node.js
or npm the test is skipped, saying why.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from harness import ROOT, Cluster

JS = ROOT / "tests" / "interop" / "js"


async def test_grpc_js_watches_health_lists_models_and_streams(cluster: Cluster) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed")
    if not (JS / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.skip("the grpc-js modules are not installed (`make test` runs npm ci)")
    queen = cluster.start_queen()
    cluster.start_hive(queen, "h1", "model=demo")
    await cluster.wait_workers(queen, "demo", 1)
    run = subprocess.run(
        [node, str(JS / "client.js"), queen.address, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["watch"] == "SERVING"
    assert seen["models"] == ["demo"]
    assert seen["text"] == "hello from node hello from"
    assert seen["finish"] == "FINISH_REASON_LENGTH"
    assert seen["unknown"]["code"] == 5 and "models served: demo" in seen["unknown"]["details"]
