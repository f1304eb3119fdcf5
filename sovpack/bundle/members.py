"""What a build stores in the bundle: the parity reference, each target with its signed attestations, the index.

``build_bundle`` (sovpack.bundle.build) decides what to build; these functions turn its results into blobs
and manifests, the same way whichever path produced them (``assemble`` copies stored members unchanged).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sovpack import __version__
from sovpack._io import Progress, no_progress
from sovpack.artifact import ARTIFACT_FILE
from sovpack.attest import oms, provenance
from sovpack.attest.dsse import SigningKey, Statement, Subject, canonical_json, pretty_json
from sovpack.bundle.attestations import attestation_manifest, parity_predicate, subject_name
from sovpack.bundle.config import BuildConfig
from sovpack.bundle.modelpack import file_metadata, layer_media_type, list_artifact_files, modelpack_config
from sovpack.convert import ConvertResult
from sovpack.errors import ParityError, SourceError, VerificationError
from sovpack.oci.blobs import collect
from sovpack.oci.descriptor import Descriptor
from sovpack.oci.media import (
    ANN_BUNDLE_TAG,
    ANN_BUNDLE_VERSION,
    ANN_CREATED,
    ANN_FILE_METADATA,
    ANN_FILEPATH,
    ANN_FORMAT,
    ANN_KIND,
    ANN_LICENSES,
    ANN_PRECISION,
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
)
from sovpack.oci.reader import Layout
from sovpack.oci.store import BlobStore, manifest_document
from sovpack.parity.embeddings import (
    MT_EMBEDDING_REFERENCE_CONFIG,
    MT_REFERENCE_EMBEDDINGS,
    RecordedEmbeddings,
)
from sovpack.parity.recorded import REFERENCE_TOKENIZER, RecordedReference
from sovpack.parity.report import PARITY_FILE, ParityReport
from sovpack.source.model import SourceModel
from sovpack.targets.base import TargetRef


@dataclass(frozen=True, kw_only=True, slots=True)
class BuiltTarget:
    """One target as stored in the bundle."""

    target: str
    manifest_digest: str
    files: tuple[str, ...]
    size: int
    parity: str
    reused_from: str | None = None  # the earlier bundle it was carried over from (``build --reuse-from``)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "manifest_digest": self.manifest_digest,
            "files": list(self.files),
            "size": self.size,
            "parity": self.parity,
            "reused_from": self.reused_from,
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class BuildContext:
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


def store_reference(store: BlobStore, reference: RecordedReference | RecordedEmbeddings, model: SourceModel,
                     context: BuildContext) -> Descriptor:
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


def store_target(
    store: BlobStore,
    ref: TargetRef,
    result: ConvertResult,
    model: SourceModel,
    ref_manifest: Descriptor,
    context: BuildContext,
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


def store_index(store: BlobStore, refs: list[TargetRef], manifests: list[Descriptor], context: BuildContext
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
        ANN_BUNDLE_TAG: tag,
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


def copy_manifest(layout: Layout, store: BlobStore, desc: Descriptor, progress: Progress = no_progress) -> None:
    """One manifest of a verified bundle and every blob it reaches, copied into ``store`` (hashed again while
    copied: a blob changed since it was verified is refused)."""
    graph = collect(lambda d: layout.read(d, f"manifest {d.digest}"), desc)
    for blob in graph.blobs:
        if not store.path(blob.digest).exists():
            progress(f"copy {blob.annotations.get(ANN_TITLE, blob.digest[:19])}", 0, 1)
            digest, _size = store.put_file(layout.blob_path(blob.digest))
            if digest != blob.digest:
                raise VerificationError(f"{layout.root}: blob {blob.digest} changed since it was verified")
    for node in graph.manifests:
        store.put_bytes(node.data)


__all__ = [
    "BuildContext",
    "BuiltTarget",
    "copy_manifest",
    "store_bundle_index",
    "store_file",
    "store_index",
    "store_reference",
    "store_target",
]
