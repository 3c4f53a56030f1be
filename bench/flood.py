"""Heartbeat floods: two hostile hives (each with a stolen, valid hive token) send maximal
heartbeats 20 times a second while a client streams; its p50 must stay within 2x of the same
run's baseline without the flood. Also prints what applying one maximal heartbeat costs the
queen's loop (in this process, on the same code), honest and hostile.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apiary.clock import SystemClock
from apiary.security import Security
from cli.certs import init as certs_init
from harness import ROOT, Cluster
from protos.v1 import common_pb2, queen_pb2, queen_pb2_grpc
from queen.beats import DEFAULT_MAX_WORKERS_PER_HIVE, BeatLimits, beat_problem, changed_records
from queen.registry import Registry, RegistrySettings

SENDERS = ("flood-1", "flood-2")


def maximal_beat(hive_id: str, generation: int, records_change: bool) -> queen_pb2.HiveHeartbeat:
    """A valid heartbeat as large as the queen allows: every record changed if asked."""
    records, samples = [], []
    for i in range(DEFAULT_MAX_WORKERS_PER_HIVE):
        worker_id = f"{hive_id}-w{i:05d}"
        records.append(
            common_pb2.WorkerRecord(
                id=worker_id, hive_id=hive_id, model=f"{hive_id}-m{i % 8}", backend="echo",
                device="cpu", state=common_pb2.WORKER_STATE_IDLE, slots_total=8,
                slots_available=8, address=f"127.0.0.1:{20000 + i}", pid=1000 + i,
                restart_count=generation if records_change else 0, tags=["gpu", "eu"],
                backend_options={"token_delay": "0.01"},
                restart_policy=common_pb2.RESTART_POLICY_ON_FAILURE,
            )
        )  # fmt: skip
        samples.append(common_pb2.WorkerSample(id=worker_id, cpu_percent=generation % 100))
    return queen_pb2.HiveHeartbeat(
        hive_id=hive_id, address="127.0.0.1:7999", instance=hive_id, workers=records,
        samples=samples,
    )  # fmt: skip


def apply_cost(records_change: bool, rounds: int = 7) -> float:
    """Median ms to check and apply one maximal heartbeat, as the queen's handler does."""
    registry, limits = Registry(SystemClock(), RegistrySettings()), BeatLimits()
    beats = [maximal_beat("h", g, records_change) for g in range(rounds + 1)]
    times = []
    for beat in beats:
        started = time.perf_counter()
        assert beat_problem(beat, limits) is None
        changed, problem = changed_records(
            beat, lambda wid: registry.known_record("h", wid), limits
        )
        assert problem is None
        registry.apply_heartbeat(beat, changed)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:]) * 1000  # the first beat adds every worker


def send(queen: str, token: str, hive_id: str, rate: float, seconds: float) -> None:
    """One hostile sender: maximal, all-changed beats at `rate` per second (a process)."""
    channel = Security().sync_channel(queen, token)
    stub = queen_pb2_grpc.QueenRegistryStub(channel)
    counts: dict[str, int] = {}
    start = time.monotonic()
    for n in range(int(rate * seconds)):
        beat = maximal_beat(hive_id, n, records_change=True)
        try:
            stub.Heartbeat(beat, timeout=5)
            counts["OK"] = counts.get("OK", 0) + 1
        except grpc.RpcError as exc:
            name = exc.code().name if isinstance(exc, grpc.Call) else "ERROR"
            counts[name] = counts.get(name, 0) + 1
        except Exception as exc:  # counted and reported, the flood goes on
            name = type(exc).__name__
            counts[name] = counts.get(name, 0) + 1
        time.sleep(max(start + (n + 1) / rate - time.monotonic(), 0.0))
    print(json.dumps(counts))


async def latencies(stub: queen_pb2_grpc.QueenAsyncStub, seconds: float, cap: int) -> list[float]:
    """A client streaming 8-token completions back to back for `seconds` (at most `cap`)."""
    request = common_pb2.InferRequest(model="bench", prompt="the quick brown fox", max_tokens=8)
    out: list[float] = []
    stop_at = time.perf_counter() + seconds
    while time.perf_counter() < stop_at and len(out) < cap:
        started = time.perf_counter()
        async for _ in stub.Infer(request, timeout=30):
            pass
        out.append(time.perf_counter() - started)
    return out


