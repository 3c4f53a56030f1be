"""A completion as it streams: pieces of decoded text in, chunks out, with stop strings cut and
every token id travelling with the text it decodes to. Pure: no I/O.

Only text that could still be the start of a stop string is held back, until it cannot; a piece's
token ids go out with the chunk that releases the last of its text (so the ids a client has
always decode to no more than the text it has).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protos.v1 import common_pb2


@dataclass
class Release:
    """What may be sent now."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    # A stop string was reached: the completion ends here.
    stopped: bool = False
    # With logprobs: one per token id, travelling with it.
    logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)


@dataclass
class _Held:
    """A piece whose text is not all released yet."""

    length: int
    token_ids: list[int]
    logprobs: list[common_pb2.TokenLogprob]


class Completion:
    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buffer = ""
        self._held: list[_Held] = []

    def feed(
        self,
        text: str,
        token_ids: list[int],
        logprobs: list[common_pb2.TokenLogprob] | None = None,
    ) -> Release:
        self.buffer += text
        self._held.append(_Held(len(text), list(token_ids), logprobs or []))
        hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            # The stop string is not part of the completion; a piece that began before it is.
            return self._release(min(hits), finishing=True, stopped=True)
        return self._release(len(self.buffer) - self._could_start_a_stop())

    def _could_start_a_stop(self) -> int:
        """How many characters at the end of the buffer a stop string could begin with."""
        for k in range(min(len(self.buffer), self.hold), 0, -1):
            tail = self.buffer[-k:]
            if any(stop.startswith(tail) for stop in self.stops):
                return k
        return 0

    def flush(self) -> Release:
        """The end: everything held back goes out."""
        return self._release(len(self.buffer), finishing=True)

    def _release(self, upto: int, finishing: bool = False, stopped: bool = False) -> Release:
        """Send buffer[:upto] and the ids of the pieces it completes (`finishing`: also of a
        piece it only begins, since nothing more of it will ever be sent)."""
        out, self.buffer = self.buffer[:upto], self.buffer[upto:]
        release = Release(out, stopped=stopped)
        left = upto
        while self._held and (self._held[0].length <= left or (finishing and left > 0)):
            piece = self._held.pop(0)
            release.token_ids += piece.token_ids
            release.logprobs += piece.logprobs
            left -= piece.length
        if self._held and left > 0:
            self._held[0].length -= left  # partly sent: its ids wait for the rest
        if finishing:
            self._held.clear()
            self.buffer = ""
        return release
