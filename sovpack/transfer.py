"""``sovpack copy``: move a bundle between an OCI layout directory, an ``oci-archive:`` tar and a registry.

Endpoints: a directory (OCI image layout, what ``sovpack build`` writes; ``oci:DIR`` also works), an
``oci-archive:FILE.tar`` (the layout as one deterministic tar, for carrying into an air-gapped site) and
``docker://HOST[:PORT]/REPO[:TAG]`` (an OCI registry). The bundle is walked from its tagged index: every
manifest and blob it reaches is copied, each checked against its digest and size before it lands.

Why it is safe to interrupt anywhere:

- into a directory, blobs land one by one (download to ``.partial``, hash, compare, rename), and
  ``oci-layout`` + ``index.json`` are written last, so a failed or killed copy never leaves a directory that
  looks like a complete bundle; a re-run skips the blobs already there (re-hashed) and resumes a
  ``.partial`` download with a Range request;
- into a registry, blobs go first (HEAD first, mounted when the source is another repository of the same
  registry), then manifests by digest (children before the indexes that list them), then the referrers
  fallback tags, and the tag itself last: a partial push never leaves a tag pointing at missing content;
- into an archive, the tar is written to a temporary sibling and renamed.

Signatures and attestations are manifests listed in the bundle index, so they travel with it. Their OCI
``subject`` makes them referrers of the target manifest: a registry with the OCI 1.1 referrers API indexes
them itself (it answers the manifest PUT with ``OCI-Subject``); for one without (Distribution 2.8), the
referrers index is pushed under the fallback tag ``sha256-<hex of the subject>``.

``RegistryLayout`` lets ``verify``/``inspect`` run straight against a registry (the same code as for a
directory: see ``sovpack.blob_source``); ``extract``/``run``/``parity`` pull into a temporary directory first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from sovpack.blob_source import VerifiedReads, json_object
from sovpack.bundle import (
    ANN_REF_NAME,
    BLOBS_DIR,
    CHUNK,
    DIGEST_RE,
    INDEX_FILE,
    LAYOUT_VERSION,
    MT_INDEX,
    OCI_LAYOUT_FILE,
    Descriptor,
    source_date,
)
from sovpack.errors import RegistryError, UsageError, VerificationError
from sovpack.fsutil import atomic_write_bytes
from sovpack.oci_registry import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    Reference,
    RegistryClient,
    RegistryOptions,
    fallback_tag,
)
from sovpack.signing import canonical_json

ARCHIVE_PREFIX = "oci-archive:"
LAYOUT_PREFIX = "oci:"
MAX_MANIFEST = 64 * 1024 * 1024
MAX_TOP_FILE = 16 * 1024 * 1024
MAX_DEPTH = 8
PARTIAL_SUFFIX = ".partial"

Progress = Callable[[str, int, int], None]


def _no_progress(_description: str, _completed: int, _total: int) -> None:
    """Silent progress."""


# ------------------------------------------------------------------------------------------------ endpoints


@dataclass(frozen=True, slots=True)
class LayoutEndpoint:
    path: Path

    def __str__(self) -> str:
        return str(self.path)


@dataclass(frozen=True, slots=True)
class ArchiveEndpoint:
    path: Path

    def __str__(self) -> str:
        return f"{ARCHIVE_PREFIX}{self.path}"


@dataclass(frozen=True, slots=True)
class RegistryEndpoint:
    ref: Reference

    def __str__(self) -> str:
        return str(self.ref)


Endpoint = LayoutEndpoint | ArchiveEndpoint | RegistryEndpoint


def parse_endpoint(text: str | os.PathLike[str]) -> Endpoint:
    """``docker://...`` -> registry, ``oci-archive:FILE`` -> archive, ``oci:DIR`` or anything else -> directory."""
    if not isinstance(text, str):
        return LayoutEndpoint(Path(text))
    if text.startswith("docker://"):
        return RegistryEndpoint(Reference.parse(text))
    if text.startswith(ARCHIVE_PREFIX):
        path = text[len(ARCHIVE_PREFIX) :]
        if not path:
            raise UsageError(f"{text!r}: oci-archive: needs a file name")
        return ArchiveEndpoint(Path(path))
    if text.startswith(LAYOUT_PREFIX):
        return LayoutEndpoint(Path(text[len(LAYOUT_PREFIX) :]))
    if re.match(r"^[a-z][a-z0-9+.-]*://", text):
        raise UsageError(f"{text!r}: unknown transport (use a directory, oci-archive:FILE.tar or docker://HOST/REPO:TAG)")
    return LayoutEndpoint(Path(text))


# -------------------------------------------------------------------------------------------- the graph


