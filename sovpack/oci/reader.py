"""Reading an OCI image layout on disk defensively: every blob is checked before its bytes are used.

:class:`Layout` is the local :class:`~sovpack.oci.blobs.BlobSource` that ``verify``/``inspect``/``extract``
read a bundle directory through (``sovpack.transport.RegistryLayout`` is the registry one);
:func:`select_index` picks the tagged bundle index out of its ``index.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sovpack._io import hashing_copy, open_regular, read_capped, read_json_file
from sovpack.errors import UsageError, VerificationError
from sovpack.oci.blobs import BlobSource, VerifiedReads
from sovpack.oci.descriptor import Descriptor, blob_path
from sovpack.oci.media import (
    ANN_REF_NAME,
    ANN_TARGET,
    BLOBS_DIR,
    DIGEST_RE,
    INDEX_FILE,
    LAYOUT_VERSION,
    MAX_JSON_DOCUMENT,
    MT_INDEX,
    OCI_LAYOUT_FILE,
)
from sovpack.oci.tags import bundle_tag_of


class Layout(VerifiedReads):
    """An OCI image layout on disk, read defensively: every blob is checked before its bytes are used."""

    def __init__(self, root: str | Path) -> None:
        super().__init__()
        self.root = Path(root)
        if not self.root.is_dir():
            raise VerificationError(f"{self.root}: no such bundle directory")
        layout = self._read_top_json(OCI_LAYOUT_FILE)
        if not isinstance(layout, dict) or layout.get("imageLayoutVersion") != LAYOUT_VERSION:
            raise VerificationError(f"{self.root / OCI_LAYOUT_FILE}: not an OCI image layout {LAYOUT_VERSION}")
        index = self._read_top_json(INDEX_FILE)
        if not isinstance(index, dict) or index.get("schemaVersion") != 2:
            raise VerificationError(f"{self.root / INDEX_FILE}: not an OCI image index (schemaVersion 2)")
        if index.get("mediaType", MT_INDEX) != MT_INDEX:
            raise VerificationError(f"{self.root / INDEX_FILE}: mediaType is not {MT_INDEX}")
        if not isinstance(index.get("manifests"), list):
            raise VerificationError(f"{self.root / INDEX_FILE}: no 'manifests' list")
        self.index: dict[str, Any] = index
        self.requested_tag: str | None = None  # a layout's tag comes from --tag
        self.blob_dir = self.root / BLOBS_DIR / "sha256"
        for directory in (self.root / BLOBS_DIR, self.blob_dir):
            if directory.is_symlink() or not directory.is_dir():
                raise VerificationError(f"{directory}: missing or a symbolic link")

    def _read_top_json(self, name: str) -> Any:
        path = self.root / name
        if path.is_symlink() or not path.is_file():
            raise VerificationError(f"{path}: missing (or a symbolic link)")
        return read_json_file(path, MAX_JSON_DOCUMENT, error=VerificationError)

    def blob_path(self, digest: str) -> Path:
        return blob_path(self.root, digest)

    def blob_problem(self, digest: str) -> str | None:
        """None if the blob file exists, is regular and hashes to its name; else what is wrong (cached)."""
        if digest in self._checked:
            return self._checked[digest]
        path = self.blob_path(digest)
        problem: str | None = None
        if path.is_symlink():
            problem = f"blob {digest} is a symbolic link; refused"
        elif not path.is_file():
            problem = f"blob {digest} is missing"
        else:
            with open_regular(path, error=VerificationError) as fh:
                actual, size = hashing_copy(fh, None)
            self.bytes_checked += size
            if actual != digest:
                problem = f"blob {digest} is corrupt: its content hashes to {actual}"
        self._checked[digest] = problem
        return problem

    def check(self, desc: Descriptor, where: str) -> None:
        """The blob a descriptor names exists, is intact, and has the declared size."""
        problem = self.blob_problem(desc.digest)
        if problem is not None:
            raise VerificationError(f"{where}: {problem}")
        size = self.blob_path(desc.digest).stat().st_size
        if size != desc.size:
            raise VerificationError(f"{where}: blob {desc.digest} has {size} bytes, the descriptor says {desc.size}")

    def read(self, desc: Descriptor, where: str, limit: int = MAX_JSON_DOCUMENT) -> bytes:
        """A small blob's verified bytes."""
        return self._read_limited(desc, where, limit)

    def _raw(self, desc: Descriptor, where: str, limit: int) -> bytes:
        path = self.blob_path(desc.digest)
        if path.is_symlink() or not path.is_file():
            raise VerificationError(f"{where}: blob {desc.digest} is missing (or a symbolic link)")
        # NOTE: capped so a blob file larger than its (small) descriptor says is refused, not slurped.
        return read_capped(path, limit)

    def stored_size(self) -> int:
        """Bytes under blobs/ (every blob file once)."""
        return sum(p.stat().st_size for p in self.blob_dir.iterdir() if p.is_file())

    def stray_blob_problems(self) -> list[str]:
        """Problems with blob files nothing referenced (checked too: a flipped byte anywhere fails)."""
        problems = []
        for path in sorted(self.blob_dir.iterdir()):
            digest = f"sha256:{path.name}"
            if digest in self._checked:
                continue
            if not DIGEST_RE.match(digest):
                problems.append(f"{path}: not a sha256 blob name")
                continue
            problem = self.blob_problem(digest)
            if problem is not None:
                problems.append(f"{BLOBS_DIR}/sha256/{path.name} (unreferenced): {problem}")
        return problems


