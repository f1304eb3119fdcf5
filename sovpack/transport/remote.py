"""A bundle wherever it is, as the bundle readers want it: a registry read like a layout, or a local copy.

``RegistryLayout`` lets ``verify``/``inspect`` run straight against a registry (the same code as for a
directory: see :class:`sovpack.oci.blobs.BlobSource`); ``extract``/``run``/``parity`` pull into a temporary
directory first (:func:`local_bundle`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sovpack._io import no_progress
from sovpack.errors import RegistryError, UsageError, VerificationError
from sovpack.oci.archive import read_archive
from sovpack.oci.blobs import VerifiedReads, collect
from sovpack.oci.descriptor import Descriptor
from sovpack.oci.media import ANN_REF_NAME, ANN_TARGET, MANIFEST_TYPES, MAX_JSON_DOCUMENT, MT_INDEX
from sovpack.oci.reader import Layout, named_target
from sovpack.oci.store import is_bundle_dir
from sovpack.oci.tags import bundle_tag_of, manifest_target
from sovpack.transport.auth import RegistryOptions
from sovpack.transport.client import RegistryClient
from sovpack.transport.copy import spool_directory, staging_directory, transfer
from sovpack.transport.endpoints import ArchiveEndpoint, LayoutEndpoint, RegistryEndpoint, parse_endpoint
from sovpack.transport.reference import Reference


class RegistryPath(str):
    """A registry reference where the readers expect a layout path: ``root / "index.json"`` names the tag."""

    __slots__ = ()

    def __truediv__(self, other: str) -> str:
        return f"{self} ({other})"


class RegistryLayout(VerifiedReads):
    """A bundle in a registry, read like ``sovpack.oci.reader.Layout``: the tag becomes a one-entry top-level index.

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
        entries = [top]
        self.requested_tag: str | None = None
        target = manifest_target(data, media_type) if ref.tag and not ref.digest else None
        bundle_tag = bundle_tag_of(str(ref.tag), target) if target is not None else None
        if target is not None and bundle_tag is None:
            raise VerificationError(f"{ref}: the tag resolves to the manifest of target {target}, which this tag does "
                                    "not name (a per-target tag moved to another manifest?)")
        if target is not None:  # a per-target tag: the bundle it belongs to is what gets read (sovpack.oci.tags)
            try:
                bundle_data, bundle_type, bundle_digest = self.client.get_manifest(ref.repository, str(bundle_tag))
            except RegistryError as e:
                raise VerificationError(f"{ref}: is target {target} of bundle tag {bundle_tag!r}, which cannot be "
                                        f"read: {e}") from e
            self._manifests[bundle_digest] = bundle_data
            top = Descriptor(media_type=bundle_type, digest=bundle_digest, size=len(bundle_data),
                             annotations={ANN_REF_NAME: str(bundle_tag)})
            entries = [top, Descriptor(media_type=media_type, digest=digest, size=len(data),
                                       annotations={**annotations, ANN_TARGET: target})]
            self.requested_tag = ref.tag
        self.index: dict[str, Any] = {"schemaVersion": 2, "mediaType": MT_INDEX,
                                      "manifests": [e.to_dict() for e in entries]}
        self.top = top

    def _fetch(self, desc: Descriptor) -> bytes:
        if desc.media_type in MANIFEST_TYPES:
            if desc.digest in self._manifests:
                return self._manifests[desc.digest]
            data, _media_type, _digest = self.client.get_manifest(self.repository, desc.digest)
            self._manifests[desc.digest] = data
            return data
        return b"".join(self.client.iter_blob(self.repository, desc.digest, desc.size))

    def read(self, desc: Descriptor, where: str, limit: int = MAX_JSON_DOCUMENT) -> bytes:
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
                self._check_manifest(desc, where)
            else:
                self._check_blob(desc)
        problem = self._checked[desc.digest]
        if problem is not None:
            raise VerificationError(f"{where}: {problem}")

    def _check_manifest(self, desc: Descriptor, where: str) -> None:
        try:
            self.read(desc, where)
        except VerificationError as e:
            # NOTE: recorded, not swallowed: check() raises it (read() may have recorded "corrupt" already)
            if self._checked.get(desc.digest) is None:
                self._checked[desc.digest] = f"manifest {desc.digest} cannot be read ({e})"

    def _check_blob(self, desc: Descriptor) -> None:
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

    def stray_blob_problems(self) -> list[str]:
        return []  # a registry has no unreferenced files of this bundle to check

    def stored_size(self) -> int:
        """Every distinct blob and manifest the tag reaches, counted once."""
        graph = collect(lambda d: self.read(d, f"manifest {d.digest}"), self.top)
        return graph.size


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
    with staging_directory(spool_directory()) as staging:
        if isinstance(endpoint, ArchiveEndpoint):
            read_archive(endpoint.path, staging, force=True, scratch=True)
        else:
            transfer(endpoint, LayoutEndpoint(staging), options=options, force=True,
                     progress=no_progress, clients={}, scratch=True)
        yield staging


def target_of_tag(arg: str | os.PathLike[str], local: Path, tag: str | None = None) -> str | None:
    """The target a per-target tag names (``tag``, else a ``docker://`` reference's own), looked up in the local
    layout the bundle was brought to; None when the tag names the bundle itself, there is none, or ``local`` is
    not a bundle (a checkpoint or an artifact directory given to ``run``)."""
    if not is_bundle_dir(local):
        return None
    endpoint = parse_endpoint(arg)
    if tag is None and isinstance(endpoint, RegistryEndpoint) and endpoint.ref.digest is None:
        tag = endpoint.ref.tag
    named = named_target(Layout(local), tag)
    return named[0] if named is not None else None


@contextlib.contextmanager
def local_bundle(arg: str | os.PathLike[str], options: RegistryOptions) -> Iterator[Path]:
    """A local directory for ``extract``/``run``/``parity``: registries and archives are pulled first."""
    with bundle_location(arg, options, stream=False) as location:
        if not isinstance(location, Path):  # pragma: no cover  (stream=False always gives a directory)
            raise UsageError(f"{arg}: not a local bundle")
        yield location


__all__ = ["RegistryLayout", "RegistryPath", "bundle_location", "local_bundle", "target_of_tag"]
