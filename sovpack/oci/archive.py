"""``oci-archive``: an OCI image layout as one deterministic tar, for carrying a bundle into an air-gapped site.

Writing: sorted entries, fixed mtime (``SOURCE_DATE_EPOCH``, else 0), uid/gid 0, fixed modes, PAX format, so
the same bundle always gives the same bytes; only what the tagged bundle reaches goes in.

Reading treats the tar as hostile and learns the bundle before it writes a byte: (1) one pass over the headers
with a tar parser of our own (linear, strict, bounded; not ``tarfile``, whose PAX parsing backtracks and reads
header records whole): only ``oci-layout``, ``index.json``, the ``blobs`` directories and ``blobs/sha256/<hex>``
regular files; links, devices, FIFOs, sparse files, absolute or ``..`` names and duplicates are refused, at most
``MAX_MEMBERS`` headers; small members are kept (bounded) so the walk needs no second pass; (2) the bundle graph
is walked from ``index.json`` (:func:`sovpack.oci.blobs.collect`), every member it reaches must have exactly its
descriptor's size; (3) only the reachable blobs are written, each hashed against its digest, ``index.json`` last.

So the bytes written are at most the sizes the reachable descriptors declare. Members nothing references are
skipped, never written, and counted (``TransferCounts.unreferenced``): they cannot be part of the signed bundle.
A compressed archive (gzip, bzip2, xz) inflates within a cap (``INFLATE_RATIO`` times its size, at least
``INFLATE_FLOOR``): a decompression bomb is refused after at most that many bytes, none of them written.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import re
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from sovpack._io import CHUNK, check_relative_path, open_regular, parse_json, source_date_epoch
from sovpack.errors import UsageError, VerificationError
from sovpack.oci.blobs import collect
from sovpack.oci.descriptor import Descriptor
from sovpack.oci.media import (
    ANN_REF_NAME,
    BLOBS_DIR,
    INDEX_FILE,
    LAYOUT_VERSION,
    MAX_JSON_DOCUMENT,
    MT_INDEX,
    OCI_LAYOUT_FILE,
)
from sovpack.oci.tags import target_entries
from sovpack.oci.writer import (
    HashingReader,
    LayoutWriter,
    LocalBlobs,
    TransferCounts,
    check_bytes,
    layout_index_bytes,
    layout_marker_bytes,
    read_layout_top,
)

_BLOB_ENTRY = re.compile(rf"^{BLOBS_DIR}/sha256/([0-9a-f]{{64}})$")
_DIRECTORIES = ("", BLOBS_DIR, f"{BLOBS_DIR}/sha256")

BLOCK = 512
MAX_MEMBERS = 10_000  # tar headers (PAX records included); a bundle of ten targets has ~300 members
MAX_HEADER_RECORD = 64 * 1024  # one PAX record block; ours carry a size or a path of 77 characters
SMALL_MEMBER = 256 * 1024  # members up to this size are kept from the first pass (manifests, configs) ...
SMALL_BUDGET = 32 * 1024 * 1024  # ... up to this many bytes in all
INFLATE_RATIO = 32  # a compressed archive may inflate to this many times its size ...
INFLATE_FLOOR = 256 * 1024 * 1024  # ... or this many bytes, whichever is more
MAX_EXTRA_PASSES = 8  # re-reads of a compressed archive for members not kept from the first pass

_COMPRESSION = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"))
_INFLATE: dict[str, Callable[[BinaryIO], BinaryIO]] = {
    "gzip": lambda raw: gzip.GzipFile(fileobj=raw, mode="rb"),  # type: ignore[dict-item,return-value]
    "bzip2": lambda raw: bz2.BZ2File(raw, "rb"),  # type: ignore[dict-item,return-value]
    "xz": lambda raw: lzma.LZMAFile(raw, "rb"),  # type: ignore[dict-item,return-value]  # noqa: SIM115 (closed by _TarStream)
}
_REFUSED_TYPES = {
    b"1": "a hard link", b"2": "a symbolic link", b"3": "a character device", b"4": "a block device",
    b"6": "a FIFO", b"7": "a contiguous file", b"L": "a GNU long-name record", b"K": "a GNU long-link record",
    b"S": "a sparse file", b"V": "a volume label", b"M": "a multi-volume continuation",
}


# ------------------------------------------------------------------------------------------------ writing


def _tar_info(name: str, size: int, *, directory: bool, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o644
    info.size = 0 if directory else size
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_archive(layout: Path, out: Path, *, force: bool = False) -> tuple[Descriptor, str | None, TransferCounts]:
    """The bundle of ``layout`` as one deterministic tar: sorted entries, fixed mtime/uid/gid/mode, PAX format.

    Only what the tagged bundle reaches goes in (stray blobs do not), each blob hashed while it is written.
    The archive's ``index.json`` names only the bundle, by its own tag (the one it was built and signed with): tools
    read an archive of one image without a tag; unpacking it writes the per-target tags (sovpack.oci.tags).
    """
    if out.exists() and not force:
        raise UsageError(f"{out}: exists (pass --force to replace it)")
    if out.exists() and not out.is_file():
        raise UsageError(f"{out}: exists and is not a file")
    top, layout_tag = read_layout_top(layout)
    blobs = LocalBlobs(layout)
    graph = collect(blobs.read_manifest, top)
    tag = graph.manifests[-1].tag or layout_tag
    items = graph.descriptors()
    mtime = source_date_epoch() or 0  # fixed, so the same bundle always gives the same tar
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    tmp = Path(name)
    counts = TransferCounts(blobs=len(graph.blobs), manifests=len(graph.manifests))
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(_tar_info(BLOBS_DIR, 0, directory=True, mtime=mtime))
            tar.addfile(_tar_info(f"{BLOBS_DIR}/sha256", 0, directory=True, mtime=mtime))
            for digest in sorted(items):
                desc = items[digest]
                path = blobs.file(digest, str(layout))
                with open_regular(path, error=VerificationError) as fh:
                    if os.fstat(fh.fileno()).st_size != desc.size:
                        raise VerificationError(f"{layout}: blob {digest} has {os.fstat(fh.fileno()).st_size} "
                                                f"bytes, the descriptor says {desc.size}; archive not written")
                    reader = HashingReader(fh)
                    info = _tar_info(f"{BLOBS_DIR}/sha256/{digest.split(':', 1)[1]}", desc.size, directory=False,
                                     mtime=mtime)
                    tar.addfile(info, reader)  # type: ignore[arg-type]  # HashingReader reads like a file
                if reader.digest != digest or reader.size != desc.size:
                    raise VerificationError(f"{layout}: blob {digest} does not hash to its name; archive not written")
                counts.transferred += 1
                counts.bytes += desc.size
            top = Descriptor(media_type=top.media_type, digest=top.digest, size=top.size)
            index_bytes = layout_index_bytes(top, tag)  # one entry: `skopeo copy oci-archive:F` needs no tag
            for entry, data in ((INDEX_FILE, index_bytes), (OCI_LAYOUT_FILE, layout_marker_bytes())):
                tar.addfile(_tar_info(entry, len(data), directory=False, mtime=mtime), io.BytesIO(data))
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return top, tag, counts


# ------------------------------------------------------------------------------------------ reading: tar


@dataclass(frozen=True, kw_only=True, slots=True)
class TarEntry:
    """One accepted member: its normalised name, whether it is a directory, its size and where its data starts."""

    name: str
    directory: bool
    size: int
    offset: int


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _number(raw: bytes, what: str, where: str) -> int:
    """A tar numeric field: octal text, or GNU base-256 (first byte 0x80) for large values; negatives refused."""
    if raw[:1] and raw[0] & 0x80:
        if raw[0] != 0x80:
            raise VerificationError(f"{where}: a negative or malformed {what} field")
        return int.from_bytes(raw[1:], "big")
    text = raw.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    if not re.fullmatch(rb"[0-7]{1,22}", text):
        raise VerificationError(f"{where}: the {what} field {text[:24]!r} is not an octal number")
    return int(text, 8)


def _text(raw: bytes, what: str, where: str) -> str:
    try:
        return raw.split(b"\0", 1)[0].decode("utf-8")
    except UnicodeDecodeError:
        raise VerificationError(f"{where}: a member {what} that is not UTF-8") from None


def _header(block: bytes, where: str) -> tuple[str, int, bytes]:
    """(name, size, type flag) of one 512-byte ustar/GNU/v7 header, its checksum checked."""
    stored = _number(block[148:156], "checksum", where)
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    signed = unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b >= 0x80)  # old tars summed signed bytes
    if stored not in (unsigned, signed):
        raise VerificationError(f"{where}: a tar header with a wrong checksum (not a tar archive, or damaged)")
    name = _text(block[0:100], "name", where)
    if block[257:263] == b"ustar\0":  # POSIX: the prefix field extends the name
        prefix = _text(block[345:500], "name prefix", where)
        if prefix:
            name = f"{prefix}/{name}"
    return name, _number(block[124:136], "size", where), block[156:157]


def _pax_records(data: bytes, where: str) -> dict[str, str]:
    """``"%d %s=%s\\n"`` records, parsed in one linear pass; anything malformed is refused."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space] if space > pos else b""
        if not re.fullmatch(rb"[0-9]{1,20}", digits):
            raise VerificationError(f"{where}: a malformed PAX record")
        end = pos + int(digits)
        if end <= space + 1 or end > len(data) or data[end - 1 : end] != b"\n":
            raise VerificationError(f"{where}: a PAX record whose length is wrong")
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq or not key:
            raise VerificationError(f"{where}: a PAX record without a keyword")
        try:
            records[key.decode("utf-8")] = value.decode("utf-8")
        except UnicodeDecodeError:
            raise VerificationError(f"{where}: a PAX record that is not UTF-8") from None
        pos = end
    if any(key.startswith("GNU.sparse.") for key in records):
        raise VerificationError(f"{where}: a sparse file (GNU.sparse PAX records); refused")
    return records


