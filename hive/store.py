"""The hive's worker table on disk: a restarted hive re-adopts its workers, never orphans them.

Also the mapping between a worker as the supervisor holds it (spec, lifecycle) and its row,
so what a row says is decided in one place: here, and in the lifecycle's `stored_state`.
"""

from __future__ import annotations

import errno
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc
import structlog

from apiary.errors import StatusError
from apiary.paths import claim, replace_file
from hive.launcher import FoundWorker
from hive.managed import ManagedWorker
from hive.spec import WorkerSpec
from hive.states import recovered_phase, stored_state

log = structlog.get_logger("hive.store")

FORMAT_VERSION = 1


class TableUnreadable(Exception):
    """The table on disk is not JSON we wrote; it was moved aside to `saved_as`."""

    def __init__(self, path: Path, saved_as: Path | None, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.saved_as, self.reason = path, saved_as, reason


@dataclass
class WorkerRow:
    """One worker as the table on disk keeps it: enough to find, check and re-adopt it."""

    id: str
    model: str
    backend: str
    slots: int
    device: str
    backend_options: dict[str, str] = field(default_factory=dict)
    restart_policy: int = 0
    tags: list[str] = field(default_factory=list)
    pid: int = 0
    create_time: float = 0.0
    address: str = ""
    # LOADING, IDLE, STOPPING or FAILED (BUSY is written as IDLE: it flips too often to matter).
    state: str = "LOADING"
    started_at: float = 0.0
    restart_count: int = 0
    failure_reason: str = ""
    restart_pending: bool = False
    # Never retired for idleness (the hive keeps it from boot).
    keep: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object) -> WorkerRow:
        """Raises ValueError naming what is wrong: the file is input like any other."""
        if not isinstance(data, dict):
            raise ValueError(f"a row must be an object, not {type(data).__name__}")
        try:
            options = data.get("backend_options", {})
            if not isinstance(options, dict):
                raise ValueError("backend_options must be an object")
            return cls(
                id=_text(data["id"]),
                model=_text(data["model"]),
                backend=_text(data["backend"]),
                slots=int(data["slots"]),
                device=_text(data.get("device", "cpu")),
                backend_options={str(k): str(v) for k, v in options.items()},
                restart_policy=int(data.get("restart_policy", 0)),
                tags=[str(t) for t in data.get("tags", [])],
                pid=int(data.get("pid", 0)),
                create_time=float(data.get("create_time", 0.0)),
                address=_text(data.get("address", "")),
                state=_text(data.get("state", "LOADING")),
                started_at=float(data.get("started_at", 0.0)),
                restart_count=int(data.get("restart_count", 0)),
                failure_reason=_text(data.get("failure_reason", "")),
                restart_pending=bool(data.get("restart_pending", False)),
                keep=bool(data.get("keep", False)),
            )
        except KeyError as exc:
            raise ValueError(f"row has no {exc.args[0]!r}") from None
        except TypeError as exc:
            raise ValueError(str(exc)) from None


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected text, got {type(value).__name__}")
    return value


class WorkerStore:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / "workers.json"
        self._lock_file: TextIO | None = None

    def log_path(self, worker_id: str) -> Path:
        return self.state_dir / "logs" / f"{worker_id}.log"

    def lock(self) -> None:
        """Claim the state dir for this process (StateDirBusy if another hive has it)."""
        self._lock_file = claim(self.state_dir, "hive")

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def load(self) -> list[WorkerRow]:
        """The rows on disk (unreadable rows skipped: their workers are found by their
        markers). Raises TableUnreadable, having moved the bad file aside."""
        return [row for row in self.load_rows() if isinstance(row, WorkerRow)]

    def load_rows(self) -> list[WorkerRow | ValueError]:
        """Each row, or the ValueError that says why it could not be read."""
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
                raise ValueError(f"not a version {FORMAT_VERSION} worker table")
            workers = data.get("workers")
            if not isinstance(workers, list):
                raise ValueError("no list of workers")
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            # A torn file cannot happen (we replace atomically), but a hand-edited or a
            # corrupted one can: keep it for a person to look at, and start over.
            raise TableUnreadable(self.path, self._set_aside(), str(exc)) from None
        rows: list[WorkerRow | ValueError] = []
        for item in workers:
            try:
                rows.append(WorkerRow.from_json(item))
            except ValueError as exc:
                rows.append(exc)
        return rows

    def _set_aside(self) -> Path | None:
        broken = self.path.with_name(f"{self.path.name}.broken-{int(time.time())}")
        try:
            self.path.replace(broken)
        except OSError:
            return None
        return broken

    def save(self, rows: list[WorkerRow]) -> None:
        """Write-then-rename, so a crash mid-write leaves the previous table whole."""
        table = {"version": FORMAT_VERSION, "workers": [r.to_json() for r in rows]}
        replace_file(self.path, json.dumps(table))


