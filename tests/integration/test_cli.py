"""The `apiary` command against a live cluster, as an operator would type it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any
from uuid import uuid4

import openai
import psutil
import pytest

from cli.certs import init as certs_init
from harness import MARKER_ENV, ROOT, Cluster, Proc, wait_until
from harness.gguf import write_tiny_gguf
from harness.lines import Lines
from harness.ports import free_port, free_port_pair
from protos.v1 import common_pb2, queen_pb2
from tests.unit.test_cli_emit import check_schema

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
def hive() -> str:
    """This test's hive id: others run tests on the same machine at the same time."""
    return f"cli-{uuid4().hex[:6]}"


@pytest.fixture
async def live(cluster: Cluster, hive: str) -> Proc:
    queen = cluster.start_queen()
    cluster.start_hive(queen, hive, "model=demo,backend=echo,count=2")
    await cluster.wait_workers(queen, "demo", 2)
    return queen


def test_console_script_is_installed() -> None:
    assert APIARY, "the project must install an `apiary` console script"
    out = apiary("--help")
    assert out.returncode == 0
    for verb in ("queen", "hive", "up", "infer", "status", "worker", "model", "completion"):
        assert verb in out.stdout
    alone = apiary()
    assert alone.returncode == 0 and alone.stdout == out.stdout
    hive = apiary("hive")
    assert hive.returncode == 0 and hive.stdout.startswith("usage: apiary hive ")
    for verb in ("start", "list", "get", "drain", "undrain"):
        assert f"\n    {verb} " in hive.stdout
    typo = apiary("hive", "ls")
    assert typo.returncode == 2 and "did you mean 'list'?" in typo.stderr
    assert len(typo.stderr.splitlines()) == 2  # usage and the error: no daemon flags
    assert apiary("--version").stdout.startswith("apiary ")


async def test_infer_streams_tokens(live: Proc) -> None:
    out = apiary("infer", "demo", "buzz buzz honey", "--max-tokens", "4", queen=live)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "buzz buzz honey buzz\n"
    assert "4 tokens, finish=length" in out.stderr
    as_json = apiary("infer", "demo", "a b", "--max-tokens", "3", "--json", queen=live)
    chunks = [json.loads(line) for line in as_json.stdout.splitlines()]
    # One line per message; tokens that come while one is written share the next.
    assert "".join(c["text"] for c in chunks) == "a b a"
    assert sum(len(c["token_ids"]) for c in chunks) == 3
    assert chunks[-1]["finish_reason"] == "length"


async def test_status_and_lists(live: Proc, hive: str) -> None:
    status = apiary("status", queen=live)
    assert status.returncode == 0, status.stderr
    assert hive in status.stdout and "HEALTHY" in status.stdout and "demo" in status.stdout
    data = json.loads(apiary("status", "--json", queen=live).stdout)
    assert [h["id"] for h in data["hives"]] == [hive]
    assert len(data["workers"]) == 2
    assert data["models"][0]["name"] == "demo" and data["models"][0]["idle"] == 2
    for key, kind in (("hives", queen_pb2.HiveInfo), ("workers", common_pb2.WorkerRecord),
                      ("models", queen_pb2.ModelInfo)):  # fmt: skip
        for item in data[key]:
            check_schema(kind.DESCRIPTOR, item)
    summary = data["summary"]
    assert summary["hives"] == {
        "total": 1, "by_health": {"HEALTHY": 1, "DEGRADED": 0, "UNHEALTHY": 0}
    }  # fmt: skip
    assert summary["workers"]["by_state"] == {
        "LOADING": 0, "IDLE": 2, "BUSY": 0, "STOPPING": 0, "FAILED": 0
    }  # fmt: skip
    assert summary["capacity"] == {"slots_total": 2, "slots_in_use": 0}
    assert summary["queued"] == {"demo": 0}
    requests = summary["requests"]
    assert {k: v for k, v in requests.items() if k != "since"} == {
        "completed": 0, "failed": 0, "cancelled": 0, "refused": 0, "success_rate": None
    }  # fmt: skip
    assert requests["since"] == data["queen"]["started_at"] and requests["since"].endswith("Z")
    check_schema(queen_pb2.QueenStatus.DESCRIPTOR, data["queen"])
    assert summary["queen"] == live.address and summary["problems"] == []
    assert summary["degraded"] is False

    models = json.loads(apiary("model", "list", "--json", queen=live).stdout)
    assert models == [
        {"name": "demo", "idle": 2, "busy": 0, "loading": 0, "failed": 0, "queued": 0, "hives": [],
         "task": "GENERATE", "context_length": 0}
    ]  # fmt: skip
    assert "demo" in apiary("model", "list", queen=live).stdout

    workers = json.loads(apiary("worker", "list", "--json", "--hive", hive, queen=live).stdout)
    assert len(workers) == 2 and all(w["state"] == "IDLE" for w in workers)
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


