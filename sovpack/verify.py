"""Reading a bundle: ``verify``, ``inspect``, ``extract``, ``run`` from a bundle and the ``parity`` re-check.

What ``verify`` checks, and what it trusts:

- the layout: ``oci-layout``, ``index.json`` (one tagged entry, whose tag must match the bundle index's own),
  and *every* blob under ``blobs/sha256`` against its name, plus every descriptor's digest and size;
- every manifest in the bundle index: target manifests (ModelPack config valid, layer media types known, file
  paths safe and unique), the parity reference, and attestation manifests (one Sigstore bundle layer each,
  an OCI ``subject``); anything else is refused;
- every attestation's DSSE signature against the trusted keys; the signed statement decides what the
  attestation is (predicate type) and which target it covers (its subject): the model-signing signature
  must list exactly the target's files and digests, provenance and parity must name the target manifest
  digest, and the parity result must match the signed ``parity.json`` and the bundle's parity reference;
- each target has all three attestations from a trusted key; required targets exist; each target's parity
  status is allowed (PASSED and WARNED by default: WARNED means "inside the warn band", worth a look but
  not broken; a policy can allow PASSED only).

Index annotations (``dev.sovpack.*``) are a convenience mapping for tools; they must agree with the signed
content but are never trusted on their own. ``run`` and ``parity`` extract a verified copy to a temporary
directory (runtimes need real files with their names) and remove it afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import tomllib
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sovpack import oms, provenance
from sovpack.blob_source import BlobSource, VerifiedReads
from sovpack.bundle import (
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
    ATTESTATION_KINDS,
    BLOBS_DIR,
    CHUNK,
    DIGEST_RE,
    INDEX_FILE,
    KIND_ATTESTATION,
    KIND_REFERENCE,
    KIND_TARGET,
    LAYOUT_VERSION,
    MODEL_LAYER_TYPES,
    MT_EMPTY,
    MT_INDEX,
    MT_LOGITS,
    MT_MANIFEST,
    MT_MODEL_CONFIG,
    MT_PARITY_REFERENCE_CONFIG,
    OCI_LAYOUT_FILE,
    PARITY_FILE,
    PARITY_PREDICATE_TYPE,
    Descriptor,
    ReferenceConfig,
    check_relative_path,
    is_bundle_dir,
)
from sovpack.errors import ParityError, UsageError, VerificationError
from sovpack.fsutil import atomic_directory
from sovpack.signing import SigstoreBundle, Statement, VerifyingKey, load_trusted_keys, verify_bundle_signature

MAX_JSON_BLOB = 64 * 1024 * 1024  # manifests, configs and signatures are small; refuse to slurp a huge "manifest"
PARITY_STATUSES = ("PASSED", "WARNED", "FAILED")
DEFAULT_ALLOWED_PARITY = ("PASSED", "WARNED")
PREDICATE_KINDS = {
    oms.PREDICATE_TYPE: "signature",
    provenance.PREDICATE_TYPE: "provenance",
    PARITY_PREDICATE_TYPE: "parity",
}
KIND_LABELS = {
    "signature": f"model-signing signature ({oms.PREDICATE_TYPE})",
    "provenance": f"SLSA provenance ({provenance.PREDICATE_TYPE})",
    "parity": f"parity test-result ({PARITY_PREDICATE_TYPE})",
}


# ------------------------------------------------------------------------------------------------ policy


@dataclass(frozen=True, kw_only=True, slots=True)
class Policy:
    """What a deploy site requires of a bundle (``--policy FILE``, JSON or TOML; schema bundle-policy).

    ``keys``: trusted public keys (paths relative to the policy file); ``required_targets``: targets that
    must be present and valid; ``allowed_parity``: parity statuses accepted (default PASSED and WARNED).
    Command-line ``--key``/``--require-target`` add to the policy's lists.
    """

    keys: tuple[Path, ...] = ()
    required_targets: tuple[str, ...] = ()
    allowed_parity: tuple[str, ...] = DEFAULT_ALLOWED_PARITY
    tag: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "keys": [str(k) for k in self.keys],
            "required_targets": list(self.required_targets),
            "allowed_parity": list(self.allowed_parity),
        }
        if self.tag is not None:
            data["tag"] = self.tag
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base_dir: Path | None = None, source: str = "policy") -> Policy:
        from jsonschema import ValidationError

        from sovpack.schemas_io import validate

        try:
            validate(dict(data), "bundle-policy")
        except ValidationError as e:
            where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
            raise UsageError(f"{source}: invalid policy at {where}: {e.message}") from None
        keys = []
        for raw in data.get("keys", ()):
            path = Path(raw)
            keys.append(path if path.is_absolute() or base_dir is None else base_dir / path)
        return cls(
            keys=tuple(keys),
            required_targets=tuple(data.get("required_targets", ())),
            allowed_parity=tuple(data.get("allowed_parity", DEFAULT_ALLOWED_PARITY)),
            tag=data.get("tag"),
        )

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise UsageError(f"{path}: cannot read policy: {e.strerror or e}") from e
        try:
            text = raw.decode("utf-8")
            data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
            raise UsageError(f"{path}: not a valid policy file: {e}") from e
        if not isinstance(data, dict):
            raise UsageError(f"{path}: a policy is a JSON/TOML object")
        return cls.from_dict(data, base_dir=path.parent, source=str(path))


# ------------------------------------------------------------------------------------------------ layout


class Layout(VerifiedReads):
    """An OCI image layout on disk, read defensively: every blob is checked before its bytes are used."""

    def __init__(self, root: str | Path) -> None:
        super().__init__()
        self.root = Path(root)
        if not self.root.is_dir():
            raise VerificationError(f"{self.root}: no such bundle directory")
        layout = self._read_top_json(OCI_LAYOUT_FILE)
        if not isinstance(layout, dict) or layout.get("imageLayoutVersion") != LAYOUT_VERSION:
            raise VerificationError(f"{self.root / OCI_LAYOUT_FILE}: not an OCI image layout {LAYOUT_VERSION}")
        self.index = self._read_top_json(INDEX_FILE)
        if not isinstance(self.index, dict) or self.index.get("schemaVersion") != 2:
            raise VerificationError(f"{self.root / INDEX_FILE}: not an OCI image index (schemaVersion 2)")
        if self.index.get("mediaType", MT_INDEX) != MT_INDEX:
            raise VerificationError(f"{self.root / INDEX_FILE}: mediaType is not {MT_INDEX}")
        if not isinstance(self.index.get("manifests"), list):
            raise VerificationError(f"{self.root / INDEX_FILE}: no 'manifests' list")
        self.blob_dir = self.root / BLOBS_DIR / "sha256"
        for directory in (self.root / BLOBS_DIR, self.blob_dir):
            if directory.is_symlink() or not directory.is_dir():
                raise VerificationError(f"{directory}: missing or a symbolic link")

    def _read_top_json(self, name: str) -> Any:
        path = self.root / name
        if path.is_symlink() or not path.is_file():
            raise VerificationError(f"{path}: missing (or a symbolic link)")
        try:
            return json.loads(path.read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise VerificationError(f"{path}: not valid JSON: {e}") from e

    def blob_path(self, digest: str) -> Path:
        if not DIGEST_RE.match(digest):
            raise VerificationError(f"not a sha256 digest: {digest!r}")
        return self.blob_dir / digest.split(":", 1)[1]

    def _hash_file(self, path: Path) -> tuple[str, int]:
        hasher = hashlib.sha256()
        size = 0
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                hasher.update(chunk)
                size += len(chunk)
        self.bytes_checked += size
        return "sha256:" + hasher.hexdigest(), size

    def blob_problem(self, digest: str) -> str | None:
        """None if the blob file exists, is regular and hashes to its name; else what is wrong (cached)."""
        if digest in self._checked:
            return self._checked[digest]
        path = self.blob_path(digest)
        problem: str | None = None
        if path.is_symlink():
            problem = f"blob {digest} is a symbolic link; refused"
        elif not path.is_file():
            problem = f"blob {digest} is missing"
        else:
            actual, _size = self._hash_file(path)
            if actual != digest:
                problem = f"blob {digest} is corrupt: its content hashes to {actual}"
        self._checked[digest] = problem
        return problem

    def check(self, desc: Descriptor, where: str) -> None:
        """The blob a descriptor names exists, is intact, and has the declared size."""
        problem = self.blob_problem(desc.digest)
        if problem is not None:
            raise VerificationError(f"{where}: {problem}")
        size = self.blob_path(desc.digest).stat().st_size
        if size != desc.size:
            raise VerificationError(f"{where}: blob {desc.digest} has {size} bytes, the descriptor says {desc.size}")

    def read(self, desc: Descriptor, where: str, limit: int = MAX_JSON_BLOB) -> bytes:
        """A small blob's verified bytes."""
        return self._read_limited(desc, where, limit)

    def _raw(self, desc: Descriptor, where: str, limit: int) -> bytes:
        path = self.blob_path(desc.digest)
        if path.is_symlink() or not path.is_file():
            raise VerificationError(f"{where}: blob {desc.digest} is missing (or a symbolic link)")
        return path.read_bytes()

    def stored_size(self) -> int:
        """Bytes under blobs/ (every blob file once)."""
        return sum(p.stat().st_size for p in self.blob_dir.iterdir() if p.is_file())

    def stray_blob_problems(self) -> list[str]:
        """Problems with blob files nothing referenced (checked too: a flipped byte anywhere fails)."""
        problems = []
        for path in sorted(self.blob_dir.iterdir()):
            digest = f"sha256:{path.name}"
            if digest in self._checked:
                continue
            if not DIGEST_RE.match(digest):
                problems.append(f"{path}: not a sha256 blob name")
                continue
            problem = self.blob_problem(digest)
            if problem is not None:
                problems.append(f"{BLOBS_DIR}/sha256/{path.name} (unreferenced): {problem}")
        return problems


