"""``build_bundle``: every target converted once from one opened checkpoint, judged against one reference pass,
stored, signed and written as one OCI image layout, atomically."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from sovpack import __version__
from sovpack._io import Progress, atomic_directory, check_not_input, no_progress, return_freed_memory, source_date
from sovpack.artifact import ArtifactMetadata
from sovpack.attest import provenance
from sovpack.attest.dsse import SigningKey
from sovpack.attest.release import PartOrigin, Release, ReleaseTarget, parse_time
from sovpack.bundle.attestations import release_manifest
from sovpack.bundle.config import BuildConfig
from sovpack.bundle.members import BuildContext, BuiltTarget, store_index, store_reference, store_target
from sovpack.bundle.preload import RunnerPreload
from sovpack.convert import TargetJob, finish_target, overlapped_targets, write_targets
from sovpack.errors import UsageError, VerificationError
from sovpack.oci.descriptor import Descriptor
from sovpack.oci.media import (
    ATTESTATION_KINDS,
    TAG_RE,
)
from sovpack.oci.store import BlobStore, write_layout
from sovpack.oci.tags import check_target_tags
from sovpack.parity.embeddings import (
    RecordedEmbeddings,
    labeled_texts,
    record_embeddings,
)
from sovpack.parity.recorded import RecordedReference, record_reference
from sovpack.source.model import SourceModel, open_model
from sovpack.targets.base import TargetRef, check_runtime_memory


@dataclass(frozen=True, kw_only=True, slots=True)
class BuildResult:
    """What ``build_bundle`` wrote."""

    output: Path
    name: str
    tag: str
    index_digest: str
    key_id: str
    targets: tuple[BuiltTarget, ...]
    size: int  # bytes under blobs/
    reference_from: str | None = None  # the earlier bundle whose parity reference (and reused targets) it took

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "name": self.name,
            "tag": self.tag,
            "index_digest": self.index_digest,
            "key_id": self.key_id,
            "targets": [t.to_dict() for t in self.targets],
            "size": self.size,
            "reference_from": self.reference_from,
        }


def _resolve_targets(config: BuildConfig) -> tuple[Path, Path, list[TargetRef]]:
    """The checkpoint, the output and the distinct targets of a build config, or a UsageError."""
    if config.checkpoint is None:
        raise UsageError("no checkpoint given (argument or 'checkpoint' in the config file)")
    if config.output is None:
        raise UsageError("no output given (-o or 'output' in the config file)")
    if not config.targets:
        raise UsageError("no targets given (-t FORMAT:PRECISION, or 'targets' in the config file)")
    if not TAG_RE.match(config.tag):
        raise UsageError(f"tag {config.tag!r} is not a valid OCI tag ([A-Za-z0-9_][A-Za-z0-9._-]*, max 128)")
    if config.sequence < 0:
        raise UsageError(f"sequence must be a non-negative integer, got {config.sequence}")
    if config.expires is not None:
        try:
            parse_time(config.expires, "expires")
        except VerificationError as e:
            raise UsageError(str(e)) from None
    refs: list[TargetRef] = []
    for text in config.targets:
        ref = TargetRef.parse(text)
        if ref not in refs:
            refs.append(ref)
    problem = check_target_tags(config.tag, [str(r) for r in refs])
    if problem is not None:
        raise UsageError(problem)
    built = {str(r) for r in refs}
    unknown = sorted(set(config.target_thresholds) - built)
    if unknown:
        raise UsageError(f"threshold overrides for targets that are not built: {', '.join(unknown)}")
    unknown = sorted(set(config.target_quantization) - built)
    if unknown:
        raise UsageError(f"quantization options for targets that are not built: {', '.join(unknown)}")
    return Path(config.checkpoint), Path(config.output), refs


class EarlierRelease(Protocol):
    """A verified, signed earlier bundle a build takes its parity reference (and unchanged targets) from.

    Implemented by sovpack.bundle.earlier (which verifies it first); ``sovpack build --reference-from`` and
    ``--reuse-from``.
    """

    @property
    def location(self) -> str: ...

    @property
    def release(self) -> Release: ...

    @property
    def release_digest(self) -> str: ...

    def reference(self) -> RecordedReference | RecordedEmbeddings:
        """The stored parity reference, ready to judge against."""
        ...

    def provenance_parameters(self, target: str) -> Mapping[str, Any]:
        """What the target's signed provenance says it was built with (SLSA externalParameters)."""
        ...

    def copy_into(self, store: BlobStore, digest: str) -> Descriptor:
        """Copy one member manifest (and every blob it reaches) into ``store``; its bundle index entry."""
        ...

    def built_target(self, target: str) -> BuiltTarget:
        ...


