"""The interface every inference backend implements, so a real engine plugs in beside `echo`."""

from __future__ import annotations

import abc
import json
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from protos.v1 import common_pb2

# Called during load with (fraction done 0..1, what is happening); from any thread.
Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class ToolCall:
    """A call a model made (or made earlier in the chat): arguments as JSON text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Message:
    """One turn of a chat: role (system, user, assistant, tool) and content; a tool result
    names the call it answers, an assistant turn the calls it made."""

    role: str
    content: str
    tool_call_id: str = ""
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    # The arguments' JSON schema as JSON text ('' = any object).
    parameters: str = ""

    def schema(self) -> Any:
        return json.loads(self.parameters) if self.parameters else {"type": "object"}


@dataclass(frozen=True)
class Tools:
    """The tools a chat may call, and whether it must: mode auto, none, required or function
    (then `function` names it)."""

    tools: tuple[Tool, ...]
    mode: str = "auto"
    function: str = ""
    parallel: bool = False


@dataclass(frozen=True)
class GenerationRequest:
    # Exactly one of prompt (raw text) and messages (a chat the backend renders).
    prompt: str
    max_tokens: int
    # None: the backend's default.
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    messages: tuple[Message, ...] = ()
    # The prompt holds a template's special tokens (e.g. <|im_start|>), to be read as such.
    special: bool = False
    # The request's prefix block hashes (apiary/prefix.py), for backends that keep prompt
    # states (KEEPS_PREFIXES): what they report as held once they hold it.
    blocks: tuple[int, ...] = ()
    # A completion begun elsewhere: its token ids so far, to follow the prompt; max_tokens is
    # then what is left to generate.
    continuation: tuple[int, ...] = ()
    tools: Tools | None = None
    # The answer must be JSON valid against this schema (JSON text), held to it by a grammar.
    json_schema: str = ""
    # A grammar (the backend's own syntax) the answer must follow: set by render().
    grammar: str = ""
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1
    # Choices decoded at once (0: all n); the worker sets it to the sequences it can spare.
    parallel: int = 0
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Rendered:
    """What the model is given: the prompt text, and where a chat turn ends."""

    text: str
    # Strings that end the completion (a chat template's end of turn), besides the request's.
    stops: tuple[str, ...] = ()
    special: bool = False
    # The grammar the answer must follow ('' none), and how to read tool calls from it:
    # 'auto' (text or calls), 'forced' (calls only), '' (no tools); in which layout
    # (worker/tool_format.py LAYOUTS: 'generic', or the model's own family).
    grammar: str = ""
    tool_calls: str = ""
    tool_layout: str = "generic"


@dataclass(frozen=True)
class Piece:
    """Decoded text as it becomes available, and the tokens it was decoded from."""

    text: str
    tokens: int = 1
    token_ids: tuple[int, ...] = ()
    # On the first piece: prompt tokens the backend reused from its cache.
    cached_prompt_tokens: int = 0
    # On the first piece, from engines that count the prompt as they take it: its tokens
    # (0: the worker asks prompt_tokens()).
    prompt_tokens: int = 0
    # Which choice (n > 1) the piece belongs to; `ended`: the engine ended that choice (the
    # last piece of a backend that generates one choice need not say it).
    choice: int = 0
    ended: bool = False
    # With logprobs: one per token id.
    logprobs: tuple[common_pb2.TokenLogprob, ...] = ()


class RequestRefused(ValueError):
    """The engine refused this request as given (too long for its context, say): the client's
    to change, said as INVALID_ARGUMENT."""


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
    # Concurrent generations one instance can run, and how many a spawn that names none gets.
    MAX_SLOTS: ClassVar[int] = 256
    DEFAULT_SLOTS: ClassVar[int] = 1
    # Keeps computed prompt states and reports them (prefix_cache): requests carry blocks.
    KEEPS_PREFIXES: ClassVar[bool] = False
    # Computes on CPU threads (option `threads`) that its hive hands out, so that the engines
    # of one machine never ask for more threads than it has cores.
    USES_CPU_THREADS: ClassVar[bool] = False
    # Of apiary.controls.FEATURES, those this backend carries out (its workers say them).
    SUPPORTS: ClassVar[frozenset[str]] = frozenset()
    # Serves embeddings instead of completions (set per instance, from its options).
    embeds: bool = False
    # Tokens of context one request may use (0: the backend does not say).
    context_length: int = 0

    @classmethod
    def features(cls) -> list[str]:
        """What its workers say they carry out (WorkerRecord.features)."""
        return ["text", *sorted(cls.SUPPORTS)]

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
    def from_options(cls, model: str, options: Mapping[str, str], slots: int = 1) -> Self:
        """Validate options and build the backend (for `slots` concurrent requests) without
        loading anything yet."""

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

    def prompt_tokens(self, request: GenerationRequest) -> int:
        """Tokens of the prompt as the model sees it (a rendered chat's included)."""
        return self.count_tokens(request.prompt)

    async def render(self, request: GenerationRequest) -> Rendered:
        """The prompt the model sees: a raw prompt as is; a chat in a plain documented form
        (backends with a model's own template override this). Raises ValueError if the model
        cannot take the request."""
        if not request.messages:
            return Rendered(request.prompt)
        return Rendered(plain_chat(request.messages))

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Each text's vector (normalized), and the tokens read; only where `embeds`."""
        raise RequestRefused(f"backend {self.name!r} does not embed")

    def prefix_cache(self) -> common_pb2.PrefixCache | None:
        """What the backend holds of computed prompts (None: it keeps none)."""
        return None

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


def plain_chat(messages: tuple[Message, ...]) -> str:
    """'role: content' per line, then 'assistant:' for the reply (the echo backend's form)."""
    return "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:"