# ------------------------------------------------------------------------------------------ bundle view


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
class ReferenceEntry:
    """The parity reference manifest: config plus layers by title."""

    descriptor: Descriptor
    config: ReferenceConfig
    layers: Mapping[str, Descriptor]


@dataclass(kw_only=True)
class BundleView:
    """Everything parsed from a bundle, and the problems found on the way (mutable while reading)."""

    layout: Layout
    tag: str | None
    name: str | None
    index_descriptor: Descriptor
    annotations: dict[str, str] = field(default_factory=dict)
    targets: list[TargetEntry] = field(default_factory=list)
    attestations: list[AttestationEntry] = field(default_factory=list)
    reference: ReferenceEntry | None = None
    problems: list[str] = field(default_factory=list)

    def target(self, name: str) -> TargetEntry:
        for entry in self.targets:
            if entry.name == name:
                return entry
        known = ", ".join(t.name for t in self.targets) or "none"
        raise UsageError(f"{self.layout.root}: no target {name!r} in this bundle (targets: {known})")


def _select_index(layout: Layout, tag: str | None) -> tuple[Descriptor, str | None]:
    entries = [
        Descriptor.from_dict(d, f"{INDEX_FILE} manifests[{i}]") for i, d in enumerate(layout.index["manifests"])
    ]
    if tag is not None:
        matching = [e for e in entries if e.annotations.get(ANN_REF_NAME) == tag]
        if not matching:
            tags = ", ".join(sorted(e.annotations.get(ANN_REF_NAME, "?") for e in entries)) or "none"
            raise VerificationError(f"{layout.root / INDEX_FILE}: no entry tagged {tag!r} (tags: {tags})")
        entry = matching[0]
    elif len(entries) == 1:
        entry = entries[0]
    elif not entries:
        raise VerificationError(f"{layout.root / INDEX_FILE}: the layout holds no bundle")
    else:
        tags = ", ".join(sorted(e.annotations.get(ANN_REF_NAME, "?") for e in entries))
        raise UsageError(f"{layout.root}: the layout holds several entries ({tags}); choose one with --tag")
    if entry.media_type != MT_INDEX:
        raise VerificationError(
            f"{layout.root / INDEX_FILE}: entry {entry.digest} is {entry.media_type}, not a bundle index"
        )
    return entry, entry.annotations.get(ANN_REF_NAME)