class _TarStream:
    """The archive's tar bytes, read forward. A compressed archive inflates through here, counted: past
    ``budget`` bytes it is refused as a decompression bomb."""

    def __init__(self, archive: Path, compression: str | None, budget: int) -> None:
        self.archive = archive
        self.compression = compression
        self.budget = budget
        self.position = 0
        self._raw = open_regular(archive, error=VerificationError)
        # NOTE: the decompressors read the raw file in bounded pieces and inflate only as much as is asked for
        self._file: BinaryIO = _INFLATE[compression](self._raw) if compression else self._raw

    def close(self) -> None:
        self._file.close()
        self._raw.close()

    def read(self, n: int) -> bytes:
        """``n`` bytes (fewer only at the end of the archive)."""
        pieces: list[bytes] = []
        wanted = n
        while wanted > 0:
            try:
                piece = self._file.read(min(wanted, CHUNK))
            except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:
                raise VerificationError(f"{self.archive}: the {self.compression or 'tar'} data is damaged: {e}") from e
            if not piece:
                break
            pieces.append(piece)
            wanted -= len(piece)
            self.position += len(piece)
            if self.compression is not None and self.position > self.budget:
                raise VerificationError(
                    f"{self.archive}: inflates to more than {self.budget} bytes ({INFLATE_RATIO} times its size, at "
                    f"least {INFLATE_FLOOR}); refused as a decompression bomb (if it is genuine, decompress it and "
                    "copy the plain .tar)"
                )
        return b"".join(pieces)

    def skip_to(self, offset: int) -> None:
        """Move forward to ``offset`` (a plain archive seeks; a compressed one inflates and discards, counted)."""
        if self.compression is None:
            self._raw.seek(offset)
            self.position = offset
            return
        while self.position < offset:
            if not self.read(min(CHUNK, offset - self.position)):
                raise VerificationError(f"{self.archive}: the archive ends inside a member (truncated)")


