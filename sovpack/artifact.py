"""``sovpack-artifact.json``: what an artifact directory holds, what it was made from, how to run it.

Written by ``convert`` into every artifact directory and read back by ``run``, ``inspect``, ``parity`` and
the target runners; validated against ``schemas/artifact.schema.json`` on write and on read, so a runner
never sees an unvalidated dict.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sovpack._io import atomic_write_bytes, check_relative_path, read_json_file
from sovpack._protocols import RunnerTraits
from sovpack.errors import SourceError
from sovpack.source.checkpoint import SourceFile
from sovpack.source.spec import ModelSpec

ARTIFACT_FILE = "sovpack-artifact.json"
SCHEMA_VERSION = 1
MAX_METADATA_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, kw_only=True, slots=True)
class ArtifactMetadata:
    """The typed content of ``sovpack-artifact.json``."""

    schema_version: int = SCHEMA_VERSION
    sovpack_version: str
    target: str  # format:precision
    format: str
    precision: str
    name: str
    files: tuple[str, ...]
    spec: ModelSpec
    source: tuple[SourceFile, ...]
    format_metadata: Mapping[str, Any] = field(default_factory=dict)
    traits: RunnerTraits = field(default_factory=RunnerTraits)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "schema_version": self.schema_version,
            "sovpack_version": self.sovpack_version,
            "target": self.target,
            "format": self.format,
            "precision": self.precision,
            "name": self.name,
            "files": sorted(self.files),
            "spec": self.spec.to_dict(),
            "source": [f.to_dict() for f in self.source],
            "format_metadata": dict(self.format_metadata),
        }
        if self.traits.parity_limits:
            data["parity_limits"] = dict(sorted(self.traits.parity_limits.items()))
        if self.traits.known_tokenizer_divergences:
            data["known_tokenizer_divergences"] = list(self.traits.known_tokenizer_divergences)
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str) -> ArtifactMetadata:
        """Validate against the schema, then build; errors name ``where``."""
        from jsonschema import ValidationError

        from sovpack._schemas import validate

        try:
            validate(data, "artifact")
        except ValidationError as e:
            path = "/".join(str(p) for p in e.absolute_path)
            raise SourceError(f"{where}: invalid artifact metadata at '{path or '/'}': {e.message}") from None
        for name in data["files"]:
            check_relative_path(name, where, error=SourceError)
        try:
            spec = ModelSpec.from_dict(data["spec"])
        except (TypeError, ValueError) as e:
            raise SourceError(f"{where}: invalid model spec: {e}") from None
        return cls(
            schema_version=int(data["schema_version"]),
            sovpack_version=str(data["sovpack_version"]),
            target=str(data["target"]),
            format=str(data["format"]),
            precision=str(data["precision"]),
            name=str(data["name"]),
            files=tuple(str(f) for f in data["files"]),
            spec=spec,
            source=tuple(SourceFile(path=f["path"], size=int(f["size"]), sha256=f["sha256"]) for f in data["source"]),
            format_metadata=dict(data["format_metadata"]),
            traits=RunnerTraits(
                parity_limits={str(k): float(v) for k, v in (data.get("parity_limits") or {}).items()},
                known_tokenizer_divergences=tuple(str(t) for t in data.get("known_tokenizer_divergences") or ()),
            ),
        )

    def save(self, directory: Path) -> None:
        data = self.to_dict()
        from sovpack._schemas import validate

        validate(data, "artifact")
        text = json.dumps(data, indent=2, sort_keys=True) + "\n"
        atomic_write_bytes(directory / ARTIFACT_FILE, text.encode("utf-8"))

    @classmethod
    def load(cls, directory: Path) -> ArtifactMetadata:
        path = directory / ARTIFACT_FILE
        return cls.from_dict(read_json_file(path, MAX_METADATA_BYTES, error=SourceError), str(path))


def is_artifact_dir(path: Path) -> bool:
    """A directory ``sovpack convert`` wrote (it has ``sovpack-artifact.json``)."""
    return path.is_dir() and (path / ARTIFACT_FILE).is_file()
