"""The queen's OpenAI HTTP front vs its gRPC Infer: the same chat streams, the same run.

Starts a real cluster (queen with --http-listen, a hive, echo workers with zero token delay:
echo is for benchmarks only) and drives chat streams through both doors in turns, at each
concurrency and stream length, in alternating rounds (the machine is shared and noisy; the
best round of each door counts). Prints streams/s and time to first token for each, and
HTTP's ratio against gRPC with the targets: >= 0.8x streams/s, TTFT within +1 ms at c=1.

Then the grammar cells, on the real model (SmolLM2, one llamacpp worker): plain chats, chats
held to a JSON schema, and required tool calls, through HTTP in alternating rounds, each
request's time to first token and decode time per token, and the grammar's overhead as a
ratio against plain chat measured in the same run (--no-engine skips them).

The HTTP client here is a minimal keep-alive HTTP/1.1 + SSE reader of our own (one
connection per concurrent client), so what is compared is the two server paths, not grpcio's
C client against a Python HTTP library.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apiary.realmodel import model_path
from harness import Cluster
from harness.ports import free_port
from protos.v1 import common_pb2, queen_pb2, queen_pb2_grpc

PROMPT = "the quick brown fox jumps over the lazy dog"


@dataclass
class Result:
    streams: int = 0
    errors: int = 0
    elapsed: float = 0.0
    ttft: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.streams / self.elapsed if self.elapsed else 0.0

    def p(self, q: float) -> float:
        ordered = sorted(self.ttft) or [float("nan")]
        return ordered[min(int(q * len(ordered)), len(ordered) - 1)] * 1000


class HttpStream:
    """One keep-alive connection that posts chat streams and reads their SSE frames."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def chat(self, tokens: int) -> float:
        """Seconds to the first token; raises on anything but a whole 200 stream."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        body = json.dumps({"model": "bench", "max_tokens": tokens, "stream": True,
                           "messages": [{"role": "user", "content": PROMPT}]}).encode()  # fmt: skip
        began = time.perf_counter()
        self.writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200") or b"chunked" not in head.lower():
            raise RuntimeError(head.decode(errors="replace"))
        first, ended = 0.0, False
        while True:
            size = int((await self.reader.readline()).strip(), 16)
            data = await self.reader.readexactly(size + 2)
            if size == 0:
                break
            if not first and b"data: {" in data:
                first = time.perf_counter() - began
            ended = ended or b"data: [DONE]" in data
        if not ended:
            raise RuntimeError("the stream ended without [DONE]")
        return first

    async def post(self, body: dict[str, Any]) -> tuple[float, float, int, int]:
        """One streamed chat of `body`: (seconds to the first event, seconds in all, prompt and
        completion tokens from the usage)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        data = json.dumps({**body, "stream": True,
                           "stream_options": {"include_usage": True}}).encode()  # fmt: skip
        began = time.perf_counter()
        self.writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(data), data)
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.decode(errors="replace"))
        first, usage = 0.0, {"prompt_tokens": 0, "completion_tokens": 0}
        while size := int((await self.reader.readline()).strip(), 16):
            frame = await self.reader.readexactly(size + 2)
            first = first or time.perf_counter() - began
            for line in frame.split(b"\n"):
                if line.startswith(b"data: {") and b'"usage":{' in line:
                    usage = json.loads(line[6:])["usage"]
        await self.reader.readexactly(2)
        elapsed = time.perf_counter() - began
        return first, elapsed, usage["prompt_tokens"], usage["completion_tokens"]

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def drive(
    open_client: Callable[[], Callable[[int], Awaitable[float]]],
    tokens: int, concurrency: int, seconds: float, cap: int,
) -> Result:  # fmt: skip
    """`concurrency` closed-loop clients for `seconds` (at most `cap` streams in all)."""
    result = Result()
    start = time.perf_counter()
    stop_at = start + seconds

    async def client() -> None:
        one = open_client()
        while time.perf_counter() < stop_at and result.streams + result.errors < cap:
            try:
                result.ttft.append(await one(tokens))
                result.streams += 1
            except (grpc.aio.AioRpcError, RuntimeError, OSError, ValueError):
                result.errors += 1

    await asyncio.gather(*(client() for _ in range(concurrency)))
    result.elapsed = time.perf_counter() - start
    return result


