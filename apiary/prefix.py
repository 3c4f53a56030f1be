"""A request's prompt as a chain of block hashes: what the queen indexes and workers report.

The queen has no tokenizer and workers render chats with their own templates, so both sides
name a prefix by the request's input as sent: its prompt, or its chat messages (role and
content, in order) — the same for every worker of a model. That text is cut into blocks of
BLOCK_BYTES and each block's hash covers every block before it, so one hash names a whole
prefix: two requests share their first n blocks exactly when their n-th hashes are equal.
A worker that holds a request's prefix state reports its hashes; the queen matches a new
request's hashes against them (queen/routing/prefix_index.py). A partial last block is not hashed:
a match is always a whole number of blocks. Pure.
"""

from __future__ import annotations

from collections.abc import Sequence
from hashlib import blake2b

from protos.v1 import common_pb2

# Small enough that a shared system prompt and a new question part within a block or two
# (~64 tokens), large enough that an 8 KiB prompt is 32 hashes: hashing and matching them is
# most of a cache-aware pick's cost (bench/scale.py).
BLOCK_BYTES = 256
# The most blocks a prompt is hashed to (64 KiB prompts: the queen's default limit).
MAX_BLOCKS = 256
# Separators that cannot occur in the UTF-8 of a role or content the same way.
ROLE_END, TURN_END = b"\x1f", b"\x1e"


def input_bytes(request: common_pb2.InferRequest) -> bytes:
    """The request's input as one byte string: the prompt, or each turn's role and content."""
    if request.prompt:
        return request.prompt.encode()
    return b"".join(
        m.role.encode() + ROLE_END + m.content.encode() + TURN_END for m in request.messages
    )


def chain(model: str, data: bytes, max_blocks: int = MAX_BLOCKS) -> list[int]:
    """The hash of each whole block of `data`, each covering the blocks before it (and the
    model, so two models never share an entry)."""
    digest = blake2b(model.encode(), digest_size=8).digest()
    hashes: list[int] = []
    for start in range(0, min(len(data) // BLOCK_BYTES, max_blocks) * BLOCK_BYTES, BLOCK_BYTES):
        digest = blake2b(digest + data[start : start + BLOCK_BYTES], digest_size=8).digest()
        hashes.append(int.from_bytes(digest, "little"))
    return hashes


def request_chain(request: common_pb2.InferRequest) -> list[int]:
    return chain(request.model, input_bytes(request))


def matched_blocks(hashes: Sequence[int], held: set[int] | frozenset[int]) -> int:
    """How many leading blocks of `hashes` a holder of `held` has (the deepest one held)."""
    for depth in range(len(hashes), 0, -1):
        if hashes[depth - 1] in held:
            return depth
    return 0
