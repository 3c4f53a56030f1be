"""hive/threads.py: engine workers never ask for more threads than the machine has cores."""

from __future__ import annotations

import pytest

from hive.threads import ThreadsRefused, thread_share


def test_by_default_the_cores_are_shared_among_the_engine_workers() -> None:
    assert thread_share(2, {}) == 2
    assert thread_share(2, {}, count=2) == 1
    assert thread_share(8, {}, count=3) == 2
    assert thread_share(8, {"w-a": 2}) == 4  # 8 cores over 2 engines, 6 still free
    assert thread_share(8, {"w-a": 6}) == 2  # the share is capped by what is free


def test_a_machine_whose_cores_are_all_held_refuses_another_engine() -> None:
    with pytest.raises(ThreadsRefused) as err:
        thread_share(2, {"w-a": 2})
    assert "2 of 2 core(s) are held by engine workers (w-a 2)" in str(err.value)


def test_explicit_threads_that_oversubscribe_are_refused_with_the_arithmetic() -> None:
    assert thread_share(4, {"w-a": 1}, wanted=3) == 3
    with pytest.raises(ThreadsRefused) as err:
        thread_share(2, {"w-a": 1}, wanted=2)
    assert str(err.value) == (
        "threads=2 does not fit: engine workers would ask for 1 held (w-a 1) + 2 = 3 threads "
        "on 2 core(s); 1 free"
    )
    with pytest.raises(ThreadsRefused) as err:
        thread_share(4, {}, wanted=2, count=3)
    assert "0 held + 3 x 2 = 6 threads on 4 core(s)" in str(err.value)