def read_bundle(
    path: str | Path | BlobSource, *, tag: str | None = None, deep: bool = True, strict_tag: bool = True
) -> BundleView:
    """Parse a bundle; ``deep`` hashes every layer too. Fatal layout problems raise, the rest are collected.

    ``path`` is a layout directory, or any BlobSource (e.g. a registry: sovpack.transfer.RegistryLayout).
    ``strict_tag``: a layout tag that differs from the tag the bundle was built with is an error unless that
    tag was asked for explicitly (else it is only listed among the problems).
    """
    layout: Any = Layout(path) if isinstance(path, str | os.PathLike) else path
    index_desc, found_tag = _select_index(layout, tag)
    index = layout.read_json(index_desc, f"bundle index {index_desc.digest}")
    if index.get("schemaVersion") != 2 or index.get("mediaType") != MT_INDEX:
        raise VerificationError(f"bundle index {index_desc.digest}: not an OCI image index")
    annotations = index.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise VerificationError(f"bundle index {index_desc.digest}: annotations are not a map")
    inner_tag = annotations.get(ANN_REF_NAME)
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
    return view


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

    from sovpack.schemas_io import validate

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
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise VerificationError(f"{where}: file metadata annotation is not JSON") from None
    flag = meta.get("typeflag") if isinstance(meta, dict) else None
    if flag not in (None, 0, 48, "0"):
        raise VerificationError(f"{where}: the file is not a regular file (typeflag {flag!r}); links are refused")


def _read_reference(
    view: BundleView, desc: Descriptor, config: Descriptor, layers: list[Descriptor], where: str, *, deep: bool
) -> None:
    where = f"parity reference (manifest {desc.digest})"
    if view.reference is not None:
        raise VerificationError(f"{where}: the bundle holds more than one parity reference")
    if config.media_type != MT_PARITY_REFERENCE_CONFIG:
        raise VerificationError(f"{where}: config media type {config.media_type!r} is unexpected")
    ref_config = ReferenceConfig.from_dict(view.layout.read_json(config, f"{where} config"))
    by_title: dict[str, Descriptor] = {}
    for i, layer in enumerate(layers):
        title = layer.annotations.get(ANN_FILEPATH) or layer.annotations.get(ANN_TITLE)
        if not title or title in by_title:
            raise VerificationError(f"{where} layer {i}: missing or duplicate title")
        if deep:
            view.layout.check(layer, f"{where} layer {title!r}")
        by_title[title] = layer
    for prompt in ref_config.prompts:
        logits = by_title.get(prompt.logits)
        if logits is None or logits.media_type != MT_LOGITS:
            raise VerificationError(f"{where}: prompt {prompt.index} logits {prompt.logits!r} are not a layer")
    if ref_config.tokenizer is not None and ref_config.tokenizer not in by_title:
        raise VerificationError(f"{where}: tokenizer {ref_config.tokenizer!r} is not a layer")
    view.reference = ReferenceEntry(descriptor=desc, config=ref_config, layers=by_title)


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


