"""Filling an OCI image layout directory safely: blobs land verified, ``index.json`` is written last.

Every blob is written to a temporary name in the blob store, hashed as it arrives, compared with its
descriptor (digest and size) and only then renamed to its digest; ``oci-layout`` and ``index.json`` are
written by :meth:`LayoutWriter.finish` alone, so an interrupted fill never looks like a complete bundle, and a
re-run keeps the blobs already there (re-hashed) and continues a ``.partial`` download where it stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from sovpack._io import CHUNK, atomic_write_bytes, read_capped, sha256_file
from sovpack.errors import UsageError, VerificationError
from sovpack.oci.descriptor import Descriptor, blob_path, sha256_digest
from sovpack.oci.media import (
    BLOBS_DIR,
    INDEX_FILE,
    MAX_JSON_DOCUMENT,
    OCI_LAYOUT_FILE,
)
from sovpack.oci.reader import Layout, select_index
from sovpack.oci.store import layout_index_bytes, layout_marker_bytes

PARTIAL_SUFFIX = ".partial"
TEMP_PREFIX = ".blob."

# start offset -> the blob's bytes from there, in pieces (e.g. a registry download resumed with Range)
PieceSource = Callable[[int], Iterable[bytes]]


@dataclass(kw_only=True)
class TransferCounts:
    """What a copy moved, counted as it goes."""

    # NOTE: mutable on purpose: the copy loops add to it; CopyResult is the frozen record made from it.
    blobs: int = 0
    transferred: int = 0
    skipped: int = 0
    mounted: int = 0
    bytes: int = 0
    manifests: int = 0
    referrer_tags: list[str] = field(default_factory=list)


def check_bytes(data: bytes, desc: Descriptor, where: str) -> None:
    """``data`` is exactly the blob ``desc`` names (digest and size), else VerificationError."""
    actual = sha256_digest(data)
    if actual != desc.digest:
        raise VerificationError(f"{where}: blob {desc.digest} hashes to {actual}; refused")
    if len(data) != desc.size:
        raise VerificationError(f"{where}: blob {desc.digest} has {len(data)} bytes, the descriptor says {desc.size}")


class HashingReader:
    """A stream that hashes and counts what is read through it; past ``limit`` bytes it refuses.

    The one streaming hasher for readers that hand the stream on (tarfile, ``shutil.copyfileobj``).
    """

    def __init__(self, fh: IO[bytes], *, limit: int | None = None, where: str = "") -> None:
        self._fh = fh
        self._limit = limit
        self._where = where
        self._hasher = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n)
        self.size += len(data)
        if self._limit is not None and self.size > self._limit:
            raise VerificationError(f"{self._where} is longer than {self._limit} bytes")
        self._hasher.update(data)
        return data

    @property
    def digest(self) -> str:
        return "sha256:" + self._hasher.hexdigest()


def read_layout_top(root: Path, tag: str | None = None) -> tuple[Descriptor, str | None]:
    """The tagged bundle index of a complete layout (the same selection rules as ``verify``)."""
    return select_index(Layout(root), tag)


class LocalBlobs:
    """``ROOT/blobs/sha256``: verified reads of what is already on disk (the layout need not be complete)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.dir = self.root / BLOBS_DIR / "sha256"

    def path(self, digest: str) -> Path:
        return blob_path(self.root, digest)

    def file(self, digest: str, where: str) -> Path:
        """The blob's file, which must exist and be a regular file (a symbolic link is refused)."""
        path = self.path(digest)
        if path.is_symlink() or not path.is_file():
            raise VerificationError(f"{where}: blob {digest} is missing (or a symbolic link)")
        return path

    def read_manifest(self, desc: Descriptor) -> bytes:
        if desc.size > MAX_JSON_DOCUMENT:
            raise VerificationError(f"{self.root}: manifest {desc.digest} declares {desc.size} bytes; refused")
        data = read_capped(self.file(desc.digest, str(self.root)), MAX_JSON_DOCUMENT)
        check_bytes(data, desc, str(self.root))
        return data

    def present(self, desc: Descriptor, *, verify: bool) -> bool:
        """The blob is there with the right size (and, with ``verify``, the right hash); a bad one is removed."""
        path = self.path(desc.digest)
        if path.is_symlink():
            raise VerificationError(f"{path}: a symbolic link in the blob store; refused")
        if not path.is_file():
            return False
        good = path.stat().st_size == desc.size
        if good and verify:
            good = sha256_file(path) == desc.digest
        if not good:
            path.unlink()
        return good


class _ResumedMismatch(Exception):
    """A download continued from a kept .partial did not verify (retried once from zero)."""


