"""``sovpack parity BUNDLE``: re-run a bundle's parity on this machine's runtimes, no checkpoint needed.

The bundle carries the reference's recorded answers (prompt ids, greedy tokens, fp32 logits); they are
replayed as the reference :class:`~sovpack._protocols.Runner` and compared with each target on its runtime
under the thresholds of the target's signed report, so the result can be set beside the signed one. An
embedding encoder's bundle carries the reference embeddings and token states of its texts instead
(:mod:`sovpack.parity.embeddings`); each target's embedding runner is judged against them the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sovpack.artifact import ArtifactMetadata
from sovpack.attest.dsse import VerifyingKey
from sovpack.errors import UsageError, VerificationError
from sovpack.parity.embeddings import EmbeddingReferenceConfig, RecordedEmbeddings, check_embedding_parity
from sovpack.parity.recorded import RecordedReference, ReferenceConfig
from sovpack.parity.report import PARITY_FILE, round_metric
from sovpack.verify.extract import (
    artifact_metadata,
    copy_verified_blob,
    extracted_target,
    open_target_embedding_runner,
    open_target_runner,
)
from sovpack.verify.policy import Policy
from sovpack.verify.view import BundleView, ReferenceEntry, TargetEntry, read_bundle

if TYPE_CHECKING:
    from sovpack.parity import ParityReport

COMPARED_METRICS = ("max_abs_error", "max_rel_error", "mean_kl", "top1_agreement", "greedy_agreement")
COMPARED_EMBEDDING_METRICS = ("min_cosine", "pipeline_min_cosine", "max_hidden_abs")


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
    ref = _reference(view)
    if not isinstance(ref.config, ReferenceConfig):
        raise VerificationError(f"{view.layout.root}: the bundle's parity reference holds embeddings, not logits")
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
    return StoredReference(ref.config, logits), _private_tokenizer(view, ref, ref.config.tokenizer, private_dir)


def _reference(view: BundleView) -> ReferenceEntry:
    if view.reference is None:
        raise VerificationError(f"{view.layout.root}: the bundle has no parity reference")
    return view.reference


def _private_tokenizer(view: BundleView, ref: ReferenceEntry, title: str | None, private_dir: Path) -> Path | None:
    if title is None:
        return None
    tokenizer = private_dir / "tokenizer.json"
    copy_verified_blob(view, ref.layers[title], tokenizer, "parity reference tokenizer")
    return tokenizer


def stored_embeddings(view: BundleView, private_dir: Path) -> tuple[RecordedEmbeddings, Path | None]:
    """An encoder bundle's stored reference embeddings and token states, and its tokenizer.json.

    As with ``stored_reference``, every blob is first copied into ``private_dir`` (hashed while copied) and read
    from there; the arrays must fit the config exactly (sovpack.parity.embeddings.RecordedEmbeddings.from_stored).
    """
    ref = _reference(view)
    config = ref.config
    if not isinstance(config, EmbeddingReferenceConfig):
        raise VerificationError(f"{view.layout.root}: the bundle's parity reference holds logits, not embeddings")
    private_dir.mkdir(mode=0o700, exist_ok=True)
    arrays = []
    for i, title in enumerate((config.embeddings, config.token_states)):
        copy = private_dir / f"reference-{i}.npy"
        copy_verified_blob(view, ref.layers[title], copy, f"parity reference {title}")
        try:
            arrays.append(np.load(copy, allow_pickle=False))
        except ValueError as e:
            raise VerificationError(f"parity reference {title}: not a readable .npy array ({e})") from None
    recorded = RecordedEmbeddings.from_stored(config, arrays[0], arrays[1])
    return recorded, _private_tokenizer(view, ref, config.tokenizer, private_dir)


def _recheck_logits(view: BundleView, directory: Path, entry: TargetEntry, metadata: ArtifactMetadata,
                    signed: ParityReport) -> tuple[ParityReport, dict[str, dict[str, float | None]]]:
    """A decoder target against the stored logits."""
    from sovpack.parity import check_parity

    reference, tokenizer = stored_reference(view, directory / ".sovpack-reference")
    try:
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
    metrics = {m: {"signed": getattr(signed.metrics, m), "now": getattr(report.metrics, m)} for m in COMPARED_METRICS}
    return report, metrics


def _recheck_embeddings(view: BundleView, directory: Path, entry: TargetEntry, metadata: ArtifactMetadata,
                        signed: ParityReport) -> tuple[ParityReport, dict[str, dict[str, float | None]]]:
    """An encoder target against the stored embeddings, under its signed report's thresholds."""
    recorded, tokenizer = stored_embeddings(view, directory / ".sovpack-reference")
    runner = open_target_embedding_runner(directory, entry, metadata)
    try:
        report = check_embedding_parity(
            recorded,
            runner,
            target=entry.name,
            precision=entry.precision,
            thresholds=signed.thresholds,
            tokenizer_json=tokenizer,
            known_tokenizer_divergences=runner.traits.known_tokenizer_divergences,
        )
    finally:
        runner.close()
    metrics = {
        m: {"signed": getattr(signed.embeddings, m, None), "now": round_metric(getattr(report.embeddings, m, None))}
        for m in COMPARED_EMBEDDING_METRICS
    }
    return report, metrics


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
    from sovpack.parity import ParityReport

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
            metadata = artifact_metadata(directory, entry, "no sovpack-artifact.json")
            encoder = metadata.spec.encoder is not None
            if encoder != isinstance(_reference(view).config, EmbeddingReferenceConfig):
                kind = "an embedding encoder" if encoder else "a text generator"
                raise VerificationError(f"target {entry.name} is {kind}, but the bundle's parity reference holds "
                                        f"{'logits' if encoder else 'embeddings'}")
            recheck = _recheck_embeddings if encoder else _recheck_logits
            report, metrics = recheck(view, directory, entry, metadata, signed)
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


__all__ = [
    "COMPARED_EMBEDDING_METRICS",
    "COMPARED_METRICS",
    "ParityRecheck",
    "StoredReference",
    "recheck_parity",
    "stored_embeddings",
    "stored_reference",
]
