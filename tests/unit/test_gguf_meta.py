"""worker/backends/gguf_meta.py: a GGUF header's KV size per token, from an untrusted file."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest

from worker.backends.gguf_meta import GgufError, kv_bytes_per_token, read_header


def header(*pairs: tuple[str, int, bytes], version: int = 3) -> io.BytesIO:
    body = b"".join(struct.pack("<Q", len(k)) + k.encode() + struct.pack("<I", t) + v
                    for k, t, v in pairs)  # fmt: skip
    return io.BytesIO(b"GGUF" + struct.pack("<IQQ", version, 0, len(pairs)) + body)


def text(value: str) -> bytes:
    return struct.pack("<Q", len(value)) + value.encode()


def test_the_real_models_kv_size_is_read_from_its_header(real_model: Path) -> None:
    # SmolLM2-135M: 30 layers, 3 KV heads of 64, f16 keys and values.
    assert kv_bytes_per_token(str(real_model)) == 30 * 3 * (64 + 64) * 2


def test_values_arrays_and_wanted_keys() -> None:
    f = header(("general.architecture", 8, text("llama")),
               ("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 2) + text("a") + text("b")),
               ("llama.block_count", 4, struct.pack("<I", 2)),
               ("llama.scores", 9, struct.pack("<IQ", 6, 3) + b"\0" * 12))  # fmt: skip
    got = read_header(f, {"general.architecture", "llama.block_count", "tokenizer.ggml.tokens"})
    assert got == {"general.architecture": "llama", "llama.block_count": 2,
                   "tokenizer.ggml.tokens": None}  # fmt: skip


@pytest.mark.parametrize(
    "data",
    [
        b"GGUX" + b"\0" * 20,
        b"GGUF" + struct.pack("<IQQ", 1, 0, 0),
        b"GGUF" + struct.pack("<IQQ", 3, 0, 10**9),
        header(("k", 8, struct.pack("<Q", 1 << 40))).getvalue(),
        header(("k", 9, struct.pack("<IQ", 4, 1 << 40))).getvalue(),
        header(("k", 99, b"")).getvalue(),
        header(("k", 4, b"\1")).getvalue(),
    ],
)
def test_a_header_of_another_shape_is_an_error_not_a_crash(data: bytes) -> None:
    with pytest.raises(GgufError):
        read_header(io.BytesIO(data), {"k"})


def test_a_file_without_the_facts_gives_zero(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(header(("general.architecture", 8, text("llama"))).getvalue())
    assert kv_bytes_per_token(str(path)) == 0
    assert kv_bytes_per_token(str(tmp_path / "missing.gguf")) == 0