@dataclass(frozen=True, kw_only=True, slots=True)
class ManifestNode:
    descriptor: Descriptor
    data: bytes
    document: Mapping[str, Any]

    @property
    def subject(self) -> str | None:
        subject = self.document.get("subject")
        digest = subject.get("digest") if isinstance(subject, Mapping) else None
        return digest if isinstance(digest, str) and DIGEST_RE.match(digest) else None

    def referrer_descriptor(self) -> dict[str, Any]:
        """How a referrers index lists this manifest: artifactType and annotations copied up."""
        doc = self.document
        config = doc.get("config") if isinstance(doc.get("config"), Mapping) else {}
        artifact_type = doc.get("artifactType") or (config or {}).get("mediaType")
        entry: dict[str, Any] = {
            "mediaType": self.descriptor.media_type,
            "digest": self.descriptor.digest,
            "size": self.descriptor.size,
        }
        if isinstance(artifact_type, str) and artifact_type:
            entry["artifactType"] = artifact_type
        if isinstance(doc.get("annotations"), Mapping) and doc["annotations"]:
            entry["annotations"] = dict(doc["annotations"])
        return entry


@dataclass(frozen=True, kw_only=True, slots=True)
class Graph:
    """Everything a tagged bundle reaches: blobs, and manifests children-first (the top index last)."""

    top: Descriptor
    blobs: tuple[Descriptor, ...]
    manifests: tuple[ManifestNode, ...]

    @property
    def size(self) -> int:
        return sum(b.size for b in self.blobs) + sum(m.descriptor.size for m in self.manifests)


def collect(read_manifest: Callable[[Descriptor], bytes], top: Descriptor) -> Graph:
    """Walk indexes and manifests from ``top``; ``read_manifest`` returns verified bytes."""
    blobs: dict[str, Descriptor] = {}
    manifests: list[ManifestNode] = []
    seen: set[str] = set()

    def visit(desc: Descriptor, depth: int) -> None:
        if desc.digest in seen:
            return
        if depth > MAX_DEPTH:
            raise VerificationError(f"manifest {desc.digest}: indexes nested deeper than {MAX_DEPTH}")
        seen.add(desc.digest)
        data = read_manifest(desc)
        doc = json_object(data, f"manifest {desc.digest}")
        media_type = doc.get("mediaType") or desc.media_type
        if media_type in INDEX_TYPES or (media_type not in MANIFEST_TYPES and "manifests" in doc):
            children = doc.get("manifests")
            if not isinstance(children, list):
                raise VerificationError(f"index {desc.digest}: no manifests list")
            for i, raw in enumerate(children):
                visit(Descriptor.from_dict(raw, f"index {desc.digest} manifests[{i}]"), depth + 1)
        elif media_type in MANIFEST_TYPES or "layers" in doc:
            config = doc.get("config")
            parts = [config] if config is not None else []
            layers = doc.get("layers") or []
            if not isinstance(layers, list):
                raise VerificationError(f"manifest {desc.digest}: layers is not a list")
            for i, raw in enumerate([*parts, *layers]):
                blob = Descriptor.from_dict(raw, f"manifest {desc.digest} blob {i}")
                known = blobs.get(blob.digest)
                if known is not None and known.size != blob.size:
                    raise VerificationError(f"blob {blob.digest} is listed with sizes {known.size} and {blob.size}")
                blobs.setdefault(blob.digest, blob)
        else:
            raise VerificationError(f"manifest {desc.digest}: unknown media type {media_type!r}")
        manifests.append(ManifestNode(descriptor=desc, data=data, document=doc))

    visit(top, 0)
    return Graph(top=top, blobs=tuple(blobs.values()), manifests=tuple(manifests))


def _check_bytes(data: bytes, desc: Descriptor, where: str) -> None:
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if actual != desc.digest:
        raise VerificationError(f"{where}: blob {desc.digest} hashes to {actual}; refused")
    if len(data) != desc.size:
        raise VerificationError(f"{where}: blob {desc.digest} has {len(data)} bytes, the descriptor says {desc.size}")


def layout_index_bytes(top: Descriptor, tag: str | None) -> bytes:
    """index.json naming one bundle index by tag (the same canonical bytes ``sovpack build`` writes)."""
    entry = Descriptor(media_type=top.media_type, digest=top.digest, size=top.size,
                       annotations={ANN_REF_NAME: tag} if tag else {})
    return canonical_json({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [entry.to_dict()]})


def layout_marker_bytes() -> bytes:
    return canonical_json({"imageLayoutVersion": LAYOUT_VERSION})


