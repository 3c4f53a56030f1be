"""Catalog pulls as untrusted input: magic first, no symlink escapes, no full disks, honest resumes.

The Catalog runs here in the test's own thread against real files, a real tmpfs (as root) and a
real HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hive.catalog import Catalog, CatalogError, NoSpace, NotGguf

MIB = 1 << 20


def gguf_bytes(size: int, fill: bytes = b"\0") -> bytes:
    return b"GGUF" + fill * (size - 4)


def noop(done: int, total: int, stage: str) -> None:
    pass


@dataclass
class Behaviour:
    """What the test server does; changed by tests between requests."""

    payload: bytes
    etag: str = '"v1"'
    honour_ranges: bool = True
    send_length: bool = True
    # Drop the connection after this many body bytes on the next N responses.
    drops: int = 0
    wrong_range_start: bool = False
    requests: list[dict[str, str]] = field(default_factory=list)


class Server(http.server.ThreadingHTTPServer):
    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        super().__init__(("127.0.0.1", 0), Handler)

    def url(self, name: str = "model.gguf") -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


class Handler(http.server.BaseHTTPRequestHandler):
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        b = self.server.behaviour
        b.requests.append(dict(self.headers.items()))
        start = 0
        header = self.headers.get("Range")
        if header and b.honour_ranges and self.headers.get("If-Range") == b.etag:
            start = int(header.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            shown = start + 1 if b.wrong_range_start else start
            self.send_header(
                "Content-Range", f"bytes {shown}-{len(b.payload) - 1}/{len(b.payload)}"
            )
        else:
            self.send_response(200)
        body = b.payload[start:]
        self.send_header("ETag", b.etag)
        if b.send_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if b.drops > 0:
            b.drops -= 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)
        self.close_connection = True


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server(Behaviour(gguf_bytes(3 * MIB, b"a")))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: the disk that fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)])
    if done.returncode != 0:
        pytest.skip("this machine cannot mount a tmpfs")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def leftovers(catalog: Catalog) -> list[str]:
    return (
        sorted(p.name for p in catalog.partial_dir.glob("*"))
        if catalog.partial_dir.exists()
        else []
    )


def test_a_file_that_is_not_gguf_is_refused_before_anything_is_copied(tmp_path: Path) -> None:
    source = tmp_path / "src" / "huge.gguf"
    source.parent.mkdir()
    source.write_bytes(b"\0" * (4 * MIB))
    catalog = Catalog(tmp_path / "models")
    copied: list[int] = []
    with pytest.raises(NotGguf, match="is not a GGUF file"):
        catalog.pull(str(source), "huge", "", lambda done, total, stage: copied.append(done))
    assert copied == [] and leftovers(catalog) == [] and catalog.entries() == []


def test_symlinks_may_not_lead_out_of_the_source_directory(tmp_path: Path) -> None:
    secret = tmp_path / "elsewhere" / "secret.gguf"
    secret.parent.mkdir()
    secret.write_bytes(gguf_bytes(1024))
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "escape.gguf").symlink_to(secret)
    (shared / "real.gguf").write_bytes(gguf_bytes(2048))
    (shared / "alias.gguf").symlink_to(shared / "real.gguf")
    catalog = Catalog(tmp_path / "models")
    with pytest.raises(CatalogError, match=r"outside its directory.*--allow-symlinks"):
        catalog.pull(str(shared / "escape.gguf"), "escape", "", noop)
    assert catalog.pull(str(shared / "alias.gguf"), "alias", "", noop).size_bytes == 2048
    lenient = Catalog(tmp_path / "models", allow_symlinks=True)
    assert lenient.pull(str(shared / "escape.gguf"), "escape", "", noop).size_bytes == 1024


def test_only_regular_files_are_pulled(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    catalog = Catalog(tmp_path / "models")
    with pytest.raises(CatalogError, match="not a regular file"):
        catalog.pull(str(fifo), "pipe", "", noop)


def test_free_space_is_checked_before_copying(tmp_path: Path, small_disk: Path) -> None:
    source = tmp_path / "big.gguf"
    source.write_bytes(gguf_bytes(2 * MIB))
    catalog = Catalog(small_disk / "models")
    with pytest.raises(NoSpace, match=rf"needs {2 * MIB} bytes but .* has \d+ bytes free"):
        catalog.pull(str(source), "big", "", noop)
    assert leftovers(catalog) == []


def test_a_disk_that_fills_during_a_download_leaves_nothing(
    small_disk: Path, server: Server
) -> None:
    server.behaviour.send_length = False  # the size is not known up front
    catalog = Catalog(small_disk / "models")
    with pytest.raises(NoSpace, match="disk filled up"):
        catalog.pull(server.url(), "big", "", noop)
    assert leftovers(catalog) == [] and catalog.entries() == []


def test_a_resume_asks_with_if_range_and_checks_the_content_range(
    tmp_path: Path, server: Server
) -> None:
    behaviour = server.behaviour
    behaviour.drops = 1
    catalog = Catalog(tmp_path / "models")
    entry = catalog.pull(server.url(), "m", "", noop)
    first, second = behaviour.requests
    assert "Range" not in first
    assert second["Range"].startswith("bytes=") and second["If-Range"] == '"v1"'
    assert catalog.path(entry).read_bytes() == behaviour.payload


@pytest.mark.parametrize("change", ["etag", "ignores ranges", "wrong start"])
def test_a_changed_file_or_a_server_ignoring_ranges_restarts_from_zero(
    tmp_path: Path, server: Server, change: str
) -> None:
    behaviour = server.behaviour
    behaviour.drops = 1
    original, new = behaviour.payload, gguf_bytes(3 * MIB, b"b")

    def progress(done: int, total: int, stage: str) -> None:
        if behaviour.drops or len(behaviour.requests) != 1 or stage != "downloading":
            return
        # Between the dropped first response and the resume:
        if change == "etag":  # the file changed on the server
            behaviour.payload, behaviour.etag = new, '"v2"'
        elif change == "ignores ranges":
            behaviour.honour_ranges = False
        else:  # answers 206 for another range than asked
            behaviour.wrong_range_start = True

    catalog = Catalog(tmp_path / "models")
    entry = catalog.pull(server.url(), "m", "", progress)
    assert catalog.path(entry).read_bytes() == (new if change == "etag" else original)
    assert len(behaviour.requests) >= 2 and leftovers(catalog) == []
