"""llama.cpp's server engine hosted in the worker's process, through xllamacpp.

One engine serves all of a worker's slots: its parallel sequences are decoded together in
each step (continuous batching), each slot keeps its last prompt in the KV cache, and saved
slot states are kept in host memory within `cache_ram_mb`. Completions are called in-process
(`Server.handle_completions`, which blocks its calling thread until the answer ends and hands
each chunk to a callback; the engine is thread-safe and batches concurrent calls).

The engine insists on an HTTP listener of its own. Ours is a Unix socket in a fresh directory
only this process's user can enter (0700), behind an API key made at random for this process
and never written anywhere: nobody else can reach it. The worker uses it for the two calls
xllamacpp does not expose in-process, rendering a chat with the model's own template
(/apply-template) and the model's metadata (/v1/models).

An engine that cannot start says why: llama.cpp logs the cause to stderr, and the last lines
it wrote while loading become the error's message (they still reach the worker's log).
"""

from __future__ import annotations

import contextlib
import glob
import http.client
import json
import os
import secrets
import shutil
import socket
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psutil

from worker.backends.cpu import engine_cpu_problem

# The engine's private directory, named after its process: apiary-engine-PID-RANDOM.
_DIR_PREFIX = "apiary-engine-"
# llama.cpp's log lines that say why a load failed.
_CAUSE_WORDS = ("error", "failed", "unable", "invalid", "cannot", "not ")


@dataclass(frozen=True)
class EngineConfig:
    model_path: str
    slots: int
    threads: int
    # Per slot: prompt and completion of one request.
    context_size: int
    gpu_layers: int = 0
    cache_ram_mb: int = 0
    # A llama.cpp built-in template name (e.g. chatml), for a model whose file has none.
    chat_template: str = ""
    # Embeddings instead of completions, pooled this way (mean, cls, last); '' = completions.
    pooling: str = ""