def start_senders(
    cluster: Cluster, queen: str, tokens: dict[str, str], rate: float, seconds: float
) -> list[subprocess.Popen[str]]:
    return [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "bench" / "flood.py"),
                "--send",
                queen,
                # One argument: a token may begin with "-", which argparse would take for a flag.
                f"--token={tokens[hive_id]}",
                "--hive-id",
                hive_id,
                "--rate",
                str(rate),
                "--seconds",
                str(seconds),
            ],
            cwd=ROOT,
            env=cluster.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for hive_id in SENDERS
    ]


def sender_counts(sender: subprocess.Popen[str]) -> dict[str, int]:
    """What a sender's beats got back, by status; a sender that failed says why here."""
    out, err = sender.communicate(timeout=60)
    lines = out.strip().splitlines()
    if sender.returncode != 0 or not lines:
        raise RuntimeError(f"a flood sender exited with {sender.returncode}: {err[-2000:]}")
    counts: dict[str, int] = json.loads(lines[-1])
    return counts


@dataclass
class Result:
    baseline_p50_ms: float
    flood_p50_ms: float
    requests: tuple[int, int]
    senders: dict[str, dict[str, int]]
    apply_ms_samples_changed: float
    apply_ms_records_changed: float

    @property
    def ratio(self) -> float:
        return self.flood_p50_ms / self.baseline_p50_ms


async def measure(args: argparse.Namespace) -> Result:
    cluster = Cluster(heartbeat_interval=1.0)
    try:
        certs_init(cluster.tmp / "certs", [("bench", []), *((s, []) for s in SENDERS)])
        tokens = json.loads((cluster.tmp / "certs" / "tokens.json").read_text())
        cluster.server_args = ["--tokens-file", str(cluster.tmp / "certs" / "tokens.json")]
        cluster.token = tokens["admin"]
        queen = cluster.start_queen()
        cluster.start_hive(queen, "bench", "model=bench,count=2,slots=4")
        await cluster.wait_workers(queen, "bench", 2)
        stub = cluster.queen_stub(queen)
        await latencies(stub, 0.5, 200)  # warm-up
        baseline = await latencies(stub, args.seconds, 20_000)
        senders = start_senders(
            cluster, queen.address, tokens["hives"], args.rate, args.seconds + 1
        )
        flooded = await latencies(stub, args.seconds, 20_000)
        counts = [sender_counts(sender) for sender in senders]
    finally:
        await cluster.close()
    return Result(
        baseline_p50_ms=statistics.median(baseline) * 1000,
        flood_p50_ms=statistics.median(flooded) * 1000,
        requests=(len(baseline), len(flooded)),
        senders=dict(zip(SENDERS, counts, strict=True)),
        apply_ms_samples_changed=apply_cost(False),
        apply_ms_records_changed=apply_cost(True),
    )


def report(r: Result, args: argparse.Namespace) -> None:
    met = "met" if r.ratio <= 2 else "MISSED"
    print(
        f"# bench/flood.py: 2 hostile hives x {args.rate:g} maximal heartbeats/s "
        f"({DEFAULT_MAX_WORKERS_PER_HIVE} workers each), {args.seconds:g}s per phase"
    )
    print(
        f"client infer p50   baseline {r.baseline_p50_ms:.2f} ms   under flood "
        f"{r.flood_p50_ms:.2f} ms   ratio {r.ratio:.2f}x (target <= 2x: {met})"
    )
    print(f"requests           baseline {r.requests[0]}, under flood {r.requests[1]}")
    print(f"hostile beats      {r.senders}")
    print(
        f"apply one maximal beat   records steady, samples changed: "
        f"{r.apply_ms_samples_changed:.2f} ms (target < 5 ms)   every record changed: "
        f"{r.apply_ms_records_changed:.2f} ms"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=8.0, help="per phase")
    p.add_argument("--rate", type=float, default=20.0, help="beats per second per sender")
    p.add_argument("--json", action="store_true")
    p.add_argument("--send", default="", help=argparse.SUPPRESS)
    p.add_argument("--token", default="", help=argparse.SUPPRESS)
    p.add_argument("--hive-id", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.send:
        send(args.send, args.token, args.hive_id, args.rate, args.seconds)
        return
    result = asyncio.run(measure(args))
    if args.json:
        print(json.dumps({**dataclasses.asdict(result), "ratio": result.ratio}))
    else:
        report(result, args)


if __name__ == "__main__":
    main()
