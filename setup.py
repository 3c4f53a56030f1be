"""The build step that makes the generated code: `from protos.v1 import queen_pb2` works from
any install (`pip install .`, a wheel, `pip install -e .`) because the .proto files are
compiled while building, never committed. Everything else is in pyproject.toml."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTOS = sorted((ROOT / "protos" / "v1").glob("*.proto"))


def generate() -> None:
    """protoc into protos/v1 beside the .proto files (the proto path is the import path)."""
    scripts = os.path.dirname(sys.executable)  # protoc-gen-mypy of mypy-protobuf lives here
    env = {**os.environ, "PATH": f"{scripts}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT),
         f"--python_out={ROOT}", f"--grpc_python_out={ROOT}",
         f"--mypy_out=quiet:{ROOT}", f"--mypy_grpc_out=quiet:{ROOT}",
         *map(str, PROTOS)],
        check=True, env=env,
    )  # fmt: skip


class BuildWithProtos(build_py):
    def run(self) -> None:
        generate()
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})
