"""``verify``: every blob, manifest, signature, provenance and parity attestation of a bundle.

What ``verify`` checks, and what it trusts:

- the layout: ``oci-layout``, ``index.json`` (the bundle's tag must match the bundle index's own; its per-target
  tags must name exactly their targets' manifests),
  and *every* blob under ``blobs/sha256`` against its name, plus every descriptor's digest and size;
- every manifest in the bundle index: target manifests (ModelPack config valid, layer media types known, file
  paths safe and unique), the parity reference, and attestation manifests (one Sigstore bundle layer each,
  an OCI ``subject``); anything else is refused;
- every attestation's DSSE signature against the trusted keys; the signed statement decides what the
  attestation is (predicate type) and which target it covers (its subject): the model-signing signature
  must list exactly the target's files and digests, provenance and parity must name the target manifest
  digest, and the parity result must match the signed ``parity.json`` and the bundle's parity reference;
- each target has all three attestations from a trusted key; required targets exist; each target's parity
  status is allowed (PASSED and WARNED by default).

Index annotations (``dev.sovpack.*``) are a convenience mapping for tools; they must agree with the signed
content but are never trusted on their own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sovpack._io import parse_json
from sovpack.attest import oms, provenance
from sovpack.attest.dsse import Statement, VerifyingKey, load_trusted_keys, verify_bundle_signature
from sovpack.attest.release import Release
from sovpack.errors import ParityError, UsageError, VerificationError
from sovpack.oci.blobs import BlobSource
from sovpack.oci.descriptor import Descriptor
from sovpack.oci.media import ATTESTATION_KINDS, KIND_REFERENCE, PARITY_PREDICATE_TYPE
from sovpack.parity.report import PARITY_FILE
from sovpack.verify.enforce import release_failures, role_key_ids, signer_failures, target_failures
from sovpack.verify.policy import DEFAULT_ALLOWED_PARITY, PARITY_STATUSES, Policy
from sovpack.verify.release import (
    check_attestation_membership,
    check_provenance_agrees,
    check_release,
    check_thresholds_agree,
)
from sovpack.verify.trust import TrustState
from sovpack.verify.view import BundleView, TargetEntry, read_bundle

if TYPE_CHECKING:
    from sovpack.parity import ParityReport

PREDICATE_KINDS = {
    oms.PREDICATE_TYPE: "signature",
    provenance.PREDICATE_TYPE: "provenance",
    PARITY_PREDICATE_TYPE: "parity",
}
KIND_LABELS = {
    "signature": f"model-signing signature ({oms.PREDICATE_TYPE})",
    "provenance": f"SLSA provenance ({provenance.PREDICATE_TYPE})",
    "parity": f"parity test-result ({PARITY_PREDICATE_TYPE})",
}


@dataclass(frozen=True, kw_only=True, slots=True)
class VerifiedTarget:
    """One target's verification outcome."""

    name: str
    format: str
    precision: str
    manifest_digest: str
    size: int
    files: tuple[str, ...]
    parity: str | None
    signers: tuple[str, ...]  # key ids that signed all three attestations
    attestations: Mapping[str, tuple[str, ...]]  # kind -> key ids with a valid attestation

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "format": self.format,
            "precision": self.precision,
            "manifest_digest": self.manifest_digest,
            "size": self.size,
            "files": list(self.files),
            "parity": self.parity,
            "signers": list(self.signers),
            "attestations": {k: list(v) for k, v in self.attestations.items()},
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class VerifyReport:
    """The outcome of ``verify_bundle``: ok, or every problem found, each naming its blob/target/check."""

    path: str
    tag: str | None
    name: str | None
    release: Release | None
    release_signer: str | None
    index_digest: str
    trusted_keys: tuple[str, ...]
    targets: tuple[VerifiedTarget, ...]
    failures: tuple[str, ...]
    blobs_checked: int
    bytes_checked: int

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "path": self.path,
            "tag": self.tag,
            "name": self.name,
            "release": release_summary(self.release, self.release_signer),
            "index_digest": self.index_digest,
            "trusted_keys": list(self.trusted_keys),
            "targets": [t.to_dict() for t in self.targets],
            "failures": list(self.failures),
            "blobs_checked": self.blobs_checked,
            "bytes_checked": self.bytes_checked,
        }

    def raise_for_failures(self) -> None:
        if not self.failures:
            return
        first = self.failures[0]
        more = len(self.failures) - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''}; --json lists them all)" if more else ""
        raise VerificationError(f"{self.path}: verification failed: {first}{suffix}")


