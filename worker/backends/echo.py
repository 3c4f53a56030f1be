"""The `echo` backend: deterministic tokens from the prompt, for tests and benchmarks only."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import ClassVar, Self

from worker.backends.base import Backend, parse_float_option


class EchoBackend(Backend):
    """Streams the prompt's words back, cycling, one per token. Not a model."""

    name: ClassVar[str] = "echo"
    OPTIONS: ClassVar[Mapping[str, str]] = {
        "token_delay": "seconds to sleep before each token (default 0)",
        "load_delay": "seconds load() takes, to imitate loading weights (default 0)",
    }

    def __init__(self, model: str, token_delay: float = 0.0, load_delay: float = 0.0) -> None:
        self.model = model
        self.token_delay = token_delay
        self.load_delay = load_delay

    @classmethod
    def from_options(cls, model: str, options: Mapping[str, str]) -> Self:
        cls.check_options(options)
        return cls(
            model,
            token_delay=parse_float_option(cls.name, options, "token_delay", 0.0),
            load_delay=parse_float_option(cls.name, options, "load_delay", 0.0),
        )

    async def load(self) -> None:
        if self.load_delay:
            await asyncio.sleep(self.load_delay)

    async def generate(self, prompt: str, max_tokens: int) -> AsyncIterator[str]:
        words = prompt.split() or [prompt]
        for i in range(max_tokens):
            if self.token_delay:
                await asyncio.sleep(self.token_delay)
            else:
                # Yield to the loop so a long stream never starves other RPCs.
                await asyncio.sleep(0)
            yield echo_token(words, i)

    def count_tokens(self, text: str) -> int:
        return len(text.split())


def echo_token(words: list[str], index: int) -> str:
    """Token `index` of an echo stream: the prompt's words in turn, space-separated."""
    word = words[index % len(words)]
    return word if index == 0 else " " + word
