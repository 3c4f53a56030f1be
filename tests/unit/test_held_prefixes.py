"""worker/held_prefixes.py: what an engine holds, as its worker reports it."""

from __future__ import annotations

from worker.held_prefixes import HeldPrefixes


def test_the_newest_prompt_of_each_slot_is_held_and_counts_add_up() -> None:
    held = HeldPrefixes(slots=2, ram_tokens=0)
    held.computed((1, 2), 600, 0)
    held.computed((3,), 300, 0)
    held.computed((1, 2), 600, 599)
    report = held.report()
    assert list(report.blocks) == [1, 2, 3] and report.states == 2
    assert (report.requests, report.hits) == (3, 1)
    assert (report.prompt_tokens, report.cached_prompt_tokens) == (1500, 599)
    held.computed((4,), 300, 0)  # a third prompt on two slots: the oldest is gone
    assert list(held.report().blocks) == [4, 1, 2]


def test_older_prompts_stay_while_the_ram_cache_can_keep_their_tokens() -> None:
    held = HeldPrefixes(slots=1, ram_tokens=1000)
    for chain in ((1,), (2,), (3,), (4,)):
        held.computed(chain, 400, 0)
    # One live (4) and 1,000 tokens' worth saved: 3 and 2 (800), not 1.
    assert list(held.report().blocks) == [4, 3, 2]


def test_a_prompt_shorter_than_a_block_is_counted_but_holds_nothing() -> None:
    held = HeldPrefixes(slots=4, ram_tokens=0)
    held.computed((), 20, 0)
    report = held.report()
    assert report.requests == 1 and list(report.blocks) == []
