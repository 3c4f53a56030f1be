"""KEY=VALUE lists as typed on command lines (--option, --spawn, --autospawn)."""

from __future__ import annotations

from collections.abc import Iterable


def parse_key_values(pairs: Iterable[str], what: str = "option") -> dict[str, str]:
    """{'k': 'v'} from ['k=v', ...]; ValueError naming the bad pair. Later keys win."""
    parsed: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"{what} {pair!r} is not KEY=VALUE")
        parsed[key] = value.strip()
    return parsed
