"""How far a stream got, so it can go on on another worker from the exact token. Pure.

Every chunk a worker sends carries the token ids of its text (worker/completion.py), so the
ids relayed so far name the completion exactly. When a worker fails mid-stream the queen
sends the next one the same request with those ids as its continuation: the worker computes
the prompt followed by them and generates the rest, counting them against max_tokens. Its
chunks go on from there, so the client's stream has no gap and no repeat. A stop string
cannot straddle the seam: a worker holds back text that could begin one, and that text and
its ids were never sent, so the next worker generates them again and finds the stop itself.

With greedy decoding (temperature 0) the result is the uninterrupted completion; with
sampling it is a valid continuation, not the same one (the sampler's state does not move).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from apiary.controls import unmovable
from apiary.protoutil import continued
from protos.v1 import common_pb2

# Moves per request (--migration-limit): a request that kills every worker it lands on (a
# prompt that crashes the engine) must not take the whole pool down.
DEFAULT_MIGRATION_LIMIT = 3


@dataclass
class Progress:
    # The completion's token ids so far: the request's own continuation, then the relayed.
    token_ids: list[int] = field(default_factory=list)
    # Every chunk with text carried its ids (a backend that sends none cannot be continued).
    exact: bool = True
    # A chunk said how the completion ended: nothing is left to generate.
    finished: bool = False
    moves: int = 0
    # Why this request can never move exactly (a grammar, n choices); '' if it can.
    fixed: str = ""

    @classmethod
    def of(cls, request: common_pb2.InferRequest) -> Progress:
        return cls(token_ids=list(request.continuation.token_ids), fixed=unmovable(request))

    def add(self, chunk: common_pb2.InferChunk) -> None:
        """A chunk the worker sent (relayed or about to be: it reaches the client either way)."""
        self.token_ids.extend(chunk.token_ids)
        if chunk.text and not chunk.token_ids:
            self.exact = False
        if chunk.finish_reason:
            self.finished = True

    def movable(self, max_tokens: int, limit: int) -> bool:
        """Whether the stream can go on on another worker."""
        return (
            self.exact
            and not self.fixed
            and not self.finished
            and self.moves < limit
            and len(self.token_ids) < max_tokens
        )

    def continued(self, request: common_pb2.InferRequest) -> common_pb2.InferRequest:
        """The request for the next worker: the same, continuing from here."""
        self.moves += 1
        return continued(request, self.token_ids)

    def why_not(self, max_tokens: int, limit: int) -> str:
        """Why a failed stream cannot go on (for its error text)."""
        if self.fixed:
            return self.fixed
        if not self.exact:
            return "its worker sends no token ids, so it cannot be continued elsewhere"
        if self.moves >= limit:
            return f"it already moved {self.moves} time(s) (--migration-limit {limit})"
        return "nothing was left to generate"
