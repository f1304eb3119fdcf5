"""CNCF ModelPack: how a target's files become layers and what its model config says."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from sovpack._io import check_relative_path
from sovpack._protocols import Precision
from sovpack.artifact import ARTIFACT_FILE
from sovpack.bundle.config import BundleMetadata
from sovpack.errors import SourceError
from sovpack.oci.descriptor import Descriptor
from sovpack.oci.media import MT_DOC, MT_WEIGHT, MT_WEIGHT_CONFIG
from sovpack.parity.report import PARITY_FILE


def layer_media_type(path: str) -> str:
    """ModelPack layer type for a target file (see the module docstring for the rule)."""
    name = PurePosixPath(path).name
    if name in (PARITY_FILE, ARTIFACT_FILE):  # reports and packager metadata: documentation, not weights config
        return MT_DOC
    lowered = name.lower()
    if lowered.endswith((".json", ".jinja", ".txt", ".yaml", ".yml")) or "tokenizer" in lowered:
        return MT_WEIGHT_CONFIG
    return MT_WEIGHT


def list_artifact_files(artifact_dir: Path) -> list[str]:
    """Every regular file below an artifact directory (relative POSIX paths, sorted); links are refused."""
    files: list[str] = []
    for entry in sorted(artifact_dir.rglob("*")):
        rel = entry.relative_to(artifact_dir).as_posix()
        if entry.is_symlink():
            raise SourceError(f"{entry}: artifact contains a symbolic link; refused")
        if entry.is_dir():
            continue
        if not entry.is_file():
            raise SourceError(f"{entry}: not a regular file")
        files.append(check_relative_path(rel, str(artifact_dir)))
    return sorted(files)


# ModelPack's precision table (model-spec docs/config.md) has no 4-bit type: 4-bit codes are stored packed two
# to a byte, so their stored element type is reported (uint8) and ``quantization`` names the scheme.
MODELPACK_PRECISION = {"int4": "uint8"}


def modelpack_precision(precision: Precision) -> tuple[str, str | None]:
    """(ModelPack ``precision``, ``quantization``) of a target precision, from the target's own table."""
    weights = MODELPACK_PRECISION.get(precision.weights, precision.weights)
    return weights, precision.name if precision.quantized else None


def param_size(count: int) -> str:
    """ModelPack paramSize: a count with at most one decimal and a scale letter, e.g. 151.5K or 8B."""
    for letter, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if count >= scale:
            value = f"{count / scale:.1f}".removesuffix(".0")
            return f"{value}{letter}"
    value = f"{max(count / 1000, 0.1):.1f}".removesuffix(".0")
    return f"{value}K"


def modelpack_config(
    *,
    name: str,
    family: str,
    fmt: str,
    precision: Precision,
    parameters: int,
    layers: Sequence[Descriptor],
    metadata: BundleMetadata,
    created: str | None,
) -> dict[str, Any]:
    """The ``application/vnd.cncf.model.config.v1+json`` document of one target (ModelPack config schema)."""
    descriptor: dict[str, Any] = {"name": name, "family": family}
    optional = {
        "version": metadata.version,
        "vendor": metadata.vendor,
        "title": metadata.title,
        "description": metadata.description,
        "docURL": metadata.doc_url,
        "sourceURL": metadata.source_url,
        "revision": metadata.revision,
        "createdAt": created,
    }
    descriptor.update({k: v for k, v in optional.items() if v})
    if metadata.licenses:
        descriptor["licenses"] = list(metadata.licenses)
    if metadata.authors:
        descriptor["authors"] = list(metadata.authors)
    mp_precision, quantization = modelpack_precision(precision)
    config: dict[str, Any] = {
        "architecture": "transformer",
        "format": fmt,
        "paramSize": param_size(parameters),
        "precision": mp_precision,
        "capabilities": {"inputTypes": ["text"], "outputTypes": ["text"]},
    }
    if quantization:
        config["quantization"] = quantization
    return {
        "descriptor": descriptor,
        "config": config,
        "modelfs": {"type": "layers", "diffIds": [layer.digest for layer in layers]},
    }




FILE_MODE = 0o644
TAR_REGULAR_FILE = ord("0")


def file_metadata(rel: str, size: int, mtime: str | None) -> str:
    """The ModelPack file-metadata annotation of one layer: fixed mode, owner and time, so builds stay identical.

    ``mtime`` is the build's SOURCE_DATE_EPOCH time when pinned, else the Unix epoch (never the wall clock).
    """
    document = {
        "name": PurePosixPath(rel).name,
        "mode": FILE_MODE,
        "uid": 0,
        "gid": 0,
        "size": size,
        "mtime": mtime or "1970-01-01T00:00:00Z",
        "typeflag": TAR_REGULAR_FILE,
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":"))
