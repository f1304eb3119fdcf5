"""``assemble_bundle``: signed parts built on separate runners joined into one bundle that verifies like a build.

A part is an ordinary signed bundle (``sovpack build ... --push``), typically one target built and
parity-checked on the machine that will serve it. Assembling verifies every part in full against the trusted
keys, requires that all of them were built from the same checkpoint (every source file digest), with the
same parity prompts and the very same parity reference, by the same sovpack version and under the same
bundle name and metadata, with no target twice; then it copies the parts' target manifests, attestations
and the shared reference unchanged and signs a new release statement over them. That release records, per
target, the part it came from (its tag and release digest): a part's provenance names the part's tag, and
``verify`` accepts exactly that (``sovpack.verify.release.check_provenance_agrees``).

The targets' attestations stay the parts' own signatures: verifying the assembled bundle needs the public
keys of the parts' signers as well as the assembler's.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sovpack._io import Progress, atomic_directory, check_not_input, check_output_dir, no_progress, source_date
from sovpack.attest.dsse import SigningKey, VerifyingKey
from sovpack.attest.release import PartOrigin, Release, ReleaseTarget, parse_time
from sovpack.bundle.attestations import release_manifest
from sovpack.bundle.config import DEFAULT_TAG
from sovpack.bundle.earlier import VerifiedBundle, verified_bundle
from sovpack.bundle.members import copy_manifest, store_bundle_index
from sovpack.errors import UsageError, VerificationError
from sovpack.oci.descriptor import Descriptor
from sovpack.oci.media import TAG_RE
from sovpack.oci.store import BlobStore, write_layout
from sovpack.oci.tags import check_target_tags
from sovpack.transport import (
    CopyResult,
    LayoutEndpoint,
    RegistryEndpoint,
    RegistryOptions,
    copy_bundle,
    parse_endpoint,
)
from sovpack.transport.copy import spool_directory, staging_directory


@dataclass(frozen=True, kw_only=True, slots=True)
class AssembledPart:
    """One part as it went into the bundle."""

    location: str
    tag: str
    release: str  # the part's release statement manifest digest
    signer: str  # key id that signed the part's release
    targets: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"location": self.location, "tag": self.tag, "release": self.release, "signer": self.signer,
                "targets": list(self.targets)}


@dataclass(frozen=True, kw_only=True, slots=True)
class AssembleResult:
    """What ``assemble_bundle`` wrote (``output`` is None when the bundle only went to a registry or archive)."""

    destination: str
    output: Path | None
    name: str
    tag: str
    sequence: int
    index_digest: str
    key_id: str
    parts: tuple[AssembledPart, ...]
    targets: tuple[str, ...]
    pushed: CopyResult | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "destination": self.destination,
            "output": str(self.output) if self.output is not None else None,
            "name": self.name,
            "tag": self.tag,
            "sequence": self.sequence,
            "index_digest": self.index_digest,
            "key_id": self.key_id,
            "parts": [p.to_dict() for p in self.parts],
            "targets": list(self.targets),
            "pushed": self.pushed.to_dict() if self.pushed is not None else None,
        }


def assembled_tag(destination: str | os.PathLike[str], tag: str | None) -> str:
    """The assembled bundle's tag: a ``docker://`` destination's, else ``tag``, else ``latest``; never both."""
    endpoint = parse_endpoint(destination)
    named = endpoint.ref.tag if isinstance(endpoint, RegistryEndpoint) else None
    if named is not None and tag is not None and named != tag:
        raise UsageError(f"{destination} names tag {named!r} but --tag is {tag!r}")
    chosen = named or tag or DEFAULT_TAG
    if not TAG_RE.match(chosen):
        raise UsageError(f"tag {chosen!r} is not a valid OCI tag ([A-Za-z0-9_][A-Za-z0-9._-]*, max 128)")
    return chosen


def assemble_bundle(
    destination: str | os.PathLike[str],
    parts: Sequence[str | os.PathLike[str]],
    *,
    key: SigningKey,
    trusted: Sequence[VerifyingKey] = (),
    tag: str | None = None,
    sequence: int | None = None,
    expires: str | None = None,
    options: RegistryOptions | None = None,
    force: bool = False,
    progress: Progress = no_progress,
) -> AssembleResult:
    """Verify every part, check they belong together, and write (or push) one bundle signed by ``key``.

    ``trusted``: public keys the parts may be signed with (the public half of ``key`` always is).
    ``sequence`` defaults to the highest of the parts', ``expires`` to the earliest of theirs.
    """
    if not parts:
        raise UsageError("no parts given (--from BUNDLE, repeatable)")
    options = options or RegistryOptions()
    bundle_tag = assembled_tag(destination, tag)
    if sequence is not None and sequence < 0:
        raise UsageError(f"sequence must be a non-negative integer, got {sequence}")
    if expires is not None:
        try:
            parse_time(expires, "expires")
        except VerificationError as e:
            raise UsageError(str(e)) from None
    dst = parse_endpoint(destination)
    local_parts = [p.path for p in map(parse_endpoint, parts) if not isinstance(p, RegistryEndpoint)]
    if not isinstance(dst, RegistryEndpoint):
        check_not_input(dst.path, local_parts)
        if isinstance(dst, LayoutEndpoint):  # refused before any part is pulled
            check_output_dir(dst.path, force=force)
        elif dst.path.exists() and not force:
            raise UsageError(f"{dst.path}: exists (pass --force to replace it)")
    keys = {k.key_id: k for k in (key.public, *trusted)}
    with contextlib.ExitStack() as stack:
        verified: list[VerifiedBundle] = []
        for i, part in enumerate(parts, start=1):
            progress(f"[{i}/{len(parts)}] verify part {part}", 0, 1)
            verified.append(stack.enter_context(verified_bundle(part, tuple(keys.values()), options, role="part")))
            progress(f"[{i}/{len(parts)}] verify part {part}", 1, 1)
        release = _joined_release(verified, tag=bundle_tag, sequence=sequence, expires=expires)
        problem = check_target_tags(release.tag, [t.target for t in release.targets])
        if problem is not None:
            raise UsageError(problem)
        if isinstance(dst, LayoutEndpoint):
            output: Path | None = dst.path
            index = _write(dst.path, verified, release, key, force=force, inputs=local_parts, progress=progress)
            pushed = None
        else:
            output = None
            staging = stack.enter_context(staging_directory(spool_directory()))
            index = _write(staging, verified, release, key, force=True, inputs=local_parts, progress=progress)
            pushed = copy_bundle(staging, destination, options=options, force=force, progress=progress)
    return AssembleResult(
        destination=str(dst),
        output=output,
        name=release.name,
        tag=release.tag,
        sequence=release.sequence,
        index_digest=index.digest,
        key_id=key.key_id,
        parts=tuple(
            AssembledPart(location=p.location, tag=p.release.tag, release=p.release_digest, signer=p.signer,
                          targets=tuple(t.target for t in p.release.targets))
            for p in verified
        ),
        targets=tuple(t.target for t in release.targets),
        pushed=pushed,
    )


def _joined_release(parts: list[VerifiedBundle], *, tag: str, sequence: int | None, expires: str | None) -> Release:
    """The release of the assembled bundle, or VerificationError naming the part that does not belong."""
    first = parts[0].release
    agree = (
        ("bundle name", lambda r: r.name),
        ("source checkpoint (file digests)", lambda r: r.source),
        ("parity prompts", lambda r: r.prompts),
        ("parity reference", lambda r: r.reference),
        ("sovpack version", lambda r: r.sovpack_version),
        ("version", lambda r: r.version),
        ("licences", lambda r: r.licenses),
        ("metadata", lambda r: dict(r.metadata)),
    )
    for part in parts[1:]:
        for what, value in agree:
            if value(part.release) != value(first):
                raise VerificationError(
                    f"part {part.location}: not the same {what} as part {parts[0].location} "
                    f"({_short(value(part.release))} vs {_short(value(first))}); parts must be built from the "
                    "same checkpoint, prompts and options"
                )
    targets: list[ReleaseTarget] = []
    owner: dict[str, str] = {}
    for part in parts:
        for target in part.release.targets:
            if target.target in owner:
                raise VerificationError(
                    f"part {part.location}: target {target.target} is also in part {owner[target.target]}"
                )
            owner[target.target] = part.location
            origin = target.part or PartOrigin(tag=part.release.tag, release=part.release_digest)
            targets.append(replace(target, part=origin))
    deadlines = sorted(r.release.expires for r in parts if r.release.expires is not None)
    return replace(
        first,
        tag=tag,
        sequence=sequence if sequence is not None else max(p.release.sequence for p in parts),
        created=source_date(),
        expires=expires if expires is not None else (deadlines[0] if deadlines else None),
        targets=tuple(targets),
    )


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _write(out: Path, parts: list[VerifiedBundle], release: Release, key: SigningKey, *, force: bool,
           inputs: list[Path], progress: Progress) -> Descriptor:
    """The parts' target manifests, reference and attestations copied unchanged, then the new release and index."""
    with atomic_directory(out, force=force, inputs=inputs) as tmp:
        store = BlobStore(tmp)
        members: list[Descriptor] = []
        attestations: list[Descriptor] = []
        reference: Descriptor | None = None
        for part in parts:
            view = part.view
            mine = [t.descriptor for t in view.targets]
            theirs = [a.descriptor for a in view.attestations]
            shared = [view.reference.descriptor] if reference is None and view.reference is not None else []
            for desc in [*mine, *shared, *theirs]:
                copy_manifest(part.layout, store, desc, progress)
            members.extend(mine)
            attestations.extend(theirs)
            if shared:
                reference = shared[0]
        if reference is None:  # pragma: no cover  (a verified part always has one)
            raise VerificationError("no part carries a parity reference")
        release_desc = release_manifest(store, statement=release.statement(), key=key, created=release.created)
        index = store_bundle_index(
            store, [*members, reference, *attestations, release_desc], name=release.name, tag=release.tag,
            targets=[t.target for t in release.targets], licenses=release.licenses, version=release.version,
            created=release.created,
        )
        write_layout(tmp, store, index, release.tag)
    return index


__all__ = ["AssembleResult", "AssembledPart", "assemble_bundle", "assembled_tag"]
