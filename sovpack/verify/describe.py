"""``inspect`` of a bundle: what it holds, read cheaply and without trusting anything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sovpack.errors import VerificationError
from sovpack.oci.blobs import BlobSource
from sovpack.parity.report import PARITY_FILE
from sovpack.verify.check import load_report
from sovpack.verify.view import read_bundle


def inspect_bundle(path: str | Path | BlobSource, *, tag: str | None = None) -> dict[str, Any]:
    """Name, targets (precision, size, manifest digest, parity, signers), without checking signatures.

    Manifests and configs are digest-checked as they are read; large layers are not hashed and signatures
    are not verified (``signers`` are the key ids the signatures claim): use ``verify`` for that.
    """
    view = read_bundle(path, tag=tag, deep=False, strict_tag=False)
    claimed: dict[str, set[str]] = {t.descriptor.digest: set() for t in view.targets}
    for att in view.attestations:
        if att.subject in claimed and att.bundle.public_key_hint:
            claimed[att.subject].add(att.bundle.public_key_hint)
    targets = []
    for target in view.targets:
        parity: dict[str, Any] | None = None
        layer = target.files.get(PARITY_FILE)
        if layer is not None:
            try:
                report = load_report(view, layer, f"target {target.name} {PARITY_FILE}")
                parity = {
                    "status": report.status,
                    "reasons": list(report.reasons),
                    "runtime": dict(report.runtime.get("target", {})).get("runtime"),
                }
            except VerificationError as e:
                view.problems.append(str(e))
        targets.append(
            {
                "name": target.name,
                "format": target.format,
                "precision": target.precision,
                "manifest_digest": target.descriptor.digest,
                "size": target.size,
                "files": [{"path": p, "size": d.size, "digest": d.digest} for p, d in sorted(target.files.items())],
                "parity": parity,
                "signers": sorted(claimed[target.descriptor.digest]),
                "config": dict(target.config.get("config", {})),
            }
        )
    layout = view.layout
    size = layout.stored_size()
    return {
        "kind": "bundle",
        "path": str(layout.root),
        "name": view.name,
        "tag": view.tag,
        "index_digest": view.index_descriptor.digest,
        "annotations": view.annotations,
        "targets": targets,
        "size": size,
        "signatures_verified": False,
        "problems": list(view.problems),
    }


__all__ = ["inspect_bundle"]
