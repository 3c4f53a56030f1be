"""Where Apiary keeps state on disk by default (the XDG base directory rules)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import TextIO


def state_home() -> Path:
    """$XDG_STATE_HOME, else ~/.local/state."""
    return Path(os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"))


def default_state_dir(name: str) -> Path:
    """STATE_HOME/apiary/NAME: 'queen' for the queen, 'hive-ID' for a hive."""
    return state_home() / "apiary" / name


class StateDirBusy(Exception):
    """Another live process holds the state dir."""


def claim(state_dir: Path, owner: str) -> TextIO:
    """Claim `state_dir` for this process (`owner`: "hive" or "queen"); the open lock file,
    held until it is closed or the process ends (the OS releases it even after SIGKILL).

    Two hives sharing one would fight over workers; two queens, over one request history."""
    state_dir.mkdir(parents=True, exist_ok=True)
    lock_file = open(state_dir / f"{owner}.lock", "a+")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        holder = lock_file.read().strip() or "unknown"
        lock_file.close()
        raise StateDirBusy(
            f"another {owner} (pid {holder}) is using state dir {state_dir}; "
            f"stop it or give this {owner} its own --state-dir"
        ) from None
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(str(os.getpid()))
    lock_file.flush()
    return lock_file


def replace_file(path: Path, text: str) -> None:
    """Write-then-rename (synced first), so a crash mid-write leaves the previous file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