async def test_worker_spawn_and_retire(live: Proc, hive: str) -> None:
    spawned = apiary(
        "worker",
        "spawn",
        "--backend",
        "echo",
        "--hive",
        hive,
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
    assert worker["state"] == "IDLE" and worker["slots_total"] == 2
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
    out = apiary("infer", "demo", "x", "--max-tokens", "-1", queen=live)
    assert out.returncode == 1 and "INVALID_ARGUMENT: max_tokens must be > 0" in out.stderr
    out = apiary("infer", "demo", "x", queen=live)  # no --max-tokens: the queen's default
    assert out.returncode == 0 and "[256 tokens, finish=length]" in out.stderr
    out = apiary("status", "--queen", "127.0.0.1:1")
    assert out.returncode == 1 and "cannot reach the queen at 127.0.0.1:1" in out.stderr


async def test_tls_failures_name_tls_and_the_flag(cluster: Cluster) -> None:
    certs, other = cluster.tmp / "certs", cluster.tmp / "other"
    certs_init(certs, [("queen", []), ("hive", [])])
    certs_init(other, [("queen", []), ("hive", [])])
    queen = cluster.start_queen(
        0, "--tls-cert", str(certs / "queen.pem"), "--tls-key", str(certs / "queen.key"),
        "--tls-client-ca", str(certs / "ca.pem"),
    )  # fmt: skip
    client = ("--tls-cert", str(certs / "client.pem"), "--tls-key", str(certs / "client.key"))
    plain = apiary("status", queen=queen)
    assert plain.returncode == 1 and "cannot reach" not in plain.stderr
    assert "it probably requires TLS; pass --tls-ca" in plain.stderr
    no_cert = apiary("status", "--tls-ca", str(certs / "ca.pem"), queen=queen)
    assert f"TLS handshake with the queen at {queen.address} failed" in no_cert.stderr
    assert "requires a client certificate: pass --tls-cert and --tls-key" in no_cert.stderr
    wrong_ca = apiary("status", "--tls-ca", str(other / "ca.pem"), *client, queen=queen)
    assert f"TLS handshake with the queen at {queen.address} failed" in wrong_ca.stderr
    assert "check --tls-ca" in wrong_ca.stderr
    assert len(wrong_ca.stderr.splitlines()) == 1  # no log line of grpc's own
    right = apiary("status", "--tls-ca", str(certs / "ca.pem"), *client, queen=queen)
    assert right.returncode == 0, right.stderr


async def test_daemons_start_by_an_explicit_verb(cluster: Cluster, hive: str) -> None:
    """`apiary queen start` and `apiary hive start` hand their flags to the daemons."""
    queen = cluster.start(
        "queen", ["cli", "queen", "start", "--listen", "127.0.0.1:0",
                  "--state-dir", str(cluster.tmp / "queen-state")],
    )  # fmt: skip
    cluster.start(
        "hive", ["cli", "hive", "start", "--queen", queen.address, "--listen", "127.0.0.1:0",
                 "--hive-id", hive, "--state-dir", str(cluster.tmp / hive),
                 "--spawn", "model=demo,backend=echo,count=1"],
    )  # fmt: skip
    await cluster.wait_workers(queen, "demo", 1)
    listed = json.loads(apiary("hive", "list", "--json", queen=queen).stdout)
    assert [h["id"] for h in listed] == [hive]
    bad = apiary("hive", "start", "--heartbeat-interval", "soon")
    assert bad.returncode == 2 and bad.stderr.startswith("usage: apiary hive start")


def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
async def test_up_runs_a_cluster_and_stops_leaving_nothing_behind(
    cluster: Cluster, hive: str, stop: str
) -> None:
    queen_port, hive_port, metrics_port = free_port(), free_port(), free_port_pair()
    state = cluster.tmp / "up-state"
    env = dict(os.environ, PYTHONPATH=str(ROOT), APIARY_LOG_FORMAT="json")
    env["XDG_STATE_HOME"] = str(cluster.tmp / "xdg")  # not the operator's state dirs
    env[MARKER_ENV] = cluster.marker
    up = subprocess.Popen(
        [
            APIARY or "apiary",
            "up",
            "--echo",
            "--queen-listen",
            f"127.0.0.1:{queen_port}",
            "--hive-listen",
            f"127.0.0.1:{hive_port}",
            "--token-delay",
            "0",
            "--hive-id",
            hive,
            "--state-dir",
            str(state),
            "--metrics-port",
            str(metrics_port),
            "--http-listen",
            "127.0.0.1:0",
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
        # Commands that reach this queen, not the default address.
        assert printed.has(f"apiary status --queen {queen}"), printed.text()
        assert (state / "queen").is_dir() and (state / f"hive-{hive}").is_dir()
        assert "apiary_" in metrics_text(metrics_port)
        assert "apiary_" in metrics_text(metrics_port + 1)
        out = apiary("infer", "demo", "hello bees", "--max-tokens", "3", "--queen", queen)
        assert out.stdout == "hello bees hello\n", out.stderr
        # The OpenAI door, at the address the banner names (a free port here).
        url = re.search(r"OpenAI API: (http://127\.0\.0\.1:\d+)/v1", printed.text())
        assert url is not None, printed.text()
        body = '{"model": "demo", "prompt": "hello bees", "max_tokens": 2}'
        curl = subprocess.run(["curl", "-sS", f"{url[1]}/v1/completions", "-H",
                               "content-type: application/json", "-d", body],
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        assert json.loads(curl.stdout)["choices"][0]["text"] == "hello bees", curl.stderr
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


async def test_up_on_a_real_model_serves_eight_concurrent_streamed_chats(
    cluster: Cluster, real_model: Path
) -> None:
    pytest.importorskip("xllamacpp", reason="the llamacpp extra is not installed")
    queen_port, hive_port = free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), APIARY_LOG_FORMAT="json")
    env["XDG_STATE_HOME"] = str(cluster.tmp / "xdg")
    env[MARKER_ENV] = cluster.marker
    up = subprocess.Popen(
        [APIARY or "apiary", "up", "--gguf", str(real_model), "--model", "smollm2",
         "--queen-listen", f"127.0.0.1:{queen_port}", "--hive-listen", f"127.0.0.1:{hive_port}",
         "--http-listen", "127.0.0.1:0"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        assert up.stdout is not None
        printed = Lines(up.stdout)
        await wait_until(lambda: printed.has("Ctrl-C here stops everything"), timeout=90)
        assert printed.has("1 'smollm2' worker(s) on the llamacpp engine"), printed.text()
        url = re.search(r"OpenAI API: (http://127\.0\.0\.1:\d+)/v1", printed.text())
        assert url is not None, printed.text()
        queen = f"127.0.0.1:{queen_port}"
        said = apiary("infer", "smollm2", "Tell me about bees.", "--max-tokens", "12",
                      "--queen", queen)  # fmt: skip
        assert said.returncode == 0 and said.stdout.strip(), said.stderr
        client = openai.AsyncOpenAI(base_url=f"{url[1]}/v1", api_key="-", max_retries=0)

        async def streamed(i: int) -> tuple[str, str | None]:
            stream = await client.chat.completions.create(
                model="smollm2", max_tokens=48, stream=True,
                messages=[{"role": "user", "content": f"Write a poem about the number {i}."}],
            )  # fmt: skip
            text, reason = "", None
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    reason = chunk.choices[0].finish_reason or reason
            return text, reason

        results = await asyncio.wait_for(asyncio.gather(*(streamed(i) for i in range(8))), 120)
        await client.close()
        assert all(text.strip() and reason in ("stop", "length") for text, reason in results)
        os.killpg(up.pid, signal.SIGINT)
        assert up.wait(30) == 0
        assert cluster.marked_processes() == []
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()


async def test_process_and_backend_verbs(live: Proc, hive: str) -> None:
    backends = apiary("worker", "backend", "list", "--hive", hive, queen=live)
    assert backends.returncode == 0, backends.stderr
    assert "echo" in backends.stdout and "tests/benchmarks only" in backends.stdout
    echo = apiary("worker", "backend", "get", "echo", queen=live)  # --hive optional: one hive
    assert "option token_delay" in echo.stdout
    missing = apiary("worker", "backend", "get", "vllm", queen=live)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr and "echo" in missing.stderr

    procs = json.loads(apiary("worker", "process", "list", "--json", queen=live).stdout)
    mine = [p for p in procs if p["hive_id"] == hive]
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
        "--backend",
        "echo",
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
        "--backend",
        "echo",
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


async def test_scheduler_verbs(live: Proc, hive: str) -> None:
    before = json.loads(apiary("status", "--json", queen=live).stdout)["summary"]["requests"]
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
    # The queen's own totals: the direct call never passed through it.
    after = json.loads(apiary("status", "--json", queen=live).stdout)["summary"]["requests"]
    assert after["completed"] == before["completed"] + 1 and after["failed"] == before["failed"]
    assert (
        f"requests  {after['completed']} completed, {after['failed']} failed, "
        f"{after['cancelled']} cancelled, {after['refused']} refused" in status.stdout
    )
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

    drained = apiary("hive", "drain", hive, queen=live)
    assert drained.returncode == 0 and f"hive {hive} drained" in drained.stdout
    assert "(drained)" in apiary("hive", "list", queen=live).stdout
    assert apiary("hive", "undrain", hive, queen=live).returncode == 0
    worker_id = json.loads(apiary("worker", "list", "--json", queen=live).stdout)[0]["id"]
    assert "drained" in apiary("worker", "drain", worker_id, queen=live).stdout
    assert "drained" in apiary("worker", "list", queen=live).stdout
    assert "undrained" in apiary("worker", "undrain", worker_id, queen=live).stdout
    assert hive in apiary("hive", "get", hive, queen=live).stdout
    missing = apiary("hive", "drain", "nope", queen=live)
    assert missing.returncode == 1
    assert f"NOT_FOUND: unknown hive 'nope'; hives: {hive}" in missing.stderr


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


async def test_model_catalog_verbs(live: Proc, hive: str, tmp_path: Path) -> None:
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    pulled = apiary("model", "pull", str(gguf), "--hive", hive, queen=live)
    assert pulled.returncode == 0, pulled.stderr
    assert "pulled tiny (tiny.gguf" in pulled.stdout and "100%" in pulled.stderr
    # Not a terminal: whole lines, no bar redrawn with carriage returns.
    assert "\r" not in pulled.stderr and pulled.stderr.endswith("\n")
    listed = apiary("model", "list", "--hive", hive, queen=live)
    assert "tiny" in listed.stdout and "llamacpp" in listed.stdout
    got = json.loads(apiary("model", "get", "tiny", "--json", queen=live).stdout)
    assert got["path"].endswith("tiny.gguf") and len(got["sha256"]) == 64

    def served() -> dict[str, Any] | None:
        models = json.loads(apiary("model", "list", "--json", queen=live).stdout)
        return next((m for m in models if m["name"] == "tiny"), None)

    tiny = await wait_until(served, timeout=10, interval=0.1)
    assert tiny["hives"] == [hive]
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


async def test_several_queens_the_next_when_one_cannot_be_reached(live: Proc) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{unused.getsockname()[1]}"
    queens = f"{dead},{live.address}"
    out = apiary("infer", "demo", "a b", "--max-tokens", "2", "--queen", queens)
    assert out.returncode == 0 and out.stdout == "a b\n", out.stderr
    direct = apiary("infer", "demo", "c d", "--max-tokens", "2", "--direct", "--queen", queens)
    assert direct.returncode == 0 and direct.stdout == "c d\n", direct.stderr
    none = apiary("status", "--queen", f"{dead},127.0.0.1:1")
    assert none.returncode == 1
    assert f"cannot reach any queen at {dead},127.0.0.1:1" in none.stderr
