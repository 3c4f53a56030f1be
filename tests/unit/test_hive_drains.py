"""The hive's drains file: kept across restarts, read as untrusted."""

from __future__ import annotations

from pathlib import Path

import pytest

from hive.drains import Drains


def test_drains_are_saved_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "state" / "drains.json"
    drains = Drains.load(path)
    assert (drains.hive, drains.workers) == (False, set())
    drains.set("w-1", True)
    drains.set("w-2", True)
    drains.set("", True)
    drains.set("w-2", False)
    again = Drains.load(path)
    assert (again.hive, again.workers) == (True, {"w-1"})
    assert again.of(["w-1", "w-3"]) == ["w-1"]  # only workers the hive still has


@pytest.mark.parametrize(
    "text", ["{not json", "[]", '{"hive": "yes", "workers": []}', '{"hive": true, "workers": [1]}']
)
def test_a_bad_file_means_no_drains_never_a_crash(tmp_path: Path, text: str) -> None:
    path = tmp_path / "drains.json"
    path.write_text(text)
    drains = Drains.load(path)
    assert (drains.hive, drains.workers) == (False, set())
