"""``inspect`` of a bundle: what it holds, read cheaply and without trusting anything."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sovpack.attest.dsse import VerifyingKey
from sovpack.errors import VerificationError
from sovpack.oci.blobs import BlobSource
from sovpack.parity.report import PARITY_FILE
from sovpack.verify.check import load_report, release_summary
from sovpack.verify.release import check_release
from sovpack.verify.view import read_bundle


def inspect_bundle(
    path: str | Path | BlobSource, *, tag: str | None = None, keys: Sequence[VerifyingKey] = ()
) -> dict[str, Any]:
    """Name, targets (precision, size, manifest digest, parity, signers), read cheaply.

    Manifests and configs are digest-checked as they are read; large layers are not hashed. With ``keys``
    the release statement's signature is checked and the bundle's identity (name, tag, version, licences,
    sequence, targets) is reported from it (``signed``); without, nothing is verified and those facts are
    reported under ``unsigned`` only: use ``verify`` for the whole check.
    """
    view = read_bundle(path, tag=tag, deep=False, strict_tag=False)
    release = check_release(view, keys) if keys else None
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
    signed = release_summary(release.release, release.signer) if release is not None else None
    problems = [*view.problems, *(release.failures if release is not None else ())]
    return {
        "kind": "bundle",
        "path": str(layout.root),
        # Identity comes from the signed release when keys were given; otherwise it is explicitly unsigned.
        "name": signed["name"] if signed else None,
        "tag": signed["tag"] if signed else None,
        "signed": signed,
        "unsigned": {"name": view.name, "tag": view.tag, "annotations": view.annotations},
        "index_digest": view.index_descriptor.digest,
        "targets": targets,
        "size": size,
        "signatures_verified": signed is not None and not problems,
        "problems": problems,
    }


__all__ = ["inspect_bundle"]
