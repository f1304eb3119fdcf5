"""``sovpack inspect``: describe a checkpoint directory or an artifact directory as one JSON-able dict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sovpack.errors import SourceError
from sovpack.model import open_model
from sovpack.targets.base import read_artifact_metadata


def inspect_path(path: str | Path) -> dict[str, Any]:
    """What a path holds: ``kind`` is "checkpoint", "artifact" or "bundle"."""
    from sovpack.bundle import is_bundle_dir

    root = Path(path)
    if is_bundle_dir(root):
        from sovpack.verify import inspect_bundle

        return inspect_bundle(root)
    metadata = read_artifact_metadata(root) if root.is_dir() else None
    if metadata is not None:
        return inspect_artifact(root, metadata)
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


def inspect_artifact(path: Path, metadata: dict[str, Any]) -> dict[str, Any]:
    files = []
    for name in metadata.get("files", []):
        file_path = path / name
        if not file_path.is_file():
            raise SourceError(f"{file_path}: listed in the artifact metadata but missing")
        files.append({"path": name, "size": file_path.stat().st_size})
    parity_path = path / "parity.json"
    parity = None
    if parity_path.is_file():
        report = json.loads(parity_path.read_text(encoding="utf-8"))
        parity = {"status": report.get("status"), "reasons": report.get("reasons", [])}
    return {
        "kind": "artifact",
        "path": str(path),
        "name": metadata.get("name"),
        "target": metadata.get("target"),
        "format": metadata.get("format"),
        "precision": metadata.get("precision"),
        "family": metadata.get("spec", {}).get("family"),
        "files": files,
        "size": sum(f["size"] for f in files),
        "parity": parity,
        "format_metadata": metadata.get("format_metadata", {}),
        "source_files": metadata.get("source", []),
    }
