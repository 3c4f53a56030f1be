"""The llamacpp backend's prompt states: the live context and saved ones, and its report.

Before a prompt is computed (on the decoding thread, under the backend's lock):
- the live context is saved if the new prompt throws most of its prompt away (a tenant, or
  a conversation, switching) and no saved state holds that prompt yet;
- the saved state sharing the longest prefix with the new prompt is restored if it shares
  clearly more than the live context does (llama-cpp-python's save_state/load_state: for a
  1,500-token prefix on this machine ~45 ms and ~20 ms, against ~1 s to compute it);
- llama-cpp-python's generate() then reuses the common prefix by itself.
Measured against LlamaRAMCache (which also keys states by token prefix but saves after every
completion, inside create_completion, and was seen taking 11 s with a stream stopped after the
first token): explicit save/load around our own generate loop works with streaming and
cancellation, and saves only when a prefix is about to be lost.

`report` is a PrefixCache message swapped whole after each request, so GetStatus reads it
from the event loop while the decoding thread works.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import structlog

from protos.v1 import common_pb2
from worker.prefix_states import (
    MIN_GAIN_TOKENS,
    PrefixStates,
    SavedState,
    common_prefix,
)

log = structlog.get_logger("worker.llamacpp")

# The default budget: a sixteenth of the machine's memory, at most this.
MAX_DEFAULT_CACHE_MB = 1024


def default_cache_ram_mb() -> int:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0
    return min(MAX_DEFAULT_CACHE_MB, total // 16 // 1_000_000)


def reusable_prefix(llm: Any, prompt: list[int]) -> int:
    """Prompt tokens llama-cpp-python's generate() will not evaluate again: the longest common
    prefix with what its context holds (one is replayed when the whole prompt matches)."""
    common = common_prefix(live_tokens(llm), prompt)
    return common - 1 if common and common == len(prompt) else common


def live_tokens(llm: Any) -> list[int]:
    return [int(t) for t in llm.input_ids[: llm.n_tokens]] if llm.n_tokens else []


class PromptCache:
    def __init__(self, states: PrefixStates) -> None:
        self.states = states
        # The live context's request: its prompt length and prefix blocks.
        self.live_prompt = 0
        self.live_blocks: tuple[int, ...] = ()
        self.requests = self.hits = self.prompt_tokens = self.cached_tokens = 0
        self.report = common_pb2.PrefixCache()

    def prepare(self, llm: Any, prompt: list[int]) -> int:
        """Save and restore states for `prompt`; the prompt tokens that need no computing."""
        live = live_tokens(llm)
        shared = common_prefix(live, prompt)
        saved, saved_shared = self.states.best(prompt)
        restore = saved if saved is not None and saved_shared > shared + MIN_GAIN_TOKENS else None
        if restore is not None:
            # It becomes the live context: the budget is for the others (a swap, so a budget of
            # one state keeps two prefixes).
            self.states.take(restore)
        if shared < self.live_prompt // 2 and self.states.worth_saving(live, self.live_prompt):
            self._save(llm, live)
        if restore is not None:
            llm.load_state(restore.state)
            self.live_blocks, self.live_prompt = restore.blocks, len(restore.tokens)
        return reusable_prefix(llm, prompt)

    def _save(self, llm: Any, live: list[int]) -> None:
        state = llm.save_state()
        size = int(state.llama_state_size) + sum(
            getattr(getattr(state, name, None), "nbytes", 0) for name in ("scores", "input_ids")
        )
        evicted = self.states.add(SavedState(live, self.live_blocks, size, state))
        log.info("prompt state saved", tokens=len(live), bytes=size, evicted=len(evicted),
                 states=len(self.states.saved))  # fmt: skip

    def started(self, prompt: Sequence[int], blocks: tuple[int, ...], cached: int) -> None:
        """The prompt is being computed: the live context is now its, and counts move."""
        self.live_prompt, self.live_blocks = len(prompt), blocks
        self.requests += 1
        self.hits += cached > 0
        self.prompt_tokens += len(prompt)
        self.cached_tokens += cached
        held = list(dict.fromkeys((*blocks, *self.states.blocks())))
        self.report = common_pb2.PrefixCache(
            blocks=held[:4096], states=len(self.states.saved), state_bytes=self.states.size,
            requests=self.requests, hits=self.hits, prompt_tokens=self.prompt_tokens,
            cached_prompt_tokens=self.cached_tokens,
        )  # fmt: skip