def build_bundle(
    config: BuildConfig,
    *,
    key: SigningKey,
    force: bool = False,
    progress: Progress = no_progress,
    earlier: EarlierRelease | None = None,
    reuse: bool = False,
) -> BuildResult:
    """Convert every target, check parity on its runtime, and write the signed bundle atomically.

    The checkpoint is opened and hashed once and the numpy reference runs once (all prompts batched; for an
    embedding encoder, all texts in one padded batch, ``prompts`` then being the texts); every target is
    converted from that model and judged against those recorded answers. A FAILED target raises
    ParityError and nothing is written; WARNED targets are kept (their attestation says WARNED and ``sovpack
    verify`` policy decides).

    ``earlier``: a signed bundle of the same checkpoint and prompts whose parity reference is used instead of
    running the numpy reference (so parts built on different machines share one reference, byte for byte);
    one of other inputs is refused. With ``reuse``, its targets whose inputs are unchanged (sovpack version,
    bundle name, every option provenance records) are carried over signed as they are, not rebuilt, and an
    ``earlier`` of other inputs only means nothing is reused.
    """
    checkpoint, output, all_refs = _resolve_targets(config)
    model = open_model(checkpoint, allow_nonfinite=config.allow_nonfinite)
    name = config.metadata.name or model.name
    context = BuildContext(config=config, name=name, created=source_date(), key=key,
                           runner=provenance.runner_facts())
    shared = earlier if earlier is not None and _shares_reference(earlier, model, config, strict=not reuse) else None
    reused: dict[str, ReleaseTarget] = {}
    if reuse and shared is not None:
        reused = {str(r): t for r in all_refs if (t := _unchanged(shared, context, str(r))) is not None}
    refs = [r for r in all_refs if str(r) not in reused]
    for ref in refs:
        ref.check_family(model.spec)
        ref.check_quantization(config.quantization_for(str(ref)))
    check_runtime_memory(refs, model.spec)  # before any work: nothing gets OOM-killed halfway

    check_not_input(output, [checkpoint])
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.work.", dir=output.parent))
    model.scratch = work / "shared"  # e.g. 4-bit codes fitted once for onnx:int4 and openvino:int4
    preload: RunnerPreload | None = None
    # NOTE: every artifact records the checkpoint's file digests (a full read, one core); hashed beside the
    # reference, they are ready when the writers start instead of delaying the first writer that asks.
    hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sovpack-source-hash")
    source_digests = hasher.submit(lambda: model.checkpoint.source_files)
    try:
        with atomic_directory(output, force=force, inputs=[checkpoint]) as tmp:
            store = BlobStore(tmp)
            reference: RecordedReference | RecordedEmbeddings
            if shared is not None:  # the earlier bundle's answers, stored byte for byte
                reference = shared.reference()
                ref_manifest = shared.copy_into(store, shared.release.reference)
            else:
                if model.spec.encoder is not None:  # an embedding encoder is judged by its embeddings of texts
                    reference = record_embeddings(model, labeled_texts(config.prompts), progress=progress)
                else:
                    reference = record_reference(model, config.prompts, progress=progress)
                ref_manifest = store_reference(store, reference, model, context)
            source_digests.result()
            model.release_all_pages()  # the reference read every weight: the writers start from none resident
            return_freed_memory()
            entries: dict[str, Descriptor] = {}
            attestations: dict[str, list[Descriptor]] = {}
            built: dict[str, BuiltTarget] = {}
            released: dict[str, ReleaseTarget] = {}
            for target, signed_target in reused.items():
                assert shared is not None  # reused is empty without it
                entries[target], attestations[target], built[target], released[target] = _carry_over(
                    shared, store, signed_target)
            jobs = [TargetJob(ref, work / f"{i:02d}-{ref.format}-{ref.precision}", config.overrides_for(str(ref))
                              or None, config.quantization_for(str(ref)), stored=True)
                    for i, ref in enumerate(refs, start=1)]
            for job in jobs:
                job.directory.mkdir()
            together = overlapped_targets(model, refs)
            preload = RunnerPreload.beside(model, together, refs[0]) if refs else None
            written = _write_together(model, jobs, together, progress, preload)
            pending = list(zip(refs, jobs, strict=True))
            while pending:
                ref, job = pending.pop(_next_judged(pending, written, preload, first=len(pending) == len(refs)))
                stage = f"[{refs.index(ref) + 1}/{len(refs)}] {ref}"
                step = "parity check" if ref in written else "convert + parity"
                progress(f"{stage}: {step}", 0, 1)
                result = finish_target(model, job, reference=reference, prompts=config.prompts, progress=progress,
                                       written=written.get(ref), runner=preload.take(ref) if preload else None)
                progress(f"{stage}: {step}", 1, 1)
                return_freed_memory()  # the runtime's session is closed: its heap goes back before the next
                progress(f"{stage}: store + sign", 0, 1)
                manifest, signed, stored = store_target(store, ref, result, model, ref_manifest, context)
                entries[stored.target] = manifest
                attestations[stored.target] = signed
                built[stored.target] = stored
                released[stored.target] = ReleaseTarget(
                    target=stored.target,
                    manifest=manifest.digest,
                    attestations={kind: d.digest for kind, d in zip(ATTESTATION_KINDS, signed, strict=True)},
                    parity=stored.parity,
                    thresholds=result.parity.thresholds.to_dict() if result.parity is not None else {},
                    threshold_overrides=dict(sorted(config.overrides_for(stored.target).items())),
                )
                shutil.rmtree(result.out_dir, ignore_errors=True)  # stored: free the disk before the next target
                progress(f"{stage}: store + sign", 1, 1)
            order = [str(r) for r in all_refs]
            release = _release(context, model, ref_manifest, [released[t] for t in order])
            release_desc = release_manifest(store, statement=release.statement(), key=key, created=context.created)
            members = [*(entries[t] for t in order), ref_manifest, *(a for t in order for a in attestations[t])]
            bundle_index = store_index(store, all_refs, [*members, release_desc], context)
            write_layout(tmp, store, bundle_index, config.tag)
            size = sum(p.stat().st_size for p in store.dir.iterdir())
    finally:
        if preload is not None:
            preload.close()
        hasher.shutdown(wait=True)  # a failed build leaves no thread reading the checkpoint
        shutil.rmtree(work, ignore_errors=True)
    return BuildResult(
        output=output,
        name=name,
        tag=config.tag,
        index_digest=bundle_index.digest,
        key_id=key.key_id,
        targets=tuple(built[t] for t in order),
        size=size,
        reference_from=shared.location if shared is not None else None,
    )


