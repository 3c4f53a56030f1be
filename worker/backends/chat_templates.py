"""Rendering a chat for a GGUF model: its own template (tokenizer.chat_template in the file's
metadata, through llama-cpp-python's Jinja2 formatter), or a named format for models that
carry none. Imported only by the llamacpp backend, after llama_cpp itself."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from worker.backends.base import Message, Rendered

# Names a `chat_format` option may take, for models without a template of their own.
NAMED_FORMATS = {
    "chatml": "format_chatml",
    "llama-2": "format_llama2",
    "llama-3": "format_llama3",
    "mistral-instruct": "format_mistral_instruct",
    "gemma": "format_gemma",
    "qwen": "format_qwen",
    "zephyr": "format_zephyr",
    "alpaca": "format_alpaca",
}
DEFAULT_FORMAT = "chatml"

Formatter = Callable[..., Any]


def formatter_for(llm: Any, chat_format: str) -> tuple[Formatter, str]:
    """The model's own template unless a format is named (or it has none): (formatter, what it
    is, for logs and errors)."""
    from llama_cpp import llama_chat_format

    template = llm.metadata.get("tokenizer.chat_template", "")
    if template and not chat_format:
        model = llm._model
        eos, bos = model.token_eos(), model.token_bos()
        formatter = llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(eos) if eos != -1 else "",
            bos_token=model.token_get_text(bos) if bos != -1 else "",
        )
        return formatter, "the model's chat template"
    name = chat_format or DEFAULT_FORMAT
    return getattr(llama_chat_format, NAMED_FORMATS[name]), f"the {name} chat format"


def render_chat(formatter: Formatter, messages: tuple[Message, ...]) -> Rendered:
    """The prompt and the strings that end the assistant's turn. Raises ValueError if the
    template refuses the messages (some refuse a system turn, or two user turns in a row)."""
    try:
        result = formatter(messages=[{"role": m.role, "content": m.content} for m in messages])
    except Exception as exc:  # a template's own raise_exception, or a Jinja error
        raise ValueError(str(exc) or type(exc).__name__) from None
    stop = result.stop
    stops = tuple(s for s in ([stop] if isinstance(stop, str) else list(stop or ())) if s)
    return Rendered(result.prompt, stops, special=True)
