"""Parsing a bundle into a :class:`BundleView`: its targets, parity reference and attestations.

Every manifest and config is digest-checked as it is read (``deep`` hashes every layer too). Fatal layout
problems raise; anything wrong with one manifest is collected in ``BundleView.problems`` so ``verify`` can
list every problem at once. Nothing here checks signatures: that is :mod:`sovpack.verify.check`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sovpack._io import check_relative_path, parse_json
from sovpack._schemas import validate
from sovpack.attest import oms
from sovpack.attest.dsse import SigstoreBundle
from sovpack.errors import UsageError, VerificationError
from sovpack.oci.blobs import BlobSource, bundle_index_tag
from sovpack.oci.descriptor import Descriptor
from sovpack.oci.media import (
    ANN_ATTESTATION,
    ANN_FILEPATH,
    ANN_FORMAT,
    ANN_KIND,
    ANN_PRECISION,
    ANN_PREDICATE_TYPE,
    ANN_REF_NAME,
    ANN_SUBJECT,
    ANN_TARGET,
    ANN_TITLE,
    AT_MODEL,
    AT_PARITY_REFERENCE,
    AT_SIGSTORE,
    INDEX_FILE,
    KIND_ATTESTATION,
    KIND_REFERENCE,
    KIND_RELEASE,
    KIND_TARGET,
    MODEL_LAYER_TYPES,
    MT_EMPTY,
    MT_INDEX,
    MT_LOGITS,
    MT_MANIFEST,
    MT_MODEL_CONFIG,
    MT_PARITY_REFERENCE_CONFIG,
)
from sovpack.oci.reader import Layout, named_target, select_index
from sovpack.oci.tags import bundle_tag_of, target_tag
from sovpack.parity.embeddings import MT_EMBEDDING_REFERENCE_CONFIG, MT_REFERENCE_EMBEDDINGS, EmbeddingReferenceConfig
from sovpack.parity.recorded import ReferenceConfig


@dataclass(frozen=True, kw_only=True, slots=True)
class TargetEntry:
    """A target manifest as found in the bundle."""

    name: str
    format: str
    precision: str
    descriptor: Descriptor
    config: Mapping[str, Any]
    layers: tuple[Descriptor, ...]

    @property
    def files(self) -> dict[str, Descriptor]:
        return {layer.annotations[ANN_FILEPATH]: layer for layer in self.layers}

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)


@dataclass(frozen=True, kw_only=True, slots=True)
class AttestationEntry:
    """An attestation manifest: the Sigstore bundle it holds and the manifest it refers to."""

    descriptor: Descriptor
    subject: str
    kind_hint: str | None  # from the manifest annotation (unsigned)
    predicate_hint: str | None
    layer: Descriptor
    bundle: SigstoreBundle


@dataclass(frozen=True, kw_only=True, slots=True)
class ReleaseEntry:
    """A release statement manifest (no subject: it vouches for the whole bundle) and its Sigstore bundle."""

    descriptor: Descriptor
    layer: Descriptor
    bundle: SigstoreBundle


@dataclass(frozen=True, kw_only=True, slots=True)
class ReferenceEntry:
    """The parity reference manifest: config plus layers by title.

    A decoder's reference holds logits (``ReferenceConfig``), an embedding encoder's the reference embeddings
    (``EmbeddingReferenceConfig``); the config's media type says which.
    """

    descriptor: Descriptor
    config: ReferenceConfig | EmbeddingReferenceConfig
    layers: Mapping[str, Descriptor]


@dataclass(kw_only=True)
class BundleView:
    """Everything parsed from a bundle, and the problems found on the way (mutable while reading)."""

    layout: BlobSource
    tag: str | None
    name: str | None
    index_descriptor: Descriptor
    annotations: dict[str, str] = field(default_factory=dict)
    targets: list[TargetEntry] = field(default_factory=list)
    attestations: list[AttestationEntry] = field(default_factory=list)
    releases: list[ReleaseEntry] = field(default_factory=list)
    reference: ReferenceEntry | None = None
    problems: list[str] = field(default_factory=list)
    named_target: tuple[str, str] | None = None  # (target, manifest digest) when opened by a per-target tag

    def target(self, name: str) -> TargetEntry:
        for entry in self.targets:
            if entry.name == name:
                return entry
        known = ", ".join(t.name for t in self.targets) or "none"
        raise UsageError(f"{self.layout.root}: no target {name!r} in this bundle (targets: {known})")

    def local_layout(self) -> Layout:
        """The bundle's store as a layout directory: extraction and the stored reference need real blob files."""
        if not isinstance(self.layout, Layout):
            kind = type(self.layout).__name__
            raise UsageError(f"{self.layout.root}: this needs a local OCI layout directory, not a {kind}")
        return self.layout