def _bundle_tag(node: ManifestNode) -> str | None:
    annotations = node.document.get("annotations")
    tag = annotations.get(ANN_REF_NAME) if isinstance(annotations, Mapping) else None
    return tag if isinstance(tag, str) else None


# ------------------------------------------------------------------------------------------ local layouts


class LocalBlobs:
    """``ROOT/blobs/sha256``: verified reads of what is already on disk."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.dir = self.root / BLOBS_DIR / "sha256"

    def path(self, digest: str) -> Path:
        if not DIGEST_RE.match(digest):
            raise VerificationError(f"not a sha256 digest: {digest!r}")
        return self.dir / digest.split(":", 1)[1]

    def read_manifest(self, desc: Descriptor) -> bytes:
        if desc.size > MAX_MANIFEST:
            raise VerificationError(f"{self.root}: manifest {desc.digest} declares {desc.size} bytes; refused")
        path = self.path(desc.digest)
        if path.is_symlink() or not path.is_file():
            raise VerificationError(f"{self.root}: blob {desc.digest} is missing (or a symbolic link)")
        data = path.read_bytes()
        _check_bytes(data, desc, str(self.root))
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
            good = _hash_file(path) == desc.digest
        if not good:
            path.unlink()
        return good


def _hash_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


def read_layout_top(root: Path, tag: str | None = None) -> tuple[Descriptor, str | None]:
    """The tagged bundle index of a complete layout (the same selection rules as ``verify``)."""
    from sovpack.verify import Layout, _select_index

    layout = Layout(root)
    return _select_index(layout, tag)


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
                    with contextlib.suppress(FileNotFoundError):
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

    def put_stream(self, desc: Descriptor, stream: BinaryIO, where: str) -> None:
        """Copy a stream in, hashing as it goes; lands only if digest and size match."""
        fd, name = tempfile.mkstemp(prefix=".blob.", dir=self.blobs.dir)
        tmp = Path(name)
        hasher = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := stream.read(CHUNK):
                    size += len(chunk)
                    if size > desc.size:
                        raise VerificationError(f"{where}: blob {desc.digest} is longer than {desc.size} bytes")
                    hasher.update(chunk)
                    out.write(chunk)
            self._land(tmp, desc, "sha256:" + hasher.hexdigest(), size, where)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def put_file(self, desc: Descriptor, source: Path, where: str) -> None:
        with open(source, "rb") as fh:
            self.put_stream(desc, fh, where)

    def put_bytes(self, desc: Descriptor, data: bytes, where: str) -> None:
        _check_bytes(data, desc, where)
        if not self.blobs.present(desc, verify=False):
            atomic_write_bytes(self.blobs.path(desc.digest), data)
            os.chmod(self.blobs.path(desc.digest), 0o644)

    def download(self, desc: Descriptor, client: RegistryClient, repository: str, progress: Callable[[int], None]
                 ) -> int:
        """Pull one blob into ``.<hex>.partial`` (continuing one a killed run left), verify, rename.

        Returns the bytes transferred. A continued download that does not verify is retried once from zero
        (the kept prefix may be what was bad); a fresh one that does not verify raises.
        """
        try:
            return self._download(desc, client, repository, progress)
        except _ResumedMismatch:
            return self._download(desc, client, repository, progress)

    def _download(self, desc: Descriptor, client: RegistryClient, repository: str, progress: Callable[[int], None]
                  ) -> int:
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
                for piece in client.iter_blob(repository, desc.digest, desc.size, start=offset):
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
                f"{client.registry}/{repository}: blob {desc.digest} arrived as {actual} ({size} bytes, "
                f"{desc.size} expected); discarded, nothing landed"
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
                leftover.name.startswith(".blob.") or leftover.name.endswith(PARTIAL_SUFFIX)
            ):
                leftover.unlink()
        atomic_write_bytes(self.root / OCI_LAYOUT_FILE, layout_marker_bytes())
        atomic_write_bytes(self.root / INDEX_FILE, layout_index_bytes(top, tag))
        for name in (OCI_LAYOUT_FILE, INDEX_FILE):
            os.chmod(self.root / name, 0o644)


class _ResumedMismatch(Exception):
    """A download continued from a kept .partial did not verify."""


# ------------------------------------------------------------------------------------------ the copy


@dataclass(kw_only=True)
class _Counts:
    blobs: int = 0
    transferred: int = 0
    skipped: int = 0
    mounted: int = 0
    bytes: int = 0
    manifests: int = 0
    referrer_tags: list[str] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True, slots=True)
class CopyResult:
    """What ``copy_bundle`` moved."""

    source: str
    destination: str
    digest: str  # the bundle index at the destination
    tag: str | None
    blobs: int
    blobs_transferred: int
    blobs_skipped: int
    blobs_mounted: int
    bytes_transferred: int
    manifests: int
    referrers: str  # how attestations are discoverable as referrers at a registry destination
    referrer_tags: tuple[str, ...]
    seconds: float
    stats: Mapping[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "destination": self.destination,
            "digest": self.digest,
            "tag": self.tag,
            "blobs": self.blobs,
            "blobs_transferred": self.blobs_transferred,
            "blobs_skipped": self.blobs_skipped,
            "blobs_mounted": self.blobs_mounted,
            "bytes_transferred": self.bytes_transferred,
            "manifests": self.manifests,
            "referrers": self.referrers,
            "referrer_tags": list(self.referrer_tags),
            "seconds": round(self.seconds, 3),
            "stats": dict(self.stats),
        }


class _Source:
    """A tagged bundle to copy from: a complete layout directory or a registry reference."""

    def __init__(self, endpoint: LayoutEndpoint | RegistryEndpoint, options: RegistryOptions,
                 clients: dict[str, RegistryClient]) -> None:
        self.endpoint = endpoint
        self.client: RegistryClient | None = None
        self.ref: Reference | None = None
        self.blobs: LocalBlobs | None = None
        self._top_data: bytes | None = None
        if isinstance(endpoint, RegistryEndpoint):
            ref = self.ref = endpoint.ref
            self.client = _client(clients, ref.registry, options)
            data, media_type, digest = self.client.get_manifest(ref.repository, ref.reference)
            if media_type not in INDEX_TYPES:
                raise VerificationError(f"{ref}: is a {media_type or 'manifest'}, not a bundle index")
            self._top_data = data
            self.top = Descriptor(media_type=media_type, digest=digest, size=len(data))
            self.tag = ref.tag
        else:
            self.blobs = LocalBlobs(endpoint.path)
            self.top, self.tag = read_layout_top(endpoint.path)

    def read_manifest(self, desc: Descriptor) -> bytes:
        if desc.digest == self.top.digest and self._top_data is not None:
            return self._top_data
        if self.blobs is not None:
            return self.blobs.read_manifest(desc)
        client, ref = self.registry()
        data, _media_type, _digest = client.get_manifest(ref.repository, desc.digest)
        _check_bytes(data, desc, str(self.endpoint))
        return data

    def registry(self) -> tuple[RegistryClient, Reference]:
        if self.client is None or self.ref is None:
            raise UsageError(f"{self.endpoint}: not a registry source")
        return self.client, self.ref


def _client(clients: dict[str, RegistryClient], registry: str, options: RegistryOptions) -> RegistryClient:
    if registry not in clients:
        clients[registry] = RegistryClient(registry, options)
    return clients[registry]


def _copy_blob_to_layout(source: _Source, writer: LayoutWriter, desc: Descriptor, counts: _Counts,
                         report: Callable[[int], None]) -> None:
    if source.blobs is not None:
        path = source.blobs.path(desc.digest)
        if path.is_symlink() or not path.is_file():
            raise VerificationError(f"{source.endpoint}: blob {desc.digest} is missing (or a symbolic link)")
        writer.put_file(desc, path, str(source.endpoint))
        counts.bytes += desc.size
    else:
        client, ref = source.registry()
        counts.bytes += writer.download(desc, client, ref.repository, report)
    counts.transferred += 1


def _copy_blob_to_registry(source: _Source, client: RegistryClient, ref: Reference, desc: Descriptor,
                           counts: _Counts, report: Callable[[int], None], spool_dir: Path | None) -> None:
    if source.blobs is not None:
        path = source.blobs.path(desc.digest)
        if path.is_symlink() or not path.is_file():
            raise VerificationError(f"{source.endpoint}: blob {desc.digest} is missing (or a symbolic link)")
        client.push_blob(ref.repository, desc.digest, desc.size, path, progress=report)
        counts.bytes += desc.size
        counts.transferred += 1
        return
    src_client, src_ref = source.registry()
    if src_client.registry == client.registry and client.mount_blob(ref.repository, desc.digest, src_ref.repository):
        counts.mounted += 1
        return
    # another registry (or a refused mount): through a verified temporary file, one blob at a time
    spool = Path(tempfile.mkdtemp(prefix=".sovpack-spool.", dir=spool_dir))
    try:
        writer = LayoutWriter(spool)
        writer.blobs.dir.mkdir(parents=True)
        counts.bytes += writer.download(desc, src_client, src_ref.repository, report)
        path = writer.blobs.path(desc.digest)
        client.push_blob(ref.repository, desc.digest, desc.size, path, progress=report)
        counts.bytes += desc.size
        counts.transferred += 1
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def _transfer(
    src: LayoutEndpoint | RegistryEndpoint,
    dst: LayoutEndpoint | RegistryEndpoint,
    *,
    options: RegistryOptions,
    force: bool,
    progress: Progress,
    clients: dict[str, RegistryClient],
) -> tuple[Graph, str | None, _Counts, str]:
    source = _Source(src, options, clients)
    graph = collect(source.read_manifest, source.top)
    top_node = graph.manifests[-1]
    tag: str | None
    if isinstance(dst, RegistryEndpoint):
        tag = dst.ref.tag or source.tag or _bundle_tag(top_node) or "latest"
    else:
        tag = source.tag or _bundle_tag(top_node)
    counts = _Counts(blobs=len(graph.blobs), manifests=len(graph.manifests))
    total = len(graph.blobs) + len(graph.manifests)
    done = 0

    def step(description: str) -> Callable[[int], None]:
        def report(completed: int) -> None:
            progress(description, completed, 0)

        return report

    referrers = "none"
    if isinstance(dst, LayoutEndpoint):
        writer = LayoutWriter(dst.path)
        writer.prepare(layout_index_bytes(graph.top, tag), force=force)
        for desc in graph.blobs:
            progress("blobs", done, total)
            if writer.has(desc):
                counts.skipped += 1
            else:
                _copy_blob_to_layout(source, writer, desc, counts, step(f"blob {desc.short}"))
            done += 1
        for node in graph.manifests:
            writer.put_bytes(node.descriptor, node.data, str(src))
            done += 1
            progress("manifests", done, total)
        writer.finish(graph.top, tag)
        return graph, tag, counts, referrers

    ref = dst.ref
    client = _client(clients, ref.registry, options)
    push = client.push_scope(ref.repository)
    spool_dir = _spool_dir()
    for desc in graph.blobs:
        progress("blobs", done, total)
        if client.blob_exists(ref.repository, desc.digest, scope=push) is not None:
            counts.skipped += 1
        else:
            _copy_blob_to_registry(source, client, ref, desc, counts, step(f"blob {desc.short}"), spool_dir)
        done += 1
    by_subject: dict[str, list[dict[str, Any]]] = {}
    api: bool | None = None  # does the registry index referrers itself? (asked once, if anything has a subject)
    for node in graph.manifests:
        if node is top_node:
            continue  # the bundle index goes by digest below, and by tag last
        headers: Mapping[str, str] = {}
        if not client.manifest_exists(ref.repository, node.descriptor.digest, scope=push):
            headers = client.put_manifest(ref.repository, node.descriptor.digest, node.data,
                                          node.descriptor.media_type)
        subject = node.subject
        if subject is not None:
            if headers.get("oci-subject"):
                api = True
            if api is None:
                api = client.supports_referrers(ref.repository, subject)
            if not api:
                by_subject.setdefault(subject, []).append(node.referrer_descriptor())
        done += 1
        progress("manifests", done, total)
    client.put_manifest(ref.repository, graph.top.digest, top_node.data, graph.top.media_type)
    for subject, entries in sorted(by_subject.items()):
        counts.referrer_tags.append(_push_referrers_fallback(client, ref.repository, subject, entries))
    if api is not None:
        referrers = "api" if api else "tag-fallback"
    client.put_manifest(ref.repository, tag or "latest", top_node.data, graph.top.media_type)  # the tag, last
    progress("manifests", total, total)
    return graph, tag, counts, referrers


def _spool_dir() -> Path | None:
    """Scratch space (``SOVPACK_SPOOL_DIR``, else the system temp dir): one blob at a time for registry-to-registry
    copies across hosts, a whole bundle for archive -> registry and for ``extract``/``run`` from a registry."""
    raw = os.environ.get("SOVPACK_SPOOL_DIR")
    return Path(raw) if raw else None


def _push_referrers_fallback(client: RegistryClient, repository: str, subject: str,
                             entries: list[dict[str, Any]]) -> str:
    """Merge our referrers into the ``sha256-<hex>`` tag's index (keeping what others put there) and push it."""
    tag = fallback_tag(subject)
    existing: list[dict[str, Any]] = []
    if client.manifest_exists(repository, tag, scope=client.push_scope(repository)):
        data, _media_type, _digest = client.get_manifest(repository, tag, accept=MT_INDEX)
        with contextlib.suppress(ValueError, AttributeError):
            existing = [m for m in json.loads(data).get("manifests", []) if isinstance(m, dict)]
    merged = {m.get("digest"): m for m in existing}
    for entry in entries:
        merged[entry["digest"]] = entry
    doc = {"schemaVersion": 2, "mediaType": MT_INDEX,
           "manifests": sorted(merged.values(), key=lambda m: str(m.get("digest")))}
    client.put_manifest(repository, tag, canonical_json(doc), MT_INDEX)
    return tag


