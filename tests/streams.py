"""What tests read from a stream of chunks."""

from __future__ import annotations

from collections.abc import Sequence

from protos.v1 import common_pb2


def tokens_in(chunks: Sequence[common_pb2.InferChunk]) -> int:
    """Tokens streamed: a message may carry several (see apiary/coalesce.py), so tests count
    token ids, never messages."""
    return sum(len(chunk.token_ids) for chunk in chunks)
