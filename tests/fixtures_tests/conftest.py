"""Fixtures the generator's test modules share: every fixture variant, generated once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures.generate import make_checkpoint
from fixtures.variants import VARIANTS


@pytest.fixture(scope="session")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("gen_a")
    return {name: make_checkpoint(name, base / name) for name in VARIANTS}
