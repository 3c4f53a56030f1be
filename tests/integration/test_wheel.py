"""A wheel that runs: built from this checkout, installed in a scratch venv, `apiary up` serves.

The generated code is made by the build step (setup.py) from the .proto files, never
committed: this is the check that a user's `pip install .` gets it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from harness import ROOT
from harness.ports import free_port
from harness.wait import wait_until_sync


@pytest.mark.timeout(300)
def test_a_built_wheel_installs_and_serves_a_first_token(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(ROOT)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = dist.glob("apiary-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "protos/v1/queen_pb2.py" in names and "protos/v1/queen.proto" in names
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python, apiary = env_dir / "bin" / "python", env_dir / "bin" / "apiary"
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(wheel)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-3000:]
    # Nothing of the checkout may be importable: run from elsewhere, with a clean PYTHONPATH.
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "APIARY_LOG_FORMAT": "json"}
    env.pop("PYTHONPATH", None)
    version = subprocess.run(
        [str(apiary), "--version"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert version.returncode == 0 and "0.1.0" in version.stdout + version.stderr
    queen, hive = free_port(), free_port()
    up = subprocess.Popen(
        [str(apiary), "up", "--echo", "--queen-listen", f"127.0.0.1:{queen}",
         "--http-listen", "127.0.0.1:0", "--hive-listen", f"127.0.0.1:{hive}",
         "--token-delay", "0"],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:

        def first_tokens() -> str:
            out = subprocess.run(
                [str(apiary), "infer", "demo", "from a wheel", "--max-tokens", "3",
                 "--queen", f"127.0.0.1:{queen}"],
                capture_output=True, text=True, env=env, cwd=tmp_path, timeout=30,
            )  # fmt: skip
            return out.stdout if out.returncode == 0 else ""

        assert wait_until_sync(first_tokens, timeout=60, interval=0.5) == "from a wheel\n"
    finally:
        os.killpg(up.pid, signal.SIGINT)
        try:
            up.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
