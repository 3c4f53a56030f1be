"""Where Apiary keeps state on disk by default (the XDG base directory rules)."""

from __future__ import annotations

import os
from pathlib import Path


def state_home() -> Path:
    """$XDG_STATE_HOME, else ~/.local/state."""
    return Path(os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"))


def default_state_dir(name: str) -> Path:
    """STATE_HOME/apiary/NAME: 'queen' for the queen, 'hive-ID' for a hive."""
    return state_home() / "apiary" / name
