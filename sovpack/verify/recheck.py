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
from sovpack.errors import VerificationError
from sovpack.parity.recorded import RecordedReference, ReferenceConfig
from sovpack.parity.report import PARITY_FILE
from sovpack.verify.extract import artifact_metadata, extracted_target, open_target_runner
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
            "signed_status": self.signed_status,
            "status": self.status,
            "changed": self.changed,
            "ok": self.ok,
            "reasons": list(self.reasons),
            "signature_verified": self.signature_verified,
            "runtime": dict(self.runtime),
            "signed_runtime": dict(self.signed_runtime),
            "metrics": {k: dict(v) for k, v in self.metrics.items()},
        }


def stored_reference(view: BundleView) -> tuple[StoredReference, Path | None]:
    """The bundle's parity reference as a Runner (logits memory-mapped from the blobs), and its tokenizer.json."""
    if view.reference is None:
        raise VerificationError(f"{view.layout.root}: the bundle has no parity reference")
    layout = view.local_layout()
    ref = view.reference
    logits = {}
    for prompt in ref.config.prompts:
        layer = ref.layers[prompt.logits]
        layout.check(layer, f"parity reference {prompt.logits}")
        array = np.load(layout.blob_path(layer.digest), mmap_mode="r", allow_pickle=False)
        if array.ndim != 2 or array.shape[0] != prompt.rows or array.shape[1] != ref.config.vocab_size:
            raise VerificationError(f"parity reference {prompt.logits}: shape {array.shape} does not fit its prompt")
        logits[prompt.index] = array
    tokenizer = None
    if ref.config.tokenizer is not None:
        tokenizer = layout.blob_path(ref.layers[ref.config.tokenizer].digest)
    return StoredReference(ref.config, logits), tokenizer


def recheck_parity(
    path: str | Path,
    *,
    targets: Sequence[str] = (),
    keys: Sequence[VerifyingKey] = (),
    tag: str | None = None,
) -> list[ParityRecheck]:
    """Re-run parity for targets (default: all) on this machine's runtimes against the stored reference.

    With keys the bundle is verified first and the comparison is with the *signed* report; without, the
    blobs are integrity-checked only and the result says ``signature_verified: false``.
    """
    from sovpack.parity import ParityReport, check_parity

    verify = bool(keys)
    names = list(targets) or [t.name for t in read_bundle(path, tag=tag, deep=False).targets]
    results = []
    for name in names:
        with extracted_target(path, name, keys=keys, tag=tag, verify=verify) as (directory, view, entry):
            signed = ParityReport.load(directory / PARITY_FILE)
            reference, tokenizer = stored_reference(view)
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