def _check_binding(
    view: BundleView,
    target: TargetEntry,
    statement: Statement,
    kind: str,
    release: Release | None,
) -> ParityReport | None:
    """Kind-specific binding checks; returns the (signed) parity report for parity attestations."""
    digest = target.descriptor.digest
    if kind == "signature":
        manifest = oms.parse_statement(statement)
        expected = {path: layer.digest.split(":", 1)[1] for path, layer in target.files.items()}
        if dict(manifest.files) != expected:
            missing = sorted(set(expected) - set(manifest.files))
            extra = sorted(set(manifest.files) - set(expected))
            changed = sorted(p for p in set(expected) & set(manifest.files) if expected[p] != manifest.files[p])
            detail = "; ".join(
                part
                for part in (
                    f"unsigned files {missing}" if missing else "",
                    f"signed files not in the target {extra}" if extra else "",
                    f"files whose digest differs from the signed one {changed}" if changed else "",
                )
                if part
            )
            raise VerificationError(f"the signed file list does not match the target's files: {detail}")
        return None
    provenance.check_subject(statement, digest)
    if kind == "provenance":
        provenance.check(statement, manifest_digest=digest, target=target.name)
        if release is not None:
            check_provenance_agrees(release, target.name, statement)
        return None
    predicate = statement.predicate
    result = predicate.get("result")
    if result not in PARITY_STATUSES:
        raise VerificationError(f"parity result {result!r} is not one of {', '.join(PARITY_STATUSES)}")
    configuration = predicate.get("configuration")
    if not isinstance(configuration, list):
        raise VerificationError("parity attestation has no configuration list")
    named = {
        str(c.get("name")): (c.get("digest") or {}).get("sha256")
        for c in configuration
        if isinstance(c, Mapping) and isinstance(c.get("digest"), Mapping)
    }
    report_layer = target.files.get(PARITY_FILE)
    if report_layer is None:
        raise VerificationError(f"the target has no {PARITY_FILE}")
    if named.get(PARITY_FILE) != report_layer.digest.split(":", 1)[1]:
        raise VerificationError(
            f"the signed {PARITY_FILE} digest is sha256:{named.get(PARITY_FILE)}, the bundle's is {report_layer.digest}"
        )
    if view.reference is not None and named.get(KIND_REFERENCE) != view.reference.descriptor.digest.split(":", 1)[1]:
        raise VerificationError("the parity attestation names a different parity reference than this bundle's")
    report = load_report(view, report_layer, f"target {target.name} {PARITY_FILE}")
    if report.status != result:
        raise VerificationError(f"the signed result is {result} but {PARITY_FILE} says {report.status}")
    if report.target != target.name:
        raise VerificationError(f"{PARITY_FILE} is the report of {report.target!r}")
    if release is not None:
        check_thresholds_agree(release, target.name, report.thresholds.to_dict())
    return report


def release_summary(release: Release | None, signer: str | None) -> dict[str, Any] | None:
    """The signed facts of a release, as verify and inspect report them."""
    if release is None:
        return None
    parts = {t.target: t.part.to_dict() for t in release.targets if t.part is not None}
    return {
        **({"parts": parts} if parts else {}),  # assembled or reused: the bundle each target was built in
        "name": release.name,
        "tag": release.tag,
        "sequence": release.sequence,
        "version": release.version,
        "created": release.created,
        "expires": release.expires,
        "licenses": list(release.licenses),
        "metadata": dict(release.metadata),
        "sovpack_version": release.sovpack_version,
        "targets": [t.target for t in release.targets],
        "signer": signer,
    }


