"""``sovpack convert``: checkpoint -> one runnable artifact directory, parity-checked on its runtime."""

from __future__ import annotations

import dataclasses
import math
import shutil
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sovpack import __version__
from sovpack._digests import hash_later
from sovpack._io import Progress, atomic_directory, check_not_input, no_progress, return_freed_memory
from sovpack._protocols import Runner
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
from sovpack.targets.base import TargetRef, check_runtime_memory, machine_memory

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
    ref.check_quantization(quant)
    if parity:  # running the artifact must fit: refused now, not OOM-killed after the conversion
        check_runtime_memory([ref], model.spec)
    # NOTE: the output may neither be, contain nor lie inside the checkpoint; a destination that cannot take
    # the output (read-only, full) is a ConversionError naming it, with nothing left behind.
    with atomic_directory(out, force=force, inputs=[model.checkpoint.root], error=ConversionError) as tmp:
        metadata, report = _write_and_check(model, TargetJob(ref, tmp, threshold_overrides, quant), parity=parity,
                                            prompts=prompts, reference=reference, progress=progress)
    return ConvertResult(target=str(ref), out_dir=out, metadata=metadata, parity=report)


@dataclass(frozen=True, slots=True)
class TargetJob:
    """One target of a build: written into an empty directory, judged with its overrides and 4-bit recipe."""

    ref: TargetRef
    directory: Path
    threshold_overrides: Overrides | None = None
    quant: QuantOptions | None = None
    stored: bool = False  # bound for a blob store: files not hashed as written are hashed while parity runs


def write_targets(model: SourceModel, jobs: Sequence[TargetJob], progress: Progress = no_progress, *,
                  on_written: Callable[[TargetJob, ArtifactMetadata], None] | None = None
                  ) -> list[ArtifactMetadata]:
    """Every job's artifact (its first recipe) written at the same time, on a thread each; no parity yet.

    The writers share the opened model, whose mapped pages come from disk once, and keep both cores busy where
    one writer alone would wait on the disk. Which targets a build writes so: ``overlapped_targets``.
    ``on_written(job, metadata)`` is called on a job's writer thread as soon as its artifact is complete.
    """
    shared = _locked(progress)

    def write(job: TargetJob) -> ArtifactMetadata:
        metadata = _write(model, job, quant_recipes(job.ref, job.quant)[0], [], shared)
        if on_written is not None:
            on_written(job, metadata)
        return metadata

    with ThreadPoolExecutor(max_workers=max(len(jobs), 1)) as pool:
        written = list(pool.map(write, jobs))
    return_freed_memory()
    return written


def finish_target(
    model: SourceModel,
    job: TargetJob,
    *,
    reference: RecordedReference | RecordedEmbeddings,
    prompts: Sequence[str] = (),
    progress: Progress = no_progress,
    written: ArtifactMetadata | None = None,
    runner: Runner | None = None,
) -> ConvertResult:
    """``job`` written (unless ``written`` says its first recipe is on disk already) and judged against the
    recorded ``reference`` on its runtime (``runner``: that artifact already opened on it, which is then
    closed here); FAILED raises ParityError (see ``convert``)."""
    metadata, report = _write_and_check(model, job, parity=True, prompts=prompts, reference=reference,
                                        progress=progress, written=written, runner=runner)
    return ConvertResult(target=str(job.ref), out_dir=job.directory, metadata=metadata, parity=report)


# NOTE: writers overlap only where that cannot cost memory or repeated work. 4-bit targets do not: their
# calibration, sensitivities and codes are shared between targets through the opened model (computed by the
# first, reused by the next), and their fits already use every core; they are written in their turn. Other
# writers hold a few copies of one tensor at a time (its float32 form, a converted copy, a quantized or packed
# one); running them together must keep that under a quarter of the machine's memory (a 0.6B model's largest
# tensor is ~0.2 GB as float32, an 8B model's embedding table 2.1 GB: three writers at once would need ~25 GB).
WRITER_COPIES = 4
OVERLAP_MEMORY_SHARE = 0.25


