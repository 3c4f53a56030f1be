"""worker/prefix_states.py: saved prompt states within a budget, the longest shared prefix
first, least recently used out, covered ones replaced."""

from __future__ import annotations

from worker.prefix_states import MIN_STATE_TOKENS, PrefixStates, SavedState, common_prefix


def state(tokens: list[int], size: int = 10, blocks: tuple[int, ...] = ()) -> SavedState:
    return SavedState(tokens, blocks, size, state=object())


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3, 4], [1, 2, 9]) == 2
    assert common_prefix([], [1]) == 0 and common_prefix([5, 6], [5, 6]) == 2
    long = list(range(3000))
    assert common_prefix(long, [*long[:1777], -1]) == 1777


def test_the_longest_shared_prefix_wins_and_lru_goes_first() -> None:
    states = PrefixStates(budget=30)
    a, b, c = state([1] * 100, blocks=(1,)), state([2] * 100, blocks=(2,)), state([3] * 100)
    for saved in (a, b, c):
        assert states.add(saved) == []
    assert states.best([2] * 50 + [7]) == (b, 50)
    states.touch(a)
    evicted = states.add(state([4] * 100))  # over budget: b, least recently used, goes
    assert evicted == [b] and states.size == 30
    assert states.best([2] * 10) == (None, 0)
    assert states.blocks() == [1]


def test_what_is_worth_a_state() -> None:
    states = PrefixStates(budget=100)
    assert not states.worth_saving([1] * 200, prompt_length=MIN_STATE_TOKENS - 1)
    assert states.worth_saving([1] * 200, prompt_length=150)
    states.add(state([1] * 180))
    assert not states.worth_saving([1] * 200, prompt_length=150)  # held already
    assert not PrefixStates(budget=0).worth_saving([1] * 200, 200)  # cache_ram_mb=0


def test_a_longer_state_replaces_one_it_covers_and_too_big_is_not_kept() -> None:
    states = PrefixStates(budget=50)
    states.add(state([1] * 100))
    states.add(state([1] * 150))
    assert [len(s.tokens) for s in states.saved] == [150]
    assert states.add(state([9] * 10, size=51)) == [] and len(states.saved) == 1
