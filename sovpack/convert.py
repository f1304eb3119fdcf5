"""``sovpack convert``: checkpoint -> one runnable artifact directory, parity-checked on its runtime."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sovpack import __version__
from sovpack._io import Progress, atomic_directory, check_not_input, no_progress, return_freed_memory
from sovpack.artifact import ARTIFACT_FILE, ArtifactMetadata
from sovpack.errors import ConversionError, ParityError
from sovpack.parity.embeddings import (
    RecordedEmbeddings,
    check_embedding_parity,
    labeled_texts,
    record_embeddings,
)
from sovpack.parity.recorded import RecordedReference, record_reference
from sovpack.parity.report import PARITY_FILE, ParityReport
from sovpack.quantize.options import QuantOptions
from sovpack.source.model import SourceModel, open_model
from sovpack.targets.base import TargetRef, check_runtime_memory

Overrides = Mapping[str, float | bool | None]


@dataclass(frozen=True, kw_only=True, slots=True)
class ConvertResult:
    """Where the artifact went, what it holds, and how parity went (None when skipped)."""

    target: str
    out_dir: Path
    metadata: ArtifactMetadata
    parity: ParityReport | None

    @property
    def files(self) -> tuple[str, ...]:
        return self.metadata.files


def convert(
    checkpoint: str | Path | SourceModel,
    target: str | TargetRef,
    out_dir: str | Path,
    *,
    parity: bool = True,
    prompts: Sequence[str] = (),
    threshold_overrides: Overrides | None = None,
    allow_nonfinite: bool = False,
    force: bool = False,
    progress: Progress = no_progress,
    reference: RecordedReference | RecordedEmbeddings | None = None,
    quant: QuantOptions | None = None,
) -> ConvertResult:
    """Write one target artifact; run parity on its runtime unless told not to. FAILED parity writes nothing.

    ``checkpoint`` may be an already opened model (a build opens and hashes it once for every target), and
    ``reference`` the reference's recorded answers (a build computes them once and judges every target
    against them); otherwise both are made here. An embedding encoder is judged by its embeddings
    (sovpack.parity.embeddings; ``prompts`` are then the texts embedded). ``quant``: the 4-bit recipe (method,
    group size, symmetry, calibration text, 8-bit share; None: the defaults); the target records it.
    """
    ref = target if isinstance(target, TargetRef) else TargetRef.parse(target)
    out = Path(out_dir)
    if isinstance(checkpoint, SourceModel):
        model = checkpoint
    else:
        check_not_input(out, [Path(checkpoint)])  # before reading anything: `-o CK --force` would delete CK
        model = open_model(checkpoint, allow_nonfinite=allow_nonfinite)
    ref.check_family(model.spec)
    if parity:  # running the artifact must fit: refused now, not OOM-killed after the conversion
        check_runtime_memory([ref], model.spec)
    # NOTE: the output may neither be, contain nor lie inside the checkpoint; a destination that cannot take
    # the output (read-only, full) is a ConversionError naming it, with nothing left behind.
    recipes = quant_recipes(ref, quant)
    tried: list[dict[str, Any]] = []
    with atomic_directory(out, force=force, inputs=[model.checkpoint.root], error=ConversionError) as tmp:
        for attempt, recipe in enumerate(recipes, start=1):
            if attempt > 1:  # the previous recipe FAILED parity: start over from an empty directory
                _empty(tmp)
            written = ref.target.write(model, ref.precision, tmp, progress, quant=recipe)
            recorded_quant = written.format_metadata.get("quantization")
            if tried and isinstance(recorded_quant, dict):
                recorded_quant["attempts"] = list(tried)  # the recipes that FAILED before this one
            metadata = ArtifactMetadata(
                sovpack_version=__version__,
                target=str(ref),
                format=ref.format,
                precision=ref.precision,
                name=model.name,
                files=tuple(sorted({*written.files, ARTIFACT_FILE})),
                spec=model.spec,
                source=tuple(model.checkpoint.source_files),
                format_metadata=written.format_metadata,
                traits=written.traits,
            )
            metadata.save(tmp)
            return_freed_memory()  # the writer's heap goes back before the runtime loads the artifact
            report = None
            if parity and model.spec.encoder is not None:
                embedded = reference if isinstance(reference, RecordedEmbeddings) else record_embeddings(
                    model, labeled_texts(prompts), progress=progress)
                reference = embedded
                report = run_embedding_parity(ref, tmp, metadata, embedded, model.checkpoint.tokenizer_json,
                                              threshold_overrides, progress)
            elif parity:
                recorded = reference if isinstance(reference, RecordedReference) else record_reference(
                    model, prompts, progress=progress)
                reference = recorded
                report = run_parity(ref, tmp, metadata, recorded, model.checkpoint.tokenizer_json,
                                    threshold_overrides, progress)
            if report is not None:
                report.save(tmp / PARITY_FILE)
                if report.status == "FAILED" and attempt < len(recipes):
                    tried.append({**(recipe or QuantOptions()).to_dict(), "mean_kl": report.metrics.mean_kl})
                    continue
                if report.status == "FAILED":
                    raise ParityError(f"{ref}: parity FAILED, nothing written: " + "; ".join(report.reasons))
            break
    return ConvertResult(target=str(ref), out_dir=out, metadata=metadata, parity=report)


# NOTE: `-t FORMAT:int4` with the default method keeps the recipe that passes parity: when 4-bit codes with
# the default 8-bit share FAIL, the conversion is redone with more of the most sensitive tensors at 8 bits
# (a quarter, then half of the linear weights) before giving up. The artifact metadata lists what FAILED.
ESCALATED_INT8_SHARES = (0.25, 0.5)


def quant_recipes(ref: TargetRef, quant: QuantOptions | None) -> list[QuantOptions | None]:
    """The 4-bit recipes to try in order: the requested one, then (default method only) larger 8-bit shares."""
    if ref.info.weights != "int4" or (quant is not None and quant.method != "auto"):
        return [quant]
    base = quant or QuantOptions()
    larger = [share for share in ESCALATED_INT8_SHARES if share > base.int8_share]
    return [quant, *(dataclasses.replace(base, int8_share=share) for share in larger)]


def _empty(directory: Path) -> None:
    for child in directory.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def run_parity(
    ref: TargetRef,
    artifact_dir: Path,
    metadata: ArtifactMetadata,
    reference: RecordedReference,
    tokenizer_json: Path | None,
    threshold_overrides: Overrides | None,
    progress: Progress = no_progress,
) -> ParityReport:
    """Check an artifact directory against the recorded reference on the target's own runtime."""
    from sovpack.parity.judge import check_parity

    progress(f"{ref}: parity", 0, 1)
    runner = ref.target.open_runner(artifact_dir, metadata)
    try:
        report = check_parity(
            reference,
            runner,
            target=str(ref),
            precision=ref.precision,
            prompts=reference.prompt_ids,
            tokenizer_json=tokenizer_json,
            # A target may publish looser limits where its runtime cannot meet the defaults (e.g. ggml's float16
            # GELU table); they sit beneath the user's overrides and are recorded in the report's thresholds.
            thresholds=ref.thresholds(runner.traits.parity_limits, threshold_overrides),
            max_new_tokens=reference.config.max_new_tokens,
            prompt_labels=reference.prompt_labels,
            stop_ids=reference.config.stop_ids,
            known_tokenizer_divergences=runner.traits.known_tokenizer_divergences,
        )
    finally:
        runner.close()
    progress(f"{ref}: parity", 1, 1)
    return report


def run_embedding_parity(
    ref: TargetRef,
    artifact_dir: Path,
    metadata: ArtifactMetadata,
    reference: RecordedEmbeddings,
    tokenizer_json: Path | None,
    threshold_overrides: Overrides | None,
    progress: Progress = no_progress,
) -> ParityReport:
    """Check an embedding-encoder artifact against the recorded reference embeddings on its own runtime."""
    progress(f"{ref}: parity", 0, 1)
    runner = ref.target.open_embedding_runner(artifact_dir, metadata)
    try:
        report = check_embedding_parity(
            reference,
            runner,
            target=str(ref),
            precision=ref.precision,
            thresholds=ref.thresholds(runner.traits.parity_limits, threshold_overrides, encoder=True),
            tokenizer_json=tokenizer_json,
            known_tokenizer_divergences=runner.traits.known_tokenizer_divergences,
        )
    finally:
        runner.close()
    progress(f"{ref}: parity", 1, 1)
    return report
