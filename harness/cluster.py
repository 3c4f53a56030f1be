"""Real queen, hive and worker processes on 127.0.0.1, for integration tests and benchmarks.

Tiers are started as processes (`python -m queen`, ...), never imported: the harness sees the
cluster only through its RPCs, its logs and the OS.

Every process a test starts carries a per-test marker in its environment (and
workers inherit it), so teardown can find and kill anything left behind even
when the test failed half-way.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil

from apiary.protoutil import READY_STATES
from apiary.security import Security, TlsFiles
from harness.wait import NotMet, wait_until, wait_until_sync
from protos.v1 import common_pb2, hive_pb2_grpc, queen_pb2, queen_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
MARKER_ENV = "APIARY_TEST_RUN"


def with_echo(spec: str) -> str:
    """Tests and benchmarks run the echo backend: a --spawn spec that names none names it
    (a hive never guesses a backend for a model outside its catalog)."""
    return spec if "backend=" in spec else f"{spec},backend=echo"


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    port: int
    log_path: Path
    host: str = "127.0.0.1"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def signal(self, sig: signal.Signals) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Cluster:
    """Starts processes with a shared marker; `close()` leaves none behind."""

    heartbeat_interval: float = 0.2
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="apiary-test-")))
    procs: list[Proc] = field(default_factory=list)
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    # Appended to every queen and hive command line (tokens, TLS).
    server_args: list[str] = field(default_factory=list)
    # What the test's own stubs present: a token and TLS files.
    token: str = ""
    tls: TlsFiles = field(default_factory=TlsFiles)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env[MARKER_ENV] = self.marker
        env["APIARY_LOG_FORMAT"] = "json"
        env["PYTHONPATH"] = str(ROOT)
        return env

    def start(
        self,
        name: str,
        argv: list[str],
        timeout: float = 15.0,
        prefix: list[str] | None = None,
        host: str = "127.0.0.1",
    ) -> Proc:
        """Start `python -m ARGV` (after `prefix`: `ip netns exec NS`) and wait for its port."""
        port_file = self.tmp / f"{name}-{len(self.procs)}.port"
        log_path = self.tmp / f"{name}-{len(self.procs)}.log"
        with open(log_path, "ab") as log_file:
            popen = subprocess.Popen(
                [*(prefix or []), sys.executable, "-m", *argv, "--port-file", str(port_file)],
                cwd=ROOT,
                env=self.env(),
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )

        def bound_port() -> int | None:
            if popen.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {popen.returncode}:\n{log_path.read_text()}"
                )
            return int(port_file.read_text()) if port_file.exists() else None

        try:
            port = wait_until_sync(bound_port, timeout)
        except NotMet:
            popen.kill()
            raise RuntimeError(f"{name} did not start within {timeout}s") from None
        proc = Proc(name, popen, port, log_path, host)
        port_file.unlink()
        self.procs.append(proc)
        return proc

    def start_queen(self, port: int = 0, *extra: str, state: str = "queen-state") -> Proc:
        """A queen; restarted ones share the cluster's queen state dir (history, drains). A
        second queen running beside the first needs a `state` of its own."""
        argv = [
            "queen",
            "--listen",
            f"127.0.0.1:{port}",
            "--heartbeat-interval",
            str(self.heartbeat_interval),
            "--state-dir",
            str(self.tmp / state),
            *self.server_args,
            *extra,
        ]
        return self.start("queen", argv)

    def start_hive(
        self,
        queen: Proc | str,
        hive_id: str,
        *spawn: str,
        extra: tuple[str, ...] = (),
        port: int = 0,
    ) -> Proc:
        address = queen if isinstance(queen, str) else queen.address
        argv = [
            "hive",
            "--queen",
            address,
            "--listen",
            f"127.0.0.1:{port}",
            "--hive-id",
            hive_id,
            # Each hive its own state dir: never the operator's, never another test's.
            "--state-dir",
            str(self.tmp / f"state-{hive_id}"),
            "--heartbeat-interval",
            str(self.heartbeat_interval),
            "--stop-grace",
            "3",
            "--health-interval",
            "0.2",
            "--health-timeout",
            "0.5",
            *self.server_args,
            *extra,
        ]
        for spec in spawn:
            argv += ["--spawn", with_echo(spec)]
        return self.start(f"hive-{hive_id}", argv)

    def channel(self, address: str, token: str | None = None) -> grpc.aio.Channel:
        """A channel for the test's own calls, with the cluster's token unless one is given."""
        security = Security(tls=self.tls)
        channel = security.aio_channel(address, self.token if token is None else token)
        self.channels.append(channel)
        return channel

    def queen_stub(self, queen: Proc) -> queen_pb2_grpc.QueenAsyncStub:
        return queen_pb2_grpc.QueenStub(self.channel(queen.address))

    def admin_stub(self, queen: Proc) -> queen_pb2_grpc.QueenAdminAsyncStub:
        return queen_pb2_grpc.QueenAdminStub(self.channel(queen.address))

    def hive_stub(self, hive: Proc) -> hive_pb2_grpc.HiveAsyncStub:
        return hive_pb2_grpc.HiveStub(self.channel(hive.address))

    async def wait_workers(
        self, queen: Proc, model: str, count: int, timeout: float = 15.0
    ) -> list[common_pb2.WorkerRecord]:
        """Wait until the queen sees `count` ready (IDLE/BUSY) workers of `model`."""
        admin = self.admin_stub(queen)

        async def ready() -> list[common_pb2.WorkerRecord] | None:
            reply = await admin.ListWorkers(queen_pb2.ListWorkersRequest(model=model), timeout=1)
            ready = [w for w in reply.workers if w.state in READY_STATES]
            return ready if len(ready) >= count else None

        return await wait_until(ready, timeout)

    def marked_processes(self) -> list[psutil.Process]:
        """Live processes that carry this cluster's marker (ours and our workers)."""
        found = []
        for proc in psutil.process_iter(["pid"]):
            try:
                if (
                    proc.environ().get(MARKER_ENV) == self.marker
                    and proc.status() != psutil.STATUS_ZOMBIE
                ):
                    found.append(proc)
            except psutil.Error:
                continue
        return found

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close(None)
        # Hives first, so they get the chance to stop their own workers.
        for proc in sorted(self.procs, key=lambda p: not p.name.startswith("hive")):
            proc.signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
        for leftover in self.marked_processes():
            try:
                leftover.kill()
            except psutil.Error:
                pass
        if not os.environ.get("APIARY_KEEP_TEST_DIRS"):  # set it to read the logs afterwards
            shutil.rmtree(self.tmp, ignore_errors=True)