class _MemberReader:
    """One member's data as a file (reads stop at its end); a short archive is refused, not padded."""

    def __init__(self, stream: _TarStream, entry: TarEntry) -> None:
        self._stream = stream
        self._left = entry.size
        self._name = entry.name

    def read(self, n: int = -1) -> bytes:
        want = self._left if n < 0 else min(n, self._left)
        data = self._stream.read(want) if want else b""
        if len(data) < want:
            raise VerificationError(f"{self._stream.archive}: member {self._name!r} is cut short (truncated archive)")
        self._left -= len(data)
        return data


def _classify(name: str, directory: bool, where: str) -> str:
    """The normalised layout name of a member, or a refusal for anything an OCI layout does not hold."""
    while name.startswith("./"):
        name = name[2:]
    name = name.rstrip("/") if directory else name
    if directory and name in (".", ""):
        return ""
    check_relative_path(name, where, error=VerificationError)  # absolute, "..", empty parts, control characters
    if directory:
        if name not in _DIRECTORIES:
            raise VerificationError(f"{where}: unexpected directory in an OCI layout archive")
        return name
    if name not in (OCI_LAYOUT_FILE, INDEX_FILE) and not _BLOB_ENTRY.match(name):
        raise VerificationError(f"{where}: not part of an OCI image layout (sha256 blobs only)")
    return name


