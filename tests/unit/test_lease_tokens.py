"""Lease tokens: signed for one worker, readable only with its key, tamper-evident."""

from __future__ import annotations

import pytest

from apiary.leasetoken import LeaseToken, lease_id_of, lease_key, mint, verify
from apiary.security import derive_worker_token


def test_a_token_names_its_lease_and_expiry_for_its_worker_only() -> None:
    key = lease_key(derive_worker_token("hive-secret", "w-1"), "w-1")
    token = mint(key, "l-abc", 1_700_000_000.25)
    assert token.startswith("l-abc.") and lease_id_of(token) == "l-abc"
    assert verify(key, token) == LeaseToken("l-abc", 1_700_000_000.25)
    other_worker = lease_key(derive_worker_token("hive-secret", "w-2"), "w-2")
    other_hive = lease_key(derive_worker_token("other-secret", "w-1"), "w-1")
    assert verify(other_worker, token) is None and verify(other_hive, token) is None


def test_without_tokens_the_key_is_public_but_still_per_worker() -> None:
    token = mint(lease_key("", "w-1"), "l-x", 10.0)
    assert verify(lease_key("", "w-1"), token) is not None
    assert verify(lease_key("", "w-2"), token) is None


@pytest.mark.parametrize(
    "change",
    [
        lambda t: t.replace(".", ".9", 1),  # a later expiry
        lambda t: "l-other" + t[t.index(".") :],  # another lease's id
        lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),  # another signature
        lambda t: t.rsplit(".", 1)[0],  # no signature
        lambda t: t + "." + t,
        lambda t: "x" + t,
        lambda t: t.replace(".", ".é", 1),
        lambda t: t[:-2] + "é",
        lambda t: t + "A" * 200,
        lambda t: "",
    ],
)
def test_anything_but_the_token_as_minted_is_refused(change: object) -> None:
    key = lease_key("w-token", "w-1")
    token = mint(key, "l-abc", 100.0)
    assert callable(change)
    assert verify(key, change(token)) is None
