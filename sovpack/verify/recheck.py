"""``sovpack parity BUNDLE``: re-run a bundle's parity on this machine's runtimes, no checkpoint needed.

The bundle carries the reference's recorded answers (prompt ids, greedy tokens, fp32 logits); they are
replayed as the reference :class:`~sovpack._protocols.Runner` and compared with each target on its runtime
under the thresholds of the target's signed report, so the result can be set beside the signed one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sovpack.attest.dsse import VerifyingKey
from sovpack.errors import UsageError, VerificationError
from sovpack.parity.recorded import RecordedReference, ReferenceConfig
from sovpack.parity.report import PARITY_FILE
from sovpack.verify.extract import artifact_metadata, copy_verified_blob, extracted_target, open_target_runner
from sovpack.verify.policy import Policy
from sovpack.verify.view import BundleView, read_bundle

if TYPE_CHECKING:
    from sovpack.parity import ParityReport

COMPARED_METRICS = ("max_abs_error", "max_rel_error", "mean_kl", "top1_agreement", "greedy_agreement")


class StoredReference(RecordedReference):
    """The reference side of a parity check, served from the logits stored in the bundle (no checkpoint).

    A full Runner (no tokenizer): see :class:`~sovpack.parity.recorded.RecordedReference`; its runtime info
    says ``stored: true``.
    """

    name = "stored-reference"

    def __init__(self, config: ReferenceConfig, logits: Mapping[int, np.ndarray]) -> None:
        super().__init__(config, logits, stored=True)


@dataclass(frozen=True, kw_only=True, slots=True)
class ParityRecheck:
    """A target's parity re-run on this machine next to its signed report."""

    target: str
    manifest_digest: str
    signed_status: str
    status: str
    reasons: tuple[str, ...]
    signature_verified: bool
    runtime: Mapping[str, str]
    signed_runtime: Mapping[str, str]
    metrics: Mapping[str, Mapping[str, float | None]]  # metric -> {"signed": v, "now": v}
    report: ParityReport

    @property
    def ok(self) -> bool:
        return self.status != "FAILED"

    @property
    def changed(self) -> bool:
        return self.status != self.signed_status

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "manifest_digest": self.manifest_digest,
            # Without a verified signature the stored report is only a claim: never call it "signed".
            "signed_status": self.signed_status if self.signature_verified else None,
            "claimed_status": None if self.signature_verified else self.signed_status,
            "status": self.status,
            "changed": self.changed,
            "ok": self.ok,
            "reasons": list(self.reasons),
            "notes": list(self.report.notes),
            "signature_verified": self.signature_verified,
            "runtime": dict(self.runtime),
            "signed_runtime": dict(self.signed_runtime),
            "metrics": {k: dict(v) for k, v in self.metrics.items()},
        }


def stored_reference(view: BundleView, private_dir: Path) -> tuple[StoredReference, Path | None]:
    """The bundle's parity reference as a Runner, and its tokenizer.json.

    Logits and tokenizer are first copied into ``private_dir`` (hashed while copied) and loaded from there, so
    blobs swapped after verification can never be what the comparison uses.
    """
    if view.reference is None:
        raise VerificationError(f"{view.layout.root}: the bundle has no parity reference")
    ref = view.reference
    private_dir.mkdir(mode=0o700, exist_ok=True)
    logits = {}
    for prompt in ref.config.prompts:
        layer = ref.layers[prompt.logits]
        copy = private_dir / f"logits-{prompt.index:04d}.npy"
        copy_verified_blob(view, layer, copy, f"parity reference {prompt.logits}")
        array = np.load(copy, mmap_mode="r", allow_pickle=False)
        if array.ndim != 2 or array.shape[0] != prompt.rows or array.shape[1] != ref.config.vocab_size:
            raise VerificationError(f"parity reference {prompt.logits}: shape {array.shape} does not fit its prompt")
        logits[prompt.index] = array
    tokenizer = None
    if ref.config.tokenizer is not None:
        tokenizer = private_dir / "tokenizer.json"
        copy_verified_blob(view, ref.layers[ref.config.tokenizer], tokenizer, "parity reference tokenizer")
    return StoredReference(ref.config, logits), tokenizer


def recheck_parity(
    path: str | Path,
    *,
    targets: Sequence[str] = (),
    keys: Sequence[VerifyingKey] = (),
    tag: str | None = None,
    policy: Policy | None = None,
    insecure: bool = False,
) -> list[ParityRecheck]:
    """Re-run parity for targets (default: all) on this machine's runtimes against the stored reference.

    With keys the bundle is verified first (under ``policy``) and the comparison is with the *signed* report.
    Without keys nothing is known about who made the bytes, so it runs only with ``insecure=True``, and the
    results say ``signature_verified: false`` (the "signed" status is then only what the file claims).
    """
    from sovpack.parity import ParityReport, check_parity

    verify = bool(keys)
    if not verify and not insecure:
        raise UsageError(
            "parity on a bundle runs its files on this machine's runtimes: pass --key PUB.pem to verify it first "
            "(or --insecure to run unverified files knowingly)"
        )
    names = list(targets) or [t.name for t in read_bundle(path, tag=tag, deep=False).targets]
    results = []
    for name in names:
        with extracted_target(path, name, keys=keys, tag=tag, verify=verify, policy=policy) as (
            directory, view, entry
        ):
            signed = ParityReport.load(directory / PARITY_FILE)
            reference, tokenizer = stored_reference(view, directory / ".sovpack-reference")
            try:
                metadata = artifact_metadata(directory, entry, "no sovpack-artifact.json")
                runner = open_target_runner(directory, entry, metadata)
                try:
                    report = check_parity(
                        reference,
                        runner,
                        target=entry.name,
                        precision=entry.precision,
                        prompts=reference.prompt_ids,
                        tokenizer_json=tokenizer,
                        thresholds=signed.thresholds,
                        max_new_tokens=signed.max_new_tokens,
                        known_tokenizer_divergences=runner.traits.known_tokenizer_divergences,
                        prompt_labels=reference.prompt_labels,
                        stop_ids=signed.stop_ids,
                    )
                finally:
                    runner.close()
            finally:
                reference.close()
            metrics = {
                m: {"signed": getattr(signed.metrics, m), "now": getattr(report.metrics, m)} for m in COMPARED_METRICS
            }
            results.append(
                ParityRecheck(
                    target=entry.name,
                    manifest_digest=entry.descriptor.digest,
                    signed_status=signed.status,
                    status=report.status,
                    reasons=tuple(report.reasons),
                    signature_verified=verify,
                    runtime=dict(report.runtime.get("target", {})),
                    signed_runtime=dict(signed.runtime.get("target", {})),
                    metrics=metrics,
                    report=report,
                )
            )
    return results


__all__ = ["COMPARED_METRICS", "ParityRecheck", "StoredReference", "recheck_parity", "stored_reference"]