class _Archive:
    """An ``oci-archive`` tar opened for reading: plain, or compressed and inflated within a cap.

    :meth:`scan` fills ``entries`` (every accepted member by name) and ``small`` (small members' bytes).
    """

    def __init__(self, archive: Path) -> None:
        self.archive = archive
        self.entries: dict[str, TarEntry] = {}
        self.small: dict[str, bytes] = {}
        with open_regular(archive, error=VerificationError) as fh:
            magic = fh.read(6)
            self.size = os.fstat(fh.fileno()).st_size
        if magic.startswith(b"\x28\xb5\x2f\xfd"):
            raise VerificationError(f"{archive}: zstd-compressed; decompress it first (zstd -d) and copy the .tar")
        self.compression = next((kind for prefix, kind in _COMPRESSION if magic.startswith(prefix)), None)
        self.budget = max(INFLATE_FLOOR, INFLATE_RATIO * self.size) if self.compression else self.size
        self.passes = 0

    def stream(self) -> _TarStream:
        if self.compression is not None:
            self.passes += 1
            if self.passes > MAX_EXTRA_PASSES + 2:
                raise VerificationError(f"{self.archive}: a compressed archive that needs more than "
                                        f"{MAX_EXTRA_PASSES + 2} passes to read; decompress it and copy the plain .tar")
        return _TarStream(self.archive, self.compression, self.budget)

    def scan(self) -> None:
        """One pass over the headers: refuse what an OCI layout archive never holds, keep small members."""
        kept = 0
        pax: dict[str, str] = {}
        headers = 0
        stream = self.stream()
        try:
            while True:
                start = stream.position
                block = stream.read(BLOCK)
                if not block or block == bytes(BLOCK):  # the end marker (or a tar that omits it)
                    break
                where = f"{self.archive}: header at byte {start}"
                if len(block) < BLOCK:
                    raise VerificationError(f"{where}: truncated")
                headers += 1
                if headers > MAX_MEMBERS:
                    raise VerificationError(f"{self.archive}: more than {MAX_MEMBERS} members; refused (a bundle "
                                            "archive holds a few hundred)")
                name, size, kind = _header(block, where if headers > 1 else f"{self.archive}: not a tar archive")
                offset = stream.position
                if kind in (b"x", b"g"):
                    if size > MAX_HEADER_RECORD:
                        raise VerificationError(f"{where}: a PAX header of {size} bytes; refused")
                    records = _pax_records(stream.read(_padded(size))[:size], where)
                    if kind == b"x":
                        pax = records
                    elif {"path", "size"} & set(records):
                        raise VerificationError(f"{where}: a global PAX header that sets a path or size; refused")
                    continue
                if not re.fullmatch(r"[0-9]{1,20}", pax.get("size", "0")):
                    raise VerificationError(f"{where}: a PAX size {pax['size'][:24]!r} that is not a number")
                name, size, pax = pax.get("path", name), int(pax.get("size", size)), {}
                where = f"{self.archive}: {name!r}"
                if kind in _REFUSED_TYPES:
                    raise VerificationError(f"{where}: {_REFUSED_TYPES[kind]}; refused (only regular files and "
                                            "directories belong in an OCI layout archive)")
                if kind not in (b"0", b"\0", b"5"):
                    raise VerificationError(f"{where}: unknown tar member type {kind!r}; refused")
                directory = kind == b"5"
                name = _classify(name, directory, where)
                if name in self.entries:
                    raise VerificationError(f"{where}: appears twice in the archive; refused (which one would count?)")
                end = offset + _padded(size)
                if self.compression is None and offset + size > self.size:
                    raise VerificationError(f"{where}: claims {size} bytes, past the end of the archive (truncated)")
                if self.compression is not None and offset + size > self.budget:
                    raise VerificationError(f"{where}: claims {size} bytes, more than this compressed archive may "
                                            f"inflate to ({self.budget}); refused as a decompression bomb")
                entry = TarEntry(name=name, directory=directory, size=0 if directory else size, offset=offset)
                self.entries[name] = entry
                if not directory and size <= SMALL_MEMBER and kept + size <= SMALL_BUDGET:
                    self.small[name] = _MemberReader(stream, entry).read()
                    kept += size
                stream.skip_to(end)
        finally:
            stream.close()

    def read_bytes(self, entry: TarEntry) -> bytes:
        """A member's bytes (kept from the first pass, or read again; the caller capped its size)."""
        if entry.name in self.small:
            return self.small[entry.name]
        stream = self.stream()
        try:
            stream.skip_to(entry.offset)
            return _MemberReader(stream, entry).read()
        finally:
            stream.close()

    def stream_members(self, entries: list[TarEntry], sink: Callable[[TarEntry, _MemberReader], None]) -> None:
        """Hand each member's data to ``sink``, in one forward pass (entries in archive order)."""
        stream = self.stream()
        try:
            for entry in sorted(entries, key=lambda e: e.offset):
                stream.skip_to(entry.offset)
                sink(entry, _MemberReader(stream, entry))
                stream.skip_to(entry.offset + entry.size)
        finally:
            stream.close()