# ------------------------------------------------------------------------------------------------ verify


@dataclass(frozen=True, kw_only=True, slots=True)
class VerifiedTarget:
    """One target's verification outcome."""

    name: str
    format: str
    precision: str
    manifest_digest: str
    size: int
    files: tuple[str, ...]
    parity: str | None
    signers: tuple[str, ...]  # key ids that signed all three attestations
    attestations: Mapping[str, tuple[str, ...]]  # kind -> key ids with a valid attestation

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "format": self.format,
            "precision": self.precision,
            "manifest_digest": self.manifest_digest,
            "size": self.size,
            "files": list(self.files),
            "parity": self.parity,
            "signers": list(self.signers),
            "attestations": {k: list(v) for k, v in self.attestations.items()},
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class VerifyReport:
    """The outcome of ``verify_bundle``: ok, or every problem found, each naming its blob/target/check."""

    path: str
    tag: str | None
    name: str | None
    index_digest: str
    trusted_keys: tuple[str, ...]
    targets: tuple[VerifiedTarget, ...]
    failures: tuple[str, ...]
    blobs_checked: int
    bytes_checked: int

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "path": self.path,
            "tag": self.tag,
            "name": self.name,
            "index_digest": self.index_digest,
            "trusted_keys": list(self.trusted_keys),
            "targets": [t.to_dict() for t in self.targets],
            "failures": list(self.failures),
            "blobs_checked": self.blobs_checked,
            "bytes_checked": self.bytes_checked,
        }

    def raise_for_failures(self) -> None:
        if not self.failures:
            return
        first = self.failures[0]
        more = len(self.failures) - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''}; --json lists them all)" if more else ""
        raise VerificationError(f"{self.path}: verification failed: {first}{suffix}")


def _check_attestation(
    view: BundleView, att: AttestationEntry, target: TargetEntry, statement: Statement, kind: str
) -> str | None:
    """Kind-specific binding checks; returns the parity status for parity attestations."""
    digest = target.descriptor.digest
    if kind == "signature":
        manifest = oms.parse_statement(statement)
        expected = {path: layer.digest.split(":", 1)[1] for path, layer in target.files.items()}
        if dict(manifest.files) != expected:
            missing = sorted(set(expected) - set(manifest.files))
            extra = sorted(set(manifest.files) - set(expected))
            changed = sorted(p for p in set(expected) & set(manifest.files) if expected[p] != manifest.files[p])
            detail = "; ".join(
                part
                for part in (
                    f"unsigned files {missing}" if missing else "",
                    f"signed files not in the target {extra}" if extra else "",
                    f"files whose digest differs from the signed one {changed}" if changed else "",
                )
                if part
            )
            raise VerificationError(f"the signed file list does not match the target's files: {detail}")
        return None
    provenance.check_subject(statement, digest)
    if kind == "provenance":
        provenance.check(statement, manifest_digest=digest, target=target.name)
        return None
    predicate = statement.predicate
    result = predicate.get("result")
    if result not in PARITY_STATUSES:
        raise VerificationError(f"parity result {result!r} is not one of {', '.join(PARITY_STATUSES)}")
    configuration = predicate.get("configuration")
    if not isinstance(configuration, list):
        raise VerificationError("parity attestation has no configuration list")
    named = {
        str(c.get("name")): (c.get("digest") or {}).get("sha256")
        for c in configuration
        if isinstance(c, Mapping) and isinstance(c.get("digest"), Mapping)
    }
    report_layer = target.files.get(PARITY_FILE)
    if report_layer is None:
        raise VerificationError(f"the target has no {PARITY_FILE}")
    if named.get(PARITY_FILE) != report_layer.digest.split(":", 1)[1]:
        raise VerificationError(
            f"the signed {PARITY_FILE} digest is sha256:{named.get(PARITY_FILE)}, the bundle's is {report_layer.digest}"
        )
    if view.reference is not None and named.get(KIND_REFERENCE) != view.reference.descriptor.digest.split(":", 1)[1]:
        raise VerificationError("the parity attestation names a different parity reference than this bundle's")
    report = _load_report(view, report_layer, f"target {target.name} {PARITY_FILE}")
    if report.status != result:
        raise VerificationError(f"the signed result is {result} but {PARITY_FILE} says {report.status}")
    if report.target != target.name:
        raise VerificationError(f"{PARITY_FILE} is the report of {report.target!r}")
    return str(result)


