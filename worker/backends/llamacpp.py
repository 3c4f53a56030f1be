"""The `llamacpp` backend: GGUF models on llama.cpp's server engine, in-process (xllamacpp).

A worker's slots are the engine's parallel sequences, decoded together (continuous batching).
Every request goes to the engine as a completion of token-exact input: a raw prompt as is, a
chat rendered by the model's own template, and a continued stream (migration) as that prompt
followed by the token ids already sent. So a greedy continuation computes exactly what the
uninterrupted run did. Each completion asks for the sampled token's log-probability, which
carries its id: token ids travel on every chunk. The engine's prompt progress gives the
prompt's token count and what came from its cache, with the first token.

Each completion runs on a thread of its own (the engine's call blocks); its chunks are handed
to the event loop as they come, and a consumer that goes away stops the sequence at the
engine's next step. xllamacpp is imported only when a model is loaded: a hive without the
extra can still list this backend (as unavailable, saying why).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import threading
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, Self

import psutil
import structlog

from protos.v1 import common_pb2
from worker.backends.base import (
    Backend,
    BackendOptionError,
    GenerationRequest,
    Piece,
    Progress,
    Rendered,
    RequestRefused,
    parse_int_option,
)
from worker.backends.engine_body import completion_body, embeddings_of
from worker.backends.engine_chunks import Failed, Finished, PromptProgress, Tokens, read_chunk
from worker.backends.gguf_meta import kv_bytes_per_token
from worker.backends.llama_engine import EngineConfig, LlamaEngine
from worker.held_prefixes import HeldPrefixes
from worker.schemas import schema_problem
from worker.tool_format import (
    LAYOUTS,
    grammar,
    openai_messages,
    openai_tools,
    rendered_messages,
)

log = structlog.get_logger("worker.llamacpp")

DEFAULT_CONTEXT = 2048
# The default budget of the engine's host-RAM prompt cache: a sixteenth of the machine's
# memory, at most this.
MAX_DEFAULT_CACHE_MB = 1024
# Host-RAM cache tokens per MB assumed when the model file does not say its KV size (a small
# model's KV is ~20-100 KB a token; the report is a routing hint).
CACHE_TOKENS_PER_MB = 20
# llama.cpp's built-in chat templates a `chat_format` may name (for a model without its own).
NAMED_FORMATS = ("chatml", "llama2", "llama3", "mistral-v7", "gemma", "zephyr", "phi3",
                 "deepseek3", "command-r", "vicuna", "openchat", "granite")  # fmt: skip
MAX_TEMPLATE_BYTES = 1 << 20
# How an embedding worker pools a text's token vectors into one.
POOLINGS = ("mean", "cls", "last")
_DONE = object()


def default_cache_ram_mb() -> int:
    return min(MAX_DEFAULT_CACHE_MB, psutil.virtual_memory().total // 16 // 1_000_000)


class LlamaCppBackend(Backend):
    name: ClassVar[str] = "llamacpp"
    REQUIRES: ClassVar[tuple[str, ...]] = ("xllamacpp",)
    PACKAGE: ClassVar[str] = "xllamacpp"
    EXTRA: ClassVar[str] = "llamacpp"
    # The engine's parallel sequences. By default 8: on CPU the batched decode's throughput
    # grows to about 8 sequences (llama-batched-bench here: 112, 131, 177, 208 tokens/s at 1,
    # 2, 4, 8), and 8 slots of 2,048 tokens of a small model's KV fit in a few hundred MB.
    MAX_SLOTS: ClassVar[int] = 64
    DEFAULT_SLOTS: ClassVar[int] = 8
    KEEPS_PREFIXES: ClassVar[bool] = True
    USES_CPU_THREADS: ClassVar[bool] = True
    OPTIONS: ClassVar[Mapping[str, str]] = {
        "model_path": "GGUF file (the hive fills it from its model catalog)",
        "threads": "CPU threads of the engine, for all its slots (the hive hands them out: by "
        "default the machine's cores shared among its engine workers)",
        "context_size": f"context window of each slot in tokens, prompt and completion "
        f"(default {DEFAULT_CONTEXT})",
        "gpu_layers": "layers offloaded to a GPU (default 0; -1 = all)",
        "chat_template_file": "a Jinja chat template file (on the hive's machine) to use instead "
        "of the model's own, e.g. one with tool support",
        "chat_format": "a llama.cpp built-in chat template for a model whose file has none (or "
        "to override it): " + ", ".join(NAMED_FORMATS),
        "cache_ram_mb": "host memory for the engine's prompt cache beyond its slots (default: "
        f"1/16 of the machine's memory, at most {MAX_DEFAULT_CACHE_MB}; 0 = the slots only)",
        "embeddings": "serve embeddings instead of completions, pooling each text's token "
        f"vectors this way: {', '.join(POOLINGS)} (default: off)",
    }
    SUPPORTS: ClassVar[frozenset[str]] = frozenset(
        {"tools", "response_format", "logprobs", "n", "penalties", "logit_bias"}
    )

    def __init__(self, model: str, config: EngineConfig) -> None:
        self.model = model
        self.config = config
        self.embeds = bool(config.pooling)
        self.context_length = config.context_size
        self.engine = LlamaEngine(config)
        self.held = HeldPrefixes(config.slots, config.cache_ram_mb * CACHE_TOKENS_PER_MB)
        # One thread per slot for completions, and one for template calls and loading.
        self._pool = ThreadPoolExecutor(max_workers=config.slots, thread_name_prefix="engine")
        self._calls = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-calls")
        # Embeddings one text at a time: the engine's mean pooling of texts of different
        # lengths decoded in one batch differs from each alone (measured: up to 0.24 in a
        # component of a unit vector), so a text's vector would depend on what else is asked.
        self._embedding = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-embed")

    @classmethod
    def from_options(cls, model: str, options: Mapping[str, str], slots: int = 1) -> Self:
        cls.check_options(options)
        path = options.get("model_path", "")
        if not path:
            raise BackendOptionError(
                f"backend 'llamacpp' needs a GGUF file: pull model {model!r} into the hive's "
                "catalog (`apiary model pull`), or pass option model_path=FILE"
            )
        chat_format = _one_of(options, "chat_format", NAMED_FORMATS)
        template = chat_template_text(options.get("chat_template_file", "")) or chat_format
        if chat_format and options.get("chat_template_file"):
            raise BackendOptionError(
                "backend 'llamacpp' takes chat_format or chat_template_file, not both"
            )
        pooling = _one_of(options, "embeddings", POOLINGS)
        config = EngineConfig(
            model_path=path,
            slots=max(slots, 1),
            threads=parse_int_option(cls.name, options, "threads", 0)
            or len(os.sched_getaffinity(0)),
            context_size=parse_int_option(cls.name, options, "context_size", DEFAULT_CONTEXT)
            or DEFAULT_CONTEXT,
            gpu_layers=_whole(options.get("gpu_layers", "0"), "gpu_layers"),
            cache_ram_mb=parse_int_option(
                cls.name, options, "cache_ram_mb", default_cache_ram_mb()
            ),
            chat_template=template,
            pooling=pooling,
        )
        return cls(model, config)

    async def load(self, progress: Progress) -> None:
        loop = asyncio.get_running_loop()
        path = self.config.model_path
        per_token = await loop.run_in_executor(self._calls, kv_bytes_per_token, path)
        if per_token:  # what the RAM cache's budget holds, for the held-prefix report
            self.held.ram_tokens = self.config.cache_ram_mb * 2**20 // per_token
        loading = loop.run_in_executor(self._calls, self.engine.start)
        await _watch_load(loading, self.config.model_path, progress)
        c = self.config
        log.info("engine started", slots=c.slots, threads=c.threads,
                 context_per_slot=c.context_size, cache_ram_mb=c.cache_ram_mb)  # fmt: skip
        progress(1.0, "loaded")

    def count_tokens(self, text: str) -> int:
        # Only asked when the engine did not count a prompt itself (it always does).
        return len(text.encode()) // 4

    async def render(self, request: GenerationRequest) -> Rendered:
        """The prompt, and the grammar of a JSON answer or of tool calls. Tool calls go in the
        generic format (worker/tool_format.py): the tools rendered into the system message, a
        grammar holding the answer to calls."""
        self._check_vocabulary(request.continuation)
        if request.json_schema:
            problem = schema_problem(json.loads(request.json_schema), "response_format schema")
            if problem:
                raise ValueError(problem)
        tools = request.tools
        for tool in tools.tools if tools else ():
            problem = schema_problem(tool.schema(), f"tool {tool.name!r} parameters")
            if problem:
                raise ValueError(problem)
        if not request.messages:
            return Rendered(request.prompt)
        family = self.engine.tool_family if tools is not None else ""
        loop = asyncio.get_running_loop()
        if family and tools is not None:  # the model's own template renders tools and calls
            args: tuple[Any, ...] = (openai_messages(request.messages), openai_tools(tools))
        else:
            args = (rendered_messages(request.messages, tools),)
        prompt = await loop.run_in_executor(self._calls, self.engine.apply_template, *args)
        if tools is None or tools.mode == "none":
            return Rendered(prompt, special=True)
        layout = family or "generic"
        reading = "auto" if tools.mode == "auto" else "forced"
        return Rendered(prompt, special=True, grammar=grammar(tools, LAYOUTS[layout]),
                        tool_calls=reading, tool_layout=layout)  # fmt: skip

    def _check_vocabulary(self, token_ids: tuple[int, ...]) -> None:
        vocabulary = self.engine.n_vocab
        if vocabulary and any(token >= vocabulary for token in token_ids):
            raise ValueError(
                f"continuation.token_ids must be below this model's vocabulary size {vocabulary}"
            )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Piece]:
        """n choices in waves of `request.parallel` sequences (n_cmpl: the prompt computed once
        and copied to each; a later wave finds it in the slot's cache). Choice i samples with
        seed + i, as the engine seeds n_cmpl's sequences, so a seed gives the same choices
        whatever the waves were."""
        size = request.parallel or request.n
        for start in range(0, request.n, size):
            seed = None if request.seed is None else request.seed + start
            wave = dataclasses.replace(request, n=min(size, request.n - start), seed=seed)
            async for piece in self._call(wave):
                yield dataclasses.replace(piece, choice=piece.choice + start) if start else piece

    async def _call(self, request: GenerationRequest) -> AsyncIterator[Piece]:
        """One engine completion's pieces."""
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[object] = asyncio.Queue()
        cancelled = threading.Event()

        def hand_over(item: object) -> None:
            loop.call_soon_threadsafe(chunks.put_nowait, item)

        def on_chunk(chunk: Any) -> bool:
            hand_over(chunk)
            return cancelled.is_set()

        def complete() -> None:
            try:
                self.engine.complete(completion_body(request), on_chunk)
            except BaseException as exc:  # handed to the event loop, raised there
                hand_over(exc)
            finally:
                hand_over(_DONE)

        running = loop.run_in_executor(self._pool, complete)
        try:
            async for piece in self._pieces(request, chunks):
                yield piece
        finally:
            # The consumer went away (done, stop string, cancelled client): stop at the next step.
            cancelled.set()
            with contextlib.suppress(BaseException):
                await asyncio.shield(running)

    async def _pieces(
        self, request: GenerationRequest, chunks: asyncio.Queue[object]
    ) -> AsyncIterator[Piece]:
        prompt = cached = 0
        first = True
        top = request.top_logprobs if request.logprobs else -1
        while (item := await chunks.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            for event in read_chunk(item, top):
                if isinstance(event, Failed):
                    if 400 <= event.code < 500:
                        raise RequestRefused(event.message)
                    raise RuntimeError(f"engine error {event.code}: {event.message}")
                if isinstance(event, PromptProgress):
                    prompt, cached = event.total, event.cached
                    continue
                if first:
                    self.held.computed(request.blocks, prompt, cached)
                if isinstance(event, Tokens):
                    yield Piece(event.text, len(event.ids), event.ids,
                                cached if first else 0, prompt if first else 0,
                                choice=event.choice, logprobs=event.logprobs)  # fmt: skip
                elif isinstance(event, Finished):
                    yield Piece("", 0, (), event.cached_tokens if first else 0,
                                (event.prompt_tokens or prompt) if first else 0,
                                choice=event.choice, ended=True)  # fmt: skip
                first = False

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        if not self.embeds:
            raise RequestRefused(f"worker of model {self.model!r} serves completions, not "
                                 "embeddings (spawn one with option embeddings=mean)")  # fmt: skip
        loop = asyncio.get_running_loop()
        vectors, tokens = [], 0
        for text in texts:
            answer = await loop.run_in_executor(self._embedding, self.engine.embed, [text])
            [vector], used = embeddings_of(answer, 1)
            vectors.append(vector)
            tokens += used
        return vectors, tokens

    def prefix_cache(self) -> common_pb2.PrefixCache:
        return self.held.report()

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._calls, self.engine.close)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._calls.shutdown(wait=False)
        self._embedding.shutdown(wait=False, cancel_futures=True)


def _one_of(options: Mapping[str, str], key: str, allowed: tuple[str, ...]) -> str:
    """An option that names one of `allowed` ('' when not given)."""
    value = options.get(key, "")
    if value and value not in allowed:
        raise BackendOptionError(
            f"backend 'llamacpp' option {key}={value!r} is not one of {', '.join(allowed)}"
        )
    return value


def chat_template_text(path: str) -> str:
    """The template in `path` ('' for none), or BackendOptionError saying why it cannot be."""
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_TEMPLATE_BYTES + 1)
    except OSError as exc:
        raise BackendOptionError(
            f"backend 'llamacpp' option chat_template_file={path!r}: {exc.strerror or exc}"
        ) from None
    if len(raw) > MAX_TEMPLATE_BYTES:
        raise BackendOptionError(f"chat_template_file {path!r} is over {MAX_TEMPLATE_BYTES} bytes")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise BackendOptionError(f"chat_template_file {path!r} is not UTF-8 text") from None


def _whole(raw: str, key: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise BackendOptionError(f"option {key}={raw!r} is not a whole number") from None


async def _watch_load(loading: asyncio.Future[None], path: str, progress: Progress) -> None:
    """Report how far the load is while it runs: the engine reads the weights into this
    process's memory (mapped or repacked), so the growth of its resident memory against the
    file's size is the fraction read."""
    me = psutil.Process()
    before = me.memory_info().rss
    size = max(await asyncio.to_thread(_size_of, path), 1)
    while not loading.done():
        fraction = min(0.95, max(0.0, (me.memory_info().rss - before) / size))
        progress(fraction, f"loading weights {fraction:.0%}")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(loading), 0.1)
    await loading


def _size_of(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
