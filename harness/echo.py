"""What the echo backend (worker/backends/echo.py) streams when nothing interrupts it, for
tests and benches that check a migrated or resumed stream has no token missing or repeated."""

from __future__ import annotations


def echo_text(prompt: str, tokens: int) -> str:
    """The prompt's words in turn, space-separated, `tokens` of them."""
    words = prompt.split() or [prompt]
    return " ".join(words[i % len(words)] for i in range(tokens))
