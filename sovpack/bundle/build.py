"""``build_bundle``: every target converted once from one opened checkpoint, judged against one reference pass,
stored, signed and written as one OCI image layout, atomically."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sovpack import __version__
from sovpack._io import Progress, atomic_directory, check_not_input, no_progress, return_freed_memory, source_date
from sovpack.artifact import ARTIFACT_FILE, ArtifactMetadata
from sovpack.attest import oms, provenance
from sovpack.attest.dsse import SigningKey, Statement, Subject, canonical_json, pretty_json
from sovpack.attest.release import Release, ReleaseTarget, parse_time
from sovpack.bundle.attestations import attestation_manifest, parity_predicate, release_manifest, subject_name
from sovpack.bundle.config import BuildConfig
from sovpack.bundle.modelpack import file_metadata, layer_media_type, list_artifact_files, modelpack_config
from sovpack.convert import ConvertResult, TargetJob, finish_target, overlapped_targets, write_targets
from sovpack.errors import ParityError, SourceError, UsageError, VerificationError
from sovpack.oci.descriptor import Descriptor
from sovpack.oci.media import (
    ANN_BUNDLE_VERSION,
    ANN_CREATED,
    ANN_FILE_METADATA,
    ANN_FILEPATH,
    ANN_FORMAT,
    ANN_KIND,
    ANN_LICENSES,
    ANN_PRECISION,
    ANN_REF_NAME,
    ANN_SOVPACK_VERSION,
    ANN_TARGET,
    ANN_TARGETS,
    ANN_TITLE,
    ANN_VERSION,
    AT_BUNDLE,
    AT_MODEL,
    AT_PARITY_REFERENCE,
    ATTESTATION_KINDS,
    BUNDLE_FORMAT_VERSION,
    KIND_REFERENCE,
    KIND_TARGET,
    MT_INDEX,
    MT_LOGITS,
    MT_MANIFEST,
    MT_MODEL_CONFIG,
    MT_PARITY_REFERENCE_CONFIG,
    MT_WEIGHT_CONFIG,
    PARITY_PREDICATE_TYPE,
    TAG_RE,
)
from sovpack.oci.store import BlobStore, manifest_document, write_layout
from sovpack.parity.embeddings import (
    MT_EMBEDDING_REFERENCE_CONFIG,
    MT_REFERENCE_EMBEDDINGS,
    RecordedEmbeddings,
    labeled_texts,
    record_embeddings,
)
from sovpack.parity.recorded import REFERENCE_TOKENIZER, RecordedReference, record_reference
from sovpack.parity.report import PARITY_FILE, ParityReport
from sovpack.source.model import SourceModel, open_model
from sovpack.targets.base import TargetRef, check_runtime_memory


@dataclass(frozen=True, kw_only=True, slots=True)
class BuiltTarget:
    """One target as stored in the bundle."""

    target: str
    manifest_digest: str
    files: tuple[str, ...]
    size: int
    parity: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "manifest_digest": self.manifest_digest,
            "files": list(self.files),
            "size": self.size,
            "parity": self.parity,
        }


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "name": self.name,
            "tag": self.tag,
            "index_digest": self.index_digest,
            "key_id": self.key_id,
            "targets": [t.to_dict() for t in self.targets],
            "size": self.size,
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
    built = {str(r) for r in refs}
    unknown = sorted(set(config.target_thresholds) - built)
    if unknown:
        raise UsageError(f"threshold overrides for targets that are not built: {', '.join(unknown)}")
    unknown = sorted(set(config.target_quantization) - built)
    if unknown:
        raise UsageError(f"quantization options for targets that are not built: {', '.join(unknown)}")
    return Path(config.checkpoint), Path(config.output), refs


def build_bundle(
    config: BuildConfig,
    *,
    key: SigningKey,
    force: bool = False,
    progress: Progress = no_progress,
) -> BuildResult:
    """Convert every target, check parity on its runtime, and write the signed bundle atomically.

    The checkpoint is opened and hashed once and the numpy reference runs once (all prompts batched; for an
    embedding encoder, all texts in one padded batch, ``prompts`` then being the texts); every target is
    converted from that model and judged against those recorded answers. A FAILED target raises
    ParityError and nothing is written; WARNED targets are kept (their attestation says WARNED and ``sovpack
    verify`` policy decides).
    """
    checkpoint, output, refs = _resolve_targets(config)
    model = open_model(checkpoint, allow_nonfinite=config.allow_nonfinite)
    for ref in refs:
        ref.check_family(model.spec)
    check_runtime_memory(refs, model.spec)  # before any work: nothing gets OOM-killed halfway
    name = config.metadata.name or model.name
    context = _BuildContext(config=config, name=name, created=source_date(), key=key,
                            runner=provenance.runner_facts())

    check_not_input(output, [checkpoint])
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.work.", dir=output.parent))
    model.scratch = work / "shared"  # e.g. 4-bit codes fitted once for onnx:int4 and openvino:int4
    try:
        with atomic_directory(output, force=force, inputs=[checkpoint]) as tmp:
            store = BlobStore(tmp)
            reference: RecordedReference | RecordedEmbeddings
            if model.spec.encoder is not None:  # an embedding encoder is judged by its embeddings of texts
                reference = record_embeddings(model, labeled_texts(config.prompts), progress=progress)
            else:
                reference = record_reference(model, config.prompts, progress=progress)
            ref_manifest = _store_reference(store, reference, model, context)
            model.release_all_pages()  # the reference read every weight: the writers start from none resident
            return_freed_memory()
            entries: list[Descriptor] = []
            attestations: list[Descriptor] = []
            built: list[BuiltTarget] = []
            released: list[ReleaseTarget] = []
            jobs = [TargetJob(ref, work / f"{i:02d}-{ref.format}-{ref.precision}", config.overrides_for(str(ref))
                              or None, config.quantization_for(str(ref))) for i, ref in enumerate(refs, start=1)]
            for job in jobs:
                job.directory.mkdir()
            written = _write_together(model, jobs, progress)
            for i, (ref, job) in enumerate(zip(refs, jobs, strict=True), start=1):
                stage = f"[{i}/{len(refs)}] {ref}"
                step = "parity check" if ref in written else "convert + parity"
                progress(f"{stage}: {step}", 0, 1)
                result = finish_target(model, job, reference=reference, prompts=config.prompts, progress=progress,
                                       written=written.get(ref))
                progress(f"{stage}: {step}", 1, 1)
                return_freed_memory()  # the runtime's session is closed: its heap goes back before the next
                progress(f"{stage}: store + sign", 0, 1)
                manifest, signed, stored = _store_target(store, ref, result, model, ref_manifest, context)
                entries.append(manifest)
                attestations.extend(signed)
                built.append(stored)
                released.append(
                    ReleaseTarget(
                        target=stored.target,
                        manifest=manifest.digest,
                        attestations={kind: d.digest for kind, d in zip(ATTESTATION_KINDS, signed, strict=True)},
                        parity=stored.parity,
                        thresholds=result.parity.thresholds.to_dict() if result.parity is not None else {},
                        threshold_overrides=dict(sorted(config.overrides_for(stored.target).items())),
                    )
                )
                shutil.rmtree(result.out_dir, ignore_errors=True)  # stored: free the disk before the next target
                progress(f"{stage}: store + sign", 1, 1)
            release = _release(context, model, ref_manifest, released)
            release_desc = release_manifest(store, statement=release.statement(), key=key, created=context.created)
            bundle_index = _store_index(store, refs, [*entries, ref_manifest, *attestations, release_desc], context)
            write_layout(tmp, store, bundle_index, config.tag)
            size = sum(p.stat().st_size for p in store.dir.iterdir())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return BuildResult(
        output=output,
        name=name,
        tag=config.tag,
        index_digest=bundle_index.digest,
        key_id=key.key_id,
        targets=tuple(built),
        size=size,
    )


def _write_together(model: SourceModel, jobs: list[TargetJob], progress: Progress
                    ) -> dict[TargetRef, ArtifactMetadata]:
    """The artifacts a build writes at once before any parity run (convert.overlapped_targets), by target."""
    refs = [job.ref for job in jobs]
    together = overlapped_targets(model, refs)
    if not together:
        return {}
    numbers = "+".join(str(refs.index(ref) + 1) for ref in together)
    stage = f"[{numbers}/{len(refs)}] {', '.join(map(str, together))}: write at once"
    progress(stage, 0, 1)
    metadata = write_targets(model, [job for job in jobs if job.ref in together], progress)
    progress(stage, 1, 1)
    return dict(zip(together, metadata, strict=True))


def _release(
    context: _BuildContext, model: SourceModel, ref_manifest: Descriptor, targets: list[ReleaseTarget]
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


@dataclass(frozen=True, kw_only=True, slots=True)
class _BuildContext:
    """What every step of one build shares."""

    config: BuildConfig
    name: str
    created: str | None
    key: SigningKey
    runner: Mapping[str, Any]  # provenance.runner_facts(): the machine this build's parity ran on

    def external_parameters(self, target: str) -> dict[str, Any]:
        """The build's inputs as provenance records them (SLSA externalParameters)."""
        config = self.config
        params: dict[str, Any] = {
            "checkpoint": Path(str(config.checkpoint)).resolve().name,
            "bundle": {"name": self.name, "tag": config.tag},
            "parity": {
                "prompts": list(config.prompts) if config.prompts else "builtin",
                "thresholdOverrides": dict(sorted(config.overrides_for(target).items())),
            },
            "allowNonfinite": config.allow_nonfinite,
        }
        quant = config.quantization_for(target)
        if quant is not None:
            params["quantization"] = quant.to_dict()
        if config.metadata.to_dict():
            params["metadata"] = config.metadata.to_dict()
        return params