class LayoutWriter:
    """Fills an OCI layout directory; ``oci-layout`` and ``index.json`` are written by ``finish`` only."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs = LocalBlobs(self.root)

    def prepare(self, index_bytes: bytes | None, *, force: bool) -> None:
        """Refuse foreign directories and complete layouts of another bundle (unless forced).

        ``index_bytes``: the index.json this copy will write, if known; an existing identical one may stay.
        """
        root = self.root
        if root.exists() and not root.is_dir():
            raise UsageError(f"{root}: exists and is not a directory")
        if root.is_dir():
            unknown = sorted(p.name for p in root.iterdir()
                             if p.name not in (BLOBS_DIR, OCI_LAYOUT_FILE, INDEX_FILE) and not p.name.startswith("."))
            if unknown:
                raise UsageError(f"{root}: not empty and not an OCI layout (holds {', '.join(unknown[:3])})")
            index = root / INDEX_FILE
            same = index.is_file() and index_bytes is not None and index.read_bytes() == index_bytes
            if index.is_file() and not same and not force:
                raise UsageError(f"{root}: already holds another bundle (pass --force to replace it)")
            if not same:
                # from here until finish() the directory must not look complete
                for name in (INDEX_FILE, OCI_LAYOUT_FILE):
                    with contextlib.suppress(FileNotFoundError):  # cleanup: it may not be there
                        (root / name).unlink()
        self.blobs.dir.mkdir(parents=True, exist_ok=True)

    def has(self, desc: Descriptor) -> bool:
        return self.blobs.present(desc, verify=True)

    def _land(self, tmp: Path, desc: Descriptor, digest: str, size: int, where: str) -> None:
        if digest != desc.digest or size != desc.size:
            tmp.unlink(missing_ok=True)
            raise VerificationError(
                f"{where}: blob {desc.digest} arrived as {digest} ({size} bytes, {desc.size} expected); "
                "nothing was written"
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.blobs.path(desc.digest))

    def put_stream(self, desc: Descriptor, stream: IO[bytes], where: str) -> None:
        """Copy a stream in, hashing as it goes; lands only if digest and size match."""
        fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=self.blobs.dir)
        tmp = Path(name)
        reader = HashingReader(stream, limit=desc.size, where=f"{where}: blob {desc.digest}")
        try:
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(reader, out, CHUNK)
            self._land(tmp, desc, reader.digest, reader.size, where)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def put_file(self, desc: Descriptor, source: Path, where: str) -> None:
        with open(source, "rb") as fh:
            self.put_stream(desc, fh, where)

    def put_bytes(self, desc: Descriptor, data: bytes, where: str) -> None:
        check_bytes(data, desc, where)
        if not self.blobs.present(desc, verify=False):
            atomic_write_bytes(self.blobs.path(desc.digest), data)
            os.chmod(self.blobs.path(desc.digest), 0o644)

    def download(self, desc: Descriptor, pieces: PieceSource, where: str, progress: Callable[[int], None]) -> int:
        """Pull one blob into ``.<hex>.partial`` (continuing one a killed run left), verify, rename.

        ``pieces(start)`` yields the blob's bytes from ``start``; ``where`` names the source in errors.
        Returns the bytes transferred. A continued download that does not verify is retried once from zero
        (the kept prefix may be what was bad); a fresh one that does not verify raises.
        """
        try:
            return self._download(desc, pieces, where, progress)
        except _ResumedMismatch:
            return self._download(desc, pieces, where, progress)

    def _download(self, desc: Descriptor, pieces: PieceSource, where: str, progress: Callable[[int], None]) -> int:
        partial = self.blobs.dir / f".{desc.digest.split(':', 1)[1]}{PARTIAL_SUFFIX}"
        hasher = hashlib.sha256()
        offset = 0
        if partial.is_file() and not partial.is_symlink():
            offset = partial.stat().st_size
            if offset > desc.size:
                partial.unlink()
                offset = 0
            else:
                with open(partial, "rb") as fh:
                    while chunk := fh.read(CHUNK):
                        hasher.update(chunk)
        received = 0
        try:
            with open(partial, "ab") as out:
                for piece in pieces(offset):
                    hasher.update(piece)
                    out.write(piece)
                    received += len(piece)
                    progress(offset + received)
        except VerificationError:
            partial.unlink(missing_ok=True)
            raise
        actual = "sha256:" + hasher.hexdigest()
        size = partial.stat().st_size
        if actual != desc.digest or size != desc.size:
            partial.unlink(missing_ok=True)
            if offset > 0:
                raise _ResumedMismatch()
            raise VerificationError(
                f"{where}: blob {desc.digest} arrived as {actual} ({size} bytes, {desc.size} expected); "
                "discarded, nothing landed"
            )
        os.chmod(partial, 0o644)
        os.replace(partial, self.blobs.path(desc.digest))
        return received

    def finish(self, top: Descriptor, tag: str | None) -> None:
        """Write ``oci-layout`` and then ``index.json``: only now does the directory look complete.

        Temporary files an interrupted earlier run left in the blob store go first (``verify`` would refuse
        them as stray names).
        """
        for leftover in self.blobs.dir.iterdir():
            if leftover.name.startswith(".") and leftover.is_file() and (
                leftover.name.startswith(TEMP_PREFIX) or leftover.name.endswith(PARTIAL_SUFFIX)
            ):
                leftover.unlink()
        atomic_write_bytes(self.root / OCI_LAYOUT_FILE, layout_marker_bytes())
        atomic_write_bytes(self.root / INDEX_FILE, layout_index_bytes(top, tag))
        for name in (OCI_LAYOUT_FILE, INDEX_FILE):
            os.chmod(self.root / name, 0o644)


__all__ = [
    "PARTIAL_SUFFIX",
    "HashingReader",
    "LayoutWriter",
    "LocalBlobs",
    "PieceSource",
    "TransferCounts",
    "check_bytes",
    "layout_index_bytes",
    "layout_marker_bytes",
    "read_layout_top",
]
