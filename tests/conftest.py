from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from apiary.realmodel import model_path
from harness import Cluster


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    c = Cluster()
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture(scope="session")
def real_model() -> Path:
    """SmolLM2-135M-Instruct's GGUF (apiary/realmodel.py), fetched once into its cache."""
    return model_path()
