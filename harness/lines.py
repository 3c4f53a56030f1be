"""A child process's text output, collected line by line by a thread, so a test can wait for a
line with a deadline instead of blocking in `readline()`."""

from __future__ import annotations

import threading
from typing import IO


class Lines:
    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line)

    def has(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def text(self) -> str:
        return "".join(self.lines)

    def finish(self, timeout: float) -> str:
        """Everything, once the stream has closed (the process exited)."""
        self._thread.join(timeout)
        return self.text()