def copy_bundle(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    *,
    options: RegistryOptions | None = None,
    force: bool = False,
    progress: Progress = _no_progress,
) -> CopyResult:
    """Copy one bundle between a directory, an ``oci-archive:`` tar and a registry (see the module docstring)."""
    options = options or RegistryOptions()
    src, dst = parse_endpoint(source), parse_endpoint(destination)
    if isinstance(src, LayoutEndpoint) and isinstance(dst, LayoutEndpoint) and (
        src.path.resolve() == dst.path.resolve()
    ):
        raise UsageError(f"{src}: source and destination are the same directory")
    started = time.monotonic()
    clients: dict[str, RegistryClient] = {}
    how = "none"
    origin = src
    with contextlib.ExitStack() as stack:
        if isinstance(src, ArchiveEndpoint) and not isinstance(dst, LayoutEndpoint):
            staging = stack.enter_context(_staging_dir(_spool_dir()))
            read_archive(src.path, staging, force=True)
            src = LayoutEndpoint(staging)
        if isinstance(src, ArchiveEndpoint) and isinstance(dst, LayoutEndpoint):  # unpack straight into it
            top, tag, counts = read_archive(src.path, dst.path, force=force)
            digest = top.digest
        elif isinstance(dst, ArchiveEndpoint) and not isinstance(src, ArchiveEndpoint):
            if isinstance(src, RegistryEndpoint):  # pull next to the archive, then write the tar
                staging = stack.enter_context(_staging_dir(dst.path.parent))
                _transfer(src, LayoutEndpoint(staging), options=options, force=True, progress=progress,
                          clients=clients)
                src = LayoutEndpoint(staging)
            top, tag, counts = write_archive(src.path, dst.path, force=force)
            digest = top.digest
        elif not isinstance(src, ArchiveEndpoint) and not isinstance(dst, ArchiveEndpoint):
            graph, tag, counts, how = _transfer(src, dst, options=options, force=force, progress=progress,
                                                clients=clients)
            digest = graph.top.digest
        else:  # pragma: no cover  (archive -> archive was turned into directory -> archive above)
            raise UsageError(f"cannot copy {source} to {destination}")
    return _result(origin, dst, digest, tag, counts, how, started, clients)


