"""What an output format provides, and the target registry.

A target module writes one runnable artifact directory from a SourceModel (streaming, one tensor at a time)
and opens a parity Runner on such a directory in its own runtime. Orchestration — temp dirs, atomic rename,
parity, metadata — lives in ``sovpack.convert``, so a target module is only its writer and its runner.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from sovpack.errors import UsageError
from sovpack.model import SourceModel
from sovpack.registry import Registry

ARTIFACT_FILE = "sovpack-artifact.json"

# A progress callback: (description, completed, total). Writers call it once per tensor.
Progress = Callable[[str, int, int], None]


def no_progress(_description: str, _completed: int, _total: int) -> None:
    """The default progress callback: silent."""


@dataclass(frozen=True, kw_only=True, slots=True)
class WrittenArtifact:
    """What a writer reports: the files it wrote (relative POSIX paths) and format-specific metadata."""

    files: tuple[str, ...]
    metadata: dict[str, Any] = field(default_factory=dict)


class ArtifactRunner(Protocol):
    """The parity Runner protocol (see sovpack.parity.Runner), plus decoding text for `sovpack run`."""

    name: str

    def prefill_logits(self, ids: Sequence[int]) -> np.ndarray: ...

    def greedy(self, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]: ...

    def tokenize(self, text: str) -> list[int] | None: ...

    def runtime_info(self) -> dict[str, str]: ...


class Target(Protocol):
    """One output format (onnx, gguf, openvino)."""

    name: str
    precisions: tuple[str, ...]
    default_precision: str

    def write(
        self, model: SourceModel, precision: str, out_dir: Path, progress: Progress
    ) -> WrittenArtifact: ...

    def open_runner(self, artifact_dir: Path, metadata: dict[str, Any]) -> ArtifactRunner: ...


class _TargetRegistry(Registry[Target]):
    """The target registry; remembers which target modules were imported (see ``load_targets``)."""

    def __init__(self) -> None:
        super().__init__("target format")
        self.loaded_modules: set[str] = set()


TARGETS = _TargetRegistry()


@dataclass(frozen=True, kw_only=True, slots=True)
class TargetRef:
    """A ``format:precision`` reference such as ``gguf:q8_0``."""

    format: str
    precision: str

    def __str__(self) -> str:
        return f"{self.format}:{self.precision}"

    @classmethod
    def parse(cls, text: str) -> TargetRef:
        fmt, _, precision = text.partition(":")
        target = TARGETS.get(fmt.strip().lower())
        precision = precision.strip().lower() or target.default_precision
        if precision not in target.precisions:
            raise UsageError(
                f"target {target.name!r} has no precision {precision!r}; known: {', '.join(target.precisions)}"
            )
        return cls(format=target.name, precision=precision)

    @property
    def target(self) -> Target:
        return TARGETS.get(self.format)


def read_artifact_metadata(artifact_dir: Path) -> dict[str, Any] | None:
    """The sovpack-artifact.json of a directory, or None if it is not an artifact directory."""
    path = artifact_dir / ARTIFACT_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else None