def grpc_client(stub: Any) -> Callable[[], Callable[[int], Awaitable[float]]]:
    def open_client() -> Callable[[int], Awaitable[float]]:
        async def one(tokens: int) -> float:
            request = common_pb2.InferRequest(
                model="bench", max_tokens=tokens,
                messages=[common_pb2.ChatMessage(role="user", content=PROMPT)],
            )  # fmt: skip
            began, first = time.perf_counter(), 0.0
            async for _ in stub.Infer(request, timeout=60):
                first = first or time.perf_counter() - began
            return first

        return one

    return open_client


def http_client(
    port: int, opened: list[HttpStream]
) -> Callable[[], Callable[[int], Awaitable[float]]]:
    def open_client() -> Callable[[int], Awaitable[float]]:
        stream = HttpStream("127.0.0.1", port)
        opened.append(stream)
        return stream.chat

    return open_client


async def measure(
    doors: dict[str, Callable[[], Callable[[int], Awaitable[float]]]],
    tokens: int, conc: int, args: argparse.Namespace,
) -> dict[str, Result]:  # fmt: skip
    """Each door in turn, `args.rounds` times; the best round of each."""
    best: dict[str, Result] = {}
    for _ in range(args.rounds):
        for name, door in doors.items():
            await drive(door, tokens, conc, 0.3, 1_000)  # warm-up
            r = await drive(door, tokens, conc, args.seconds, args.max_requests)
            if name not in best or r.rate > best[name].rate:
                best[name] = r
    return best


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per cell")
    p.add_argument("--max-requests", type=int, default=50_000, help="per measurement")
    p.add_argument("--concurrency", default="1,64")
    p.add_argument("--tokens", default="8,100")
    p.add_argument("--no-engine", dest="engine", action="store_false",
                   help="skip the grammar cells on the real model")  # fmt: skip
    p.add_argument("--engine-requests", type=int, default=12, help="per kind and round")
    args = p.parse_args()

    cluster = Cluster(heartbeat_interval=1.0)
    opened: list[HttpStream] = []
    try:
        port = free_port()
        queen = cluster.start_queen(0, "--http-listen", f"127.0.0.1:{port}")
        # Slots above the highest concurrency: we measure the doors, not queueing.
        cluster.start_hive(queen, "bench", f"model=bench,backend=echo,count={args.workers},"
                           "slots=256,token_delay=0")  # fmt: skip
        await cluster.wait_workers(queen, "bench", args.workers)
        doors = {
            "grpc": grpc_client(queen_pb2_grpc.QueenStub(cluster.channel(queen.address))),
            "http": http_client(port, opened),
        }
        print(f"# bench/http.py: chat streams, {args.workers} echo workers (token delay 0), "
              f"{args.seconds:g}s per cell, best of {args.rounds} alternating rounds, "
              f"python {sys.version.split()[0]}, grpcio {grpc.__version__}")  # fmt: skip
        print(f"{'tokens':>6} {'conc':>4} {'door':>5} {'streams/s':>10} {'ttft50':>7} "
              f"{'ttft99':>7} {'err':>4}")  # fmt: skip
        summary = []
        for tokens in map(int, args.tokens.split(",")):
            for conc in map(int, args.concurrency.split(",")):
                results = await measure(doors, tokens, conc, args)
                for name, r in results.items():
                    print(f"{tokens:>6} {conc:>4} {name:>5} {r.rate:>10.0f} {r.p(0.5):>7.2f} "
                          f"{r.p(0.99):>7.2f} {r.errors:>4}")  # fmt: skip
                summary.append(verdict(tokens, conc, results["http"], results["grpc"]))
        print("\n# HTTP against gRPC (targets: >= 0.80x streams/s; TTFT p50 within +1 ms at c=1)")
        print("\n".join(summary))
        if args.engine:
            await grammar_cells(cluster, queen, port, args, opened)
    finally:
        for stream in opened:
            await stream.close()
        await cluster.close()