# ------------------------------------------------------------------------------------ reading: the bundle


def _archive_top(archive: Path, reader: _Archive) -> tuple[Descriptor, str | None]:
    """The one bundle index the archive's ``index.json`` names (after ``oci-layout`` is checked), and its tag."""
    docs: dict[str, Any] = {}
    for name in (OCI_LAYOUT_FILE, INDEX_FILE):
        entry = reader.entries.get(name)
        if entry is None:
            docs[name] = None
            continue
        if entry.size > MAX_JSON_DOCUMENT:
            raise VerificationError(f"{archive}: {name} has {entry.size} bytes; refused")
        docs[name] = parse_json(reader.read_bytes(entry), f"{archive}: {name}", error=VerificationError)
    layout_doc, index = docs[OCI_LAYOUT_FILE], docs[INDEX_FILE]
    if not isinstance(layout_doc, dict) or layout_doc.get("imageLayoutVersion") != LAYOUT_VERSION:
        raise VerificationError(f"{archive}: no {OCI_LAYOUT_FILE} of an OCI image layout {LAYOUT_VERSION}")
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise VerificationError(f"{archive}: no valid {INDEX_FILE}")
    entries = [Descriptor.from_dict(d, f"{archive}: {INDEX_FILE} manifests[{i}]")
               for i, d in enumerate(index["manifests"])]
    bundles = [e for e in entries if e.media_type == MT_INDEX] if len(entries) > 1 else entries  # + target tags
    if len(bundles) != 1:
        raise UsageError(f"{archive}: the archive holds {len(bundles)} bundles; sovpack copies archives of one bundle")
    return bundles[0], bundles[0].annotations.get(ANN_REF_NAME)


