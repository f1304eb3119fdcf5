"""Shared fixtures: tiny checkpoints generated deterministically by fixtures/generate.py, once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures.generate import VARIANTS, make_checkpoint

ALL_VARIANTS = sorted(VARIANTS)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every fixture variant, generated once per test session."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: make_checkpoint(name, root / name) for name in ALL_VARIANTS}


@pytest.fixture
def llama3(checkpoints: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the llama3 fixture that a test may damage."""
    import shutil

    dst = tmp_path / "llama3"
    shutil.copytree(checkpoints["llama3"], dst)
    return dst
