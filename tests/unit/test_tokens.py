"""Tokens and the identities they name: named clients, per-hive tokens, derived worker tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apiary.security import (
    SHARED_HIVE,
    Identity,
    SecurityError,
    TokenSet,
    check_distinct,
    derive_worker_token,
    load_tokens_file,
)

TOKENS = TokenSet(
    admin="adm",
    queen="qn",
    hive="shared",
    clients={"shop": "c-shop", "search": "c-search"},
    hives={"hive-a": "h-a", "hive-b": "h-b"},
)


def test_a_token_names_its_identity_and_nothing_else() -> None:
    assert TOKENS.identities("c-shop") == {Identity("client", "shop")}
    assert TOKENS.identities("h-a") == {Identity("hive", "hive-a")}
    assert TOKENS.identities("shared") == {Identity("hive", SHARED_HIVE)}
    assert TOKENS.identities("qn") == {Identity("queen", "queen")}
    assert TOKENS.identities("nope") == frozenset() and TOKENS.identities("") == frozenset()
    assert TOKENS.roles_of("adm") == {"admin"}
    assert "c-shop" not in repr(TOKENS) and "h-a" not in repr(TOKENS)


def test_worker_tokens_are_derived_per_worker_from_its_hive_token() -> None:
    one = TOKENS.worker_token("hive-a", "w-1")
    assert one == derive_worker_token("h-a", "w-1")
    assert one != TOKENS.worker_token("hive-a", "w-2")  # worth nothing at another worker
    assert one != TOKENS.worker_token("hive-b", "w-1")  # nor at another hive's
    # A hive without its own token uses the shared one; no tokens at all, no credential.
    assert TOKENS.worker_token("hive-c", "w-1") == derive_worker_token("shared", "w-1")
    assert TokenSet().worker_token("hive-a", "w-1") == ""


def test_the_tokens_file_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"admin": "a", "clients": {"app": "c"}, "hives": {"h": "x"}}))
    assert load_tokens_file(str(path)) == {
        "admin": "a",
        "clients": {"app": "c"},
        "hives": {"h": "x"},
    }
    for bad, message in [
        ({"root": "x"}, "keys are among"),
        ({"admin": 5}, "'admin' must be a string"),
        ({"hives": ["h"]}, "'hives' must map names to tokens"),
        ({"clients": {"app": ""}}, "'clients' must map names to tokens"),
    ]:
        path.write_text(json.dumps(bad))
        with pytest.raises(SecurityError, match=message):
            load_tokens_file(str(path))
    path.write_text("{not json")
    with pytest.raises(SecurityError, match="cannot read tokens file"):
        load_tokens_file(str(path))


def test_one_token_may_not_name_two_identities() -> None:
    with pytest.raises(SecurityError, match="same token is configured for admin 'admin' and"):
        check_distinct(TokenSet(admin="same", clients={"app": "same"}))
    check_distinct(TOKENS)
