"""PromptCache's save/restore decisions, driven by a fake engine context (no llama.cpp)."""

from __future__ import annotations

from dataclasses import dataclass, field

from worker.backends.prompt_cache import PromptCache
from worker.prefix_states import PrefixStates


@dataclass
class FakeState:
    tokens: list[int]
    llama_state_size: int


@dataclass
class FakeContext:
    """What PromptCache reads and calls on a llama_cpp.Llama: its tokens, save and load."""

    input_ids: list[int] = field(default_factory=list)
    saves: int = 0
    loads: int = 0

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    def save_state(self) -> FakeState:
        self.saves += 1
        return FakeState(list(self.input_ids), 1000)

    def load_state(self, state: FakeState) -> None:
        self.loads += 1
        self.input_ids = list(state.tokens)


def tenant(n: int) -> list[int]:
    return [n * 1000 + i for i in range(200)]


def run(cache: PromptCache, llm: FakeContext, prompt: list[int]) -> int:
    """One request: prepare, then the engine computes the prompt (its context becomes it)."""
    cached = cache.prepare(llm, prompt)
    cache.started(prompt, (prompt[0],), cached)
    llm.input_ids = list(prompt)
    return cached


def test_a_budget_of_one_state_swaps_two_tenants_and_every_return_is_a_hit() -> None:
    cache, llm = PromptCache(PrefixStates(budget=1000)), FakeContext()
    cached = [run(cache, llm, tenant(t)) for t in (0, 1, 0, 1, 0)]
    assert cached[:2] == [0, 0]
    # The whole prompt matches: one token is replayed, as llama-cpp-python does.
    assert cached[2:] == [199, 199, 199]
    assert len(cache.states.saved) == 1 and cache.states.size <= 1000


def test_a_third_tenant_evicts_the_least_recently_used() -> None:
    cache, llm = PromptCache(PrefixStates(budget=1000)), FakeContext()
    cached = [run(cache, llm, tenant(t)) for t in (0, 1, 2, 1, 0)]
    # 2 swaps with 1 (saved), 1 is restored, 0 was evicted when 1 was saved.
    assert cached == [0, 0, 0, 199, 0]


def test_a_continuing_prompt_neither_saves_nor_restores() -> None:
    cache, llm = PromptCache(PrefixStates(budget=10_000)), FakeContext()
    run(cache, llm, tenant(0))
    assert run(cache, llm, [*tenant(0), 7, 8, 9]) == 200
    assert (llm.saves, llm.loads) == (0, 0)


def test_no_budget_keeps_only_the_live_context() -> None:
    cache, llm = PromptCache(PrefixStates(budget=0)), FakeContext()
    assert [run(cache, llm, tenant(t)) for t in (0, 1, 0)] == [0, 0, 0]
    assert llm.saves == 0
    assert cache.report.requests == 3 and cache.report.hits == 0