def load_report(view: BundleView, layer: Descriptor, where: str) -> ParityReport:
    """A target's ``parity.json`` from the bundle (digest-checked), as a report."""
    from sovpack.parity import ParityReport

    data = view.layout.read(layer, where)
    try:
        return ParityReport.parse(parse_json(data, where, error=ParityError), where)
    except ParityError as e:
        raise VerificationError(f"{where}: not a valid parity report: {e}") from e


def verify_view(
    view: BundleView,
    keys: Sequence[VerifyingKey],
    *,
    required_targets: Sequence[str] = (),
    allowed_parity: Sequence[str] = DEFAULT_ALLOWED_PARITY,
    check_signatures: bool = True,
    policy: Policy | None = None,
) -> VerifyReport:
    """Check a parsed bundle (signatures, bindings, policy); every failure is listed in the report, none raised.

    ``policy`` adds its ceiling (key roles, signers, parity limits, name/tag/sequence/index pins); without one
    the default policy applies (one signing identity per target, the targets' own parity limits).
    """
    policy = policy or Policy()
    failures = list(view.problems)
    by_digest = {t.descriptor.digest: t for t in view.targets}
    valid: dict[str, dict[str, list[str]]] = {t.name: {k: [] for k in ATTESTATION_KINDS} for t in view.targets}
    reports: dict[str, ParityReport] = {}
    if check_signatures and not keys:
        raise UsageError("no trusted public key: pass --key PUB.pem (or keys in a --policy file)")
    roles = role_key_ids(policy, tuple(keys)) if check_signatures else {}
    release_check = check_release(view, keys, check_signatures=check_signatures)
    failures.extend(release_check.failures)
    release = release_check.release
    if release_check.signer is not None and check_signatures:
        failures.extend(signer_failures("release statement", "release", release_check.signer, roles))
    failures.extend(release_failures(view, policy, release))
    for att in view.attestations:
        where = f"attestation {att.descriptor.digest}"
        if att.kind_hint:
            where += f" ({att.kind_hint})"
        target = by_digest.get(att.subject)
        if target is None:
            failures.append(
                f"{where}: refers to manifest {att.subject}, which is not a target of this bundle "
                "(an attestation from another bundle?)"
            )
            continue
        where = f"target {target.name}: {where}"
        try:
            if check_signatures:
                verified = verify_bundle_signature(att.bundle, keys)
                statement, signer = verified.statement, verified.signer.key_id
            else:
                statement, signer = att.bundle.envelope.statement(), "unverified"
            kind = PREDICATE_KINDS.get(statement.predicate_type)
            if kind is None:
                raise VerificationError(f"unknown predicate type {statement.predicate_type!r}")
            if att.predicate_hint is not None and att.predicate_hint != statement.predicate_type:
                raise VerificationError(
                    f"the manifest says {att.predicate_hint!r} but the signed statement is {statement.predicate_type!r}"
                )
            if att.kind_hint is not None and att.kind_hint != kind:
                raise VerificationError(f"the manifest says {att.kind_hint!r} but the signed statement is a {kind}")
            report = _check_binding(view, target, statement, kind, release)
            if release is not None:  # after the specific binding checks, whose messages say more
                check_attestation_membership(release, target.name, kind, att.descriptor.digest)
        except VerificationError as e:
            failures.append(f"{where}: {e}")
            continue
        role_problems = signer_failures(where, kind, signer, roles) if check_signatures else []
        if role_problems:
            failures.extend(role_problems)
            continue
        valid[target.name][kind].append(signer)
        if report is not None:
            reports[target.name] = report
    results = []
    for target in view.targets:
        kinds = valid[target.name]
        for kind in ATTESTATION_KINDS:
            if not kinds[kind]:
                who = "signed by a trusted key" if check_signatures else "present"
                failures.append(f"target {target.name}: no valid {KIND_LABELS[kind]} {who}")
        report = reports.get(target.name)
        status = report.status if report is not None else None
        if status is not None and status not in allowed_parity:
            failures.append(
                f"target {target.name}: parity {status} is not allowed (allowed: {', '.join(allowed_parity)})"
            )
        signers = set.intersection(*(set(v) for v in kinds.values())) if kinds else set()
        if check_signatures:
            failures.extend(target_failures(view, target, policy, report, signers))
        results.append(
            VerifiedTarget(
                name=target.name,
                format=target.format,
                precision=target.precision,
                manifest_digest=target.descriptor.digest,
                size=target.size,
                files=tuple(sorted(target.files)),
                parity=status,
                signers=tuple(sorted(signers)),
                attestations={k: tuple(sorted(set(v))) for k, v in kinds.items()},
            )
        )
    names = {t.name for t in view.targets}
    if view.named_target is not None:  # opened by a per-target tag (its manifest: view._target_tag_problems)
        required_targets = (*required_targets, view.named_target[0])
    for required in required_targets:
        if required not in names:
            failures.append(f"required target {required} is not in the bundle (targets: {', '.join(sorted(names))})")
    if view.reference is None:
        failures.append("the bundle has no parity reference manifest")
    failures.extend(view.layout.stray_blob_problems())
    return VerifyReport(
        path=str(view.layout.root),
        tag=release.tag if release is not None else view.tag,
        name=release.name if release is not None else view.name,
        release=release,
        release_signer=release_check.signer,
        index_digest=view.index_descriptor.digest,
        trusted_keys=tuple(k.key_id for k in keys),
        targets=tuple(results),
        failures=tuple(dict.fromkeys(failures)),
        blobs_checked=view.layout.blobs_checked,
        bytes_checked=view.layout.bytes_checked,
    )