def _store_reference(store: BlobStore, reference: RecordedReference | RecordedEmbeddings, model: SourceModel,
                     context: _BuildContext) -> Descriptor:
    """The parity reference manifest: the source tokenizer, the recorded answers, and their config.

    A decoder's answers are its logits per prompt; an encoder's are its embeddings and token states
    (sovpack.parity.embeddings), under a config media type of their own in the same kind of manifest.
    """
    tokenizer_path = model.checkpoint.tokenizer_json
    if tokenizer_path is None:
        raise ParityError(f"{model.path}: parity needs tokenizer.json")
    layers = [store_file(store, tokenizer_path, REFERENCE_TOKENIZER, MT_WEIGHT_CONFIG)]
    if isinstance(reference, RecordedEmbeddings):
        for title, data in reference.reference_files():
            layers.append(store.add(data, MT_REFERENCE_EMBEDDINGS, annotations={ANN_TITLE: title}))
        config_document = reference.reference_config(REFERENCE_TOKENIZER).to_dict()
        config = store.add(pretty_json(config_document), MT_EMBEDDING_REFERENCE_CONFIG)
    else:
        for title, data in reference.logits_files():
            layers.append(store.add(data, MT_LOGITS, annotations={ANN_TITLE: title}))
        config = store.add(pretty_json(reference.config.to_dict()), MT_PARITY_REFERENCE_CONFIG)
    annotations = {ANN_TITLE: f"{context.name} parity reference"}
    if context.created:
        annotations[ANN_CREATED] = context.created
    document = manifest_document(
        artifact_type=AT_PARITY_REFERENCE, config=config, layers=layers, annotations=annotations
    )
    return store.add(
        canonical_json(document), MT_MANIFEST, artifact_type=AT_PARITY_REFERENCE, annotations={ANN_KIND: KIND_REFERENCE}
    )


