"""``sovpack inspect``: describe a checkpoint directory or an artifact directory as one JSON-able dict."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sovpack._io import check_relative_path
from sovpack.artifact import ARTIFACT_FILE, ArtifactMetadata, is_artifact_dir
from sovpack.attest.dsse import VerifyingKey
from sovpack.errors import SourceError
from sovpack.parity.report import PARITY_FILE, ParityReport
from sovpack.source.model import open_model


def inspect_path(path: str | Path, *, keys: Sequence[VerifyingKey] = ()) -> dict[str, Any]:
    """What a path holds: ``kind`` is "checkpoint", "artifact" or "bundle" (its release checked with ``keys``)."""
    from sovpack.oci.store import is_bundle_dir

    root = Path(path)
    if is_bundle_dir(root):
        from sovpack.verify import inspect_bundle

        return inspect_bundle(root, keys=keys)
    if is_artifact_dir(root):
        return inspect_artifact(root, ArtifactMetadata.load(root))
    return inspect_checkpoint(root)


def inspect_checkpoint(path: Path) -> dict[str, Any]:
    model = open_model(path)
    ckpt = model.checkpoint
    return {
        "kind": "checkpoint",
        "path": str(path),
        "name": model.name,
        "family": model.spec.family,
        "architecture": model.spec.architecture,
        "parameters": model.spec.parameter_count(),
        "dtypes": ckpt.stored_dtypes(),
        "shards": sorted(ckpt.shards),
        "tokenizer": "tokenizer.json" if ckpt.tokenizer_json else None,
        "chat_template": ckpt.chat_template is not None,
        "spec": model.spec.to_dict(),
        "source_files": [f.to_dict() for f in ckpt.source_files],
    }


def inspect_artifact(path: Path, metadata: ArtifactMetadata) -> dict[str, Any]:
    files = []
    where = str(path / ARTIFACT_FILE)
    for name in metadata.files:
        # NOTE: the metadata is unsigned input: a listed path must stay inside the artifact directory and name
        # a regular file there (not ../../etc/passwd, not a link out, not a FIFO).
        file_path = path / check_relative_path(name, where, error=SourceError)
        if file_path.is_symlink() or not file_path.is_file():
            raise SourceError(f"{file_path}: listed in the artifact metadata but missing (or not a regular file)")
        files.append({"path": name, "size": file_path.lstat().st_size})
    parity = None
    if (path / PARITY_FILE).is_file():
        report = ParityReport.load(path / PARITY_FILE)
        parity = {"status": report.status, "reasons": list(report.reasons)}
    return {
        "kind": "artifact",
        "path": str(path),
        "name": metadata.name,
        "target": metadata.target,
        "format": metadata.format,
        "precision": metadata.precision,
        "family": metadata.spec.family,
        "files": files,
        "size": sum(f["size"] for f in files),
        "parity": parity,
        "format_metadata": dict(metadata.format_metadata),
        "source_files": [f.to_dict() for f in metadata.source],
    }
