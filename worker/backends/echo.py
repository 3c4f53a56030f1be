"""The `echo` backend: deterministic tokens from the prompt, for tests and benchmarks only.

What it does, exactly, so tests can assert text:
- a prompt: its words streamed back, cycling, one word per token (' word' after the first);
- a chat (messages): rendered as 'role: content' lines then 'assistant:' (that is what
  prompt_tokens counts), and the words of the last user message streamed back the same way;
- token ids: a word's id is crc32(word) mod 32000, the same word always the same id.
"""

from __future__ import annotations

import asyncio
import os
import time
import zlib
from collections.abc import AsyncIterator, Mapping
from typing import ClassVar, Self

from worker.backends.base import (
    Backend,
    GenerationRequest,
    Piece,
    Progress,
    parse_float_option,
    parse_int_option,
    plain_chat,
)


class EchoBackend(Backend):
    """Streams the prompt's words back, cycling, one per token. Not a model.

    The fault_* options make a worker misbehave on purpose, so the hive's
    supervision can be tested against real processes.
    """

    name: ClassVar[str] = "echo"
    FOR_TESTING: ClassVar[bool] = True
    OPTIONS: ClassVar[Mapping[str, str]] = {
        "token_delay": "seconds between tokens, kept on a schedule (default 0)",
        "load_delay": "seconds load() takes, to imitate loading weights (default 0)",
        "fault_exit_on_load": "tests only: exit with this code while loading (default: off)",
        "fault_crash_after": "tests only: the process dies when request N+1 arrives (default: off)",
        "fault_hang_after": "tests only: freeze the process this many seconds after load (off)",
        "fault_fail_requests": "tests only: 1 = fail every request before its first token",
    }

    def __init__(
        self,
        model: str,
        token_delay: float = 0.0,
        load_delay: float = 0.0,
        fault_exit_on_load: int | None = None,
        fault_crash_after: int | None = None,
        fault_hang_after: float | None = None,
        fault_fail_requests: bool = False,
    ) -> None:
        self.fault_fail_requests = fault_fail_requests
        self.model = model
        self.token_delay = token_delay
        self.load_delay = load_delay
        self.fault_exit_on_load = fault_exit_on_load
        self.fault_crash_after = fault_crash_after
        self.fault_hang_after = fault_hang_after
        self.requests = 0

    @classmethod
    def from_options(cls, model: str, options: Mapping[str, str], slots: int = 1) -> Self:
        cls.check_options(options)

        def maybe_int(key: str) -> int | None:
            return parse_int_option(cls.name, options, key, 0) if key in options else None

        return cls(
            model,
            token_delay=parse_float_option(cls.name, options, "token_delay", 0.0),
            load_delay=parse_float_option(cls.name, options, "load_delay", 0.0),
            fault_exit_on_load=maybe_int("fault_exit_on_load"),
            fault_crash_after=maybe_int("fault_crash_after"),
            fault_hang_after=(
                parse_float_option(cls.name, options, "fault_hang_after", 0.0)
                if "fault_hang_after" in options
                else None
            ),
            fault_fail_requests=bool(parse_int_option(cls.name, options, "fault_fail_requests", 0)),
        )

    async def load(self, progress: Progress) -> None:
        if self.fault_exit_on_load is not None:
            os._exit(self.fault_exit_on_load)
        if self.load_delay:
            # Imitated weights, in ten steps, so loading progress can be seen and tested.
            for step in range(10):
                progress(step / 10, f"loading imitation weights, step {step + 1} of 10")
                await asyncio.sleep(self.load_delay / 10)
            progress(1.0, "loaded")
        if self.fault_hang_after is not None:
            # Block the event loop: no RPC, health check or signal handler runs again.
            asyncio.get_running_loop().call_later(self.fault_hang_after, time.sleep, 10**6)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Piece]:
        self.requests += 1
        if self.fault_crash_after is not None and self.requests > self.fault_crash_after:
            os._exit(70)
        if self.fault_fail_requests:
            raise RuntimeError("echo fault_fail_requests: failing on purpose")
        words = echoed_words(request)
        # A continuation goes on from the token it reached: the same words, in turn.
        first = len(request.continuation)
        # On a schedule (token n at start + (n + 1) x token_delay), not a sleep per token, so a
        # busy loop's lateness does not add up over a stream: a steady N tokens/s, like a model.
        start = time.monotonic()
        for n, i in enumerate(range(first, first + request.max_tokens)):
            if self.token_delay:
                await asyncio.sleep(start + (n + 1) * self.token_delay - time.monotonic())
            else:
                # Yield to the loop so a long stream never starves other RPCs.
                await asyncio.sleep(0)
            word = words[i % len(words)]
            yield Piece(echo_token(words, i), token_ids=(token_id(word),))

    def count_tokens(self, text: str) -> int:
        return len(text.split())


def echoed_words(request: GenerationRequest) -> list[str]:
    """A prompt's words, or a chat's last user message's (the whole rendering if none)."""
    text = request.prompt
    if request.messages:
        users = [m.content for m in request.messages if m.role == "user"]
        text = users[-1] if users else plain_chat(request.messages)
    return text.split() or [text]


def token_id(word: str) -> int:
    """The made-up, stable id of an echoed word."""
    return zlib.crc32(word.encode()) % 32000


def echo_token(words: list[str], index: int) -> str:
    """Token `index` of an echo stream: the prompt's words in turn, space-separated."""
    word = words[index % len(words)]
    return word if index == 0 else " " + word