def _result(src: Endpoint, dst: Endpoint, digest: str, tag: str | None, counts: _Counts, referrers: str,
            started: float, clients: Mapping[str, RegistryClient]) -> CopyResult:
    stats: dict[str, int] = {}
    for client in clients.values():
        for key, value in client.stats.items():
            stats[key] = stats.get(key, 0) + value
    return CopyResult(
        source=str(src), destination=str(dst), digest=digest, tag=tag, blobs=counts.blobs,
        blobs_transferred=counts.transferred, blobs_skipped=counts.skipped, blobs_mounted=counts.mounted,
        bytes_transferred=counts.bytes, manifests=counts.manifests, referrers=referrers,
        referrer_tags=tuple(counts.referrer_tags), seconds=time.monotonic() - started, stats=stats,
    )


@contextlib.contextmanager
def _staging_dir(parent: Path | None) -> Iterator[Path]:
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=".sovpack-staging.", dir=parent))
    try:
        yield path / "layout"
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ archives


def _archive_mtime() -> int:
    """Fixed: SOURCE_DATE_EPOCH if set, else 0, so the same bundle always gives the same tar."""
    return int(os.environ["SOURCE_DATE_EPOCH"]) if source_date() is not None else 0


def _tar_info(name: str, size: int, *, directory: bool, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o644
    info.size = 0 if directory else size
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class _HashingReader:
    """Feeds tarfile from a file while hashing what it reads."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self.hasher = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n)
        self.hasher.update(data)
        self.size += len(data)
        return data


def write_archive(layout: Path, out: Path, *, force: bool = False) -> tuple[Descriptor, str | None, _Counts]:
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
    items = {d.digest: d for d in graph.blobs}
    items.update({m.descriptor.digest: m.descriptor for m in graph.manifests})
    mtime = _archive_mtime()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    tmp = Path(name)
    counts = _Counts(blobs=len(graph.blobs), manifests=len(graph.manifests))
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(_tar_info(BLOBS_DIR, 0, directory=True, mtime=mtime))
            tar.addfile(_tar_info(f"{BLOBS_DIR}/sha256", 0, directory=True, mtime=mtime))
            for digest in sorted(items):
                desc = items[digest]
                path = blobs.path(digest)
                if path.is_symlink() or not path.is_file():
                    raise VerificationError(f"{layout}: blob {digest} is missing (or a symbolic link)")
                with open(path, "rb") as fh:
                    reader = _HashingReader(fh)
                    tar.addfile(_tar_info(f"{BLOBS_DIR}/sha256/{digest.split(':', 1)[1]}", desc.size, directory=False,
                                          mtime=mtime), reader)  # type: ignore[arg-type]
                if "sha256:" + reader.hasher.hexdigest() != digest or reader.size != desc.size:
                    raise VerificationError(f"{layout}: blob {digest} does not hash to its name; archive not written")
                counts.transferred += 1
                counts.bytes += desc.size
            for entry, data in ((INDEX_FILE, layout_index_bytes(top, tag)), (OCI_LAYOUT_FILE, layout_marker_bytes())):
                info = _tar_info(entry, len(data), directory=False, mtime=mtime)
                tar.addfile(info, _BytesReader(data))  # type: ignore[arg-type]
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return top, tag, counts


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._at = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else self._at + n
        chunk = self._data[self._at : end]
        self._at += len(chunk)
        return chunk


_BLOB_ENTRY = re.compile(rf"^{BLOBS_DIR}/sha256/([0-9a-f]{{64}})$")


def _entry_name(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


def read_archive(archive: Path, dest: Path, *, force: bool = False) -> tuple[Descriptor, str | None, _Counts]:
    """Unpack an ``oci-archive`` tar into a layout directory, streaming: every blob checked against its name.

    Only ``oci-layout``, ``index.json`` and ``blobs/sha256/<hex>`` regular files are accepted (no links, no
    other paths). ``index.json`` is written last, after every blob the bundle reaches is there.
    """
    if not archive.is_file():
        raise UsageError(f"{archive}: no such archive")
    writer = LayoutWriter(dest)
    top_files: dict[str, bytes] = {}
    counts = _Counts()
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
                    if member.size > MAX_TOP_FILE:
                        raise VerificationError(f"{where}: {member.size} bytes; refused")
                    top_files[name] = stream.read()
                    continue
                match = _BLOB_ENTRY.match(name)
                if match is None:
                    raise VerificationError(f"{where}: not part of an OCI image layout (sha256 blobs only)")
                if not staged:
                    staged = True
                    _prepare_for_archive(writer, force=force)
                desc = Descriptor(media_type="application/octet-stream", digest=f"sha256:{match.group(1)}",
                                  size=member.size)
                counts.blobs += 1
                if writer.has(desc):
                    counts.skipped += 1
                    continue
                writer.put_stream(desc, stream, where)  # type: ignore[arg-type]
                counts.transferred += 1
                counts.bytes += member.size
    except tarfile.TarError as e:
        raise VerificationError(f"{archive}: not a readable tar archive: {e}") from e
    if not staged:
        _prepare_for_archive(writer, force=force)
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
    entry = entries[0]
    tag = entry.annotations.get(ANN_REF_NAME)
    graph = collect(writer.blobs.read_manifest, entry)
    for blob in graph.blobs:
        if not writer.blobs.present(blob, verify=False):
            raise VerificationError(f"{archive}: blob {blob.digest} is missing from the archive")
    top = Descriptor(media_type=entry.media_type, digest=entry.digest, size=entry.size)
    counts.manifests = len(graph.manifests)
    writer.finish(top, tag)
    return top, tag, counts


def _prepare_for_archive(writer: LayoutWriter, *, force: bool) -> None:
    """LayoutWriter.prepare before the archive's index.json is read (it comes last in the tar)."""
    writer.prepare(None, force=force)


# -------------------------------------------------------------------------------------- registry as a layout


class RegistryPath(str):
    """A registry reference where verify.py expects a layout path: ``root / "index.json"`` names the tag."""

    __slots__ = ()

    def __truediv__(self, other: str) -> str:
        return f"{self} ({other})"


class RegistryLayout(VerifiedReads):
    """A bundle in a registry, read like ``verify.Layout``: the tag becomes a one-entry top-level index.

    Manifests come from ``/manifests/<digest>``, blobs from ``/blobs/<digest>``; every byte is hashed as it
    streams and compared with the descriptor (digest and size) before use; nothing is stored locally.
    """

    def __init__(self, ref: Reference, options: RegistryOptions | None = None,
                 client: RegistryClient | None = None) -> None:
        super().__init__()
        self.ref = ref
        self.client = client or RegistryClient(ref.registry, options)
        self.repository = ref.repository
        self.root = RegistryPath(str(ref))
        try:
            data, media_type, digest = self.client.get_manifest(ref.repository, ref.reference)
        except RegistryError as e:
            raise VerificationError(f"{ref}: cannot read the bundle: {e}") from e
        self._manifests: dict[str, bytes] = {digest: data}
        annotations = {ANN_REF_NAME: ref.tag} if ref.tag and not ref.digest else {}
        top = Descriptor(media_type=media_type, digest=digest, size=len(data), annotations=annotations)
        self.index: dict[str, Any] = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [top.to_dict()]}
        self.top = top

    def _fetch(self, desc: Descriptor) -> bytes:
        if desc.media_type in MANIFEST_TYPES:
            if desc.digest in self._manifests:
                return self._manifests[desc.digest]
            data, _media_type, _digest = self.client.get_manifest(self.repository, desc.digest)
            self._manifests[desc.digest] = data
            return data
        return b"".join(self.client.iter_blob(self.repository, desc.digest, desc.size))

    def read(self, desc: Descriptor, where: str, limit: int = MAX_MANIFEST) -> bytes:
        return self._read_limited(desc, where, limit)

    def _raw(self, desc: Descriptor, where: str, limit: int) -> bytes:
        try:
            return self._fetch(desc)
        except RegistryError as e:
            raise VerificationError(f"{where}: blob {desc.digest} cannot be read from {self.ref}: {e}") from e

    def check(self, desc: Descriptor, where: str) -> None:
        """Stream the blob through sha256 (constant memory, any size); cached per digest."""
        if desc.digest not in self._checked:
            if desc.media_type in MANIFEST_TYPES:
                with contextlib.suppress(VerificationError):
                    self.read(desc, where)
                if desc.digest not in self._checked:
                    self._checked[desc.digest] = f"manifest {desc.digest} cannot be read"
            else:
                hasher = hashlib.sha256()
                size = 0
                problem: str | None = None
                try:
                    for piece in self.client.iter_blob(self.repository, desc.digest, desc.size):
                        hasher.update(piece)
                        size += len(piece)
                except (RegistryError, VerificationError) as e:
                    problem = f"blob {desc.digest} cannot be read from {self.ref}: {e}"
                self.bytes_checked += size
                if problem is None and "sha256:" + hasher.hexdigest() != desc.digest:
                    problem = f"blob {desc.digest} is corrupt: its content hashes to sha256:{hasher.hexdigest()}"
                self._checked[desc.digest] = problem
        problem = self._checked[desc.digest]
        if problem is not None:
            raise VerificationError(f"{where}: {problem}")

    def stray_blob_problems(self) -> list[str]:
        return []  # a registry has no unreferenced files of this bundle to check

    def stored_size(self) -> int:
        """Every distinct blob and manifest the tag reaches, counted once."""
        graph = collect(lambda d: self.read(d, f"manifest {d.digest}"), self.top)
        return graph.size


