"""The `apiary` command against a live cluster, as an operator would type it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from harness import MARKER_ENV, ROOT, Cluster, Proc, wait_until
from harness.gguf import write_tiny_gguf
from harness.lines import Lines
from protos.v1 import common_pb2

APIARY = shutil.which("apiary", path=str(Path(sys.executable).parent))


def apiary(
    *args: str, queen: Proc | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if queen is not None:
        env["APIARY_QUEEN"] = queen.address
    return subprocess.run(
        [APIARY or "apiary", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
async def live(cluster: Cluster) -> Proc:
    queen = cluster.start_queen()
    cluster.start_hive(queen, "h1", "model=demo,backend=echo,count=2")
    await cluster.wait_workers(queen, "demo", 2)
    return queen


def test_console_script_is_installed() -> None:
    assert APIARY, "the project must install an `apiary` console script"
    out = apiary("--help")
    assert out.returncode == 0
    for verb in ("queen", "hive", "up", "infer", "status", "worker", "model"):
        assert verb in out.stdout


async def test_infer_streams_tokens(live: Proc) -> None:
    out = apiary("infer", "demo", "buzz buzz honey", "--max-tokens", "4", queen=live)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "buzz buzz honey buzz\n"
    assert "4 tokens, finish=length" in out.stderr
    as_json = apiary("infer", "demo", "a b", "--max-tokens", "3", "--json", queen=live)
    chunks = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [c["text"] for c in chunks] == ["a", " b", " a"]
    assert chunks[-1]["finish_reason"] == "FINISH_REASON_LENGTH"


async def test_status_and_lists(live: Proc) -> None:
    status = apiary("status", queen=live)
    assert status.returncode == 0, status.stderr
    assert "h1" in status.stdout and "HEALTHY" in status.stdout and "demo" in status.stdout
    data = json.loads(apiary("status", "--json", queen=live).stdout)
    assert [h["id"] for h in data["hives"]] == ["h1"]
    assert len(data["workers"]) == 2
    assert data["models"][0]["name"] == "demo" and data["models"][0]["idle"] == 2

    models = json.loads(apiary("model", "list", "--json", queen=live).stdout)
    assert models == [{"name": "demo", "idle": 2}]
    assert "demo" in apiary("model", "list", queen=live).stdout

    workers = json.loads(apiary("worker", "list", "--json", "--hive", "h1", queen=live).stdout)
    assert len(workers) == 2 and all(w["state"] == "WORKER_STATE_IDLE" for w in workers)
    idle = json.loads(apiary("worker", "list", "--state", "idle", "--json", queen=live).stdout)
    assert len(idle) == 2
    assert (
        json.loads(apiary("worker", "list", "--state", "failed", "--json", queen=live).stdout) == []
    )
    bad = apiary("worker", "list", "--state", "sleepy", queen=live)
    assert (
        bad.returncode == 2 and "valid states: LOADING, IDLE, BUSY, STOPPING, FAILED" in bad.stderr
    )

    got = apiary("worker", "get", workers[0]["id"], queen=live)
    assert got.returncode == 0 and workers[0]["id"] in got.stdout and "IDLE" in got.stdout
    one = json.loads(apiary("worker", "get", workers[0]["id"], "--json", queen=live).stdout)
    assert one["pid"] == workers[0]["pid"]


async def test_worker_spawn_and_retire(live: Proc) -> None:
    spawned = apiary(
        "worker",
        "spawn",
        "--hive",
        "h1",
        "--model",
        "extra",
        "--option",
        "token_delay=0",
        "--slots",
        "2",
        "--json",
        queen=live,
    )
    assert spawned.returncode == 0, spawned.stderr
    worker = json.loads(spawned.stdout)
    assert worker["state"] == "WORKER_STATE_IDLE" and worker["slots_total"] == 2
    assert psutil.pid_exists(worker["pid"])
    out = apiary("infer", "extra", "x", "--max-tokens", "2", queen=live)
    assert out.stdout == "x x\n"
    retired = apiary("worker", "retire", worker["id"], queen=live)
    assert retired.returncode == 0, retired.stderr
    assert f"retired {worker['id']}" in retired.stdout
    assert not psutil.pid_exists(worker["pid"])


async def test_errors_are_one_readable_line(live: Proc) -> None:
    out = apiary("infer", "nope", "x", queen=live)
    assert out.returncode == 1
    assert out.stderr.startswith("error: NOT_FOUND: unknown model 'nope'; models served: demo")
    assert "Traceback" not in out.stderr
    out = apiary("worker", "get", "w-nope", queen=live)
    assert out.returncode == 1 and "NOT_FOUND" in out.stderr
    out = apiary("infer", "demo", "x", "--max-tokens", "0", queen=live)
    assert out.returncode == 1 and "INVALID_ARGUMENT: max_tokens must be > 0" in out.stderr
    out = apiary("status", "--queen", "127.0.0.1:1")
    assert out.returncode == 1 and "cannot reach the queen at 127.0.0.1:1" in out.stderr


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
async def test_up_runs_a_cluster_and_stops_leaving_nothing_behind(
    cluster: Cluster, stop: str
) -> None:
    queen_port, hive_port = free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), APIARY_LOG_FORMAT="json")
    env["XDG_STATE_HOME"] = str(cluster.tmp / "xdg")  # not the operator's state dirs
    env[MARKER_ENV] = cluster.marker
    up = subprocess.Popen(
        [
            APIARY or "apiary",
            "up",
            "--queen-listen",
            f"127.0.0.1:{queen_port}",
            "--hive-listen",
            f"127.0.0.1:{hive_port}",
            "--token-delay",
            "0",
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # its own process group, like a shell's foreground job
    )
    try:
        assert up.stdout is not None
        printed = Lines(up.stdout)
        await wait_until(lambda: printed.has("Ctrl-C here stops everything"), timeout=30)
        assert printed.has("Apiary is up"), printed.text()
        queen = f"127.0.0.1:{queen_port}"
        out = apiary("infer", "demo", "hello bees", "--max-tokens", "3", "--queen", queen)
        assert out.stdout == "hello bees hello\n", out.stderr
        assert len(cluster.marked_processes()) == 5  # up, queen, hive, 2 workers

        if stop == "ctrl-c":
            # Ctrl-C at a terminal signals the foreground process group (not the workers,
            # which run in sessions of their own: their hive must stop them).
            os.killpg(up.pid, signal.SIGINT)
        else:
            up.send_signal(signal.SIGTERM)
        assert up.wait(30) == 0
        leftovers = cluster.marked_processes()
        assert leftovers == [], [p.cmdline() for p in leftovers]
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


async def test_process_and_backend_verbs(live: Proc) -> None:
    backends = apiary("worker", "backend", "list", "--hive", "h1", queen=live)
    assert backends.returncode == 0, backends.stderr
    assert "echo" in backends.stdout and "tests/benchmarks only" in backends.stdout
    echo = apiary("worker", "backend", "get", "echo", queen=live)  # --hive optional: one hive
    assert "option token_delay" in echo.stdout
    missing = apiary("worker", "backend", "get", "vllm", queen=live)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr and "echo" in missing.stderr

    procs = json.loads(apiary("worker", "process", "list", "--json", queen=live).stdout)
    mine = [p for p in procs if p["hive_id"] == "h1"]
    assert len(mine) == 2 and all(p["known"] for p in mine)
    table_out = apiary("worker", "process", "list", queen=live).stdout
    assert str(mine[0]["pid"]) in table_out
    got = apiary("worker", "process", "get", str(mine[0]["pid"]), queen=live)
    assert mine[0]["worker_id"] in got.stdout
    assert re.search(r"in table:\s+yes", got.stdout)
    refused = apiary("worker", "process", "kill", str(os.getpid()), queen=live)
    assert refused.returncode == 1 and "is not an Apiary worker" in refused.stderr
    killed = apiary("worker", "process", "kill", str(mine[0]["pid"]), queen=live)
    assert killed.returncode == 0 and f"killed pid {mine[0]['pid']}" in killed.stdout
    assert not psutil.pid_exists(mine[0]["pid"])


async def test_worker_get_shows_why_a_worker_failed(live: Proc) -> None:
    spawned = apiary(
        "worker",
        "spawn",
        "--model",
        "broken",
        "--option",
        "fault_exit_on_load=3",
        "--restart",
        "never",
        "--no-wait",
        "--json",
        queen=live,
    )
    assert spawned.returncode == 0, spawned.stderr
    worker_id = json.loads(spawned.stdout)["id"]

    def given_up() -> subprocess.CompletedProcess[str] | None:
        got = apiary("worker", "get", worker_id, queen=live)
        return got if "not restarting" in got.stdout else None

    got = await wait_until(given_up, timeout=15, interval=0.1)
    assert "FAILED" in got.stdout
    assert "exited with code 3; not restarting (restart policy never)" in got.stdout
    assert re.search(r"restart policy:\s+never", got.stdout)
    waited = apiary(
        "worker",
        "spawn",
        "--model",
        "broken",
        "--option",
        "fault_exit_on_load=3",
        "--restart",
        "never",
        queen=live,
    )
    assert waited.returncode == 1
    assert "FAILED_PRECONDITION" in waited.stderr and "exited with code 3" in waited.stderr


async def test_scheduler_verbs(live: Proc) -> None:
    out = apiary("infer", "demo", "x y", "--max-tokens", "2", "--policy", "lottery", queen=live)
    assert out.returncode == 0 and out.stdout == "x y\n", out.stderr
    bad = apiary("infer", "demo", "x", "--policy", "fastest", queen=live)
    assert bad.returncode == 2 and "choose least-loaded, lru, score" in bad.stderr
    direct = apiary("infer", "demo", "p q", "--max-tokens", "3", "--direct", queen=live)
    assert direct.returncode == 0 and direct.stdout == "p q p\n" and "[lease l-" in direct.stderr

    status = apiary("status", queen=live)
    assert "hives     1: 1 healthy" in status.stdout
    assert "workers   2: 2 idle" in status.stdout
    assert "capacity  0/2 slots in use" in status.stdout
    assert "requests  2 completed, 0 failed (success 100.0%)" in status.stdout
    assert "top       w-" in status.stdout

    history = apiary("requests", "list", "--status", "completed", queen=live)
    assert (
        history.returncode == 0 and history.stdout.count("completed") == 1
    )  # direct calls skip it
    assert json.loads(apiary("requests", "list", "--json", queen=live).stdout)[0]["model"] == "demo"
    assert (
        "unknown request status 'odd'"
        in apiary("requests", "list", "--status", "odd", queen=live).stderr
    )

    drained = apiary("hive", "drain", "h1", queen=live)
    assert drained.returncode == 0 and "hive h1 drained" in drained.stdout
    assert "(drained)" in apiary("hive", "list", queen=live).stdout
    assert apiary("hive", "undrain", "h1", queen=live).returncode == 0
    worker_id = json.loads(apiary("worker", "list", "--json", queen=live).stdout)[0]["id"]
    assert "drained" in apiary("worker", "drain", worker_id, queen=live).stdout
    assert "drained" in apiary("worker", "list", queen=live).stdout
    assert "undrained" in apiary("worker", "undrain", worker_id, queen=live).stdout
    assert "h1" in apiary("hive", "get", "h1", queen=live).stdout
    missing = apiary("hive", "drain", "nope", queen=live)
    assert missing.returncode == 1 and "NOT_FOUND: unknown hive 'nope'; hives: h1" in missing.stderr


async def test_events_verb_prints_live_events(cluster: Cluster, live: Proc) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), APIARY_QUEEN=live.address)
    watcher = subprocess.Popen(
        [APIARY or "apiary", "events", "--kind", "request-completed", "--timeout", "8"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert watcher.stdout is not None and watcher.stderr is not None
    printed = Lines(watcher.stdout)
    stub = cluster.queen_stub(live)
    probe = common_pb2.InferRequest(model="demo", prompt="p", max_tokens=1, request_id="probe")

    async def watching() -> bool:
        """The watcher has subscribed once it prints a probe request completing."""
        if printed.has("ref=probe"):
            return True
        [_ async for _ in stub.Infer(probe, timeout=5)]
        return False

    await wait_until(watching, timeout=10, interval=0.1)
    apiary("infer", "demo", "hello", "--max-tokens", "2", "--request-id", "watched", queen=live)
    assert watcher.wait(15) == 0, watcher.stderr.read()
    out = printed.finish(5)
    assert "request-completed" in out and "ref=watched" in out and "duration=" in out
    bad = apiary("events", "--kind", "nonsense", "--timeout", "1", queen=live)
    assert bad.returncode == 2 and "choose hive-joined, hive-health-changed" in bad.stderr


async def test_model_catalog_verbs(live: Proc, tmp_path: Path) -> None:
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    pulled = apiary("model", "pull", str(gguf), "--hive", "h1", queen=live)
    assert pulled.returncode == 0, pulled.stderr
    assert "pulled tiny (tiny.gguf" in pulled.stdout and "100%" in pulled.stderr
    listed = apiary("model", "list", "--hive", "h1", queen=live)
    assert "tiny" in listed.stdout and "llamacpp" in listed.stdout
    got = json.loads(apiary("model", "get", "tiny", "--json", queen=live).stdout)
    assert got["path"].endswith("tiny.gguf") and len(got["sha256"]) == 64

    def served() -> dict[str, Any] | None:
        models = json.loads(apiary("model", "list", "--json", queen=live).stdout)
        return next((m for m in models if m["name"] == "tiny"), None)

    tiny = await wait_until(served, timeout=10, interval=0.1)
    assert tiny["hives"] == ["h1"]
    removed = apiary("model", "rm", "tiny", queen=live)
    assert removed.returncode == 0 and "deleted tiny" in removed.stdout
    missing = apiary("model", "get", "tiny", queen=live)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr


async def test_infer_sampling_and_stop_flags(live: Proc) -> None:
    out = apiary(
        "infer",
        "demo",
        "one two three four",
        "--max-tokens",
        "8",
        "--stop",
        " three",
        "--seed",
        "7",
        "--temperature",
        "0.5",
        "--top-p",
        "0.9",
        "--top-k",
        "5",
        queen=live,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "one two\n" and "finish=stop" in out.stderr


async def test_output_piped_into_a_reader_that_stops_early(live: Proc) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), APIARY_QUEEN=live.address)
    piped = subprocess.run(
        f"'{APIARY or 'apiary'}' status | head -1",
        shell=True,
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert piped.stdout.startswith("queen ")
    assert "Traceback" not in piped.stderr