def _store_target(
    store: BlobStore,
    ref: TargetRef,
    result: ConvertResult,
    model: SourceModel,
    ref_manifest: Descriptor,
    context: _BuildContext,
) -> tuple[Descriptor, list[Descriptor], BuiltTarget]:
    """One converted artifact as a ModelPack manifest plus its three signed attestations."""

    target = str(ref)
    artifact_dir = result.out_dir
    files = list_artifact_files(artifact_dir)
    if ARTIFACT_FILE not in files or PARITY_FILE not in files:
        raise SourceError(f"{artifact_dir}: converted artifact lacks {ARTIFACT_FILE} or {PARITY_FILE}")
    report = ParityReport.load(artifact_dir / PARITY_FILE)
    # The converted artifact is this build's scratch copy: its files are renamed into the blob store.
    layers = [
        store_file(store, artifact_dir / rel, rel, layer_media_type(rel), context.created, move=True)
        for rel in files
    ]
    by_path = {layer.annotations[ANN_FILEPATH]: layer for layer in layers}
    mp_config = modelpack_config(
        name=context.name,
        family=model.spec.family,
        fmt=ref.format,
        precision=ref.info,
        parameters=model.spec.parameter_count(),
        layers=layers,
        metadata=context.config.metadata,
        created=context.created,
    )
    config_desc = store.add(pretty_json(mp_config), MT_MODEL_CONFIG)
    annotations = {
        ANN_TARGET: target,
        ANN_FORMAT: ref.format,
        ANN_PRECISION: ref.precision,
        ANN_TITLE: subject_name(context.name, target),
        ANN_SOVPACK_VERSION: __version__,
    }
    if context.created:
        annotations[ANN_CREATED] = context.created
    manifest = store.add(
        canonical_json(manifest_document(artifact_type=AT_MODEL, config=config_desc, layers=layers,
                                         annotations=annotations)),
        MT_MANIFEST,
        artifact_type=AT_MODEL,
        annotations={ANN_KIND: KIND_TARGET, ANN_TARGET: target},
    )
    subject = Subject(name=subject_name(context.name, target), digest={"sha256": manifest.digest.split(":", 1)[1]})
    provenance_input = provenance.ProvenanceInput(
        subject_name=subject.name,
        manifest_digest=manifest.digest,
        target=target,
        external_parameters=context.external_parameters(target),
        source_files=[f.to_dict() for f in result.metadata.source],
        parity_runtime=report.runtime,
        packages={
            **provenance.package_versions(provenance.BASE_PACKAGES),
            **provenance.package_versions(ref.target.runtime_packages),
        },
        timestamp=context.created,
        runner=context.runner,
    )
    statements = {
        "signature": oms.OmsManifest(
            model_name=subject.name,
            files={layer.annotations[ANN_FILEPATH]: layer.digest.split(":", 1)[1] for layer in layers},
        ).statement(),
        "provenance": provenance.statement(provenance_input),
        "parity": Statement(
            subjects=(subject,),
            predicate_type=PARITY_PREDICATE_TYPE,
            predicate=parity_predicate(report, by_path[PARITY_FILE].digest, ref_manifest.digest),
        ),
    }
    signed = [
        attestation_manifest(
            store, kind=kind, statement=statements[kind], key=context.key, target=target, subject=manifest,
            created=context.created,
        )
        for kind in ATTESTATION_KINDS
    ]
    stored = BuiltTarget(
        target=target,
        manifest_digest=manifest.digest,
        files=tuple(files),
        size=sum(layer.size for layer in layers),
        parity=report.status,
    )
    return manifest, signed, stored


