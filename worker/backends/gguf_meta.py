"""The few facts of a GGUF file's header the worker needs: how many bytes of KV cache a token
takes (what a prompt cache's memory budget holds). Pure reading of an untrusted file: every
length is bounded, and a header of another shape is a GgufError, never a crash.

GGUF v2/v3: magic "GGUF", version (u32), tensor count (u64), key-value count (u64), then each
key (u64 length + UTF-8), a value type (u32) and the value.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

MAX_KEYS = 100_000
MAX_STRING = 16 << 20
MAX_ARRAY = 10_000_000
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}  # fmt: skip
_STRING, _ARRAY = 8, 9
# KV cache entries are f16 by default (llama.cpp's cache_type_k/v).
KV_BYTES = 2


class GgufError(ValueError):
    """The file's header is not one this reader understands."""


def read_header(f: BinaryIO, wanted: set[str]) -> dict[str, object]:
    """The header values of the `wanted` keys (strings and numbers; arrays are skipped)."""
    if f.read(4) != b"GGUF":
        raise GgufError("not a GGUF file")
    version, _tensors, count = struct.unpack("<IQQ", _exactly(f, 20))
    if version < 2 or count > MAX_KEYS:
        raise GgufError(f"unsupported GGUF header (version {version}, {count} keys)")
    found: dict[str, object] = {}
    for _ in range(count):
        key = _string(f)
        (kind,) = struct.unpack("<I", _exactly(f, 4))
        value = _value(f, kind)
        if key in wanted:
            found[key] = value
    return found


def kv_bytes_per_token(path: str) -> int:
    """KV cache bytes one token takes in this model (0 if the header does not say)."""
    try:
        with open(path, "rb") as f:
            arch = read_header(f, {"general.architecture"}).get("general.architecture")
            if not isinstance(arch, str):
                return 0
            f.seek(0)
            keys = {f"{arch}.{k}" for k in ("block_count", "embedding_length",
                    "attention.head_count", "attention.head_count_kv", "attention.key_length",
                    "attention.value_length")}  # fmt: skip
            meta = read_header(f, keys)
    except (OSError, GgufError, struct.error, UnicodeDecodeError):
        return 0
    return _kv_bytes(meta, arch)


def _kv_bytes(meta: dict[str, object], arch: str) -> int:
    def number(key: str, default: int = 0) -> int:
        value = meta.get(f"{arch}.{key}", default)
        return value if isinstance(value, int) and not isinstance(value, bool) else default

    layers, width, heads = (
        number("block_count"),
        number("embedding_length"),
        number("attention.head_count"),
    )
    if not (layers and width and heads):
        return 0
    kv_heads = number("attention.head_count_kv", heads)
    key = number("attention.key_length", width // heads)
    value = number("attention.value_length", width // heads)
    return layers * kv_heads * (key + value) * KV_BYTES


def _exactly(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise GgufError("GGUF header ends early")
    return data


def _string(f: BinaryIO) -> str:
    (length,) = struct.unpack("<Q", _exactly(f, 8))
    if length > MAX_STRING:
        raise GgufError(f"GGUF string of {length} bytes")
    return _exactly(f, length).decode()


def _value(f: BinaryIO, kind: int) -> object:
    if kind in _SCALARS:
        code = "<" + _SCALARS[kind]
        return struct.unpack(code, _exactly(f, struct.calcsize(code)))[0]
    if kind == _STRING:
        return _string(f)
    if kind == _ARRAY:
        item, length = struct.unpack("<IQ", _exactly(f, 12))
        if length > MAX_ARRAY:
            raise GgufError(f"GGUF array of {length} items")
        if item in _SCALARS:
            f.seek(struct.calcsize("<" + _SCALARS[item]) * length, 1)
        else:
            for _ in range(length):
                _value(f, item)
        return None
    raise GgufError(f"unknown GGUF value type {kind}")
