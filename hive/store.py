"""The hive's worker table on disk: a restarted hive re-adopts its workers, never orphans them."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Any, TextIO

FORMAT_VERSION = 1


class StateDirBusy(Exception):
    """Another live hive owns this state directory."""


class WorkerStore:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / "workers.json"
        self._lock_file: TextIO | None = None

    def lock(self) -> None:
        """Claim the state dir for this process; two hives sharing one would fight over workers."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        lock_file = open(self.state_dir / "hive.lock", "a+")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "unknown"
            lock_file.close()
            raise StateDirBusy(
                f"another hive (pid {holder}) is using state dir {self.state_dir}; "
                "stop it or give this hive its own --state-dir"
            ) from None
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(str(os.getpid()))
        lock_file.flush()
        self._lock_file = lock_file

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def load(self) -> list[dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError):
            # A torn file cannot happen (we replace atomically), but a hand-edited one can.
            broken = self.path.with_suffix(".broken")
            with contextlib.suppress(OSError):
                self.path.replace(broken)
            return []
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            return []
        workers = data.get("workers", [])
        return [w for w in workers if isinstance(w, dict)] if isinstance(workers, list) else []

    def save(self, workers: list[dict[str, Any]]) -> None:
        """Write-then-rename, so a crash mid-write leaves the previous table whole."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump({"version": FORMAT_VERSION, "workers": workers}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