def read_bundle(
    path: str | Path | BlobSource, *, tag: str | None = None, deep: bool = True, strict_tag: bool = True
) -> BundleView:
    """Parse a bundle; ``deep`` hashes every layer too. Fatal layout problems raise, the rest are collected.

    ``path`` is a layout directory, or any BlobSource (e.g. a registry: sovpack.transport.RegistryLayout).
    ``strict_tag``: a layout tag that differs from the tag the bundle was built with is an error unless that
    tag was asked for explicitly (else it is only listed among the problems).
    """
    layout: BlobSource = Layout(path) if isinstance(path, str | os.PathLike) else path
    tag = tag if tag is not None else layout.requested_tag
    named = named_target(layout, tag)
    if named is not None:  # a per-target tag: the bundle it belongs to, explicitly by its own tag
        tag = bundle_tag_of(str(tag), named[0])
    index_desc, found_tag = select_index(layout, tag)
    index = layout.read_json(index_desc, f"bundle index {index_desc.digest}")
    if index.get("schemaVersion") != 2 or index.get("mediaType") != MT_INDEX:
        raise VerificationError(f"bundle index {index_desc.digest}: not an OCI image index")
    annotations = index.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise VerificationError(f"bundle index {index_desc.digest}: annotations are not a map")
    inner_tag = bundle_index_tag(index)
    retag_problem = None
    if inner_tag is not None and found_tag is not None and inner_tag != found_tag and tag is None:
        # A re-tagged copy (skopeo copy ... oci:DIR:NEWTAG) is fine when asked for by its new tag; otherwise a
        # changed tag in index.json (e.g. a flipped byte) must not go unnoticed.
        retag_problem = (
            f"{layout.root / INDEX_FILE}: tags the bundle {found_tag!r}, but it was built as {inner_tag!r} "
            f"(if it was re-tagged on purpose, pass --tag {found_tag})"
        )
        if strict_tag:
            raise VerificationError(retag_problem)
    manifests = index.get("manifests")
    if not isinstance(manifests, list) or not manifests:
        raise VerificationError(f"bundle index {index_desc.digest}: no manifests")
    view = BundleView(
        layout=layout,
        tag=found_tag or inner_tag,
        name=annotations.get(ANN_TITLE),
        index_descriptor=index_desc,
        annotations={str(k): str(v) for k, v in annotations.items()},
    )
    if retag_problem is not None:
        view.problems.append(retag_problem)
    for i, raw in enumerate(manifests):
        try:
            desc = Descriptor.from_dict(raw, f"bundle index manifests[{i}]")
            if desc.media_type != MT_MANIFEST:
                raise VerificationError(f"bundle index manifests[{i}]: {desc.media_type} is not an image manifest")
            _read_manifest(view, desc, deep=deep)
        except VerificationError as e:
            view.problems.append(str(e))
    names = [t.name for t in view.targets]
    for name in sorted({n for n in names if names.count(n) > 1}):
        view.problems.append(f"target {name}: appears more than once in the bundle")
    view.named_target = named
    view.problems.extend(_target_tag_problems(view))
    return view


def _target_tag_problems(view: BundleView) -> list[str]:
    """Every per-target tag of this bundle in the top-level index must name that very target's manifest."""
    if view.tag is None:
        return []
    problems = []
    by_name = {t.name: t.descriptor.digest for t in view.targets}
    for raw in view.layout.index.get("manifests") or []:
        annotations = raw.get("annotations") if isinstance(raw, dict) else None
        target = annotations.get(ANN_TARGET) if isinstance(annotations, dict) else None
        tag = annotations.get(ANN_REF_NAME) if isinstance(annotations, dict) else None
        if not isinstance(target, str) or tag != target_tag(view.tag, target):
            continue
        if by_name.get(target) != raw.get("digest"):
            problems.append(f"{view.layout.root / INDEX_FILE}: tag {tag!r} names manifest {raw.get('digest')}, "
                            f"which is not target {target} of bundle {view.tag!r}")
    return problems