def normalize_targets(names: Sequence[str]) -> tuple[str, ...]:
    """``gguf`` -> ``gguf:<default precision>`` etc., via the target registry when it knows the format."""
    from sovpack.targets.base import TargetRef
    out = []
    for name in names:
        try:
            out.append(str(TargetRef.parse(name)))
        except UsageError:
            out.append(name.strip().lower())
    return tuple(out)


def verify_bundle(
    path: str | Path | BlobSource,
    *,
    keys: Sequence[VerifyingKey] = (),
    tag: str | None = None,
    required_targets: Sequence[str] = (),
    allowed_parity: Sequence[str] = DEFAULT_ALLOWED_PARITY,
    policy: Policy | None = None,
) -> VerifyReport:
    """Verify everything (see the module docstring); failures are listed in the report, not raised."""
    bad = sorted(set(allowed_parity) - set(PARITY_STATUSES))
    if bad:
        raise UsageError(f"unknown parity status(es) {', '.join(bad)}; known: {', '.join(PARITY_STATUSES)}")
    view = read_bundle(path, tag=tag, deep=True)
    return verify_view(
        view, keys, required_targets=normalize_targets(required_targets), allowed_parity=allowed_parity,
        policy=policy,
    )


def verify_with_policy(
    path: str | Path | BlobSource,
    *,
    key_paths: Sequence[str | Path] = (),
    policy: Policy | None = None,
    required_targets: Sequence[str] = (),
    tag: str | None = None,
    trust_state: str | Path | None = None,
) -> VerifyReport:
    """``verify_bundle`` under a policy narrowed by command-line flags, and an optional trust-state file.

    With ``trust_state``, a release older than (or conflicting with) one accepted before is refused, and an
    accepted release is recorded.
    """
    effective = (policy or Policy()).narrowed(key_paths=key_paths, tag=tag, required_targets=required_targets)
    keys = load_trusted_keys(effective.keys)
    report = verify_bundle(
        path,
        keys=keys,
        tag=effective.tag,
        required_targets=effective.required_targets,
        allowed_parity=effective.allowed_parity,
        policy=effective,
    )
    if trust_state is None or report.release is None:
        return report
    state = TrustState.load(trust_state)
    problems = state.problems(report.release, report.index_digest)
    if problems:
        return replace(report, failures=(*report.failures, *problems))
    if report.ok:
        state.record(report.release, report.index_digest)
    return report


__all__ = [
    "VerifiedTarget",
    "VerifyReport",
    "load_report",
    "normalize_targets",
    "verify_bundle",
    "verify_view",
    "verify_with_policy",
]
