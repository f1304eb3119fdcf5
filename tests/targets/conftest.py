"""Fixtures several target test modules share; a module that defines a fixture of the same name uses its own."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from fixtures.generate import make_checkpoint
from sovpack.reference import ReferenceModel
from tests.targets.shared import WINDOW, reference_cache


@pytest.fixture(scope="session")
def ckpts(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The session's fixture checkpoints and WINDOW, a mistral with a sliding window of 5 (test_openvino*.py)."""
    made = dict(checkpoints)
    made[WINDOW] = make_checkpoint("mistral", tmp_path_factory.mktemp("ov-ckpt") / WINDOW, sliding_window=5)
    return made


@pytest.fixture(scope="session")
def references(ckpts: dict[str, Path]) -> Callable[[str], ReferenceModel]:
    """variant -> its ReferenceModel over ``ckpts``, opened once per session."""
    return reference_cache(ckpts)