def read_archive(archive: Path, dest: Path, *, force: bool = False, scratch: bool = False
                 ) -> tuple[Descriptor, str | None, TransferCounts]:
    """Unpack an ``oci-archive`` tar into a layout directory: only what the bundle reaches, each blob verified.

    See the module docstring for what is refused. ``index.json`` is written last, after every blob the
    bundle reaches is there; the destination gets the bundle's own tag. ``scratch``: ``dest`` is a staging
    directory the caller removes (errors then say nothing about what it holds).
    """
    if not archive.exists():
        raise UsageError(f"{archive}: no such archive")
    reader = _Archive(archive)
    reader.scan()
    top, archive_tag = _archive_top(archive, reader)
    where = str(archive)

    def member(desc: Descriptor, what: str) -> TarEntry | None:
        entry = reader.entries.get(f"{BLOBS_DIR}/sha256/{desc.digest.split(':', 1)[1]}")
        if entry is not None and entry.size != desc.size:
            raise VerificationError(f"{where}: {what} {desc.digest} is a member of {entry.size} bytes, its "
                                    f"descriptor says {desc.size}; refused")
        return entry

    def read_manifest(desc: Descriptor) -> bytes:
        if desc.size > MAX_JSON_DOCUMENT:
            raise VerificationError(f"{where}: manifest {desc.digest} declares {desc.size} bytes; refused")
        entry = member(desc, "manifest")
        if entry is None:
            raise VerificationError(f"{where}: manifest {desc.digest} is missing from the archive")
        data = reader.read_bytes(entry)
        check_bytes(data, desc, where)
        return data

    graph = collect(read_manifest, top)
    tag = graph.manifests[-1].tag or archive_tag
    top = Descriptor(media_type=top.media_type, digest=top.digest, size=top.size)
    writer = LayoutWriter(dest)
    counts = TransferCounts(blobs=len(graph.blobs), manifests=len(graph.manifests))
    reachable = {f"{BLOBS_DIR}/sha256/{digest.split(':', 1)[1]}" for digest in graph.descriptors()}
    counts.unreferenced = sum(1 for name in reader.entries if _BLOB_ENTRY.match(name) and name not in reachable)
    members = {blob.digest: member(blob, "blob") for blob in graph.blobs}  # every size checked before writing
    for blob in graph.blobs:  # a blob the destination already holds (a re-run) may be missing: looked at only
        path = LocalBlobs(dest).path(blob.digest)
        if members[blob.digest] is None and (path.is_symlink() or not path.is_file() or
                                             path.stat().st_size != blob.size):
            raise VerificationError(f"{where}: blob {blob.digest} is missing from the archive")
    with writer.filling(scratch=scratch):
        targets = target_entries(graph.manifests[-1].document, tag)
        writer.prepare(layout_index_bytes(top, tag, targets), force=force)
        for node in graph.manifests:
            writer.put_bytes(node.descriptor, node.data, where)
        streamed: dict[str, Descriptor] = {}
        for blob in graph.blobs:
            entry = members[blob.digest]
            if writer.has(blob):
                counts.skipped += 1
                continue
            if entry is None:
                raise VerificationError(f"{where}: blob {blob.digest} is missing from the archive")
            if entry.name in reader.small:
                writer.put_bytes(blob, reader.small[entry.name], where)
            else:
                streamed[entry.name] = blob
            counts.transferred += 1
            counts.bytes += blob.size
        reader.stream_members([reader.entries[name] for name in streamed],
                              lambda entry, data: writer.put_stream(streamed[entry.name], data, where))
        writer.finish(top, tag, targets)
    return top, tag, counts


__all__ = ["TarEntry", "read_archive", "write_archive"]
