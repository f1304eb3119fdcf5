"""Writing an OCI image layout: a blob store that hashes while it writes, manifests, index.json."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sovpack._digests import written_digest
from sovpack._io import hashing_copy
from sovpack.attest.dsse import canonical_json, pretty_json
from sovpack.oci.descriptor import Descriptor, blob_path, sha256_digest
from sovpack.oci.media import (
    ANN_REF_NAME,
    BLOBS_DIR,
    INDEX_FILE,
    LAYOUT_VERSION,
    MT_INDEX,
    MT_MANIFEST,
    OCI_LAYOUT_FILE,
)
from sovpack.oci.tags import target_entries


class BlobStore:
    """Writes blobs into ``ROOT/blobs/sha256``: streamed, hashed while copied, each digest stored once."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.dir = self.root / BLOBS_DIR / "sha256"
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return blob_path(self.root, digest)

    def put_bytes(self, data: bytes) -> tuple[str, int]:
        digest = sha256_digest(data)
        dest = self.path(digest)
        if not dest.exists():
            fd, tmp = tempfile.mkstemp(prefix=".blob.", dir=self.dir)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        return digest, len(data)

    def put_json(self, document: Any, *, pretty: bool = False) -> tuple[str, int]:
        return self.put_bytes(pretty_json(document) if pretty else canonical_json(document))

    def put_file(self, source: Path) -> tuple[str, int]:
        """Copy a file in, hashing while copying; never holds more than one chunk in memory."""
        fd, tmp = tempfile.mkstemp(prefix=".blob.", dir=self.dir)
        os.close(fd)
        try:
            digest, size = hashing_copy(source, Path(tmp))
            dest = self.path(digest)
            if dest.exists():
                os.unlink(tmp)
            else:
                os.chmod(tmp, 0o644)
                os.replace(tmp, dest)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return digest, size

    def move_file(self, source: Path) -> tuple[str, int]:
        """Take a file in by renaming it (never copied) when it lies on the store's file system; otherwise copy
        it in (``put_file``). The source is gone either way once this returns. A file a ``HashingWriter`` wrote
        and nothing changed since is not read again; any other is hashed by one read."""
        digest, size = written_digest(source) or hashing_copy(source, None)
        dest = self.path(digest)
        try:
            if dest.exists():
                os.unlink(source)
            else:
                os.chmod(source, 0o644)
                os.replace(source, dest)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            self.put_file(source)
            os.unlink(source)
        return digest, size

    def add(
        self,
        data: bytes,
        media_type: str,
        *,
        annotations: Mapping[str, str] | None = None,
        artifact_type: str | None = None,
    ) -> Descriptor:
        digest, size = self.put_bytes(data)
        return Descriptor(
            media_type=media_type, digest=digest, size=size, annotations=dict(annotations or {}),
            artifact_type=artifact_type,
        )


def manifest_document(
    *,
    artifact_type: str,
    config: Descriptor,
    layers: Sequence[Descriptor],
    annotations: Mapping[str, str] | None = None,
    subject: Descriptor | None = None,
) -> dict[str, Any]:
    """An OCI 1.1 image manifest used as an artifact manifest."""
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "artifactType": artifact_type,
        "config": config.to_dict(),
        "layers": [layer.to_dict() for layer in layers],
    }
    if subject is not None:
        doc["subject"] = Descriptor(media_type=subject.media_type, digest=subject.digest, size=subject.size).to_dict()
    if annotations:
        doc["annotations"] = dict(annotations)
    return doc


def layout_index_bytes(top: Descriptor, tag: str | None, targets: Sequence[Descriptor] = ()) -> bytes:
    """index.json naming one bundle index by tag, then each target by its per-target tag (sovpack.oci.tags);
    the same canonical bytes whichever command writes the layout."""
    entry = Descriptor(media_type=top.media_type, digest=top.digest, size=top.size,
                       annotations={ANN_REF_NAME: tag} if tag else {})
    manifests = [entry.to_dict(), *(t.to_dict() for t in targets)]
    return canonical_json({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": manifests})


def layout_marker_bytes() -> bytes:
    """The ``oci-layout`` file."""
    return canonical_json({"imageLayoutVersion": LAYOUT_VERSION})


def write_layout(root: Path, store: BlobStore, bundle_index: Descriptor, tag: str) -> None:
    """Write oci-layout and the top-level index.json naming the bundle index by tag (and each target by its own)."""
    document = json.loads(store.path(bundle_index.digest).read_bytes())
    (root / OCI_LAYOUT_FILE).write_bytes(layout_marker_bytes())
    (root / INDEX_FILE).write_bytes(layout_index_bytes(bundle_index, tag, target_entries(document, tag)))


def is_bundle_dir(path: Path) -> bool:
    """An OCI image layout directory (what ``sovpack build`` writes)."""
    return path.is_dir() and (path / OCI_LAYOUT_FILE).is_file() and (path / INDEX_FILE).is_file()