def _read_manifest(view: BundleView, desc: Descriptor, *, deep: bool) -> None:
    layout = view.layout
    hint = desc.annotations.get(ANN_TARGET)
    where = f"manifest {desc.digest}" + (f" (target {hint})" if hint else "")
    doc = layout.read_json(desc, where)
    if doc.get("schemaVersion") != 2 or doc.get("mediaType") != MT_MANIFEST:
        raise VerificationError(f"{where}: not an OCI image manifest")
    artifact_type = doc.get("artifactType")
    config = Descriptor.from_dict(doc.get("config"), f"{where} config")
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise VerificationError(f"{where}: no layers list")
    layers = [Descriptor.from_dict(layer, f"{where} layers[{i}]") for i, layer in enumerate(raw_layers)]
    annotations = doc.get("annotations") or {}
    kind = desc.annotations.get(ANN_KIND)
    if artifact_type == AT_MODEL:
        _read_target(view, desc, config, layers, annotations, where, deep=deep)
        expected_kind = KIND_TARGET
    elif artifact_type == AT_PARITY_REFERENCE:
        _read_reference(view, desc, config, layers, where, deep=deep)
        expected_kind = KIND_REFERENCE
    elif artifact_type == AT_SIGSTORE and doc.get("subject") is None and annotations.get(ANN_KIND) == KIND_RELEASE:
        _read_release(view, desc, config, layers)
        expected_kind = KIND_RELEASE
    elif artifact_type == AT_SIGSTORE:
        _read_attestation(view, desc, doc, config, layers, annotations, where)
        expected_kind = KIND_ATTESTATION
    else:
        raise VerificationError(f"{where}: unexpected artifactType {artifact_type!r}; a bundle holds only "
                                f"{AT_MODEL}, {AT_PARITY_REFERENCE} and {AT_SIGSTORE} manifests")
    if kind is not None and kind != expected_kind:
        raise VerificationError(f"{where}: the index calls it {kind!r}, but it is a {expected_kind} manifest")


def _read_target(
    view: BundleView,
    desc: Descriptor,
    config: Descriptor,
    layers: list[Descriptor],
    annotations: Mapping[str, Any],
    where: str,
    *,
    deep: bool,
) -> None:
    from jsonschema import ValidationError

    name = annotations.get(ANN_TARGET)
    fmt, precision = annotations.get(ANN_FORMAT), annotations.get(ANN_PRECISION)
    if not isinstance(name, str) or name != f"{fmt}:{precision}":
        raise VerificationError(f"{where}: target annotations are missing or inconsistent ({name!r})")
    where = f"target {name} (manifest {desc.digest})"
    hint = desc.annotations.get(ANN_TARGET)
    if hint is not None and hint != name:
        raise VerificationError(f"{where}: the index entry calls it {hint!r}")
    if config.media_type != MT_MODEL_CONFIG:
        raise VerificationError(f"{where}: config media type {config.media_type!r} is not {MT_MODEL_CONFIG}")
    mp_config = view.layout.read_json(config, f"{where} config")
    try:
        validate(mp_config, "modelpack-config")
    except ValidationError as e:
        raise VerificationError(f"{where}: config is not a valid ModelPack config: {e.message}") from None
    if mp_config["config"].get("format") != fmt:
        raise VerificationError(f"{where}: config format {mp_config['config'].get('format')!r} is not {fmt!r}")
    if mp_config["modelfs"]["diffIds"] != [layer.digest for layer in layers]:
        raise VerificationError(f"{where}: config modelfs.diffIds do not list the manifest's layers")
    paths: set[str] = set()
    for i, layer in enumerate(layers):
        lwhere = f"{where} layer {i}"
        if layer.media_type not in MODEL_LAYER_TYPES:
            raise VerificationError(f"{lwhere}: unexpected media type {layer.media_type!r}")
        path = layer.annotations.get(ANN_FILEPATH)
        if path is None:
            raise VerificationError(f"{lwhere}: no {ANN_FILEPATH} annotation")
        check_relative_path(path, lwhere)
        _check_no_link_metadata(layer, lwhere)
        lwhere = f"{where} file {path!r}"
        if path in paths:
            raise VerificationError(f"{lwhere}: listed twice")
        if path == oms.SIGNATURE_FILE:
            raise VerificationError(f"{lwhere}: the name is reserved for the extracted signature")
        paths.add(path)
        if deep:
            view.layout.check(layer, lwhere)
    for path in paths:
        parts = path.split("/")
        for n in range(1, len(parts)):
            if "/".join(parts[:n]) in paths:
                raise VerificationError(f"{where}: {'/'.join(parts[:n])!r} is both a file and a directory")
    view.targets.append(
        TargetEntry(
            name=name, format=str(fmt), precision=str(precision), descriptor=desc, config=mp_config,
            layers=tuple(layers),
        )
    )


def _check_no_link_metadata(layer: Descriptor, where: str) -> None:
    """ModelPack file metadata may describe a link (tar typeflag '1' or '2'): sovpack extracts regular files only."""
    raw = layer.annotations.get("org.cncf.model.file.metadata+json")
    if raw is None:
        return
    meta = parse_json(raw, f"{where}: file metadata annotation", error=VerificationError)
    flag = meta.get("typeflag") if isinstance(meta, dict) else None
    if flag not in (None, 0, 48, "0"):
        raise VerificationError(f"{where}: the file is not a regular file (typeflag {flag!r}); links are refused")