# ------------------------------------------------------------------------------------- command helpers


@contextlib.contextmanager
def bundle_location(arg: str | os.PathLike[str], options: RegistryOptions, *, stream: bool = True
                    ) -> Iterator[Path | RegistryLayout]:
    """What ``verify``/``inspect`` read: a directory as is, a registry streamed (``stream``) or pulled into a
    temporary directory, an archive unpacked into one (removed afterwards)."""
    endpoint = parse_endpoint(arg)
    if isinstance(endpoint, LayoutEndpoint):
        yield endpoint.path
        return
    if isinstance(endpoint, RegistryEndpoint) and stream:
        yield RegistryLayout(endpoint.ref, options)
        return
    with _staging_dir(_spool_dir()) as staging:
        if isinstance(endpoint, ArchiveEndpoint):
            read_archive(endpoint.path, staging, force=True)
        else:
            _transfer(endpoint, LayoutEndpoint(staging), options=options, force=True, progress=_no_progress,
                      clients={})
        yield staging


@contextlib.contextmanager
def local_bundle(arg: str | os.PathLike[str], options: RegistryOptions) -> Iterator[Path]:
    """A local directory for ``extract``/``run``/``parity``: registries and archives are pulled first."""
    with bundle_location(arg, options, stream=False) as location:
        if not isinstance(location, Path):  # pragma: no cover  (stream=False always gives a directory)
            raise UsageError(f"{arg}: not a local bundle")
        yield location


__all__ = [
    "ArchiveEndpoint",
    "CopyResult",
    "Graph",
    "LayoutEndpoint",
    "LayoutWriter",
    "RegistryEndpoint",
    "RegistryLayout",
    "bundle_location",
    "collect",
    "copy_bundle",
    "local_bundle",
    "parse_endpoint",
    "read_archive",
    "write_archive",
]
