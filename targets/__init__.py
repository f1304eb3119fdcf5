"""Output formats: one module each (writer + runtime runner), registered in ``TARGETS`` on import.

Adding a format is one module here and one name in ``TARGET_MODULES``.
"""

from __future__ import annotations

import importlib

from sovpack.targets.base import ARTIFACT_FILE, TARGETS, Target, TargetRef, WrittenArtifact

TARGET_MODULES = ("onnx", "gguf", "openvino")


def load_targets() -> None:
    """Import every target module so it registers itself; heavy runtimes stay lazy inside them."""
    for name in TARGET_MODULES:
        if f"sovpack.targets.{name}" not in TARGETS.loaded_modules:
            try:
                importlib.import_module(f"sovpack.targets.{name}")
            except ModuleNotFoundError as e:
                if e.name != f"sovpack.targets.{name}":
                    raise
            TARGETS.loaded_modules.add(f"sovpack.targets.{name}")


__all__ = ["ARTIFACT_FILE", "TARGETS", "Target", "TargetRef", "WrittenArtifact", "load_targets"]