class SavedTable:
    """The table as last written, so an unchanged table is not rewritten, and why the last
    write failed ('' when it did not): heartbeats carry that, and spawns are refused on it."""

    def __init__(self, store: WorkerStore) -> None:
        self.store = store
        self._persisted: list[WorkerRow] | None = None
        self.error = ""
        self._errno = 0

    def save(self, rows: list[WorkerRow]) -> str:
        """Write `rows` if they changed; returns why they could not be ('' if they could)."""
        if rows == self._persisted:
            return self.error
        path = self.store.path
        try:
            self.store.save(rows)
        except OSError as exc:
            error = f"cannot save the worker table {path}: {exc.strerror or exc}"
            if error != self.error:
                log.error("cannot save the worker table", path=str(path), error=str(exc))
            self.error, self._errno = error, exc.errno or 0
            return error
        if self.error:
            log.info("worker table saved again", path=str(path))
        self._persisted, self.error = rows, ""
        return ""

    def refusal(self, consequence: str) -> StatusError:
        """The refusal of a spawn whose row could not be saved: RESOURCE_EXHAUSTED for a full
        disk (nothing passes until space is freed), UNAVAILABLE for anything else."""
        full = self._errno in (errno.ENOSPC, errno.EDQUOT)
        code = grpc.StatusCode.RESOURCE_EXHAUSTED if full else grpc.StatusCode.UNAVAILABLE
        return StatusError(code, f"{self.error}; {consequence}")


# ---- a worker <-> its row ---------------------------------------------------------


def spec_json(spec: WorkerSpec, keep: bool) -> str:
    """What a worker process carries of its spec, for a hive that lost its table."""
    return json.dumps(
        {
            "model": spec.model,
            "backend": spec.backend,
            "slots": spec.slots,
            "device": spec.device,
            "backend_options": spec.backend_options,
            "restart_policy": int(spec.restart_policy),
            "tags": spec.tags,
            "keep": keep,
        }
    )


def worker_row(worker: ManagedWorker) -> WorkerRow:
    """The row that lets a restarted hive find, check and re-adopt `worker`."""
    life, ident = worker.life, worker.identity
    return WorkerRow(
        id=worker.id,
        model=worker.spec.model,
        backend=worker.spec.backend,
        slots=worker.spec.slots,
        device=worker.spec.device,
        backend_options=dict(worker.spec.backend_options),
        restart_policy=int(life.policy),
        tags=list(worker.spec.tags),
        pid=ident.pid if ident else 0,
        create_time=ident.create_time if ident else 0.0,
        address=life.address,
        state=stored_state(life.phase),
        started_at=worker.started_at,
        restart_count=life.restart_count,
        failure_reason=life.failure_reason,
        restart_pending=life.restart_at is not None,
        keep=worker.keep,
    )


def row_spec(row: WorkerRow) -> WorkerSpec:
    """The spec a row read back was spawned with."""
    return WorkerSpec(
        model=row.model,
        backend=row.backend,
        slots=row.slots,
        device=row.device,
        backend_options=row.backend_options,
        restart_policy=row.restart_policy,  # type: ignore[arg-type]
        tags=row.tags,
    )


def recovered_row(found: FoundWorker) -> WorkerRow:
    """A row rebuilt from a live worker process the table did not name, from the spec it
    carries (`spec_json`). Raises ValueError, as `WorkerRow.from_json` does."""
    spec = json.loads(found.spec) if found.spec else {}
    return WorkerRow.from_json(
        {
            **(spec if isinstance(spec, dict) else {}),
            "id": found.worker_id,
            "pid": found.identity.pid,
            "create_time": found.identity.create_time,
            "address": found.address,
            "state": recovered_phase(bool(found.address)).value,
        }
    )
