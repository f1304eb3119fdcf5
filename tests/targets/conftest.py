"""Fixtures several target test modules share; a module that defines a fixture of the same name uses its own."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from fixtures.generate import make_checkpoint
from sovpack.convert import ConvertResult, convert
from sovpack.reference import ReferenceModel
from tests.targets.shared import UNJUDGED_PRECISIONS, WINDOW, reference_cache


@pytest.fixture(scope="session")
def ckpts(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The session's fixture checkpoints and WINDOW, a mistral with a sliding window of 5 (test_openvino*.py,
    test_onnx.py, test_onnx_genai.py)."""
    made = dict(checkpoints)
    made[WINDOW] = make_checkpoint("mistral", tmp_path_factory.mktemp("ov-ckpt") / WINDOW, sliding_window=5)
    return made


@pytest.fixture(scope="session")
def references(ckpts: dict[str, Path]) -> Callable[[str], ReferenceModel]:
    """variant -> its ReferenceModel over ``ckpts``, opened once per session."""
    return reference_cache(ckpts)


@pytest.fixture(scope="session")
def onnx_artifact(
    ckpts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., ConvertResult]:
    """convert(variant, precision) to onnx through sovpack.convert, with parity (none for UNJUDGED_PRECISIONS),
    cached per session: test_onnx.py and test_onnx_genai.py open the same artifacts."""
    root = tmp_path_factory.mktemp("onnx-artifacts")
    cache: dict[tuple[str, str], ConvertResult] = {}

    def make(variant: str, precision: str) -> ConvertResult:
        key = (variant, precision)
        if key not in cache:
            cache[key] = convert(ckpts[variant], f"onnx:{precision}", root / f"{variant}-{precision}",
                                 parity=precision not in UNJUDGED_PRECISIONS)
        return cache[key]

    return make
