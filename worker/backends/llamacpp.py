"""The `llamacpp` backend: GGUF models through llama-cpp-python (the `llamacpp` extra).

Decoding runs on a thread of its own, one token at a time, handing each piece of
text to the event loop as soon as it is decoded, so the worker keeps answering
health checks while it generates and a cancelled stream stops decoding at the
next token. llama_cpp is imported only when a model is loaded: a hive without
the extra can still list this backend (as unavailable, saying why).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
import random
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, Self

import structlog

from protos.v1 import common_pb2
from worker.backends.base import (
    Backend,
    BackendOptionError,
    GenerationRequest,
    Piece,
    Progress,
    Rendered,
    parse_int_option,
)
from worker.backends.chat_templates import NAMED_FORMATS, formatter_for, render_chat
from worker.backends.prompt_cache import PromptCache, default_cache_ram_mb
from worker.prefix_states import PrefixStates

log = structlog.get_logger("worker.llamacpp")

DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 40
_DONE = object()


class LlamaCppBackend(Backend):
    name: ClassVar[str] = "llamacpp"
    REQUIRES: ClassVar[tuple[str, ...]] = ("llama_cpp",)
    PACKAGE: ClassVar[str] = "llama-cpp-python"
    EXTRA: ClassVar[str] = "llamacpp"
    # One llama context decodes one sequence at a time.
    MAX_SLOTS: ClassVar[int] = 1
    OPTIONS: ClassVar[Mapping[str, str]] = {
        "model_path": "GGUF file (the hive fills it from its model catalog)",
        "threads": "CPU threads for prompt evaluation and decoding (default: the CPUs this "
        "process may use)",
        "context_size": "context window in tokens, prompt and completion (default 2048)",
        "gpu_layers": "layers offloaded to the GPU (default 0; -1 = all)",
        "chat_format": "how chats are rendered: the model's own template by default; for a "
        "model without one (or to override it): " + ", ".join(NAMED_FORMATS),
        "cache_ram_mb": "memory for saved prompt states beyond the live context, restored when "
        "a prompt shares their prefix (default: 1/16 of the machine's memory, at most 1024; "
        "0 = the live context only)",
    }
    KEEPS_PREFIXES: ClassVar[bool] = True

    def __init__(
        self,
        model: str,
        model_path: str,
        threads: int,
        context_size: int,
        gpu_layers: int,
        chat_format: str = "",
        cache_ram_mb: int = 0,
    ):
        self.chat_format = chat_format
        self.prompts = PromptCache(PrefixStates(cache_ram_mb * 1_000_000))
        self._formatter: Any = None
        self.model = model
        self.model_path = model_path
        self.threads = threads
        self.context_size = context_size
        self.gpu_layers = gpu_layers
        self.llm: Any = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamacpp")
        self._lock = threading.Lock()

    @classmethod
    def devices(cls) -> list[str]:
        return ["cpu"]

    @classmethod
    def from_options(cls, model: str, options: Mapping[str, str]) -> Self:
        cls.check_options(options)
        path = options.get("model_path", "")
        if not path:
            raise BackendOptionError(
                f"backend 'llamacpp' needs a GGUF file: pull model {model!r} into the hive's "
                "catalog (`apiary model pull`), or pass option model_path=FILE"
            )
        threads = parse_int_option(cls.name, options, "threads", 0) or len(os.sched_getaffinity(0))
        gpu_layers_raw = options.get("gpu_layers", "0")
        try:
            gpu_layers = int(gpu_layers_raw)
        except ValueError:
            raise BackendOptionError(
                f"option gpu_layers={gpu_layers_raw!r} is not a whole number"
            ) from None
        chat_format = options.get("chat_format", "")
        if chat_format and chat_format not in NAMED_FORMATS:
            raise BackendOptionError(
                f"backend 'llamacpp' option chat_format={chat_format!r} is not one of "
                f"{', '.join(NAMED_FORMATS)}"
            )
        cache_ram_mb = parse_int_option(cls.name, options, "cache_ram_mb", default_cache_ram_mb())
        return cls(
            model,
            chat_format=chat_format,
            cache_ram_mb=cache_ram_mb,
            model_path=path,
            threads=threads,
            context_size=parse_int_option(cls.name, options, "context_size", 2048) or 2048,
            gpu_layers=gpu_layers,
        )

    async def load(self, progress: Progress) -> None:
        loop = asyncio.get_running_loop()
        self.llm = await loop.run_in_executor(self._pool, self._load_blocking, progress)
        self._formatter, how = formatter_for(self.llm, self.chat_format)
        log.info("chats rendered with " + how)
        progress(1.0, "loaded")

    def _load_blocking(self, progress: Progress) -> Any:
        if not os.path.isfile(self.model_path):
            raise FileNotFoundError(f"model file {self.model_path} does not exist")
        import llama_cpp

        with _progress_reported(llama_cpp, progress):
            return llama_cpp.Llama(
                model_path=self.model_path,
                n_ctx=self.context_size,
                n_threads=self.threads,
                # Prompt evaluation too: llama-cpp-python's default is every CPU, so one
                # worker's prefill would spin threads over its neighbours' cores.
                n_threads_batch=self.threads,
                n_gpu_layers=self.gpu_layers,
                verbose=False,
            )

    def count_tokens(self, text: str) -> int:
        return len(self._tokens(text, special=False))

    def _tokens(self, text: str, special: bool) -> list[int]:
        """A rendered chat holds its template's special tokens (and its BOS) as text."""
        return list(self.llm.tokenize(text.encode(), add_bos=not special, special=special))

    def prompt_tokens(self, request: GenerationRequest) -> int:
        return len(self._tokens(request.prompt, request.special))

    def render(self, request: GenerationRequest) -> Rendered:
        if not request.messages:
            return Rendered(request.prompt)
        return render_chat(self._formatter, request.messages)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Piece]:
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[object] = asyncio.Queue()
        cancelled = threading.Event()

        def hand_over(item: object) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, item)

        def decode() -> None:
            try:
                for piece in self._decode(request, cancelled):
                    hand_over(piece)
            except BaseException as exc:  # handed to the event loop, raised there
                hand_over(exc)
            finally:
                hand_over(_DONE)

        running = loop.run_in_executor(self._pool, decode)
        try:
            while (item := await pieces.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, Piece)
                yield item
        finally:
            # The consumer went away (done, stop string, cancelled client): stop at the next token.
            cancelled.set()
            with contextlib.suppress(BaseException):
                await asyncio.shield(running)

    def _decode(self, request: GenerationRequest, cancelled: threading.Event) -> Iterator[Piece]:
        """Runs on the decoding thread."""
        with self._lock:
            llm = self.llm
            prompt = self._tokens(request.prompt, request.special)
            cached = self.prompts.prepare(llm, prompt)
            self.prompts.started(prompt, request.blocks, cached)
            if len(prompt) + request.max_tokens > self.context_size:
                raise ValueError(
                    f"prompt ({len(prompt)} tokens) + max_tokens ({request.max_tokens}) exceed "
                    f"this worker's context of {self.context_size} tokens"
                )
            seed = request.seed if request.seed is not None else random.getrandbits(32)
            llm.set_seed(seed & 0xFFFFFFFF)
            utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
            # The end of the sequence, or of the assistant's turn (chat templates).
            ends = {llm.token_eos(), llm._model.token_eot()} - {-1}
            produced: list[int] = []
            pending: list[int] = []
            for token in llm.generate(
                prompt,
                temp=DEFAULT_TEMPERATURE if request.temperature is None else request.temperature,
                top_p=DEFAULT_TOP_P if request.top_p is None else request.top_p,
                top_k=DEFAULT_TOP_K if request.top_k is None else request.top_k,
                reset=True,
            ):
                if cancelled.is_set() or token in ends:
                    break
                raw = llm.detokenize([token], prev_tokens=prompt + produced)
                produced.append(token)
                pending.append(token)
                text = utf8.decode(raw)
                if text:
                    yield Piece(text, len(pending), tuple(pending), cached)
                    pending, cached = [], 0
                if len(produced) >= request.max_tokens:
                    break
            tail = utf8.decode(b"", final=True)
            if tail or pending:
                yield Piece(tail, len(pending), tuple(pending), cached)

    def prefix_cache(self) -> common_pb2.PrefixCache:
        return self.prompts.report

    async def close(self) -> None:
        self.llm = None
        self._pool.shutdown(wait=False, cancel_futures=True)


@contextlib.contextmanager
def _progress_reported(llama_cpp: Any, progress: Progress) -> Iterator[None]:
    """Report llama.cpp's own load progress.

    llama-cpp-python's Llama() takes no progress callback, but builds its model params with
    llama_model_default_params(); for the duration of the load we hand it params with our
    callback set. If that internal ever changes, loading still works, without progress.
    """
    low = getattr(llama_cpp, "llama_cpp", None)
    original = getattr(low, "llama_model_default_params", None)
    callback_type = getattr(low, "llama_progress_callback", None)
    if low is None or original is None or callback_type is None:
        yield
        return

    def report(fraction: float, _user_data: object) -> bool:
        progress(float(fraction), f"loading weights {fraction:.0%}")
        return True  # keep loading

    callback = callback_type(report)  # referenced here until loading ends: ctypes needs that

    def params_with_progress() -> Any:
        params = original()
        params.progress_callback = callback
        return params

    low.llama_model_default_params = params_with_progress
    try:
        yield
    finally:
        low.llama_model_default_params = original
