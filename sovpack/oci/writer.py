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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from sovpack._io import CHUNK, atomic_write_bytes, open_regular, read_capped, sha256_file
from sovpack.errors import SovpackError, UsageError, VerificationError
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


class Readable(Protocol):
    """What blob copies read from: a file, an HTTP body, one member of a tar."""

    def read(self, n: int = -1, /) -> bytes: ...


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
    unreferenced: int = 0  # blobs an oci-archive held that the bundle does not reach: skipped, never written
    referrer_tags: list[str] = field(default_factory=list)
    target_tags: list[str] = field(default_factory=list)  # per-target tags set at a registry


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

    def __init__(self, fh: Readable, *, limit: int | None = None, where: str = "") -> None:
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


def _refuse_symlink(path: Path) -> None:
    """Nothing of a destination layout may be a symbolic link: what is written through it lands elsewhere."""
    if path.is_symlink():
        raise UsageError(f"{path}: a symbolic link inside the destination layout; refused (files written through "
                         "it would land outside the destination)")


class LayoutWriter:
    """Fills an OCI layout directory; ``oci-layout`` and ``index.json`` are written by ``finish`` only.

    It remembers what this run added (blobs landed, directories created) so a failure can say exactly what is
    left (:meth:`abandon`): landed blobs are verified and stay, so running the same copy again continues.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs = LocalBlobs(self.root)
        self.landed = 0  # blobs this run renamed into place
        self.unindexed = False  # this run removed the index.json of the bundle that was there (--force)
        self._created: list[Path] = []  # directories this run made, parents first

    def prepare(self, index_bytes: bytes | None, *, force: bool) -> None:
        """Refuse foreign directories, symbolic links and complete layouts of another bundle (unless forced).

        ``index_bytes``: the index.json this copy will write, if known; an existing identical one may stay.
        """
        root = self.root
        _refuse_symlink(root)
        if root.exists() and not root.is_dir():
            raise UsageError(f"{root}: exists and is not a directory")
        if root.is_dir():
            unknown = sorted(p.name for p in root.iterdir()
                             if p.name not in (BLOBS_DIR, OCI_LAYOUT_FILE, INDEX_FILE) and not p.name.startswith("."))
            if unknown:
                raise UsageError(f"{root}: not empty and not an OCI layout (holds {', '.join(unknown[:3])})")
            for name in (BLOBS_DIR, f"{BLOBS_DIR}/sha256", INDEX_FILE, OCI_LAYOUT_FILE):
                _refuse_symlink(root / name)
            for name in (INDEX_FILE, OCI_LAYOUT_FILE):
                if (root / name).exists() and not (root / name).is_file():
                    raise UsageError(f"{root / name}: not a regular file; refused")
            index = root / INDEX_FILE
            same = index.is_file() and index_bytes is not None and (
                read_capped(index, MAX_JSON_DOCUMENT, error=UsageError) == index_bytes
            )
            if index.exists() and not same and not force:
                raise UsageError(f"{root}: already holds another bundle (pass --force to replace it)")
            if not same:
                # from here until finish() the directory must not look complete
                self.unindexed = index.exists()
                for name in (INDEX_FILE, OCI_LAYOUT_FILE):
                    with contextlib.suppress(FileNotFoundError):  # cleanup: it may not be there
                        (root / name).unlink()
        self._created += reversed([p for p in (root, *root.parents) if not p.exists()])  # parents first
        root.mkdir(parents=True, exist_ok=True)
        for directory in (root / BLOBS_DIR, self.blobs.dir):
            if not directory.is_dir():
                directory.mkdir()
                self._created.append(directory)

    def has(self, desc: Descriptor) -> bool:
        return self.blobs.present(desc, verify=True)

    def _land(self, tmp: Path, desc: Descriptor, digest: str, size: int, where: str) -> None:
        if digest != desc.digest or size != desc.size:
            tmp.unlink(missing_ok=True)
            raise VerificationError(
                f"{where}: blob {desc.digest} arrived as {digest} ({size} bytes, {desc.size} expected); discarded"
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.blobs.path(desc.digest))
        self.landed += 1

    def put_stream(self, desc: Descriptor, stream: Readable, where: str) -> None:
        """Copy a stream in, hashing as it goes; lands only if digest and size match (more bytes are refused)."""
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
        with open_regular(source, error=VerificationError) as fh:
            self.put_stream(desc, fh, where)

    def put_bytes(self, desc: Descriptor, data: bytes, where: str) -> None:
        check_bytes(data, desc, where)
        if not self.blobs.present(desc, verify=False):
            atomic_write_bytes(self.blobs.path(desc.digest), data)
            os.chmod(self.blobs.path(desc.digest), 0o644)
            self.landed += 1

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

    def _partial(self, desc: Descriptor) -> Path:
        return self.blobs.dir / f".{desc.digest.split(':', 1)[1]}{PARTIAL_SUFFIX}"

    def _download(self, desc: Descriptor, pieces: PieceSource, where: str, progress: Callable[[int], None]) -> int:
        partial = self._partial(desc)
        _refuse_symlink(partial)
        hasher = hashlib.sha256()
        offset = 0
        if partial.is_file():
            offset = partial.stat().st_size
            if offset > desc.size:
                partial.unlink()
                offset = 0
            else:
                with open_regular(partial, error=UsageError) as fh:
                    while chunk := fh.read(CHUNK):
                        hasher.update(chunk)
        received = 0
        # O_NOFOLLOW: a link planted after the check above is refused by the kernel, not followed
        fd = os.open(partial, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            with os.fdopen(fd, "ab") as out:
                for piece in pieces(offset):
                    hasher.update(piece)
                    out.write(piece)
                    received += len(piece)
                    progress(offset + received)
        except VerificationError:
            partial.unlink(missing_ok=True)
            raise
        except BaseException:
            with contextlib.suppress(OSError):  # cleanup only: an empty .partial has nothing to continue from
                if partial.stat().st_size == 0:
                    partial.unlink()
            raise
        actual = "sha256:" + hasher.hexdigest()
        size = partial.stat().st_size
        if actual != desc.digest or size != desc.size:
            partial.unlink(missing_ok=True)
            if offset > 0:
                raise _ResumedMismatch()
            raise VerificationError(
                f"{where}: blob {desc.digest} arrived as {actual} ({size} bytes, {desc.size} expected); discarded"
            )
        os.chmod(partial, 0o644)
        os.replace(partial, self.blobs.path(desc.digest))
        self.landed += 1
        return received

    def abandon(self) -> str:
        """After a failure: remove the directories this run made if it landed nothing; say what is left.

        Landed blobs are verified and stay (a re-run skips them), as does a ``.partial`` download (a re-run
        continues it): the returned sentence says so, or that nothing was written.
        """
        ours = self.blobs.dir.is_dir() and not any(  # (a refused symbolic link is not looked through)
            p.is_symlink() for p in (self.root, self.root / BLOBS_DIR, self.blobs.dir))
        partials = [p for p in self.blobs.dir.glob(f".*{PARTIAL_SUFFIX}") if p.is_file() and not p.is_symlink()
                    ] if ours else []
        if self.landed == 0 and not partials and not self.unindexed:
            for directory in reversed(self._created):
                with contextlib.suppress(OSError):  # cleanup only: a directory something else filled stays
                    directory.rmdir()
            return f"nothing was written to {self.root}"
        kept = ["the blobs of the bundle it held (its index.json was removed to replace it)"] if self.unindexed else []
        if self.landed:
            kept.append(f"{self.landed} verified blob{'s' if self.landed != 1 else ''} this run added")
        if partials:
            kept.append(f"{len(partials)} partial download{'s' if len(partials) != 1 else ''}")
        return (f"{self.root} keeps {' and '.join(kept)} but no index.json (it is not a bundle); run the same copy "
                "again to continue from there")

    @contextlib.contextmanager
    def filling(self, *, scratch: bool = False) -> Iterator[LayoutWriter]:
        """Fill the layout; a SovpackError on the way gets :meth:`abandon`'s account of what is left appended.

        ``scratch``: the layout is a staging directory its caller removes, so there is nothing to account for.
        """
        try:
            yield self
        except SovpackError as e:
            note = self.abandon()
            if scratch:
                raise
            try:
                annotated = type(e)(f"{e}; {note}")
            except TypeError:  # an error class with its own constructor keeps its message
                raise e from None
            raise annotated from e
        except BaseException:
            self.abandon()
            raise

    def finish(self, top: Descriptor, tag: str | None, targets: Sequence[Descriptor] = ()) -> None:
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
        atomic_write_bytes(self.root / INDEX_FILE, layout_index_bytes(top, tag, targets))
        for name in (OCI_LAYOUT_FILE, INDEX_FILE):
            os.chmod(self.root / name, 0o644)


__all__ = [
    "PARTIAL_SUFFIX",
    "HashingReader",
    "LayoutWriter",
    "LocalBlobs",
    "PieceSource",
    "Readable",
    "TransferCounts",
    "check_bytes",
    "layout_index_bytes",
    "layout_marker_bytes",
    "read_layout_top",
]