def _next_judged(pending: list[tuple[TargetRef, TargetJob]], written: dict[TargetRef, ArtifactMetadata],
                 preload: RunnerPreload | None, *, first: bool) -> int:
    """Which pending target to judge next: the build's order, except that if the preloaded runtime is still
    loading (one core's work) when judging starts, one other written target whose parity fits beside it goes
    first. One: the load needs only the idle core, and a second runtime beside it would add its memory for
    no time. The bundle lists targets in the build's order whatever order they are judged in."""
    if first and preload is not None and pending[0][0] == preload.ref and preload.loading():
        for i, (ref, _job) in enumerate(pending[1:], start=1):
            if ref in written and preload.fits_beside(ref):
                return i
    return 0


def _shares_reference(earlier: EarlierRelease, model: SourceModel, config: BuildConfig, *, strict: bool) -> bool:
    """Whether the earlier bundle was judged on this very checkpoint and these prompts (strict: or refuse it)."""
    prompts = tuple(config.prompts) if config.prompts else None
    differs = [what for what, same in (
        ("source checkpoint (file digests)", earlier.release.source == tuple(model.checkpoint.source_files)),
        ("parity prompts", earlier.release.prompts == prompts),
    ) if not same]
    if differs and strict:
        raise VerificationError(f"{earlier.location}: its {' and '.join(differs)} differ from this build's, so its "
                                "parity reference is not this build's")
    return not differs


