"""Real inference cost: a GGUF through the queen vs llama-cpp-python called directly.

Both sides decode the same prompt with the same sampling and thread count; the
direct side runs in this process (the floor: no gRPC, no routing), the routed
side is a real queen, hive and llamacpp worker. Two random-weight llama models,
written at bench time:

- realistic (harness.gguf.REALISTIC, 1024 dims x 12 layers, ~620 MB): a token costs what a
  small real model's does here (tens of ms on 2 cores): the engine figure, c=1;
- tiny (2 layers x 64 dims): a token in well under a millisecond, so the ratio shows
  Apiary's per-token overhead at its most visible.

Direct and routed runs alternate, and each ratio is the median over side-by-side pairs: a
shared machine's speed drifts by a fifth from minute to minute, more than the overhead
measured. Prints tokens/s and time to first token for each, and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import Cluster
from harness.gguf import REALISTIC, TINY, Shape, write_tiny_gguf
from protos.v1 import common_pb2, hive_pb2, queen_pb2, queen_pb2_grpc

PROMPT = "the bees fly to the hive and the queen"


class Direct:
    """llama-cpp-python in this process: the floor (no gRPC, no routing)."""

    def __init__(self, path: Path, threads: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads,
            verbose=False,
        )  # fmt: skip

    async def run(self, seed: int, tokens: int) -> tuple[float, float]:
        """(tokens/s, seconds to the first token) of one completion."""
        llm = self.llm
        llm.set_seed(seed)
        start = time.perf_counter()
        first = 0.0
        n = 0
        prompt = llm.tokenize(PROMPT.encode(), add_bos=True)
        # The first token a client can see is the first that decodes to text (a worker sends
        # nothing for a token that is the start of a longer UTF-8 character): time that one.
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for token in llm.generate(prompt, temp=0.8, top_p=0.95, top_k=40, reset=True):
            text = utf8.decode(llm.detokenize([token]))
            if not first and text:
                first = time.perf_counter() - start
            n += 1
            if n >= tokens:
                break
        return n / (time.perf_counter() - start), first


class Routed:
    """The same model through a cluster of its own: queen, hive, one llamacpp worker."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.stub: queen_pb2_grpc.QueenAsyncStub | None = None

    async def start(self, path: Path, threads: int) -> None:
        cluster = self.cluster
        queen = cluster.start_queen()
        hive = cluster.start_hive(queen, "bench")
        async for _ in cluster.hive_stub(hive).PullModel(
            hive_pb2.PullModelRequest(source=str(path), name="m")
        ):
            pass
        await cluster.admin_stub(queen).SpawnWorker(
            queen_pb2.QueenSpawnWorkerRequest(
                hive_id="bench", model="m", backend="llamacpp", wait_ready=True,
                backend_options={"threads": str(threads), "context_size": "512"},
            ),
            timeout=120,
        )  # fmt: skip
        await cluster.wait_workers(queen, "m", 1)
        self.stub = cluster.queen_stub(queen)

    async def run(self, seed: int, tokens: int) -> tuple[float, float]:
        assert self.stub is not None
        request = common_pb2.InferRequest(
            model="m", prompt=PROMPT, max_tokens=tokens, seed=seed,
            temperature=0.8, top_p=0.95, top_k=40,
        )  # fmt: skip
        start = time.perf_counter()
        first = 0.0
        last = None
        async for chunk in self.stub.Infer(request, timeout=60):
            if last is None:
                first = time.perf_counter() - start
            last = chunk
        assert last is not None
        return last.completion_tokens / (time.perf_counter() - start), first


async def measure(
    label: str, shape: Shape, runs: int, tokens: int, threads: int
) -> tuple[float, float]:
    """One model, direct and routed run by turns (this box is shared: its speed drifts, so
    each routed run is compared with the direct run beside it). Prints its rows; returns
    (median of the pairs' tokens/s ratios, median of the pairs' ttft differences in ms)."""
    med = statistics.median
    cluster = Cluster(heartbeat_interval=1.0)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = write_tiny_gguf(Path(tmp) / "m.gguf", shape=shape)
            size = path.stat().st_size / 1e6
            direct, routed = Direct(path, threads), Routed(cluster)
            await routed.start(path, threads)
            pairs = []
            for run in range(runs + 1):
                pair: list[tuple[float, float]] = []
                side: Direct | Routed
                for side in (direct, routed):
                    # A short untimed run first: each side decodes from caches warm from its
                    # own last token, as a serving engine does, not from the other side's.
                    await side.run(run, 2)
                    pair.append(await side.run(run, tokens))
                if run:  # the first pair warms caches
                    pairs.append((pair[0], pair[1]))
        finally:
            await cluster.close()
    print(f"\n## {label}: {shape.n_embd} dims x {shape.n_layer} layers, ff {shape.n_ff} "
          f"({size:.0f} MB F32), {tokens} tokens, {runs} runs each, alternating, "
          f"{threads} thread(s), c=1")  # fmt: skip
    print(f"{'':>20} {'tokens/s p50':>13} {'ms/token':>9} {'ttft p50 ms':>12} {'ttft max ms':>12}")
    for name, at in (("direct (in-process)", 0), ("through queen", 1)):
        rates = [pair[at][0] for pair in pairs]
        ttft = [pair[at][1] for pair in pairs]
        print(f"{name:>20} {med(rates):>13.1f} {1000 / med(rates):>9.2f} "
              f"{med(ttft) * 1000:>12.2f} {max(ttft) * 1000:>12.2f}")  # fmt: skip
    ratio = med(r[0] / d[0] for d, r in pairs)
    delta = med((r[1] - d[1]) * 1000 for d, r in pairs)
    print(f"ratio queen/direct (median of {len(pairs)} side-by-side pairs): tokens/s "
          f"{ratio:.3f}x, ttft {delta:+.2f} ms")  # fmt: skip
    return ratio, delta


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=7, help="realistic model (tiny: twice as many)")
    p.add_argument("--tokens", type=int, default=64, help="realistic model (tiny: 200)")
    # One decoding thread: the other core is the router's (queen, hive, the worker's gRPC),
    # as a GPU box leaves its CPUs to them; with both cores decoding, every microsecond of
    # routing is taken from the engine and the figure measures core sharing, not overhead.
    p.add_argument("--threads", type=int, default=1, help="realistic model (tiny: 1)")
    args = p.parse_args()
    print("# bench/engine.py: random-weight llama GGUFs written now; direct = llama-cpp-python "
          "in this process, through queen = queen + hive + llamacpp worker")  # fmt: skip
    ratio, delta = await measure("realistic model", REALISTIC, args.runs, args.tokens, args.threads)
    tiny_ratio, tiny_delta = await measure("tiny model (per-token overhead)", TINY, args.runs * 2,
                                           200, 1)  # fmt: skip
    print("\n# summary")
    print(f"engine figure (realistic model): queen/direct tokens/s {ratio:.3f}x "
          f"({'ok' if ratio >= 0.97 else 'BELOW'} >= 0.97x), ttft {delta:+.2f} ms "
          f"({'ok' if delta <= 2 else 'ABOVE'} <= +2 ms)")  # fmt: skip
    print(f"per-token overhead (tiny model): queen/direct tokens/s {tiny_ratio:.2f}x, "
          f"ttft {tiny_delta:+.2f} ms: a token in well under a millisecond shows Apiary's "
          "per-token cost at its most visible")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
