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

import errno
import hashlib
import json
import os
import re
import shutil
import stat
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO
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


class NoSpace(CatalogError):
    """The disk cannot take the file; nothing partial is kept."""


class NotGguf(CatalogError):
    """The source is not a GGUF file: refused from its first bytes, before any copy."""


class _RangeMismatch(ConnectionError):
    """The server answered a resume with another range than asked: start over."""


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
    def __init__(self, models_dir: Path, allow_symlinks: bool = False) -> None:
        # Local sources may be symlinks leading out of their directory only if allowed.
        self.allow_symlinks = allow_symlinks
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
        try:
            if parsed.scheme in ("http", "https"):
                self._download(source, part, meta, progress)
            elif parsed.scheme in ("", "file"):
                local = Path(unquote(parsed.path)) if parsed.scheme else Path(source)
                self._copy(local, part, progress)
            else:
                raise CatalogError(
                    f"unsupported source {source!r}: use a local path, file://PATH or http(s)://URL"
                )
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise CatalogError(f"cannot pull {source}: {exc}") from None
            _remove(part, meta)
            raise NoSpace(
                f"the hive's disk filled up while pulling {source} into {self.dir}; "
                "the partial file was removed: free some space and pull again"
            ) from None
        except (NoSpace, NotGguf):
            _remove(part, meta)
            raise
        progress(part.stat().st_size, part.stat().st_size, "verifying")
        digest = _sha256(part)
        if sha256 and digest != sha256:
            _remove(part, meta)
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
        self._install(entry, part, meta)
        return entry

    def _install(self, entry: CatalogEntry, part: Path, meta: Path) -> None:
        """Move the whole, verified file into place; only then does its manifest appear."""
        target = self.dir / entry.name
        target.mkdir(parents=True, exist_ok=True)
        os.replace(part, target / entry.file)
        meta.unlink(missing_ok=True)
        tmp = target / "manifest.json.tmp"
        tmp.write_text(json.dumps(asdict(entry), indent=2))
        os.replace(tmp, target / "manifest.json")
        self._cached = None

    def _check_space(self, needed: int, source: str) -> None:
        free = shutil.disk_usage(self.partial_dir).free
        if needed > free:
            raise NoSpace(
                f"pulling {source} needs {needed} bytes but {self.dir} has {free} bytes free; "
                "free some space (or delete a model) and pull again"
            )

    def _open_local(self, path: Path) -> BinaryIO:
        """The source file, refusing symlinks that lead out of its directory (and non-files)."""
        real = os.path.realpath(path)
        home = os.path.realpath(path.parent)
        if real != os.path.join(home, path.name) and not self.allow_symlinks:
            if not real.startswith(home + os.sep):
                raise CatalogError(
                    f"{path} is a symlink to {real}, outside its directory; the hive does not "
                    "follow it (start the hive with --allow-symlinks to allow this)"
                )
        try:
            # O_NONBLOCK: opening a FIFO would otherwise wait for a writer (files ignore it).
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            raise CatalogError(f"no file at {path}") from None
        except OSError as exc:
            raise CatalogError(f"cannot open {path}: {exc.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise CatalogError(f"no file at {path} (it is not a regular file)")
        return os.fdopen(fd, "rb")

    def _copy(self, path: Path, part: Path, progress: PullProgress) -> None:
        with self._open_local(path) as src:
            _check_magic(src.read(len(GGUF_MAGIC)), str(path))
            src.seek(0)
            total = os.fstat(src.fileno()).st_size
            self._check_space(total, str(path))
            done = 0
            with open(part, "wb") as dst:
                while chunk := src.read(CHUNK):
                    dst.write(chunk)
                    done += len(chunk)
                    progress(done, total, "copying")

    def _download(self, url: str, part: Path, meta: Path, progress: PullProgress) -> None:
        resume = _Resume.read(meta, url)
        if resume is None:
            part.unlink(missing_ok=True)
            resume = _Resume(url)
            resume.write(meta)
        last_error = ""
        for attempt in range(HTTP_ATTEMPTS):
            offset = part.stat().st_size if part.exists() and resume.validator else 0
            try:
                self._fetch(url, part, meta, resume, offset, progress)
                return
            except urllib.error.HTTPError as exc:
                if exc.code == 416 and offset:  # nothing left to fetch
                    return
                _remove(part, meta)
                raise CatalogError(f"{url}: HTTP {exc.code} {exc.reason}") from None
            except NoSpace:
                raise
            except _RangeMismatch as exc:
                part.unlink(missing_ok=True)
                last_error = str(exc)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise
                last_error = str(exc) or type(exc).__name__
                time.sleep(min(0.2 * 2**attempt, 2.0))
        raise CatalogError(
            f"download of {url} failed after {HTTP_ATTEMPTS} attempts ({last_error}); "
            "pull again to resume from where it stopped"
        )

    def _fetch(
        self,
        url: str,
        part: Path,
        meta: Path,
        resume: _Resume,
        offset: int,
        progress: PullProgress,
    ) -> None:
        """One GET: a resume (Range + If-Range) from `offset`, or the whole file from zero."""
        headers = {"Range": f"bytes={offset}-", "If-Range": resume.validator} if offset else {}
        request = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
            total, offset = _response_span(response, offset)
            if offset == 0:
                # The server sent the whole file (a first GET, a changed file, or a server
                # that ignores ranges): start over, remembering its validator for a resume.
                resume.validator = response.headers.get("ETag") or response.headers.get(
                    "Last-Modified", ""
                )
                resume.write(meta)
            if total:
                self._check_space(total - offset, url)
            progress(offset, total, f"resuming at {offset}" if offset else "downloading")
            with open(part, "ab" if offset else "wb") as dst:
                if offset == 0:
                    head = response.read(len(GGUF_MAGIC))
                    _check_magic(head, url)
                    dst.write(head)
                done = offset + (len(GGUF_MAGIC) if offset == 0 else 0)
                while chunk := response.read(CHUNK):
                    dst.write(chunk)
                    done += len(chunk)
                    progress(done, total, "downloading")
            if total and done < total:
                raise ConnectionError(f"connection closed at {done} of {total} bytes")


@dataclass
class _Resume:
    """What a later attempt needs to resume a download safely: the source and its validator."""

    source: str
    validator: str = ""

    @classmethod
    def read(cls, meta: Path, url: str) -> _Resume | None:
        """The saved state of an earlier pull of the same source, else None."""
        try:
            data = json.loads(meta.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("source") != url:
            return None
        return cls(url, str(data.get("validator", "")))

    def write(self, meta: Path) -> None:
        meta.write_text(json.dumps(asdict(self)))


def _response_span(response: Any, offset: int) -> tuple[int, int]:
    """(total size or 0, where this response's body starts) from its status and headers."""
    length = int(response.headers.get("Content-Length") or 0)
    if offset and response.status == 206:
        match = re.fullmatch(
            r"bytes (\d+)-(\d+)/(\d+|\*)", response.headers.get("Content-Range", "")
        )
        if match and int(match.group(1)) == offset:
            size = match.group(3)
            return (int(size) if size != "*" else 0), offset
        raise _RangeMismatch(
            f"the server answered a resume at byte {offset} with Content-Range "
            f"{response.headers.get('Content-Range')!r}; starting over"
        )
    return length, 0


def _check_magic(head: bytes, source: str) -> None:
    if head != GGUF_MAGIC:
        raise NotGguf(f"{source} is not a GGUF file (it does not start with 'GGUF')")


def _remove(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