def _unchanged(earlier: EarlierRelease, context: BuildContext, target: str) -> ReleaseTarget | None:
    """The earlier bundle's signed target when it can be reused: same sovpack, bundle name and recorded inputs."""
    signed = earlier.release.target(target)
    if signed is None or earlier.release.sovpack_version != __version__ or earlier.release.name != context.name:
        return None
    local = ("checkpoint", "bundle")  # where the checkpoint lay and the tag are not inputs of the target
    before = {k: v for k, v in earlier.provenance_parameters(target).items() if k not in local}
    now = {k: v for k, v in {"target": target, **context.external_parameters(target)}.items() if k not in local}
    return signed if before == now else None


def _carry_over(earlier: EarlierRelease, store: BlobStore, signed: ReleaseTarget
                ) -> tuple[Descriptor, list[Descriptor], BuiltTarget, ReleaseTarget]:
    """A reused target copied as signed (manifest, its attestations), released as built in the earlier bundle
    (or in the part that bundle says it was built in)."""
    manifest = earlier.copy_into(store, signed.manifest)
    attestations = [earlier.copy_into(store, signed.attestations[kind]) for kind in ATTESTATION_KINDS]
    origin = signed.part or PartOrigin(tag=earlier.release.tag, release=earlier.release_digest)
    return manifest, attestations, earlier.built_target(signed.target), replace(signed, part=origin)


def _write_together(model: SourceModel, jobs: list[TargetJob], together: list[TargetRef], progress: Progress,
                    preload: RunnerPreload | None) -> dict[TargetRef, ArtifactMetadata]:
    """The artifacts a build writes at once before any parity run (convert.overlapped_targets), by target; the
    first target judged is opened on its runtime as soon as its own writer is done (``preload``)."""
    refs = [job.ref for job in jobs]
    if not together:
        return {}
    numbers = "+".join(str(refs.index(ref) + 1) for ref in together)
    stage = f"[{numbers}/{len(refs)}] {', '.join(map(str, together))}: write at once"
    progress(stage, 0, 1)
    metadata = write_targets(model, [job for job in jobs if job.ref in together], progress,
                             on_written=preload.on_written if preload is not None else None)
    progress(stage, 1, 1)
    return dict(zip(together, metadata, strict=True))


def _release(
    context: BuildContext, model: SourceModel, ref_manifest: Descriptor, targets: list[ReleaseTarget]
) -> Release:
    """What the build vouches for as a whole (see sovpack.attest.release)."""
    config = context.config
    return Release(
        name=context.name,
        tag=config.tag,
        sequence=config.sequence,
        version=config.metadata.version,
        created=context.created,
        expires=config.expires,
        licenses=tuple(config.metadata.licenses),
        metadata=config.metadata.to_dict(),
        sovpack_version=__version__,
        source=tuple(model.checkpoint.source_files),
        prompts=tuple(config.prompts) if config.prompts else None,
        reference=ref_manifest.digest,
        targets=tuple(targets),
    )


