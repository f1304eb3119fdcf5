"""``sovpack copy``: one bundle from a layout directory, an ``oci-archive:`` tar or a registry to another.

The bundle is walked from its tagged index (:func:`sovpack.oci.blobs.collect`): every manifest and blob it
reaches is copied, each checked against its digest and size before it lands.

Why it is safe to interrupt anywhere:

- into a directory, blobs land one by one through :class:`~sovpack.oci.writer.LayoutWriter` (download to
  ``.partial``, hash, compare, rename), and ``oci-layout`` + ``index.json`` are written last; a re-run skips
  the blobs already there (re-hashed) and resumes a ``.partial`` download with a Range request;
- into a registry, blobs go first (HEAD first, mounted when the source is another repository of the same
  registry), then manifests by digest (children before the indexes that list them), then the referrers
  fallback tags, and the tag itself last: a partial push never leaves a tag pointing at missing content;
- into an archive, the tar is written to a temporary sibling and renamed (:mod:`sovpack.oci.archive`).

A failed copy into a directory says exactly what it leaves: nothing (the directories it made are removed), or
the verified blobs it landed and any ``.partial`` download, which the same command run again continues from.
Staging directories (archive -> registry, registry -> archive) are removed on every exit path.

The tag: a bundle's tag is part of what was signed, so a copy keeps it (:func:`destination_tag`): a
destination without a tag gets the bundle's own, and one that names another tag is refused (rebuild, i.e.
re-sign, the bundle under the new tag instead). What ``copy`` pushed therefore verifies by the reference it
was pushed to.

Signatures and attestations are manifests listed in the bundle index, so they travel with it. Their OCI
``subject`` makes them referrers of the target manifest: a registry with the OCI 1.1 referrers API indexes
them itself (it answers the manifest PUT with ``OCI-Subject``); for one without (Distribution 2.8), the
referrers index is pushed under the fallback tag ``sha256-<hex of the subject>``, merged with what is there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sovpack._io import Progress, check_not_input, no_progress
from sovpack.attest.dsse import canonical_json
from sovpack.errors import UsageError, VerificationError
from sovpack.oci.archive import read_archive, write_archive
from sovpack.oci.blobs import Graph, collect
from sovpack.oci.descriptor import Descriptor
from sovpack.oci.media import ANN_REF_NAME, INDEX_TYPES, MT_INDEX, TAG_RE
from sovpack.oci.tags import bundle_tag_of, tagged_target, target_entries
from sovpack.oci.writer import (
    LayoutWriter,
    LocalBlobs,
    TransferCounts,
    check_bytes,
    layout_index_bytes,
    read_layout_top,
)
from sovpack.transport.auth import RegistryOptions
from sovpack.transport.client import RegistryClient
from sovpack.transport.endpoints import ArchiveEndpoint, Endpoint, LayoutEndpoint, RegistryEndpoint, parse_endpoint
from sovpack.transport.reference import Reference, fallback_tag

SPOOL_ENV = "SOVPACK_SPOOL_DIR"


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
    blobs_unreferenced: int  # blobs an oci-archive held that the bundle does not reach: not imported
    bytes_transferred: int
    manifests: int
    referrers: str  # how attestations are discoverable as referrers at a registry destination
    referrer_tags: tuple[str, ...]
    target_tags: tuple[str, ...]  # per-target tags set at a registry destination (sovpack.oci.tags)
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
            "blobs_unreferenced": self.blobs_unreferenced,
            "bytes_transferred": self.bytes_transferred,
            "manifests": self.manifests,
            "referrers": self.referrers,
            "referrer_tags": list(self.referrer_tags),
            "target_tags": list(self.target_tags),
            "seconds": round(self.seconds, 3),
            "stats": dict(self.stats),
        }


Clients = dict[str, RegistryClient]  # registry host -> its client, shared by one copy (stats are summed)


def _client(clients: Clients, registry: str, options: RegistryOptions) -> RegistryClient:
    if registry not in clients:
        clients[registry] = RegistryClient(registry, options)
    return clients[registry]


class _Source:
    """A tagged bundle to copy from: a complete layout directory or a registry reference."""

    def __init__(self, endpoint: LayoutEndpoint | RegistryEndpoint, options: RegistryOptions, clients: Clients
                 ) -> None:
        self.endpoint = endpoint
        self.client: RegistryClient | None = None
        self.ref: Reference | None = None
        self.blobs: LocalBlobs | None = None
        self._top_data: bytes | None = None
        if isinstance(endpoint, RegistryEndpoint):
            ref = self.ref = endpoint.ref
            self.client = _client(clients, ref.registry, options)
            data, media_type, digest = self.client.get_manifest(ref.repository, ref.reference)
            target = tagged_target(data, media_type, ref.tag) if ref.digest is None else None
            if target is not None:  # a per-target tag: the bundle it belongs to is the unit that is copied
                ref = self.ref = ref.with_tag(bundle_tag_of(str(ref.tag), target))
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
        check_bytes(data, desc, str(self.endpoint))
        return data

    def registry(self) -> tuple[RegistryClient, Reference]:
        if self.client is None or self.ref is None:
            raise UsageError(f"{self.endpoint}: not a registry source")
        return self.client, self.ref

    def download(self, writer: LayoutWriter, desc: Descriptor, report: Callable[[int], None]) -> int:
        """Pull one blob of this registry source into ``writer`` (resumable); returns the bytes transferred."""
        client, ref = self.registry()
        return writer.download(desc, lambda start: client.iter_blob(ref.repository, desc.digest, desc.size, start),
                               f"{client.registry}/{ref.repository}", report)


def _copy_blob_to_layout(source: _Source, writer: LayoutWriter, desc: Descriptor, counts: TransferCounts,
                         report: Callable[[int], None]) -> None:
    if source.blobs is not None:
        writer.put_file(desc, source.blobs.file(desc.digest, str(source.endpoint)), str(source.endpoint))
        counts.bytes += desc.size
    else:
        counts.bytes += source.download(writer, desc, report)
    counts.transferred += 1


def _copy_blob_to_registry(source: _Source, client: RegistryClient, ref: Reference, desc: Descriptor,
                           counts: TransferCounts, report: Callable[[int], None], spool_dir: Path | None) -> None:
    if source.blobs is not None:
        path = source.blobs.file(desc.digest, str(source.endpoint))
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
        counts.bytes += source.download(writer, desc, report)
        client.push_blob(ref.repository, desc.digest, desc.size, writer.blobs.path(desc.digest), progress=report)
        counts.bytes += desc.size
        counts.transferred += 1
    finally:
        shutil.rmtree(spool, ignore_errors=True)  # cleanup only: scratch space


def destination_tag(bundle_tag: str | None, source_tag: str | None, dst: Endpoint, digest: str) -> str | None:
    """The tag a copy gives the bundle at ``dst``: a bundle's tag is part of what was signed, so copy keeps it.

    A destination without a tag (a directory, an archive, ``docker://HOST/REPO``) gets the bundle's own tag (the
    ``org.opencontainers.image.ref.name`` annotation of its bundle index, written by ``sovpack build``); a
    reference naming another tag is refused: the bundle must be rebuilt (re-signed) under that tag. Only a
    bundle built without a tag takes the destination's tag, else the source's.
    """
    requested = None
    if isinstance(dst, RegistryEndpoint):
        requested = dst.ref.tag
        if dst.ref.digest is not None and dst.ref.digest != digest:
            raise UsageError(f"{dst}: pins {dst.ref.digest}, but the bundle index being copied is {digest}")
    if isinstance(dst, RegistryEndpoint) and bundle_tag is not None and requested not in (None, bundle_tag):
        raise UsageError(
            f"{dst}: names the tag {requested!r}, but the bundle was built and signed as {bundle_tag!r}; a bundle's "
            f"tag is part of what was signed, so copy keeps it: copy to {dst.ref.with_tag(None)} (it gets "
            f"{bundle_tag!r}), or rebuild the bundle with --tag {requested} to sign it under the new tag"
        )
    tag = bundle_tag or requested or source_tag
    if tag is not None and not TAG_RE.match(tag):
        raise VerificationError(f"{dst}: the source names the bundle {tag!r}, which is not a valid OCI tag")
    return tag


def transfer(
    src: LayoutEndpoint | RegistryEndpoint,
    dst: LayoutEndpoint | RegistryEndpoint,
    *,
    options: RegistryOptions,
    force: bool,
    progress: Progress,
    clients: Clients,
    scratch: bool = False,
) -> tuple[Graph, str | None, TransferCounts, str]:
    """Copy between a directory and/or registries: (graph, tag, counts, how referrers are discoverable).

    ``scratch``: a directory destination is a staging directory the caller removes.
    """
    source = _Source(src, options, clients)
    graph = collect(source.read_manifest, source.top)
    top_node = graph.manifests[-1]
    tag = destination_tag(top_node.tag, source.tag, dst, graph.top.digest)
    counts = TransferCounts(blobs=len(graph.blobs), manifests=len(graph.manifests))
    total = len(graph.blobs) + len(graph.manifests)
    done = 0

    def step(description: str) -> Callable[[int], None]:
        def report(completed: int) -> None:
            progress(description, completed, 0)

        return report

    if isinstance(dst, LayoutEndpoint):
        top = Descriptor(media_type=graph.top.media_type, digest=graph.top.digest, size=graph.top.size)
        writer = LayoutWriter(dst.path)
        targets = target_entries(top_node.document, tag)
        with writer.filling(scratch=scratch):
            writer.prepare(layout_index_bytes(top, tag, targets), force=force)
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
            writer.finish(top, tag, targets)
        return graph, tag, counts, "none"

    ref = dst.ref
    tag = tag or "latest"
    client = _client(clients, ref.registry, options)
    push = client.push_scope(ref.repository)
    spool_dir = spool_directory()
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
    referrers = "none" if api is None else "api" if api else "tag-fallback"
    client.put_manifest(ref.repository, tag, top_node.data, graph.top.media_type)  # the bundle tag, last ...
    nodes = {node.descriptor.digest: node for node in graph.manifests}
    for entry in target_entries(top_node.document, tag):  # ... then each target's own (sovpack.oci.tags)
        target_tag = entry.annotations[ANN_REF_NAME]
        client.put_manifest(ref.repository, target_tag, nodes[entry.digest].data, entry.media_type)
        counts.target_tags.append(target_tag)
    progress("manifests", total, total)
    return graph, tag, counts, referrers


def _push_referrers_fallback(client: RegistryClient, repository: str, subject: str,
                             entries: list[dict[str, Any]]) -> str:
    """Merge our referrers into the ``sha256-<hex>`` tag's index (keeping what others put there) and push it.

    A tag that holds something other than a referrers index raises RegistryError (naming the registry and
    tag) instead of being overwritten.
    """
    existing = client.fallback_referrers(repository, subject, scope=client.push_scope(repository)) or []
    merged = {m.get("digest"): m for m in existing}
    for entry in entries:
        merged[entry["digest"]] = entry
    doc = {"schemaVersion": 2, "mediaType": MT_INDEX,
           "manifests": sorted(merged.values(), key=lambda m: str(m.get("digest")))}
    tag = fallback_tag(subject)
    client.put_manifest(repository, tag, canonical_json(doc), MT_INDEX)
    return tag


def spool_directory() -> Path | None:
    """Scratch space (``SOVPACK_SPOOL_DIR``, else the system temp dir): one blob at a time for registry-to-registry
    copies across hosts, a whole bundle for archive -> registry and for ``extract``/``run`` from a registry."""
    raw = os.environ.get(SPOOL_ENV)
    return Path(raw) if raw else None


@contextlib.contextmanager
def staging_directory(parent: Path | None) -> Iterator[Path]:
    """A fresh layout path inside a temporary directory under ``parent``; removed afterwards."""
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=".sovpack-staging.", dir=parent))
    try:
        yield path / "layout"
    finally:
        shutil.rmtree(path, ignore_errors=True)  # cleanup only: scratch space


def copy_bundle(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    *,
    options: RegistryOptions | None = None,
    force: bool = False,
    progress: Progress = no_progress,
) -> CopyResult:
    """Copy one bundle between a directory, an ``oci-archive:`` tar and a registry (see the module docstring)."""
    options = options or RegistryOptions()
    src, dst = parse_endpoint(source), parse_endpoint(destination)
    if isinstance(src, LayoutEndpoint) and isinstance(dst, LayoutEndpoint) and (
        src.path.resolve() == dst.path.resolve()
    ):
        raise UsageError(f"{src}: source and destination are the same directory")
    if not isinstance(src, RegistryEndpoint) and not isinstance(dst, RegistryEndpoint):
        check_not_input(dst.path, [src.path])  # writing into (or over) the source would change what is read
    started = time.monotonic()
    clients: Clients = {}
    how = "none"
    origin = src
    unreferenced = 0
    with contextlib.ExitStack() as stack:
        if isinstance(src, ArchiveEndpoint) and not isinstance(dst, LayoutEndpoint):
            staging = stack.enter_context(staging_directory(spool_directory()))
            unreferenced = read_archive(src.path, staging, force=True, scratch=True)[2].unreferenced
            src = LayoutEndpoint(staging)
        if isinstance(src, ArchiveEndpoint) and isinstance(dst, LayoutEndpoint):  # unpack straight into it
            top, tag, counts = read_archive(src.path, dst.path, force=force)
            digest = top.digest
        elif isinstance(dst, ArchiveEndpoint) and not isinstance(src, ArchiveEndpoint):
            if isinstance(src, RegistryEndpoint):  # pull next to the archive, then write the tar
                staging = stack.enter_context(staging_directory(dst.path.parent))
                transfer(src, LayoutEndpoint(staging), options=options, force=True, progress=progress,
                         clients=clients, scratch=True)
                src = LayoutEndpoint(staging)
            top, tag, counts = write_archive(src.path, dst.path, force=force)
            digest = top.digest
        elif not isinstance(src, ArchiveEndpoint) and not isinstance(dst, ArchiveEndpoint):
            graph, tag, counts, how = transfer(src, dst, options=options, force=force, progress=progress,
                                               clients=clients)
            digest = graph.top.digest
        else:  # pragma: no cover  (archive -> archive was turned into directory -> archive above)
            raise UsageError(f"cannot copy {source} to {destination}")
    counts.unreferenced = counts.unreferenced or unreferenced
    return _result(origin, dst, digest, tag, counts, how, started, clients)


def _result(src: Endpoint, dst: Endpoint, digest: str, tag: str | None, counts: TransferCounts, referrers: str,
            started: float, clients: Clients) -> CopyResult:
    stats: dict[str, int] = {}
    for client in clients.values():
        for key, value in client.stats.items():
            stats[key] = stats.get(key, 0) + value
    if isinstance(dst, RegistryEndpoint) and tag and dst.ref.tag is None:
        dst = RegistryEndpoint(dst.ref.with_tag(tag))  # where the bundle went: its own tag
    return CopyResult(
        source=str(src), destination=str(dst), digest=digest, tag=tag, blobs=counts.blobs,
        blobs_transferred=counts.transferred, blobs_skipped=counts.skipped, blobs_mounted=counts.mounted,
        blobs_unreferenced=counts.unreferenced, bytes_transferred=counts.bytes, manifests=counts.manifests,
        referrers=referrers,
        referrer_tags=tuple(counts.referrer_tags), target_tags=tuple(counts.target_tags),
        seconds=time.monotonic() - started, stats=stats,
    )


__all__ = ["CopyResult", "copy_bundle", "destination_tag", "spool_directory", "staging_directory", "transfer"]