def _load_report(view: BundleView, layer: Descriptor, where: str) -> Any:
    from sovpack.parity import ParityReport

    data = view.layout.read(layer, where)
    try:
        return ParityReport.from_dict(json.loads(data))
    except (UnicodeDecodeError, json.JSONDecodeError, ParityError) as e:
        raise VerificationError(f"{where}: not a valid parity report: {e}") from e


def _verify_view(
    view: BundleView,
    keys: Sequence[VerifyingKey],
    *,
    required_targets: Sequence[str] = (),
    allowed_parity: Sequence[str] = DEFAULT_ALLOWED_PARITY,
    check_signatures: bool = True,
) -> VerifyReport:
    failures = list(view.problems)
    by_digest = {t.descriptor.digest: t for t in view.targets}
    valid: dict[str, dict[str, list[str]]] = {t.name: {k: [] for k in ATTESTATION_KINDS} for t in view.targets}
    parity_status: dict[str, str] = {}
    if check_signatures and not keys:
        raise UsageError("no trusted public key: pass --key PUB.pem (or keys in a --policy file)")
    for att in view.attestations:
        where = f"attestation {att.descriptor.digest}"
        if att.kind_hint:
            where += f" ({att.kind_hint})"
        target = by_digest.get(att.subject)
        if target is None:
            failures.append(
                f"{where}: refers to manifest {att.subject}, which is not a target of this bundle "
                "(an attestation from another bundle?)"
            )
            continue
        where = f"target {target.name}: {where}"
        try:
            if check_signatures:
                verified = verify_bundle_signature(att.bundle, keys)
                statement, signer = verified.statement, verified.signer.key_id
            else:
                statement, signer = att.bundle.envelope.statement(), "unverified"
            kind = PREDICATE_KINDS.get(statement.predicate_type)
            if kind is None:
                raise VerificationError(f"unknown predicate type {statement.predicate_type!r}")
            if att.predicate_hint is not None and att.predicate_hint != statement.predicate_type:
                raise VerificationError(
                    f"the manifest says {att.predicate_hint!r} but the signed statement is {statement.predicate_type!r}"
                )
            if att.kind_hint is not None and att.kind_hint != kind:
                raise VerificationError(f"the manifest says {att.kind_hint!r} but the signed statement is a {kind}")
            status = _check_attestation(view, att, target, statement, kind)
        except VerificationError as e:
            failures.append(f"{where}: {e}")
            continue
        valid[target.name][kind].append(signer)
        if status is not None:
            parity_status[target.name] = status
    results = []
    for target in view.targets:
        kinds = valid[target.name]
        for kind in ATTESTATION_KINDS:
            if not kinds[kind]:
                who = "signed by a trusted key" if check_signatures else "present"
                failures.append(f"target {target.name}: no valid {KIND_LABELS[kind]} {who}")
        status = parity_status.get(target.name)
        if status is not None and status not in allowed_parity:
            failures.append(
                f"target {target.name}: parity {status} is not allowed (allowed: {', '.join(allowed_parity)})"
            )
        signers = set.intersection(*(set(v) for v in kinds.values())) if kinds else set()
        results.append(
            VerifiedTarget(
                name=target.name,
                format=target.format,
                precision=target.precision,
                manifest_digest=target.descriptor.digest,
                size=target.size,
                files=tuple(sorted(target.files)),
                parity=status,
                signers=tuple(sorted(signers)),
                attestations={k: tuple(sorted(set(v))) for k, v in kinds.items()},
            )
        )
    names = {t.name for t in view.targets}
    for required in required_targets:
        if required not in names:
            failures.append(f"required target {required} is not in the bundle (targets: {', '.join(sorted(names))})")
    if view.reference is None:
        failures.append("the bundle has no parity reference manifest")
    failures.extend(view.layout.stray_blob_problems())
    return VerifyReport(
        path=str(view.layout.root),
        tag=view.tag,
        name=view.name,
        index_digest=view.index_descriptor.digest,
        trusted_keys=tuple(k.key_id for k in keys),
        targets=tuple(results),
        failures=tuple(dict.fromkeys(failures)),
        blobs_checked=view.layout.blobs_checked,
        bytes_checked=view.layout.bytes_checked,
    )


def _normalize_targets(names: Sequence[str]) -> tuple[str, ...]:
    """``gguf`` -> ``gguf:<default precision>`` etc., via the target registry when it knows the format."""
    from sovpack.targets import load_targets
    from sovpack.targets.base import TargetRef

    load_targets()
    out = []
    for name in names:
        try:
            out.append(str(TargetRef.parse(name)))
        except UsageError:
            out.append(name.strip().lower())
    return tuple(out)


def verify_bundle(
    path: str | Path | BlobSource,
    *,
    keys: Sequence[VerifyingKey] = (),
    tag: str | None = None,
    required_targets: Sequence[str] = (),
    allowed_parity: Sequence[str] = DEFAULT_ALLOWED_PARITY,
) -> VerifyReport:
    """Verify everything (see the module docstring); failures are listed in the report, not raised."""
    bad = sorted(set(allowed_parity) - set(PARITY_STATUSES))
    if bad:
        raise UsageError(f"unknown parity status(es) {', '.join(bad)}; known: {', '.join(PARITY_STATUSES)}")
    view = read_bundle(path, tag=tag, deep=True)
    return _verify_view(
        view, keys, required_targets=_normalize_targets(required_targets), allowed_parity=allowed_parity
    )


