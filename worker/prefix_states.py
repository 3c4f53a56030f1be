"""Saved prompt states of one engine context, within a memory budget. Pure bookkeeping.

An engine keeps one live context; a prompt that does not continue it throws its computed
prefix away. Before that happens the backend saves the context (its KV state, a few MB for a
few thousand tokens) here, and before computing a prompt it restores the saved state sharing
the longest prefix with it, if that beats what the live context shares. States are kept
least recently used first out, within `budget` bytes (0: none kept, only the live context).
Each state also carries the block hashes (apiary/prefix.py) of the request it came from: what
the worker reports to the queen as held.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# Prompts shorter than this are not worth a saved state.
MIN_STATE_TOKENS = 64
# A saved state is restored only if it shares this many more tokens than the live context.
MIN_GAIN_TOKENS = 16


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix, by binary search over C-speed slice compares."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


@dataclass
class SavedState:
    tokens: list[int]
    blocks: tuple[int, ...]
    size: int
    # The engine's own state object (opaque here).
    state: Any
    last_used: int = 0


@dataclass
class PrefixStates:
    budget: int
    saved: list[SavedState] = field(default_factory=list)
    _clock: int = 0

    @property
    def size(self) -> int:
        return sum(s.size for s in self.saved)

    def best(self, prompt: Sequence[int]) -> tuple[SavedState | None, int]:
        """The saved state sharing the longest prefix with `prompt`, and how long it is."""
        best: tuple[SavedState | None, int] = (None, 0)
        for state in self.saved:
            shared = common_prefix(state.tokens, prompt)
            if shared > best[1]:
                best = (state, shared)
        return best

    def worth_saving(self, tokens: Sequence[int], prompt_length: int) -> bool:
        """A context worth a saved state: its prompt (the first `prompt_length` tokens) long
        enough, and not held already by a saved state."""
        if self.budget <= 0 or prompt_length < MIN_STATE_TOKENS:
            return False
        return not any(common_prefix(s.tokens, tokens) >= prompt_length for s in self.saved)

    def add(self, state: SavedState) -> list[SavedState]:
        """Keep `state` (dropping saved ones it covers whole); the states evicted for room."""
        if state.size > self.budget:
            return []
        covered = [s for s in self.saved if common_prefix(s.tokens, state.tokens) >= len(s.tokens)]
        for old in covered:
            self.saved.remove(old)
        self.touch(state)
        self.saved.append(state)
        evicted = []
        while self.size > self.budget:
            oldest = min(self.saved, key=lambda s: s.last_used)
            self.saved.remove(oldest)
            evicted.append(oldest)
        return evicted

    def take(self, state: SavedState) -> None:
        """`state` leaves the budget: it is being restored as the live context."""
        self.saved.remove(state)

    def touch(self, state: SavedState) -> None:
        self._clock += 1
        state.last_used = self._clock

    def blocks(self) -> list[int]:
        """Every block hash the saved states hold (each once)."""
        return list(dict.fromkeys(b for s in self.saved for b in s.blocks))
