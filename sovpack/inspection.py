"""``sovpack inspect``: describe a checkpoint directory or an artifact directory as one JSON-able dict."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sovpack._io import check_relative_path, parse_json
from sovpack.artifact import ARTIFACT_FILE, MAX_METADATA_BYTES, ArtifactMetadata, is_artifact_dir
from sovpack.attest.dsse import VerifyingKey
from sovpack.errors import SourceError, SovpackError
from sovpack.parity.report import PARITY_FILE, ParityReport
from sovpack.source.model import open_model
from sovpack.source.spec import ModelSpec

if TYPE_CHECKING:
    from sovpack.oci.blobs import BlobSource

DECODER = "decoder"
ENCODER = "embedding encoder"


def model_kind(spec: ModelSpec) -> str:
    """What a spec describes for a user: a text-generating decoder or an embedding encoder."""
    return DECODER if spec.encoder is None else ENCODER



def encoder_facts(spec: ModelSpec) -> dict[str, Any] | None:
    """An encoder's embedding pipeline as inspect and run report it; None for a decoder."""
    if spec.encoder is None:
        return None
    pooling = spec.encoder.pooling
    return {
        "pooling": pooling.mode,
        "normalize": pooling.normalize,
        "max_seq_length": pooling.max_seq_length,
        "max_input_tokens": spec.max_input_tokens(),
        "dimension": spec.hidden_size,
    }


def inspect_path(path: str | Path, *, keys: Sequence[VerifyingKey] = ()) -> dict[str, Any]:
    """What a path holds: ``kind`` is "checkpoint", "artifact" or "bundle" (its release checked with ``keys``)."""
    from sovpack.oci.store import is_bundle_dir

    root = Path(path)
    if is_bundle_dir(root):
        return inspect_bundle_models(root, keys=keys)
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
        "model": model_kind(model.spec),
        "architecture": model.spec.architecture,
        "parameters": model.spec.parameter_count(),
        "dtypes": ckpt.stored_dtypes(),
        "shards": sorted(ckpt.shards),
        "tokenizer": "tokenizer.json" if ckpt.tokenizer_json else None,
        "chat_template": ckpt.chat_template is not None,
        "spec": model.spec.to_dict(),
        "encoder": encoder_facts(model.spec),
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
        "model": model_kind(metadata.spec),
        "encoder": encoder_facts(metadata.spec),
        "files": files,
        "size": sum(f["size"] for f in files),
        "parity": parity,
        "format_metadata": dict(metadata.format_metadata),
        "source_files": [f.to_dict() for f in metadata.source],
    }


def inspect_bundle_models(source: str | Path | BlobSource, *, keys: Sequence[VerifyingKey] = ()) -> dict[str, Any]:
    """``inspect_bundle`` plus each target's model: family, kind and, for an encoder, its embedding pipeline.

    Read from each target's ``sovpack-artifact.json`` layer (digest-checked against its manifest; signed only as
    far as ``verify`` says the manifest is). A layer that cannot be read is one more problem listed.
    """
    from sovpack.verify import inspect_bundle
    from sovpack.verify.view import read_bundle

    info = inspect_bundle(source, keys=keys)
    view = read_bundle(source, deep=False, strict_tag=False)
    by_name = {t["name"]: t for t in info.get("targets", [])}
    for target in view.targets:
        layer = target.files.get(ARTIFACT_FILE)
        shown = by_name.get(target.name)
        if layer is None or shown is None:
            continue
        where = f"target {target.name} {ARTIFACT_FILE}"
        try:
            data = view.layout.read(layer, where, limit=MAX_METADATA_BYTES)
            meta = ArtifactMetadata.from_dict(parse_json(data, where, error=SourceError), where)
        except SovpackError as e:  # NOTE: e.g. written by another sovpack version: listed, inspect goes on
            info.setdefault("problems", []).append(str(e))
            continue
        shown["family"] = meta.spec.family
        shown["model"] = model_kind(meta.spec)
        shown["encoder"] = encoder_facts(meta.spec)
    return info
