"""The interface every inference backend implements, so a real engine plugs in beside `echo`."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Self

# Called during load with (fraction done 0..1, what is happening); from any thread.
Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    max_tokens: int
    # None: the backend's default.
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None


@dataclass(frozen=True)
class Piece:
    """Decoded text as it becomes available, and how many tokens it took."""

    text: str
    tokens: int = 1


class BackendOptionError(ValueError):
    """A backend option was unknown or had a bad value; the message says which and why."""


class Backend(abc.ABC):
    name: ClassVar[str]
    # Option name -> one-line help, for messages and catalogs.
    OPTIONS: ClassVar[Mapping[str, str]] = {}
    # Python modules the backend needs; if one is missing the backend is unavailable.
    REQUIRES: ClassVar[tuple[str, ...]] = ()
    # The distribution whose version the catalog shows, and the pip extra that installs it.
    PACKAGE: ClassVar[str] = "apiary"
    EXTRA: ClassVar[str] = ""
    # Exists for tests and benchmarks only.
    FOR_TESTING: ClassVar[bool] = False
    # Concurrent generations one instance can run (an engine context is not shared).
    MAX_SLOTS: ClassVar[int] = 256

    @classmethod
    def devices(cls) -> list[str]:
        """Devices this backend can run on, on this machine."""
        return ["cpu"]

    @classmethod
    def check_options(cls, options: Mapping[str, str]) -> None:
        unknown = sorted(set(options) - set(cls.OPTIONS))
        if unknown:
            known = ", ".join(sorted(cls.OPTIONS)) or "none"
            raise BackendOptionError(
                f"backend {cls.name!r} has no option {', '.join(map(repr, unknown))}; "
                f"known options: {known}"
            )

    @classmethod
    @abc.abstractmethod
    def from_options(cls, model: str, options: Mapping[str, str]) -> Self:
        """Validate options and build the backend without loading anything yet."""

    @abc.abstractmethod
    async def load(self, progress: Progress) -> None:
        """Load weights, reporting progress where the engine can; ready only after it returns."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[Piece]:
        """Yield the completion as it is decoded, at most max_tokens tokens, ending early at the
        end of sequence. Closing the iterator must stop decoding."""

    @abc.abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens in `text` by this backend's tokenizer (for prompt token counts)."""

    async def close(self) -> None:  # noqa: B027 - optional hook; most backends free nothing
        """Free what load() took."""


def parse_int_option(backend: str, options: Mapping[str, str], key: str, default: int) -> int:
    """A non-negative integer option, or BackendOptionError saying what was wrong."""
    raw = options.get(key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BackendOptionError(
            f"backend {backend!r} option {key}={raw!r} is not a whole number"
        ) from None
    if value < 0:
        raise BackendOptionError(f"backend {backend!r} option {key}={raw!r} must be >= 0")
    return value


def parse_float_option(backend: str, options: Mapping[str, str], key: str, default: float) -> float:
    """A non-negative float option, or BackendOptionError saying what was wrong."""
    raw = options.get(key)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BackendOptionError(
            f"backend {backend!r} option {key}={raw!r} is not a number"
        ) from None
    if not value >= 0 or value == float("inf"):
        raise BackendOptionError(
            f"backend {backend!r} option {key}={raw!r} must be a finite number >= 0"
        )
    return value
