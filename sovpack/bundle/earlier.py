"""A signed bundle opened as an input of another: verified in full first, then its members reused verbatim.

Three commands read a bundle this way: ``assemble`` (its parts), ``build --reference-from`` (a bundle whose
parity reference a part shares, so runners on different CPUs judge against the same answers, byte for
byte) and ``build --reuse-from`` (unchanged targets carried over instead of rebuilt). Whatever the location
(directory, ``oci-archive:``, ``docker://``), the bundle is brought to a local layout, verified against the
trusted keys (every blob, signature and binding, and its release), and only then read.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sovpack.attest.dsse import VerifyingKey
from sovpack.attest.release import Release
from sovpack.bundle.members import BuiltTarget, copy_manifest
from sovpack.errors import RegistryError, VerificationError
from sovpack.oci.descriptor import Descriptor
from sovpack.oci.reader import Layout
from sovpack.oci.store import BlobStore
from sovpack.parity.embeddings import RecordedEmbeddings
from sovpack.parity.recorded import ReferenceConfig
from sovpack.transport import RegistryOptions, local_bundle
from sovpack.verify.check import verify_view
from sovpack.verify.recheck import StoredReference, stored_embeddings, stored_reference
from sovpack.verify.view import BundleView, read_bundle


@dataclass(frozen=True, kw_only=True, slots=True)
class VerifiedBundle:
    """A bundle that verified against the trusted keys, read from a local layout (satisfies
    ``sovpack.bundle.build.EarlierRelease``)."""

    location: str
    view: BundleView
    release: Release
    release_digest: str  # its release statement's manifest
    signer: str  # key id that signed the release
    scratch: Path  # private copies of the stored reference live here

    @property
    def layout(self) -> Layout:
        return self.view.local_layout()

    def members(self) -> dict[str, Descriptor]:
        """Every member manifest's bundle index entry, by digest."""
        entries = [t.descriptor for t in self.view.targets] + [a.descriptor for a in self.view.attestations]
        if self.view.reference is not None:
            entries.append(self.view.reference.descriptor)
        return {d.digest: d for d in entries}

    def copy_into(self, store: BlobStore, digest: str) -> Descriptor:
        desc = self.members().get(digest)
        if desc is None:
            raise VerificationError(f"{self.location}: manifest {digest} is not a member of the bundle")
        copy_manifest(self.layout, store, desc)
        return desc

    def reference(self) -> StoredReference | RecordedEmbeddings:
        """The stored answers (copied privately, hashed while copied, then loaded)."""
        if self.view.reference is not None and isinstance(self.view.reference.config, ReferenceConfig):
            return stored_reference(self.view, self.scratch)[0]
        return stored_embeddings(self.view, self.scratch)[0]

    def provenance_parameters(self, target: str) -> Mapping[str, Any]:
        signed = self.release.target(target)
        digest = signed.attestations.get("provenance") if signed is not None else None
        entry = next((a for a in self.view.attestations if a.descriptor.digest == digest), None)
        if entry is None:
            return {}
        definition = entry.bundle.envelope.statement().predicate.get("buildDefinition")  # signature verified
        params = definition.get("externalParameters") if isinstance(definition, Mapping) else None
        return dict(params) if isinstance(params, Mapping) else {}

    def built_target(self, target: str) -> BuiltTarget:
        entry = self.view.target(target)
        signed = self.release.target(target)
        return BuiltTarget(target=target, manifest_digest=entry.descriptor.digest, files=tuple(sorted(entry.files)),
                           size=entry.size, parity=signed.parity if signed is not None else "?",
                           reused_from=self.location)


@contextlib.contextmanager
def verified_bundle(location: str | os.PathLike[str], keys: Sequence[VerifyingKey], options: RegistryOptions,
                    *, role: str = "bundle") -> Iterator[VerifiedBundle]:
    """The bundle at ``location`` brought local (registries and archives to a temporary layout) and verified;
    VerificationError naming ``role`` and the location when anything about it does not hold."""
    where = f"{role} {location}"
    with contextlib.ExitStack() as stack:
        try:
            path = stack.enter_context(local_bundle(location, options))
        except (VerificationError, RegistryError) as e:  # pulled or unpacked: a corrupt or missing blob
            raise type(e)(f"{where}: {e}") from e
        view = read_bundle(path, deep=True)  # every layer hashed once, here
        report = verify_view(view, keys)
        if not report.ok:
            more = len(report.failures) - 1
            suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
            raise VerificationError(f"{where}: does not verify: {report.failures[0]}{suffix}")
        if report.release is None or report.release_signer is None:  # pragma: no cover  (verify fails without)
            raise VerificationError(f"{where}: has no verified release statement")
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sovpack-earlier-")))
        yield VerifiedBundle(location=str(location), view=view, release=report.release,
                             release_digest=view.releases[0].descriptor.digest, signer=report.release_signer,
                             scratch=scratch)


__all__ = ["VerifiedBundle", "verified_bundle"]
