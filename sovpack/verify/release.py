"""Checking a bundle against its signed release statement: membership, identity, tag, expiry, provenance.

Per-target attestations prove each target; the release statement is what ties them together. A bundle must
carry exactly one release statement signed by a trusted key, and then:

- every manifest of the bundle index is one the release lists, and every manifest it lists is present, so a
  target (with its attestations) spliced in from another signed build, or one removed, is refused;
- each target's attestations are the very ones the release lists for it (not a valid attestation of the
  same target from another build);
- each target's provenance names the release's bundle name and tag and exactly its source files, and each
  parity report was judged with the limits the release records;
- the tag the bundle was reached by (layout tag or registry reference) is the signed tag (rollback/freeze:
  an old release re-tagged as new is refused), and an expired release is refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sovpack.attest.dsse import Statement, VerifyingKey, verify_bundle_signature
from sovpack.attest.release import Release
from sovpack.errors import VerificationError
from sovpack.oci.media import ANN_BUNDLE_TAG, ANN_LICENSES, ANN_REF_NAME, ANN_TARGETS, ANN_TITLE, ANN_VERSION
from sovpack.verify.view import BundleView


@dataclass(frozen=True, kw_only=True, slots=True)
class ReleaseCheck:
    """The verified release (None when there is none valid), who signed it, and what failed."""

    release: Release | None
    signer: str | None
    failures: tuple[str, ...]


def check_release(
    view: BundleView, keys: Sequence[VerifyingKey], *, check_signatures: bool = True, now: datetime | None = None
) -> ReleaseCheck:
    """Verify the release statement and the bundle's membership against it (signatures of targets aside)."""
    if not view.releases:
        return ReleaseCheck(release=None, signer=None, failures=(
            "the bundle has no signed release statement (built by an older sovpack?): its targets are not tied "
            "together by any signature",
        ))
    if len(view.releases) > 1:
        digests = ", ".join(r.descriptor.digest for r in view.releases)
        problem = f"the bundle has several release statements: {digests}"
        return ReleaseCheck(release=None, signer=None, failures=(problem,))
    entry = view.releases[0]
    where = f"release statement {entry.descriptor.digest}"
    try:
        if check_signatures:
            verified = verify_bundle_signature(entry.bundle, keys)
            statement, signer = verified.statement, verified.signer.key_id
        else:
            statement, signer = entry.bundle.envelope.statement(), "unverified"
        release = Release.from_statement(statement)
    except VerificationError as e:
        return ReleaseCheck(release=None, signer=None, failures=(f"{where}: {e}",))
    failures = [*_membership(view, release, entry.descriptor.digest), *_identity(view, release, now)]
    return ReleaseCheck(release=release, signer=signer, failures=tuple(failures))


def _membership(view: BundleView, release: Release, own_digest: str) -> list[str]:
    failures = []
    listed = release.manifest_digests()
    present: dict[str, str] = {t.descriptor.digest: f"target {t.name}" for t in view.targets}
    if view.reference is not None:
        present[view.reference.descriptor.digest] = "parity reference"
    for att in view.attestations:
        present[att.descriptor.digest] = f"attestation ({att.kind_hint or '?'})"
    for digest, what in sorted(present.items()):
        if digest not in listed and digest != own_digest:
            failures.append(
                f"{what} {digest} is not part of the signed release (spliced in from another build?)"
            )
    for digest in sorted(listed - set(present)):
        failures.append(f"the signed release lists manifest {digest}, which is not in the bundle")
    for target in view.targets:
        signed = release.target(target.name)
        if signed is None:
            failures.append(f"target {target.name}: not a target of the signed release")
        elif signed.manifest != target.descriptor.digest:
            failures.append(
                f"target {target.name}: manifest {target.descriptor.digest} is not the one the release signed "
                f"({signed.manifest})"
            )
    names = {t.name for t in view.targets}
    for signed in release.targets:
        if signed.target not in names:
            failures.append(f"target {signed.target} of the signed release is missing from the bundle")
    if view.reference is not None and view.reference.descriptor.digest != release.reference:
        failures.append("the parity reference is not the one the release signed")
    return failures


def _identity(view: BundleView, release: Release, now: datetime | None) -> list[str]:
    failures = []
    # Index annotations are a convenience for tools (and may be dropped by them); present, they must agree.
    claims = {
        ANN_TITLE: release.name,
        ANN_BUNDLE_TAG: release.tag,
        ANN_REF_NAME: release.tag,  # bundles before dev.sovpack.tag
        ANN_VERSION: release.version,
        ANN_LICENSES: " AND ".join(release.licenses) if release.licenses else None,
        ANN_TARGETS: ",".join(t.target for t in release.targets),
    }
    for key, signed in claims.items():
        claimed = view.annotations.get(key)
        if claimed is not None and claimed != signed:
            failures.append(f"the bundle index annotation {key} says {claimed!r}, the signed release {signed!r}")
    if view.tag is not None and view.tag != release.tag:
        failures.append(
            f"the bundle is tagged {view.tag!r} here but was signed as {release.tag!r} "
            "(re-tagged, or an older release under a newer tag?)"
        )
    if release.expired(now):
        failures.append(f"the signed release expired at {release.expires}")
    return failures


def check_attestation_membership(release: Release, target: str, kind: str, digest: str) -> None:
    """A valid attestation must also be the one the release lists for this target and kind."""
    signed = release.target(target)
    if signed is None or signed.attestations.get(kind) != digest:
        raise VerificationError(f"this {kind} attestation is not the one the signed release lists for {target}")


def check_provenance_agrees(release: Release, target: str, statement: Statement) -> None:
    """The target's provenance must name the release's bundle and exactly its source files.

    An assembled release (``sovpack assemble``) records the part each target was built in: that target's
    provenance names the part's tag, which the release signs, instead of the release's own.
    """
    definition = statement.predicate.get("buildDefinition")
    params = definition.get("externalParameters") if isinstance(definition, Mapping) else None
    bundle = params.get("bundle") if isinstance(params, Mapping) else None
    signed = release.target(target)
    tag = signed.part.tag if signed is not None and signed.part is not None else release.tag
    if not isinstance(bundle, Mapping) or (bundle.get("name"), bundle.get("tag")) != (release.name, tag):
        named = (bundle.get("name"), bundle.get("tag")) if isinstance(bundle, Mapping) else None
        whose = "the signed release is" if tag == release.tag else "the signed release built it in part"
        raise VerificationError(f"provenance names bundle {named}, {whose} ({release.name!r}, {tag!r})")
    deps = definition.get("resolvedDependencies") if isinstance(definition, Mapping) else None
    recorded: dict[str, Any] = {}
    for dep in deps if isinstance(deps, list) else []:
        if isinstance(dep, Mapping) and isinstance(dep.get("digest"), Mapping):
            recorded[str(dep.get("name"))] = dep["digest"].get("sha256")
    expected = {f.path: f.sha256 for f in release.source}
    if recorded != expected:
        differ = sorted(set(recorded) ^ set(expected) | {p for p in recorded if recorded[p] != expected.get(p)})
        raise VerificationError(f"provenance records other source files than the signed release: {differ[:5]}")


def check_thresholds_agree(release: Release, target: str, thresholds: Mapping[str, Any]) -> None:
    """The parity report must have been judged with the limits the release records for the target."""
    signed = release.target(target)
    if signed is not None and dict(signed.thresholds) != dict(thresholds):
        raise VerificationError("the parity report was judged with other limits than the signed release records")


__all__ = [
    "ReleaseCheck",
    "check_attestation_membership",
    "check_provenance_agrees",
    "check_release",
    "check_thresholds_agree",
]
