"""The three signed statements each target carries, stored as OCI 1.1 referrer manifests."""

from __future__ import annotations

from typing import Any

from sovpack.attest.dsse import SigningKey, SigstoreBundle, Statement, canonical_json
from sovpack.oci.descriptor import Descriptor
from sovpack.oci.media import (
    ANN_ATTESTATION,
    ANN_BUNDLE_CONTENT,
    ANN_CREATED,
    ANN_KIND,
    ANN_PREDICATE_TYPE,
    ANN_SUBJECT,
    ANN_TARGET,
    AT_SIGSTORE,
    EMPTY_JSON,
    KIND_ATTESTATION,
    KIND_REFERENCE,
    KIND_RELEASE,
    MT_EMPTY,
    MT_MANIFEST,
    MT_PARITY_REPORT,
)
from sovpack.oci.store import BlobStore, manifest_document
from sovpack.parity.report import PARITY_FILE, ParityReport


def subject_name(name: str, target: str) -> str:
    """How statements name a target: ``<bundle name>/<format>-<precision>``."""
    return f"{name}/{target.replace(':', '-')}"


def parity_predicate(report: ParityReport, report_digest: str, reference_digest: str) -> dict[str, Any]:
    """in-toto test-result v0.1: verdict, the judged checks by outcome, and the report + reference by digest."""
    passed = [c.metric for c in report.checks if c.verdict == "pass"]
    warned = [c.metric for c in report.checks if c.verdict == "warn"]
    failed = [c.metric for c in report.checks if c.verdict == "fail"]
    return {
        "result": report.status,
        "configuration": [
            {"name": PARITY_FILE, "digest": {"sha256": report_digest.split(":", 1)[1]}, "mediaType": MT_PARITY_REPORT},
            {
                "name": KIND_REFERENCE,
                "digest": {"sha256": reference_digest.split(":", 1)[1]},
                "mediaType": MT_MANIFEST,
            },
        ],
        "passedTests": passed,
        "warnedTests": warned,
        "failedTests": failed,
    }


def _signed_manifest(
    store: BlobStore,
    statement: Statement,
    key: SigningKey,
    *,
    annotations: dict[str, str],
    index_annotations: dict[str, str],
    created: str | None,
    subject: Descriptor | None = None,
) -> Descriptor:
    """Sign a statement, store it as one Sigstore bundle layer, and wrap it in a manifest (a referrer if subject)."""
    signed = SigstoreBundle.sign(statement, key)
    layer = store.add(signed.to_bytes(), AT_SIGSTORE)
    empty = store.add(EMPTY_JSON, MT_EMPTY)
    annotations = {ANN_BUNDLE_CONTENT: "dsse-envelope", ANN_PREDICATE_TYPE: statement.predicate_type, **annotations}
    if created:
        annotations[ANN_CREATED] = created
    doc = manifest_document(artifact_type=AT_SIGSTORE, config=empty, layers=[layer], annotations=annotations,
                            subject=subject)
    return store.add(canonical_json(doc), MT_MANIFEST, artifact_type=AT_SIGSTORE, annotations=index_annotations)


def attestation_manifest(
    store: BlobStore,
    *,
    kind: str,
    statement: Statement,
    key: SigningKey,
    target: str,
    subject: Descriptor,
    created: str | None,
) -> Descriptor:
    """A target's attestation: an OCI 1.1 referrer of the target manifest."""
    return _signed_manifest(
        store, statement, key,
        annotations={ANN_ATTESTATION: kind, ANN_TARGET: target},
        index_annotations={ANN_KIND: KIND_ATTESTATION, ANN_ATTESTATION: kind, ANN_TARGET: target,
                           ANN_SUBJECT: subject.digest},
        created=created,
        subject=subject,
    )


def release_manifest(store: BlobStore, *, statement: Statement, key: SigningKey, created: str | None) -> Descriptor:
    """The release statement's manifest: no subject, it covers the whole bundle."""
    return _signed_manifest(
        store, statement, key, annotations={ANN_KIND: KIND_RELEASE}, index_annotations={ANN_KIND: KIND_RELEASE},
        created=created,
    )
