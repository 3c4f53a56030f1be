"""The hive's model catalog: model files in its models dir, each with a manifest.

Layout under the models dir:
  NAME/manifest.json     name, file, size, sha256, source, added_at, backend
  NAME/FILE              the model file
  .partial/NAME.part     a pull in progress (with NAME.json: its source), never listed

A pull writes to .partial and only moves the file into place, and writes its
manifest, once it is whole and verified; an interrupted HTTP pull resumes with
a Range request, within the same pull (a few attempts) or on the next one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from apiary.validation import name_problem

CHUNK = 1 << 20
HTTP_ATTEMPTS = 4
HTTP_TIMEOUT = 30.0
GGUF_MAGIC = b"GGUF"

# (bytes done, bytes total or 0, stage)
PullProgress = Callable[[int, int, str], None]


class CatalogError(Exception):
    """A catalog operation that cannot be done; the message says why and what to do."""


class AlreadyExists(CatalogError):
    pass


class NotInCatalog(CatalogError):
    pass


@dataclass
class CatalogEntry:
    name: str
    file: str
    size_bytes: int
    sha256: str
    source: str
    added_at: float
    backend: str


def backend_for(file_name: str) -> str:
    if file_name.lower().endswith(".gguf"):
        return "llamacpp"
    raise CatalogError(
        f"{file_name!r} is not a model file this hive can run: only GGUF files (.gguf, for the "
        "llamacpp backend) are supported"
    )


def catalog_name_problem(name: str) -> str | None:
    problem = name_problem("model name", name)
    if problem is None and ("/" in name or name.startswith(".")):
        problem = f"model name {name!r} cannot contain '/' or start with '.' in a hive catalog"
    return problem


class Catalog:
    def __init__(self, models_dir: Path) -> None:
        self.dir = models_dir
        self.partial_dir = models_dir / ".partial"
        self._pulling: set[str] = set()
        self._lock = threading.Lock()
        self._cached: list[CatalogEntry] | None = None

    def cached_entries(self) -> list[CatalogEntry]:
        """entries() without touching the disk again until a pull or delete changes them."""
        if self._cached is None:
            self._cached = self.entries()
        return self._cached

    # ---- reading ----------------------------------------------------------

    def entries(self) -> list[CatalogEntry]:
        found = []
        if self.dir.is_dir():
            for manifest in sorted(self.dir.glob("*/manifest.json")):
                entry = self._read(manifest)
                if entry is not None:
                    found.append(entry)
        return found

    def _read(self, manifest: Path) -> CatalogEntry | None:
        try:
            data = json.loads(manifest.read_text())
            entry = CatalogEntry(**data)
        except (OSError, ValueError, TypeError):
            return None
        return entry if (manifest.parent / entry.file).is_file() else None

    def get(self, name: str) -> CatalogEntry:
        entry = (
            self._read(self.dir / name / "manifest.json")
            if not catalog_name_problem(name)
            else None
        )
        if entry is None:
            known = ", ".join(e.name for e in self.entries()) or "none"
            raise NotInCatalog(f"model {name!r} is not in this hive's catalog; models: {known}")
        return entry

    def path(self, entry: CatalogEntry) -> Path:
        return self.dir / entry.name / entry.file

    # ---- changing ---------------------------------------------------------

    def delete(self, name: str) -> CatalogEntry:
        entry = self.get(name)
        shutil.rmtree(self.dir / name)
        self._cached = None
        return entry

    def pull(self, source: str, name: str, sha256: str, progress: PullProgress) -> CatalogEntry:
        """Blocking: run it on a thread. Raises CatalogError with an actionable message."""
        problem = catalog_name_problem(name)
        if problem:
            raise CatalogError(problem)
        if sha256 and (
            len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256.lower())
        ):
            raise CatalogError("sha256 must be 64 hexadecimal digits")
        with self._lock:
            if name in self._pulling:
                raise CatalogError(f"a pull of model {name!r} is already in progress")
            if (self.dir / name / "manifest.json").exists():
                raise AlreadyExists(
                    f"model {name!r} is already in the catalog; delete it first to pull again"
                )
            self._pulling.add(name)
        try:
            return self._pull(source, name, sha256.lower(), progress)
        finally:
            with self._lock:
                self._pulling.discard(name)

    def _pull(self, source: str, name: str, sha256: str, progress: PullProgress) -> CatalogEntry:
        parsed = urlparse(source)
        file_name = Path(unquote(parsed.path)).name
        backend = backend_for(file_name)
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        part = self.partial_dir / f"{name}.part"
        meta = self.partial_dir / f"{name}.json"
        if parsed.scheme in ("http", "https"):
            self._download(source, part, meta, progress)
        elif parsed.scheme in ("", "file"):
            self._copy(
                Path(unquote(parsed.path)) if parsed.scheme else Path(source), part, progress
            )
        else:
            raise CatalogError(
                f"unsupported source {source!r}: use a local path, file://PATH or http(s)://URL"
            )
        progress(part.stat().st_size, part.stat().st_size, "verifying")
        digest = _sha256(part)
        with open(part, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            part.unlink(missing_ok=True)
            meta.unlink(missing_ok=True)
            raise CatalogError(f"{source} is not a GGUF file (it does not start with 'GGUF')")
        if sha256 and digest != sha256:
            part.unlink(missing_ok=True)
            meta.unlink(missing_ok=True)
            raise CatalogError(
                f"sha256 mismatch for {source}: expected {sha256}, got {digest}; nothing was kept"
            )
        entry = CatalogEntry(
            name=name,
            file=file_name,
            size_bytes=part.stat().st_size,
            sha256=digest,
            source=source,
            added_at=time.time(),
            backend=backend,
        )
        target = self.dir / name
        target.mkdir(parents=True, exist_ok=True)
        os.replace(part, target / file_name)
        meta.unlink(missing_ok=True)
        tmp = target / "manifest.json.tmp"
        tmp.write_text(json.dumps(asdict(entry), indent=2))
        os.replace(tmp, target / "manifest.json")
        self._cached = None
        return entry

    def _copy(self, path: Path, part: Path, progress: PullProgress) -> None:
        if not path.is_file():
            raise CatalogError(f"no file at {path}")
        total = path.stat().st_size
        done = 0
        with open(path, "rb") as src, open(part, "wb") as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)
                done += len(chunk)
                progress(done, total, "copying")

    def _download(self, url: str, part: Path, meta: Path, progress: PullProgress) -> None:
        # A partial file from an earlier pull of the same source is resumed; any other is not.
        try:
            same_source = json.loads(meta.read_text()).get("source") == url
        except (OSError, ValueError):
            same_source = False
        if not same_source:
            part.unlink(missing_ok=True)
            meta.write_text(json.dumps({"source": url}))
        last_error = ""
        for attempt in range(HTTP_ATTEMPTS):
            offset = part.stat().st_size if part.exists() else 0
            request = urllib.request.Request(
                url, headers={"Range": f"bytes={offset}-"} if offset else {}
            )
            try:
                with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
                    if offset and response.status != 206:
                        offset = 0  # the server ignored the range: start over
                    length = int(response.headers.get("Content-Length") or 0)
                    total = offset + length if length else 0
                    progress(offset, total, f"resuming at {offset}" if offset else "downloading")
                    with open(part, "ab" if offset else "wb") as dst:
                        done = offset
                        while chunk := response.read(CHUNK):
                            dst.write(chunk)
                            done += len(chunk)
                            progress(done, total, "downloading")
                    if total and done < total:
                        raise ConnectionError(f"connection closed at {done} of {total} bytes")
                return
            except urllib.error.HTTPError as exc:
                if exc.code == 416 and offset:  # nothing left to fetch
                    return
                raise CatalogError(f"{url}: HTTP {exc.code} {exc.reason}") from None
            except (OSError, ConnectionError) as exc:
                last_error = str(exc) or type(exc).__name__
                time.sleep(min(0.2 * 2**attempt, 2.0))
        raise CatalogError(
            f"download of {url} failed after {HTTP_ATTEMPTS} attempts ({last_error}); "
            "pull again to resume from where it stopped"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
