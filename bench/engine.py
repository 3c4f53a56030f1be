"""Real inference cost: a GGUF through the queen vs llama-cpp-python called directly.

Both sides decode the same prompt with the same sampling and thread count; the
direct side runs in this process (the floor: no gRPC, no routing), the routed
side is a real queen, hive and llamacpp worker. Two random-weight llama models,
written at bench time:

- realistic (harness.gguf.REALISTIC, 1024 dims x 12 layers, ~620 MB): a token costs what a
  small real model's does here (tens of ms on 2 cores): the engine figure, c=1;
- tiny (2 layers x 64 dims): a token in well under a millisecond, so the ratio shows
  Apiary's per-token overhead at its most visible.

Prints tokens/s and time to first token for each, and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import Cluster
from harness.gguf import REALISTIC, TINY, Shape, write_tiny_gguf
from protos.v1 import common_pb2, hive_pb2, queen_pb2

PROMPT = "the bees fly to the hive and the queen"


def direct(path: Path, runs: int, tokens: int, threads: int) -> tuple[list[float], list[float]]:
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    rates, ttfts = [], []
    for run in range(runs + 1):
        llm.set_seed(run)
        start = time.perf_counter()
        first = 0.0
        n = 0
        prompt = llm.tokenize(PROMPT.encode(), add_bos=True)
        for token in llm.generate(prompt, temp=0.8, top_p=0.95, top_k=40, reset=True):
            if n == 0:
                first = time.perf_counter() - start
            llm.detokenize([token])
            n += 1
            if n >= tokens:
                break
        if run:  # the first run warms caches
            rates.append(n / (time.perf_counter() - start))
            ttfts.append(first)
    return rates, ttfts


async def routed(
    path: Path, runs: int, tokens: int, threads: int
) -> tuple[list[float], list[float]]:
    """Through a fresh cluster of its own (queen, hive, one llamacpp worker)."""
    cluster = Cluster(heartbeat_interval=1.0)
    try:
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
        stub = cluster.queen_stub(queen)
        rates, ttfts = [], []
        for run in range(runs + 1):
            request = common_pb2.InferRequest(
                model="m", prompt=PROMPT, max_tokens=tokens, seed=run,
                temperature=0.8, top_p=0.95, top_k=40,
            )  # fmt: skip
            start = time.perf_counter()
            first = 0.0
            last = None
            async for chunk in stub.Infer(request, timeout=60):
                if last is None:
                    first = time.perf_counter() - start
                last = chunk
            assert last is not None
            if run:
                rates.append(last.completion_tokens / (time.perf_counter() - start))
                ttfts.append(first)
        return rates, ttfts
    finally:
        await cluster.close()


async def measure(
    label: str, shape: Shape, runs: int, tokens: int, threads: int
) -> tuple[float, float]:
    """One model, direct then routed: prints its rows; (tokens/s ratio, ttft delta ms)."""
    med = statistics.median
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_gguf(Path(tmp) / "m.gguf", shape=shape)
        size = path.stat().st_size / 1e6
        d_rates, d_ttft = direct(path, runs, tokens, threads)
        r_rates, r_ttft = await routed(path, runs, tokens, threads)
    print(f"\n## {label}: {shape.n_embd} dims x {shape.n_layer} layers, ff {shape.n_ff} "
          f"({size:.0f} MB F32), {tokens} tokens, {runs} runs each, {threads} thread(s), "
          "c=1")  # fmt: skip
    print(f"{'':>20} {'tokens/s p50':>13} {'ms/token':>9} {'ttft p50 ms':>12} {'ttft max ms':>12}")
    for name, rates, ttft in (
        ("direct (in-process)", d_rates, d_ttft),
        ("through queen", r_rates, r_ttft),
    ):
        print(f"{name:>20} {med(rates):>13.1f} {1000 / med(rates):>9.2f} "
              f"{med(ttft) * 1000:>12.2f} {max(ttft) * 1000:>12.2f}")  # fmt: skip
    ratio = med(r_rates) / med(d_rates)
    delta = (med(r_ttft) - med(d_ttft)) * 1000
    print(f"ratio queen/direct: tokens/s {ratio:.3f}x, ttft {delta:+.2f} ms")
    return ratio, delta


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=5, help="realistic model (tiny: twice as many)")
    p.add_argument("--tokens", type=int, default=64, help="realistic model (tiny: 200)")
    p.add_argument("--threads", type=int, default=2, help="realistic model (tiny: 1)")
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
