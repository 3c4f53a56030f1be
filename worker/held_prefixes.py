"""What an engine holds of computed prompts, as the worker reports it to the queen. Pure.

llama.cpp's server engine keeps each slot's last prompt in its KV cache (a new request goes to
the slot whose prompt it shares most with) and, within `cache_ram_mb`, saved slot states in
host memory. The worker cannot see inside it, but it knows what it sent: the prefix block
hashes (apiary/prefix.py) of each request, newest first: the newest `slots` prompts (one per
slot), and older ones while their tokens fit in what the RAM cache can keep. The queen's
cache-aware pick reads these blocks; the counters give hit ratios.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from protos.v1 import common_pb2

# At most this many blocks go in one report (a heartbeat record stays small).
MAX_REPORTED_BLOCKS = 4096


@dataclass
class HeldPrefixes:
    # Prompts the engine keeps live, one per slot.
    slots: int
    # Prompt tokens its host-RAM cache can keep besides.
    ram_tokens: int
    # Block chain of a request -> its prompt tokens; newest last.
    _held: OrderedDict[tuple[int, ...], int] = field(default_factory=OrderedDict)
    requests: int = 0
    hits: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0

    def computed(self, blocks: tuple[int, ...], prompt_tokens: int, cached: int) -> None:
        """A request's prompt was taken by the engine, `cached` of its tokens from a cache."""
        self.requests += 1
        self.hits += cached > 0
        self.prompt_tokens += prompt_tokens
        self.cached_tokens += cached
        if not blocks:
            return
        self._held.pop(blocks, None)
        self._held[blocks] = prompt_tokens
        older = len(self._held) - self.slots
        saved = sum(tokens for _, tokens in zip(range(older), self._held.values(), strict=False))
        while older > 0 and saved > self.ram_tokens:
            _, tokens = self._held.popitem(last=False)
            saved -= tokens
            older -= 1

    def report(self) -> common_pb2.PrefixCache:
        blocks = list(dict.fromkeys(b for chain in reversed(self._held) for b in chain))
        return common_pb2.PrefixCache(
            blocks=blocks[:MAX_REPORTED_BLOCKS], states=len(self._held),
            requests=self.requests, hits=self.hits, prompt_tokens=self.prompt_tokens,
            cached_prompt_tokens=self.cached_tokens,
        )  # fmt: skip
