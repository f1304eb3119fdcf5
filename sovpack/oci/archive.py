"""``oci-archive``: an OCI image layout as one deterministic tar, for carrying a bundle into an air-gapped site.

Writing: sorted entries, fixed mtime (``SOURCE_DATE_EPOCH``, else 0), uid/gid 0, fixed modes, PAX format, so
the same bundle always gives the same bytes; only what the tagged bundle reaches goes in. Reading streams the
tar straight into a layout through :class:`~sovpack.oci.writer.LayoutWriter`: every blob is checked against its
name, only ``oci-layout``, ``index.json`` and ``blobs/sha256/<hex>`` regular files are accepted, and
``index.json`` lands last.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import tempfile
from pathlib import Path

from sovpack._io import source_date_epoch
from sovpack.errors import UsageError, VerificationError
from sovpack.oci.blobs import collect
from sovpack.oci.descriptor import Descriptor
from sovpack.oci.media import ANN_REF_NAME, BLOBS_DIR, INDEX_FILE, LAYOUT_VERSION, MAX_JSON_DOCUMENT, OCI_LAYOUT_FILE
from sovpack.oci.writer import (
    HashingReader,
    LayoutWriter,
    LocalBlobs,
    TransferCounts,
    layout_index_bytes,
    layout_marker_bytes,
    read_layout_top,
)

_BLOB_ENTRY = re.compile(rf"^{BLOBS_DIR}/sha256/([0-9a-f]{{64}})$")


def _archive_mtime() -> int:
    """Fixed: SOURCE_DATE_EPOCH if set, else 0, so the same bundle always gives the same tar."""
    return source_date_epoch() or 0


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
    """
    if out.exists() and not force:
        raise UsageError(f"{out}: exists (pass --force to replace it)")
    if out.exists() and not out.is_file():
        raise UsageError(f"{out}: exists and is not a file")
    top, tag = read_layout_top(layout)
    blobs = LocalBlobs(layout)
    graph = collect(blobs.read_manifest, top)
    items = graph.descriptors()
    mtime = _archive_mtime()
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
                if path.stat().st_size != desc.size:
                    raise VerificationError(f"{layout}: blob {digest} has {path.stat().st_size} bytes, the "
                                            f"descriptor says {desc.size}; archive not written")
                with open(path, "rb") as fh:
                    reader = HashingReader(fh)
                    info = _tar_info(f"{BLOBS_DIR}/sha256/{digest.split(':', 1)[1]}", desc.size, directory=False,
                                     mtime=mtime)
                    tar.addfile(info, reader)  # type: ignore[arg-type]  # HashingReader reads like a file
                if reader.digest != digest or reader.size != desc.size:
                    raise VerificationError(f"{layout}: blob {digest} does not hash to its name; archive not written")
                counts.transferred += 1
                counts.bytes += desc.size
            for entry, data in ((INDEX_FILE, layout_index_bytes(top, tag)), (OCI_LAYOUT_FILE, layout_marker_bytes())):
                tar.addfile(_tar_info(entry, len(data), directory=False, mtime=mtime), io.BytesIO(data))
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return top, tag, counts


def _entry_name(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


def read_archive(archive: Path, dest: Path, *, force: bool = False) -> tuple[Descriptor, str | None, TransferCounts]:
    """Unpack an ``oci-archive`` tar into a layout directory, streaming: every blob checked against its name.

    Only ``oci-layout``, ``index.json`` and ``blobs/sha256/<hex>`` regular files are accepted (no links, no
    other paths). ``index.json`` is written last, after every blob the bundle reaches is there.
    """
    if not archive.is_file():
        raise UsageError(f"{archive}: no such archive")
    writer = LayoutWriter(dest)
    top_files: dict[str, bytes] = {}
    counts = TransferCounts()
    staged = False
    try:
        with tarfile.open(archive, mode="r|*") as tar:
            for member in tar:
                name = _entry_name(member.name)
                where = f"{archive}: {member.name!r}"
                if member.isdir():
                    if name not in ("", ".", BLOBS_DIR, f"{BLOBS_DIR}/sha256"):
                        raise VerificationError(f"{where}: unexpected directory in an OCI layout archive")
                    continue
                if not member.isreg():
                    raise VerificationError(f"{where}: not a regular file (links and devices are refused)")
                stream = tar.extractfile(member)
                if stream is None:  # pragma: no cover  (regular members always have a stream)
                    raise VerificationError(f"{where}: unreadable")
                if name in (OCI_LAYOUT_FILE, INDEX_FILE):
                    if member.size > MAX_JSON_DOCUMENT:
                        raise VerificationError(f"{where}: {member.size} bytes; refused")
                    top_files[name] = stream.read()
                    continue
                match = _BLOB_ENTRY.match(name)
                if match is None:
                    raise VerificationError(f"{where}: not part of an OCI image layout (sha256 blobs only)")
                if not staged:
                    # NOTE: prepared before index.json is read (it comes last in the tar), so nothing to compare
                    staged = True
                    writer.prepare(None, force=force)
                desc = Descriptor(media_type="application/octet-stream", digest=f"sha256:{match.group(1)}",
                                  size=member.size)
                counts.blobs += 1
                if writer.has(desc):
                    counts.skipped += 1
                    continue
                writer.put_stream(desc, stream, where)
                counts.transferred += 1
                counts.bytes += member.size
    except tarfile.TarError as e:
        raise VerificationError(f"{archive}: not a readable tar archive: {e}") from e
    if not staged:
        writer.prepare(None, force=force)
    top, tag = _archive_top(archive, top_files)
    graph = collect(writer.blobs.read_manifest, top)
    for blob in graph.blobs:
        if not writer.blobs.present(blob, verify=False):
            raise VerificationError(f"{archive}: blob {blob.digest} is missing from the archive")
    counts.manifests = len(graph.manifests)
    top = Descriptor(media_type=top.media_type, digest=top.digest, size=top.size)
    writer.finish(top, tag)
    return top, tag, counts


def _archive_top(archive: Path, top_files: dict[str, bytes]) -> tuple[Descriptor, str | None]:
    """The one bundle index the archive's ``index.json`` names (after ``oci-layout`` is checked), and its tag."""
    marker = top_files.get(OCI_LAYOUT_FILE)
    try:
        layout_doc = json.loads(marker) if marker is not None else None
        index = json.loads(top_files[INDEX_FILE]) if INDEX_FILE in top_files else None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VerificationError(f"{archive}: oci-layout or index.json is not JSON: {e}") from e
    if not isinstance(layout_doc, dict) or layout_doc.get("imageLayoutVersion") != LAYOUT_VERSION:
        raise VerificationError(f"{archive}: no {OCI_LAYOUT_FILE} of an OCI image layout {LAYOUT_VERSION}")
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise VerificationError(f"{archive}: no valid {INDEX_FILE}")
    entries = [Descriptor.from_dict(d, f"{archive}: {INDEX_FILE} manifests[{i}]")
               for i, d in enumerate(index["manifests"])]
    if len(entries) != 1:
        raise UsageError(f"{archive}: the archive holds {len(entries)} entries; sovpack copies archives of one bundle")
    return entries[0], entries[0].annotations.get(ANN_REF_NAME)


__all__ = ["read_archive", "write_archive"]