class EngineStartError(RuntimeError):
    """The engine did not start; the message says why."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("engine", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class LlamaEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._server: Any = None
        self._private = ""
        self._key = secrets.token_urlsafe(32)
        self.n_vocab = 0
        # The family of tool-call format the model's own template writes, where it has tool
        # support and the family is one the worker reads ('hermes'); '' otherwise.
        self.tool_family = ""

    @property
    def socket_path(self) -> str:
        return os.path.join(self._private, "engine.sock")

    def start(self) -> None:
        """Load the model and start the engine (blocks for the load). Raises EngineStartError."""
        problem = engine_cpu_problem() or gguf_problem(self.config.model_path)
        if problem:
            raise EngineStartError(problem)
        import xllamacpp  # type: ignore[import-untyped]  # ships no type hints

        _sweep_stale_dirs()
        self._private = tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-")  # mode 0700
        params = self._params(xllamacpp.CommonParams())
        with _stderr_kept() as lines:
            try:
                self._server = xllamacpp.Server(params)
            except Exception as exc:
                self.close()
                raise EngineStartError(_cause(lines, exc)) from None
        meta = self._call("GET", "/v1/models").get("data", [{}])[0].get("meta", {})
        self.n_vocab = int(meta.get("n_vocab", 0))
        self.tool_family = tool_family(self._call("GET", "/props"))

    def _params(self, params: Any) -> Any:
        config = self.config
        params.model.path = config.model_path
        params.n_parallel = config.slots
        params.n_ctx = config.context_size * config.slots
        params.cpuparams.n_threads = config.threads
        params.cpuparams_batch.n_threads = config.threads
        params.n_gpu_layers = config.gpu_layers
        params.cache_ram_mib = config.cache_ram_mb
        params.use_jinja = True
        if config.chat_template:
            params.chat_template = config.chat_template
        params.hostnames = [self.socket_path]
        params.api_keys = [self._key]
        params.ui = False
        params.endpoint_slots = False
        params.endpoint_metrics = True  # read in-process (handle_metrics), not over the socket
        params.n_threads_http = 2
        if config.pooling:
            import xllamacpp

            params.embedding = True
            params.pooling_type = getattr(
                xllamacpp.llama_pooling_type, f"LLAMA_POOLING_TYPE_{config.pooling.upper()}"
            )
        return params

    def complete(self, body: dict[str, Any], on_chunk: Callable[[Any], bool]) -> None:
        """One streamed completion; blocks until it ends. `on_chunk` returns True to stop it
        (the engine then cancels the sequence before its next step)."""
        self._server.handle_completions(body, on_chunk)

    def chat(self, body: dict[str, Any], on_chunk: Callable[[Any], bool]) -> None:
        """The engine's own streamed chat completion, as a plain xllamacpp user would call it
        (bench/engine.py's floor; the worker sends token-exact completions instead)."""
        self._server.handle_chat_completions(body, on_chunk)

    def embed(self, texts: list[str]) -> Any:
        """The engine's embeddings answer for `texts` (blocks until computed)."""
        return self._server.handle_embeddings({"input": texts, "encoding_format": "float"})

    def apply_template(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> str:
        """A chat rendered by the model's own template, with the assistant's turn opened (and
        the tools, for a template with tool support)."""
        body: dict[str, Any] = {"messages": messages}
        if tools:
            body["tools"] = tools
        answer = self._call("POST", "/apply-template", body)
        prompt = answer.get("prompt")
        if not isinstance(prompt, str):
            raise ValueError(_message_of(answer) or "the chat template gave no prompt")
        return prompt

    def metrics(self) -> str:
        return str(self._server.handle_metrics())

    def _call(self, method: str, path: str, body: object = None) -> dict[str, Any]:
        connection = _UnixConnection(self.socket_path, timeout=30)
        try:
            data = None if body is None else json.dumps(body)
            headers = {"Authorization": f"Bearer {self._key}", "Content-Type": "application/json"}
            connection.request(method, path, data, headers)
            response = connection.getresponse()
            raw = response.read(64 << 20)
        finally:
            connection.close()
        try:
            answer = json.loads(raw)
        except ValueError:
            raise RuntimeError(f"engine {path} answered {response.status} with no JSON") from None
        if not isinstance(answer, dict):
            raise RuntimeError(f"engine {path} answered a {type(answer).__name__}")
        if response.status >= 400:
            raise ValueError(_message_of(answer) or f"engine {path} answered {response.status}")
        return answer

    def close(self) -> None:
        """Stop the engine (waits for its loop to end) and remove its private socket."""
        server, self._server = self._server, None
        del server  # the engine's destructor terminates its loop and joins it
        if self._private:
            shutil.rmtree(self._private, ignore_errors=True)


def tool_family(props: dict[str, Any]) -> str:
    """'hermes' when the engine's template renders tools and writes calls as Hermes and Qwen
    do (<tool_call> JSON </tool_call>); '' for no tool support or another family (those go
    through the generic format)."""
    caps = props.get("chat_template_caps")
    template = props.get("chat_template")
    if not isinstance(caps, dict) or not caps.get("supports_tools"):
        return ""
    return "hermes" if isinstance(template, str) and "<tool_call>" in template else ""


def _sweep_stale_dirs() -> None:
    """Remove the private directories of engines whose process is gone (killed, they could
    not remove their own)."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{_DIR_PREFIX}*-*")):
        pid = os.path.basename(path)[len(_DIR_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def gguf_problem(path: str) -> str:
    """Why `path` cannot be a model file ('' if it may be one)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        return f"model file {path} cannot be read: {exc.strerror or exc}"
    return "" if magic == b"GGUF" else f"model file {path} is not a GGUF file"


def _message_of(answer: dict[str, Any]) -> str:
    error = answer.get("error")
    if isinstance(error, dict):
        return str(error.get("message", ""))[:2000]
    return ""


def _cause(lines: deque[str], exc: Exception) -> str:
    causes = [line for line in lines if any(w in line.lower() for w in _CAUSE_WORDS)]
    said = " | ".join(causes[-3:]) or str(exc)
    return f"llama.cpp could not start: {said}"


@contextlib.contextmanager
def _stderr_kept(keep: int = 40) -> Iterator[deque[str]]:
    """While the block runs, what is written to file descriptor 2 (llama.cpp's log) still
    reaches stderr, and its last `keep` lines are kept for an error message."""
    lines: deque[str] = deque(maxlen=keep)
    try:
        original = os.dup(2)
    except OSError:
        yield lines
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        pending = b""
        while chunk := os.read(read_end, 65536):
            os.write(original, chunk)
            pending += chunk
            *whole, pending = pending.split(b"\n")
            lines.extend(line.decode(errors="replace").strip() for line in whole if line.strip())
        os.close(read_end)

    reader = threading.Thread(target=pump, name="engine-stderr", daemon=True)
    reader.start()
    try:
        yield lines
    finally:
        os.dup2(original, 2)  # closes the pipe's last write end: the reader sees its end
        reader.join(timeout=5)
        os.close(original)