def overlapped_targets(model: SourceModel, refs: Sequence[TargetRef]) -> list[TargetRef]:
    """The targets a build writes at the same time (none, or at least two; see the NOTE)."""
    chosen = [ref for ref in refs if ref.info.weights != "int4"]
    if len(chosen) < 2 or writers_memory(model, len(chosen)) > OVERLAP_MEMORY_SHARE * machine_memory():
        return []
    return chosen


def writers_memory(model: SourceModel, writers: int) -> int:
    """Bytes ``writers`` writers at once may hold: a few float32 copies of the largest tensor each."""
    largest = max(math.prod(shape) for shape in model.spec.tensor_shapes().values())
    return largest * 4 * WRITER_COPIES * writers


def _locked(progress: Progress) -> Progress:
    """``progress`` callable from several writer threads (one report at a time)."""
    lock = threading.Lock()

    def report(description: str, completed: int, total: int) -> None:
        with lock:
            progress(description, completed, total)

    return report


BACKGROUND_HASH_BYTES = 2**18  # smaller files are hashed when stored (well under a millisecond)


def _write(model: SourceModel, job: TargetJob, recipe: QuantOptions | None, tried: list[dict[str, Any]],
           progress: Progress) -> ArtifactMetadata:
    """Write ``job``'s artifact with one 4-bit recipe into its (empty) directory, metadata included."""
    ref = job.ref
    written = ref.target.write(model, ref.precision, job.directory, progress, quant=recipe)
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
    metadata.save(job.directory)
    if job.stored:
        for name in written.files:
            if (path := job.directory / name).is_file() and path.stat().st_size >= BACKGROUND_HASH_BYTES:
                hash_later(path)
    return metadata


def _write_and_check(
    model: SourceModel,
    job: TargetJob,
    *,
    parity: bool,
    prompts: Sequence[str],
    reference: RecordedReference | RecordedEmbeddings | None,
    progress: Progress,
    written: ArtifactMetadata | None = None,
    runner: Runner | None = None,
) -> tuple[ArtifactMetadata, ParityReport | None]:
    """Write ``job`` (unless ``written``: its first recipe is on disk already) and judge it on its runtime,
    retrying the larger 8-bit shares of the default 4-bit recipe while parity FAILS; FAILED raises ParityError."""
    ref = job.ref
    recipes = quant_recipes(ref, job.quant)
    tried: list[dict[str, Any]] = []
    for attempt, recipe in enumerate(recipes, start=1):
        if attempt > 1:  # the previous recipe FAILED parity: start over from an empty directory
            _empty(job.directory)
        metadata = written if attempt == 1 and written is not None else _write(model, job, recipe, tried, progress)
        return_freed_memory()  # the writer's heap goes back before the runtime loads the artifact
        report = None
        if parity and model.spec.encoder is not None:
            embedded = reference if isinstance(reference, RecordedEmbeddings) else record_embeddings(
                model, labeled_texts(prompts), progress=progress)
            reference = embedded
            report = run_embedding_parity(ref, job.directory, metadata, embedded, model.checkpoint.tokenizer_json,
                                          job.threshold_overrides, progress)
        elif parity:
            recorded = reference if isinstance(reference, RecordedReference) else record_reference(
                model, prompts, progress=progress)
            reference = recorded
            report = run_parity(ref, job.directory, metadata, recorded, model.checkpoint.tokenizer_json,
                                job.threshold_overrides, progress, runner=runner if attempt == 1 else None)
        if report is not None:
            report.save(job.directory / PARITY_FILE)
            if report.status == "FAILED" and attempt < len(recipes):
                tried.append({**(recipe or QuantOptions()).to_dict(), "mean_kl": report.metrics.mean_kl})
                continue
            if report.status == "FAILED":
                raise ParityError(f"{ref}: parity FAILED, nothing written: " + "; ".join(report.reasons))
        return metadata, report
    raise AssertionError("unreachable: quant_recipes returns at least one recipe")


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
    *,
    runner: Runner | None = None,
) -> ParityReport:
    """Check an artifact directory against the recorded reference on the target's own runtime (``runner``: the
    artifact already opened there; closed here either way)."""
    from sovpack.parity.judge import check_parity

    progress(f"{ref}: parity", 0, 1)
    runner = runner or ref.target.open_runner(artifact_dir, metadata)
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
