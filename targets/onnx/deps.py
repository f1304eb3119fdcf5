"""The onnx target's optional packages, imported only when used: a missing one names the ``onnx`` extra."""

from __future__ import annotations

import importlib
from typing import Any

from sovpack.errors import MissingDependencyError


def require(module: str, package: str | None = None) -> Any:
    """Import ``module``; if it is not installed, a MissingDependencyError naming ``package`` and the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(package or module, "onnx") from e
