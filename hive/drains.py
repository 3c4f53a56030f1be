"""The operator drains a hive keeps: itself, and some of its workers.

Drains are operator state every queen must agree on, so the hive keeps them (not a queen):
set through Hive.SetDrain by whichever queen an operator asked, saved in the hive's state dir
(write-then-rename, so they outlive the hive process), and carried in every heartbeat to every
queen, where they replace what the queen knew. A restarted queen learns them from the first
heartbeat. The file is read as untrusted: anything but the shape written here is ignored (and
logged), never a crash.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from apiary.paths import replace_file

log = structlog.get_logger("hive.drains")


@dataclass
class Drains:
    path: Path
    hive: bool = False
    workers: set[str] = field(default_factory=set)

    @classmethod
    def load(cls, path: Path) -> Drains:
        drains = cls(path)
        try:
            saved = json.loads(path.read_text())
        except FileNotFoundError:
            return drains
        except (OSError, ValueError) as exc:
            log.warning("drains unreadable; none kept", path=str(path), error=str(exc))
            return drains
        workers = saved.get("workers") if isinstance(saved, dict) else None
        if (
            not isinstance(saved, dict)
            or not isinstance(saved.get("hive"), bool)
            or not (isinstance(workers, list) and all(isinstance(w, str) for w in workers))
        ):
            log.warning("drains file is not {hive, workers}; starting with none", path=str(path))
            return drains
        drains.hive, drains.workers = saved["hive"], set(workers)
        return drains

    def set(self, worker_id: str, drained: bool) -> None:
        """Drain (or undrain) a worker, or the hive itself (worker_id ""); saved at once."""
        if not worker_id:
            self.hive = drained
        elif drained:
            self.workers.add(worker_id)
        else:
            self.workers.discard(worker_id)
        self.save()

    def of(self, worker_ids: Iterable[str]) -> list[str]:
        """The drained ones among these (workers that are gone are not reported)."""
        return sorted(self.workers.intersection(worker_ids))

    def save(self) -> None:
        replace_file(self.path, json.dumps({"hive": self.hive, "workers": sorted(self.workers)}))