def _entries(layout: BlobSource) -> list[Descriptor]:
    return [Descriptor.from_dict(d, f"{INDEX_FILE} manifests[{i}]") for i, d in enumerate(layout.index["manifests"])]


def named_target(layout: BlobSource, tag: str | None) -> tuple[str, str] | None:
    """(target, manifest digest) when ``tag`` is a per-target tag of the layout (sovpack.oci.tags), else None."""
    if tag is None:
        return None
    for entry in _entries(layout):
        target = entry.annotations.get(ANN_TARGET)
        if (entry.annotations.get(ANN_REF_NAME) == tag and entry.media_type != MT_INDEX and target is not None
                and bundle_tag_of(tag, target) is not None):
            return target, entry.digest
    return None


def select_index(layout: BlobSource, tag: str | None) -> tuple[Descriptor, str | None]:
    """The bundle index the top-level index names by ``tag`` (or its only bundle), and the tag it carries.

    ``layout`` is any BlobSource (a layout directory, or a registry tag seen as a one-entry index). ``tag`` names
    a bundle; a per-target tag is resolved to its bundle's by the caller (``sovpack.verify.view.read_bundle``).
    """
    entries = _entries(layout)
    if tag is not None:
        matching = [e for e in entries if e.annotations.get(ANN_REF_NAME) == tag]
        if not matching:
            tags = ", ".join(sorted(e.annotations.get(ANN_REF_NAME, "?") for e in entries)) or "none"
            raise VerificationError(f"{layout.root / INDEX_FILE}: no entry tagged {tag!r} (tags: {tags})")
        entry = matching[0]
    else:
        bundles = [e for e in entries if e.media_type == MT_INDEX] if len(entries) > 1 else entries
        if len(bundles) == 1:
            entry = bundles[0]
        elif not entries:
            raise VerificationError(f"{layout.root / INDEX_FILE}: the layout holds no bundle")
        else:
            tags = ", ".join(sorted(e.annotations.get(ANN_REF_NAME, "?") for e in bundles or entries))
            raise UsageError(f"{layout.root}: the layout holds several bundles ({tags}); choose one with --tag")
    if entry.media_type != MT_INDEX:
        raise VerificationError(
            f"{layout.root / INDEX_FILE}: entry {entry.digest} is {entry.media_type}, not a bundle index"
        )
    return entry, entry.annotations.get(ANN_REF_NAME)


__all__ = ["Layout", "named_target", "select_index"]