def _store_index(store: BlobStore, refs: list[TargetRef], manifests: list[Descriptor], context: _BuildContext
                 ) -> Descriptor:
    """The bundle index of this build."""
    metadata = context.config.metadata
    return store_bundle_index(store, manifests, name=context.name, tag=context.config.tag,
                              targets=[str(r) for r in refs], licenses=metadata.licenses, version=metadata.version,
                              created=context.created)


def store_bundle_index(store: BlobStore, manifests: Sequence[Descriptor], *, name: str, tag: str,
                       targets: Sequence[str], licenses: Sequence[str], version: str | None, created: str | None
                       ) -> Descriptor:
    """The bundle index listing every manifest, with the bundle's annotations (``build`` and ``assemble``)."""
    annotations = {
        ANN_REF_NAME: tag,
        ANN_TITLE: name,
        ANN_BUNDLE_VERSION: BUNDLE_FORMAT_VERSION,
        ANN_SOVPACK_VERSION: __version__,
        ANN_TARGETS: ",".join(targets),
    }
    if licenses:
        annotations[ANN_LICENSES] = " AND ".join(licenses)
    if version:
        annotations[ANN_VERSION] = version
    if created:
        annotations[ANN_CREATED] = created
    document = {
        "schemaVersion": 2,
        "mediaType": MT_INDEX,
        "artifactType": AT_BUNDLE,
        "manifests": [d.to_dict() for d in manifests],
        "annotations": annotations,
    }
    return store.add(canonical_json(document), MT_INDEX)


def store_file(store: BlobStore, path: Path, rel: str, media_type: str, created: str | None = None, *,
               move: bool = False) -> Descriptor:
    """Store one file as a layer annotated with its relative path and ModelPack file metadata (``move``: the
    file is the build's own scratch copy, renamed into the store instead of copied)."""
    digest, size = store.move_file(path) if move else store.put_file(path)
    return Descriptor(
        media_type=media_type,
        digest=digest,
        size=size,
        annotations={ANN_FILEPATH: rel, ANN_TITLE: rel, ANN_FILE_METADATA: file_metadata(rel, size, created)},
    )