def verify_with_policy(
    path: str | Path | BlobSource,
    *,
    key_paths: Sequence[str | Path] = (),
    policy: Policy | None = None,
    required_targets: Sequence[str] = (),
    tag: str | None = None,
) -> VerifyReport:
    """``verify_bundle`` with keys and requirements from the command line plus an optional policy."""
    policy = policy or Policy()
    keys = load_trusted_keys([*policy.keys, *key_paths])
    return verify_bundle(
        path,
        keys=keys,
        tag=tag or policy.tag,
        required_targets=[*policy.required_targets, *required_targets],
        allowed_parity=policy.allowed_parity,
    )


# ----------------------------------------------------------------------------------------------- inspect


def inspect_bundle(path: str | Path | BlobSource, *, tag: str | None = None) -> dict[str, Any]:
    """Name, targets (precision, size, manifest digest, parity, signers), without checking signatures.

    Manifests and configs are digest-checked as they are read; large layers are not hashed and signatures
    are not verified (``signers`` are the key ids the signatures claim): use ``verify`` for that.
    """
    view = read_bundle(path, tag=tag, deep=False, strict_tag=False)
    claimed: dict[str, set[str]] = {t.descriptor.digest: set() for t in view.targets}
    for att in view.attestations:
        if att.subject in claimed and att.bundle.public_key_hint:
            claimed[att.subject].add(att.bundle.public_key_hint)
    targets = []
    for target in view.targets:
        parity: dict[str, Any] | None = None
        layer = target.files.get(PARITY_FILE)
        if layer is not None:
            try:
                report = _load_report(view, layer, f"target {target.name} {PARITY_FILE}")
                parity = {
                    "status": report.status,
                    "reasons": list(report.reasons),
                    "runtime": dict(report.runtime.get("target", {})).get("runtime"),
                }
            except VerificationError as e:
                view.problems.append(str(e))
        targets.append(
            {
                "name": target.name,
                "format": target.format,
                "precision": target.precision,
                "manifest_digest": target.descriptor.digest,
                "size": target.size,
                "files": [{"path": p, "size": d.size, "digest": d.digest} for p, d in sorted(target.files.items())],
                "parity": parity,
                "signers": sorted(claimed[target.descriptor.digest]),
                "config": dict(target.config.get("config", {})),
            }
        )
    layout = view.layout
    size = layout.stored_size()
    return {
        "kind": "bundle",
        "path": str(layout.root),
        "name": view.name,
        "tag": view.tag,
        "index_digest": view.index_descriptor.digest,
        "annotations": view.annotations,
        "targets": targets,
        "size": size,
        "signatures_verified": False,
        "problems": list(view.problems),
    }


# ----------------------------------------------------------------------------------------------- extract


@dataclass(frozen=True, kw_only=True, slots=True)
class ExtractResult:
    """What ``extract_target`` wrote."""

    target: str
    out_dir: Path
    manifest_digest: str
    files: tuple[str, ...]
    signature: Path

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "output": str(self.out_dir),
            "manifest_digest": self.manifest_digest,
            "files": list(self.files),
            "signature": str(self.signature),
        }


def _copy_verified(layout: Layout, layer: Descriptor, dest: Path, where: str) -> None:
    """Copy a blob to ``dest`` (a new file), hashing while copying; a mismatch raises before anything is used."""
    source = layout.blob_path(layer.digest)
    if source.is_symlink() or not source.is_file():
        raise VerificationError(f"{where}: blob {layer.digest} is missing (or a symbolic link)")
    hasher = hashlib.sha256()
    size = 0
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(dest, flags, 0o644)
    with open(source, "rb") as src, os.fdopen(fd, "wb") as dst:
        while chunk := src.read(CHUNK):
            hasher.update(chunk)
            dst.write(chunk)
            size += len(chunk)
    actual = "sha256:" + hasher.hexdigest()
    if actual != layer.digest or size != layer.size:
        dest.unlink()
        raise VerificationError(f"{where}: blob {layer.digest} changed while copying (got {actual}, {size} bytes)")


