"""Reading a bundle: ``verify``, ``inspect``, ``extract``, ``run`` from a bundle and the ``parity`` re-check.

- :mod:`~sovpack.verify.policy`: what a deploy site requires (trusted keys, required targets, parity statuses);
- :mod:`~sovpack.verify.view`: a bundle parsed into targets, parity reference and attestations (digest-checked);
- :mod:`~sovpack.verify.check`: ``verify`` (signatures, what each attestation binds, policy) and its report;
- :mod:`~sovpack.verify.describe`: ``inspect``, cheap and trusting nothing;
- :mod:`~sovpack.verify.extract`: a verified target written out, and ``run`` on such a copy;
- :mod:`~sovpack.verify.recheck`: ``parity`` re-run against the reference stored in the bundle.

The local OCI layout reader is :class:`sovpack.oci.reader.Layout`.
"""

from sovpack.oci.reader import Layout
from sovpack.oci.store import is_bundle_dir
from sovpack.verify.check import VerifiedTarget, VerifyReport, verify_bundle, verify_with_policy
from sovpack.verify.describe import inspect_bundle
from sovpack.verify.extract import (
    BundleEmbeddingRunner,
    ExtractResult,
    extract_target,
    extracted_target,
    open_bundle_embedding_runner,
    open_bundle_runner,
    write_target_files,
)
from sovpack.verify.policy import DEFAULT_ALLOWED_PARITY, PARITY_STATUSES, Policy
from sovpack.verify.recheck import ParityRecheck, StoredReference, recheck_parity
from sovpack.verify.view import AttestationEntry, BundleView, ReferenceEntry, TargetEntry, read_bundle

__all__ = [
    "DEFAULT_ALLOWED_PARITY",
    "PARITY_STATUSES",
    "AttestationEntry",
    "BundleEmbeddingRunner",
    "BundleView",
    "ExtractResult",
    "Layout",
    "ParityRecheck",
    "Policy",
    "ReferenceEntry",
    "StoredReference",
    "TargetEntry",
    "VerifiedTarget",
    "VerifyReport",
    "extract_target",
    "extracted_target",
    "inspect_bundle",
    "is_bundle_dir",
    "open_bundle_embedding_runner",
    "open_bundle_runner",
    "read_bundle",
    "recheck_parity",
    "verify_bundle",
    "verify_with_policy",
    "write_target_files",
]