def _read_reference(
    view: BundleView, desc: Descriptor, config: Descriptor, layers: list[Descriptor], where: str, *, deep: bool
) -> None:
    where = f"parity reference (manifest {desc.digest})"
    if view.reference is not None:
        raise VerificationError(f"{where}: the bundle holds more than one parity reference")
    if config.media_type not in (MT_PARITY_REFERENCE_CONFIG, MT_EMBEDDING_REFERENCE_CONFIG):
        raise VerificationError(f"{where}: config media type {config.media_type!r} is unexpected")
    raw = view.layout.read_json(config, f"{where} config")
    ref_config: ReferenceConfig | EmbeddingReferenceConfig
    try:
        if config.media_type == MT_EMBEDDING_REFERENCE_CONFIG:
            ref_config = EmbeddingReferenceConfig.from_dict(raw)
        else:
            ref_config = ReferenceConfig.from_dict(raw)
    except VerificationError as e:
        raise VerificationError(f"{where}: {e}") from None
    by_title: dict[str, Descriptor] = {}
    for i, layer in enumerate(layers):
        title = layer.annotations.get(ANN_FILEPATH) or layer.annotations.get(ANN_TITLE)
        if not title or title in by_title:
            raise VerificationError(f"{where} layer {i}: missing or duplicate title")
        if deep:
            view.layout.check(layer, f"{where} layer {title!r}")
        by_title[title] = layer
    if isinstance(ref_config, EmbeddingReferenceConfig):
        for title in (ref_config.embeddings, ref_config.token_states):
            stored = by_title.get(title)
            if stored is None or stored.media_type != MT_REFERENCE_EMBEDDINGS:
                raise VerificationError(f"{where}: reference embeddings {title!r} are not a layer")
    else:
        for prompt in ref_config.prompts:
            logits = by_title.get(prompt.logits)
            if logits is None or logits.media_type != MT_LOGITS:
                raise VerificationError(f"{where}: prompt {prompt.index} logits {prompt.logits!r} are not a layer")
    if ref_config.tokenizer is not None and ref_config.tokenizer not in by_title:
        raise VerificationError(f"{where}: tokenizer {ref_config.tokenizer!r} is not a layer")
    view.reference = ReferenceEntry(descriptor=desc, config=ref_config, layers=by_title)


def _read_release(view: BundleView, desc: Descriptor, config: Descriptor, layers: list[Descriptor]) -> None:
    where = f"release statement {desc.digest}"
    if config.media_type != MT_EMPTY:
        raise VerificationError(f"{where}: config media type {config.media_type!r} is not {MT_EMPTY}")
    view.layout.check(config, f"{where} config")
    if len(layers) != 1 or layers[0].media_type != AT_SIGSTORE:
        raise VerificationError(f"{where}: expected exactly one {AT_SIGSTORE} layer")
    bundle = SigstoreBundle.from_bytes(view.layout.read(layers[0], f"{where} layer"))
    view.releases.append(ReleaseEntry(descriptor=desc, layer=layers[0], bundle=bundle))


def _read_attestation(
    view: BundleView,
    desc: Descriptor,
    doc: Mapping[str, Any],
    config: Descriptor,
    layers: list[Descriptor],
    annotations: Mapping[str, Any],
    where: str,
) -> None:
    where = f"attestation {desc.digest}"
    target_hint = annotations.get(ANN_TARGET) or desc.annotations.get(ANN_TARGET)
    kind_hint = annotations.get(ANN_ATTESTATION) or desc.annotations.get(ANN_ATTESTATION)
    if target_hint or kind_hint:
        where += f" ({kind_hint or '?'} of {target_hint or '?'})"
    if config.media_type != MT_EMPTY:
        raise VerificationError(f"{where}: config media type {config.media_type!r} is not {MT_EMPTY}")
    view.layout.check(config, f"{where} config")
    if len(layers) != 1 or layers[0].media_type != AT_SIGSTORE:
        raise VerificationError(f"{where}: expected exactly one {AT_SIGSTORE} layer")
    subject = Descriptor.from_dict(doc.get("subject"), f"{where} subject")
    index_subject = desc.annotations.get(ANN_SUBJECT)
    if index_subject is not None and index_subject != subject.digest:
        raise VerificationError(f"{where}: the index maps it to {index_subject}, its manifest to {subject.digest}")
    bundle = SigstoreBundle.from_bytes(view.layout.read(layers[0], f"{where} layer"))
    predicate_hint = annotations.get(ANN_PREDICATE_TYPE)
    view.attestations.append(
        AttestationEntry(
            descriptor=desc,
            subject=subject.digest,
            kind_hint=kind_hint,
            predicate_hint=predicate_hint,
            layer=layers[0],
            bundle=bundle,
        )
    )


__all__ = ["AttestationEntry", "BundleView", "ReferenceEntry", "ReleaseEntry", "TargetEntry", "read_bundle"]