# ---- grammar cells on the real model ------------------------------------------------

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"},
    "hobbies": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
    "required": ["name", "age", "hobbies"]}  # fmt: skip
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": CITY}}
KINDS: dict[str, dict[str, Any]] = {
    "plain": {},
    "json": {"response_format": {"type": "json_schema",
                                 "json_schema": {"name": "person", "schema": SCHEMA}}},
    "tool": {"tools": [WEATHER], "tool_choice": "required"},
}  # fmt: skip


@dataclass
class Timings:
    ttft: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    # The request's whole time over its completion tokens (prompt and grammar included).
    per_token: list[float] = field(default_factory=list)
    prompt: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    def median(self, values: list[float]) -> float:
        ordered = sorted(values) or [float("nan")]
        return ordered[len(ordered) // 2] * 1000


async def grammar_cells(
    cluster: Cluster, queen: Any, port: int, args: argparse.Namespace, opened: list[HttpStream]
) -> None:
    path = model_path()
    admin = queen_pb2_grpc.QueenAdminStub(cluster.channel(queen.address))
    spawn = queen_pb2.QueenSpawnWorkerRequest(
        model="smol", backend="llamacpp", slots=4, wait_ready=True,
        backend_options={"model_path": str(path), "context_size": "1024"},
    )  # fmt: skip
    await admin.SpawnWorker(spawn, timeout=120)
    stream = HttpStream("127.0.0.1", port)
    opened.append(stream)
    timings = {kind: Timings() for kind in KINDS}
    for round_ in range(args.rounds + 1):  # the first round warms up
        for kind, extra in KINDS.items():
            for i in range(args.engine_requests):
                body = {"model": "smol", "max_tokens": 48, "temperature": 0.7, "seed": i,
                        "messages": [{"role": "user", "content": f"Tell me about person {i}."}],
                        **extra}  # fmt: skip
                first, total, prompt, tokens = await stream.post(body)
                if round_ and tokens:
                    t = timings[kind]
                    t.ttft.append(first)
                    t.total.append(total)
                    t.per_token.append(total / tokens)
                    t.prompt.append(prompt)
                    t.tokens.append(tokens)
    grammar_report(timings, args)


def grammar_report(timings: dict[str, Timings], args: argparse.Namespace) -> None:
    print(f"\n# grammar cells: SmolLM2 on one llamacpp worker, streamed HTTP chats one at a "
          f"time, {args.engine_requests} per kind and round, {args.rounds} rounds alternating; "
          "ttft: to the first event (a tool call's: its name); ms/token: the request's whole "
          "time over its completion tokens")  # fmt: skip
    print(f"{'kind':>6} {'requests':>8} {'prompt':>7} {'tokens':>7} {'ttft50':>8} "
          f"{'total50':>8} {'ms/token':>9}")  # fmt: skip
    for kind, t in timings.items():
        n = max(len(t.tokens), 1)
        print(f"{kind:>6} {len(t.ttft):>8} {sum(t.prompt) / n:>7.0f} {sum(t.tokens) / n:>7.1f} "
              f"{t.median(t.ttft):>8.1f} {t.median(t.total):>8.1f} "
              f"{t.median(t.per_token):>9.2f}")  # fmt: skip
    plain = timings["plain"]
    print("\n# the grammar's overhead per request, against plain chat in this run")
    for kind in ("json", "tool"):
        t = timings[kind]
        ratio = t.median(t.per_token) / plain.median(plain.per_token)
        prompt = (sum(t.prompt) - sum(plain.prompt)) / max(len(t.prompt), 1)
        print(f"{kind:>6}   ms per completion token {ratio:.2f}x plain   ttft p50 "
              f"{t.median(t.ttft) - plain.median(plain.ttft):+.1f} ms (prompt "
              f"{prompt:+.0f} tokens)")  # fmt: skip


def verdict(tokens: int, conc: int, http: Result, grpc_: Result) -> str:
    ratio = http.rate / grpc_.rate if grpc_.rate else float("nan")
    delta = http.p(0.5) - grpc_.p(0.5)
    line = f"{tokens:>6} {conc:>4}   streams/s {ratio:5.2f}x {'ok' if ratio >= 0.8 else 'MISSED'}"
    line += f"   ttft p50 {delta:+.2f} ms"
    if conc == 1:
        line += " ok" if delta <= 1.0 else " MISSED"
    return line


if __name__ == "__main__":
    asyncio.run(main())
