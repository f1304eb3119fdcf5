"""Applying a policy's ceiling to a verified bundle: signing identities, parity limits, release identity.

These checks run after the signatures and bindings (``check``) and only add failures; they need the keys'
roles, the limits each target's parity was judged with, and the signed release.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sovpack.artifact import ARTIFACT_FILE, ArtifactMetadata
from sovpack.attest.dsse import VerifyingKey, load_trusted_keys
from sovpack.attest.release import Release
from sovpack.errors import SovpackError, UsageError
from sovpack.oci.tags import target_tag
from sovpack.parity.report import ParityReport
from sovpack.verify.policy import STATEMENT_KINDS, Policy
from sovpack.verify.view import BundleView, TargetEntry


def role_key_ids(policy: Policy, trusted: tuple[VerifyingKey, ...]) -> dict[str, set[str]]:
    """kind -> key ids allowed to sign it; every role key must also be a trusted key."""
    roles: dict[str, set[str]] = {}
    trusted_ids = {k.key_id for k in trusted}
    for kind, paths in policy.key_roles.items():
        if kind not in STATEMENT_KINDS:
            raise UsageError(f"policy key_roles: unknown statement kind {kind!r}; known: {', '.join(STATEMENT_KINDS)}")
        ids = {k.key_id for k in load_trusted_keys(paths)}
        stray = ids - trusted_ids
        if stray:
            raise UsageError(f"policy key_roles[{kind!r}] names keys that are not among the trusted keys")
        roles[kind] = ids
    return roles


def signer_failures(where: str, kind: str, signer: str, roles: Mapping[str, set[str]]) -> list[str]:
    allowed = roles.get(kind)
    if allowed is not None and signer not in allowed:
        return [f"{where}: signed by key {signer[:16]}…, which the policy does not allow to sign {kind} statements"]
    return []


def _ceiling(view: BundleView, target: TargetEntry) -> dict[str, Any]:
    """The default ceiling: the target precision's own limits, loosened only where the target publishes so."""
    from sovpack.targets.base import TargetRef

    try:
        base = TargetRef.parse(target.name).info.thresholds.to_dict()
    except SovpackError:
        return {}  # a format this sovpack does not know: only the policy's explicit limits apply
    layer = target.files.get(ARTIFACT_FILE)
    if layer is None:
        return base
    try:
        from sovpack._io import parse_json

        metadata = ArtifactMetadata.from_dict(
            parse_json(view.layout.read(layer, f"target {target.name} {ARTIFACT_FILE}"), ARTIFACT_FILE),
            f"target {target.name} {ARTIFACT_FILE}",
        )
    except SovpackError:
        return base  # check() reports a broken metadata file; the ceiling stays the default
    if metadata.spec.encoder is not None:
        base = TargetRef.parse(target.name).thresholds(encoder=True).to_dict()
    return {**base, **metadata.traits.parity_limits}


def target_failures(
    view: BundleView, target: TargetEntry, policy: Policy, report: ParityReport | None, signers: set[str]
) -> list[str]:
    failures = []
    if len(signers) < policy.min_signers:
        who = "no single trusted key signed" if not signers else f"only {len(signers)} trusted key(s) signed"
        failures.append(
            f"target {target.name}: {who} all of its attestations (the policy requires {policy.min_signers})"
        )
    if report is not None:
        loose = policy.limit_violations(target.precision, report.thresholds.to_dict(), _ceiling(view, target))
        if loose:
            failures.append(
                f"target {target.name}: parity was judged with looser limits than the policy allows: "
                + "; ".join(loose)
            )
    return failures


def release_failures(view: BundleView, policy: Policy, release: Release | None) -> list[str]:
    failures = []
    if policy.index_digest is not None and view.index_descriptor.digest != policy.index_digest:
        failures.append(
            f"the bundle index is {view.index_descriptor.digest}, the policy pins {policy.index_digest}"
        )
    if release is None:
        return failures
    if policy.name is not None and release.name != policy.name:
        failures.append(f"the signed bundle name is {release.name!r}, the policy requires {policy.name!r}")
    per_target = {target_tag(release.tag, t.target) for t in release.targets}  # sovpack.oci.tags
    if policy.tag is not None and release.tag != policy.tag and policy.tag not in per_target:
        failures.append(f"the signed tag is {release.tag!r}, the policy requires {policy.tag!r}")
    if policy.min_sequence is not None and release.sequence < policy.min_sequence:
        failures.append(
            f"the signed release sequence {release.sequence} is older than the policy's minimum {policy.min_sequence}"
        )
    return failures


__all__ = ["release_failures", "role_key_ids", "signer_failures", "target_failures"]