def write_target_files(view: BundleView, target: TargetEntry, tmp: Path, signature: bytes | None) -> list[str]:
    """Write a target's files (and model.sig) into the fresh directory ``tmp``; paths are re-checked here."""
    written: list[str] = []
    root = tmp.resolve()
    for path, layer in sorted(target.files.items()):
        where = f"target {target.name} file {path!r}"
        check_relative_path(path, where)
        if path == oms.SIGNATURE_FILE:
            raise VerificationError(f"{where}: the name is reserved for the signature")
        dest = tmp / path
        parent = dest.parent
        parent.mkdir(parents=True, exist_ok=True)
        real_parent = parent.resolve()
        if parent.is_symlink() or not (real_parent == root or real_parent.is_relative_to(root)):
            raise VerificationError(f"{where}: resolves outside the output directory")
        try:
            _copy_verified(view.layout, layer, dest, where)
        except FileExistsError:
            raise VerificationError(f"{where}: written twice") from None
        written.append(path)
    if signature is not None:
        fd = os.open(tmp / oms.SIGNATURE_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(signature)
    return written


def _signature_bytes(view: BundleView, target: TargetEntry, keys: Sequence[VerifyingKey]) -> bytes:
    """The verified OMS Sigstore bundle of a target, as stored (it becomes model.sig)."""
    for att in view.attestations:
        if att.subject != target.descriptor.digest:
            continue
        try:
            verified = verify_bundle_signature(att.bundle, keys)
        except VerificationError:
            continue
        if verified.statement.predicate_type == oms.PREDICATE_TYPE:
            return view.layout.read(att.layer, f"target {target.name} signature")
    raise VerificationError(f"target {target.name}: no model-signing signature by a trusted key")


def _verified_view(
    path: str | Path,
    target: str,
    keys: Sequence[VerifyingKey],
    *,
    tag: str | None,
    allowed_parity: Sequence[str],
) -> tuple[BundleView, TargetEntry]:
    (name,) = _normalize_targets([target])
    view = read_bundle(path, tag=tag, deep=True)
    report = _verify_view(view, keys, required_targets=(name,), allowed_parity=allowed_parity)
    report.raise_for_failures()
    return view, view.target(name)


def extract_target(
    path: str | Path,
    target: str,
    out_dir: str | Path,
    *,
    keys: Sequence[VerifyingKey],
    tag: str | None = None,
    allowed_parity: Sequence[str] = DEFAULT_ALLOWED_PARITY,
    force: bool = False,
) -> ExtractResult:
    """Verify the bundle, then write the target's runnable files plus model.sig, atomically."""
    view, entry = _verified_view(path, target, keys, tag=tag, allowed_parity=allowed_parity)
    signature = _signature_bytes(view, entry, keys)
    out = Path(out_dir)
    with atomic_directory(out, force=force) as tmp:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # a normal directory, not the private mode of a temporary one
        files = write_target_files(view, entry, tmp, signature)
    return ExtractResult(
        target=entry.name,
        out_dir=out,
        manifest_digest=entry.descriptor.digest,
        files=tuple(files),
        signature=out / oms.SIGNATURE_FILE,
    )


@contextlib.contextmanager
def extracted_target(
    path: str | Path,
    target: str,
    *,
    keys: Sequence[VerifyingKey],
    tag: str | None = None,
    verify: bool = True,
    allowed_parity: Sequence[str] = PARITY_STATUSES,
) -> Iterator[tuple[Path, BundleView, TargetEntry]]:
    """A verified copy of one target in a temporary directory, removed on exit."""
    if verify:
        view, entry = _verified_view(path, target, keys, tag=tag, allowed_parity=allowed_parity)
    else:
        (name,) = _normalize_targets([target])
        view = read_bundle(path, tag=tag, deep=True)
        if view.problems:
            raise VerificationError(f"{path}: {view.problems[0]}")
        entry = view.target(name)
    tmp = Path(tempfile.mkdtemp(prefix="sovpack-target-"))
    try:
        write_target_files(view, entry, tmp, None)
        yield tmp, view, entry
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ run


def _single_target(path: str | Path, target: str | None, tag: str | None) -> str:
    if target is not None:
        return target
    view = read_bundle(path, tag=tag, deep=False)
    if len(view.targets) == 1:
        return view.targets[0].name
    names = ", ".join(t.name for t in view.targets)
    raise UsageError(f"{path}: the bundle holds several targets ({names}); choose one with -t")


def open_bundle_runner(
    path: str | Path, target: str | None, keys: Sequence[VerifyingKey], tag: str | None = None
) -> tuple[Any, Path | None, tuple[int, ...]]:
    """A runner on a verified, extracted copy of one target (removed when the runner is garbage-collected).

    Returns what ``sovpack.run.open_runner`` returns: the runner, its tokenizer.json (if any) and stop ids.
    """
    from sovpack.targets import load_targets
    from sovpack.targets.base import TARGETS, read_artifact_metadata

    if not keys:
        raise UsageError("running from a bundle verifies it first: pass --key PUB.pem")
    name = _single_target(path, target, tag)
    manager = extracted_target(path, name, keys=keys, tag=tag, allowed_parity=DEFAULT_ALLOWED_PARITY)
    directory, _view, entry = manager.__enter__()
    try:
        metadata = read_artifact_metadata(directory)
        if metadata is None:
            raise VerificationError(f"target {entry.name}: no sovpack-artifact.json in the bundle")
        load_targets()
        runner = TARGETS.get(entry.format).open_runner(directory, metadata)
    except BaseException:
        manager.__exit__(None, None, None)
        raise
    cleanup = weakref.finalize(runner, manager.__exit__, None, None, None)
    cleanup.atexit = True
    tokenizer = directory / "tokenizer.json"
    stop = tuple(int(i) for i in metadata.get("spec", {}).get("eos_token_ids", ()))
    return runner, tokenizer if tokenizer.is_file() else None, stop


# --------------------------------------------------------------------------------------------- parity


class StoredReference:
    """The reference side of a parity check, served from the logits stored in the bundle (no checkpoint).

    ``prefill_logits`` answers for a prompt, or a prompt plus a prefix of the reference's own greedy tokens
    (what the harness asks at a greedy divergence); anything else is a ParityError.
    """

    name = "stored-reference"

    def __init__(self, config: ReferenceConfig, logits: Mapping[int, Any]) -> None:
        self.config = config
        self._logits = dict(logits)
        self._by_ids = {p.ids: p for p in config.prompts}

    def runtime_info(self) -> dict[str, str]:
        return {**dict(self.config.reference_runtime), "stored": "true"}

    def _find(self, ids: Sequence[int]) -> tuple[Any, int]:
        key = tuple(int(i) for i in ids)
        for prompt in self.config.prompts:
            n = len(prompt.ids)
            extra = key[n:]
            if key[:n] == prompt.ids and len(extra) < max(len(prompt.greedy_ids), 1) and (
                extra == prompt.greedy_ids[: len(extra)]
            ):
                return prompt, len(key)
        raise ParityError("the stored reference has no logits for this token sequence")

    def prefill_logits(self, ids: Sequence[int]) -> Any:
        import numpy as np

        prompt, rows = self._find(ids)
        return np.asarray(self._logits[prompt.index][:rows], dtype=np.float32)

    def greedy(self, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
        prompt = self._by_ids.get(tuple(int(i) for i in ids))
        if prompt is None:
            raise ParityError("the stored reference has no greedy continuation for this prompt")
        if max_new_tokens != self.config.max_new_tokens:
            raise ParityError(f"the stored reference holds {self.config.max_new_tokens} greedy tokens per prompt")
        return list(prompt.greedy_ids)


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
    report: Any  # sovpack.parity.ParityReport

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


COMPARED_METRICS = ("max_abs_error", "max_rel_error", "mean_kl", "top1_agreement", "greedy_agreement")


def _stored_reference(view: BundleView) -> tuple[StoredReference, Path | None]:
    import numpy as np

    if view.reference is None:
        raise VerificationError(f"{view.layout.root}: the bundle has no parity reference")
    ref = view.reference
    logits = {}
    for prompt in ref.config.prompts:
        layer = ref.layers[prompt.logits]
        view.layout.check(layer, f"parity reference {prompt.logits}")
        array = np.load(view.layout.blob_path(layer.digest), mmap_mode="r", allow_pickle=False)
        if array.ndim != 2 or array.shape[0] != prompt.rows or array.shape[1] != ref.config.vocab_size:
            raise VerificationError(f"parity reference {prompt.logits}: shape {array.shape} does not fit its prompt")
        logits[prompt.index] = array
    tokenizer = None
    if ref.config.tokenizer is not None:
        tokenizer = view.layout.blob_path(ref.layers[ref.config.tokenizer].digest)
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
    from sovpack.parity import ParityReport, Thresholds, check_parity
    from sovpack.targets import load_targets
    from sovpack.targets.base import TARGETS, read_artifact_metadata

    verify = bool(keys)
    names = list(targets) or [t.name for t in read_bundle(path, tag=tag, deep=False).targets]
    results = []
    for name in names:
        with extracted_target(path, name, keys=keys, tag=tag, verify=verify) as (directory, view, entry):
            signed = ParityReport.load(directory / PARITY_FILE)
            reference, tokenizer = _stored_reference(view)
            metadata = read_artifact_metadata(directory)
            if metadata is None:
                raise VerificationError(f"target {entry.name}: no sovpack-artifact.json")
            load_targets()
            runner = TARGETS.get(entry.format).open_runner(directory, metadata)
            labels = [p.label for p in reference.config.prompts]
            report = check_parity(
                reference,
                runner,
                target=entry.name,
                precision=entry.precision,
                prompts=[list(p.ids) for p in reference.config.prompts],
                tokenizer_json=tokenizer,
                thresholds=Thresholds.from_dict(signed.thresholds.to_dict()),
                max_new_tokens=signed.max_new_tokens,
                known_tokenizer_divergences=getattr(runner, "known_tokenizer_divergences", ()),
                prompt_labels=None if any(label is None for label in labels) else [str(x) for x in labels],
                stop_ids=signed.stop_ids,
            )
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


__all__ = [
    "BundleView",
    "ExtractResult",
    "Layout",
    "ParityRecheck",
    "Policy",
    "StoredReference",
    "VerifyReport",
    "extract_target",
    "inspect_bundle",
    "is_bundle_dir",
    "open_bundle_runner",
    "read_bundle",
    "recheck_parity",
    "verify_bundle",
    "verify_with_policy",
]
