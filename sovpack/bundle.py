"""``sovpack build``: one signed, content-addressed OCI image layout holding every target of a model.

Layout (OCI image layout 1.0, readable by skopeo/oras/crane)::

    BUNDLE/oci-layout                      {"imageLayoutVersion": "1.0.0"}
    BUNDLE/index.json                      one entry: the bundle index, tagged (org.opencontainers.image.ref.name)
    BUNDLE/blobs/sha256/<hex>              every manifest, config and file, stored once by digest

The bundle index (an OCI image index, also carrying the tag and the bundle name) lists:

- one **target manifest** per target variant, CNCF ModelPack style: artifactType
  ``application/vnd.cncf.model.manifest.v1+json``, config ``application/vnd.cncf.model.config.v1+json``
  (descriptor + architecture/format/paramSize/precision/quantization + modelfs), one raw layer per file with
  its relative path in ``org.cncf.model.filepath``. Weights are ``...model.weight.v1.raw``; tokenizer, model
  config and ``sovpack-artifact.json`` (runtimes read it) are ``...model.weight.config.v1.raw``;
  ``parity.json`` (a report, not needed to run) is ``...model.doc.v1.raw``.
- one **parity reference** manifest (``application/vnd.sovpack.parity-reference.v1+json``): the prompts'
  token ids, the reference's greedy tokens and fp32 logits (one .npy layer per prompt) and the source
  tokenizer.json, so a deploy site can re-check parity without the checkpoint (``sovpack parity``).
- three **attestation** manifests per target, each an OCI 1.1 referrer (``subject`` = the target manifest)
  holding one Sigstore bundle v0.3 (DSSE, in-toto Statement v1): the OpenSSF model-signing signature of the
  target's files, SLSA provenance v1, and the parity result as an in-toto test-result. Index entries also
  carry ``dev.sovpack.*`` annotations (kind, target, attestation, subject) as an explicit mapping, so tools
  without referrers support still find them; verification trusts only what is signed.

Signatures name target *manifest* digests, never the index: tools such as ``skopeo copy --all`` rewrite the
indexes (they drop descriptor ``artifactType``), but copy manifests and blobs byte for byte.
Same checkpoint + options give byte-identical bytes throughout (no timestamps unless SOURCE_DATE_EPOCH).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from sovpack import __version__
from sovpack.build_config import BuildConfig, BundleMetadata
from sovpack.errors import ParityError, SourceError, UsageError, VerificationError
from sovpack.fsutil import atomic_directory
from sovpack.signing import SigningKey, SigstoreBundle, Statement, Subject, canonical_json, pretty_json

# ------------------------------------------------------------------------------------------ media types

OCI_LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
BLOBS_DIR = "blobs"
LAYOUT_VERSION = "1.0.0"

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"

AT_MODEL = "application/vnd.cncf.model.manifest.v1+json"
MT_MODEL_CONFIG = "application/vnd.cncf.model.config.v1+json"
MT_WEIGHT = "application/vnd.cncf.model.weight.v1.raw"
MT_WEIGHT_CONFIG = "application/vnd.cncf.model.weight.config.v1.raw"
MT_DOC = "application/vnd.cncf.model.doc.v1.raw"
MODEL_LAYER_TYPES = (MT_WEIGHT, MT_WEIGHT_CONFIG, MT_DOC)

AT_BUNDLE = "application/vnd.sovpack.bundle.v1+json"
AT_PARITY_REFERENCE = "application/vnd.sovpack.parity-reference.v1+json"
MT_PARITY_REFERENCE_CONFIG = "application/vnd.sovpack.parity-reference.config.v1+json"
MT_LOGITS = "application/vnd.sovpack.reference-logits.v1.npy"
MT_PARITY_REPORT = "application/vnd.sovpack.parity-report.v1+json"
AT_SIGSTORE = "application/vnd.dev.sigstore.bundle.v0.3+json"

ANN_FILEPATH = "org.cncf.model.filepath"
ANN_REF_NAME = "org.opencontainers.image.ref.name"
ANN_CREATED = "org.opencontainers.image.created"
ANN_TITLE = "org.opencontainers.image.title"
ANN_LICENSES = "org.opencontainers.image.licenses"
ANN_VERSION = "org.opencontainers.image.version"
ANN_KIND = "dev.sovpack.kind"  # target | parity-reference | attestation
ANN_TARGET = "dev.sovpack.target"
ANN_TARGETS = "dev.sovpack.targets"
ANN_FORMAT = "dev.sovpack.format"
ANN_PRECISION = "dev.sovpack.precision"
ANN_ATTESTATION = "dev.sovpack.attestation"  # signature | provenance | parity
ANN_SUBJECT = "dev.sovpack.subject"
ANN_BUNDLE_VERSION = "dev.sovpack.bundle.version"
ANN_SOVPACK_VERSION = "dev.sovpack.version"
ANN_PREDICATE_TYPE = "dev.sigstore.bundle.predicateType"
ANN_BUNDLE_CONTENT = "dev.sigstore.bundle.content"

KIND_TARGET = "target"
KIND_REFERENCE = "parity-reference"
KIND_ATTESTATION = "attestation"
ATTESTATION_KINDS = ("signature", "provenance", "parity")
BUNDLE_FORMAT_VERSION = "1"
PARITY_FILE = "parity.json"
PARITY_PREDICATE_TYPE = "https://in-toto.io/attestation/test-result/v0.1"
REFERENCE_TOKENIZER = "tokenizer.json"

CHUNK = 8 * 1024 * 1024
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")

Progress = Callable[[str, int, int], None]


def no_progress(_description: str, _completed: int, _total: int) -> None:
    """The default progress callback: silent."""


# ---------------------------------------------------------------------------------------- descriptors


@dataclass(frozen=True, kw_only=True, slots=True)
class Descriptor:
    """An OCI content descriptor: what a blob is, its digest and size, and annotations."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    artifact_type: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.artifact_type:
            data["artifactType"] = self.artifact_type
        if self.annotations:
            data["annotations"] = dict(self.annotations)
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Descriptor:
        """Parse and sanity-check a descriptor; ``where`` names it in errors."""
        if not isinstance(data, Mapping):
            raise VerificationError(f"{where}: descriptor is not a JSON object")
        media_type, digest, size = data.get("mediaType"), data.get("digest"), data.get("size")
        if not isinstance(media_type, str) or not media_type:
            raise VerificationError(f"{where}: descriptor has no mediaType")
        if not isinstance(digest, str) or not DIGEST_RE.match(digest):
            raise VerificationError(f"{where}: descriptor digest {digest!r} is not a sha256 digest")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise VerificationError(f"{where}: descriptor size {size!r} is not a non-negative integer")
        annotations = data.get("annotations") or {}
        if not isinstance(annotations, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
        ):
            raise VerificationError(f"{where}: descriptor annotations are not a string map")
        artifact_type = data.get("artifactType")
        return cls(
            media_type=media_type,
            digest=digest,
            size=size,
            annotations=dict(annotations),
            artifact_type=artifact_type if isinstance(artifact_type, str) else None,
        )

    @property
    def short(self) -> str:
        return self.digest[:19]


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def source_date() -> str | None:
    """RFC 3339 UTC time from SOURCE_DATE_EPOCH, or None: timestamps only when reproducibly pinned."""
    raw = os.environ.get("SOURCE_DATE_EPOCH")
    if raw is None or raw.strip() == "":
        return None
    try:
        seconds = int(raw.strip())
    except ValueError:
        raise UsageError(f"SOURCE_DATE_EPOCH must be an integer number of seconds, got {raw!r}") from None
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------------------------ blob store


class BlobStore:
    """Writes blobs into ``ROOT/blobs/sha256``: streamed, hashed while copied, each digest stored once."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.dir = self.root / BLOBS_DIR / "sha256"
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        if not DIGEST_RE.match(digest):
            raise VerificationError(f"not a sha256 digest: {digest!r}")
        return self.dir / digest.split(":", 1)[1]

    def put_bytes(self, data: bytes) -> tuple[str, int]:
        digest = sha256_digest(data)
        dest = self.path(digest)
        if not dest.exists():
            fd, tmp = tempfile.mkstemp(prefix=".blob.", dir=self.dir)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        return digest, len(data)

    def put_json(self, document: Any, *, pretty: bool = False) -> tuple[str, int]:
        return self.put_bytes(pretty_json(document) if pretty else canonical_json(document))

    def put_file(self, source: Path) -> tuple[str, int]:
        """Copy a file in, hashing while copying; never holds more than one chunk in memory."""
        hasher = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(prefix=".blob.", dir=self.dir)
        try:
            with open(source, "rb") as src, os.fdopen(fd, "wb") as dst:
                while chunk := src.read(CHUNK):
                    hasher.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
            digest = "sha256:" + hasher.hexdigest()
            dest = self.path(digest)
            if dest.exists():
                os.unlink(tmp)
            else:
                os.chmod(tmp, 0o644)
                os.replace(tmp, dest)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return digest, size

    def add(
        self,
        data: bytes,
        media_type: str,
        *,
        annotations: Mapping[str, str] | None = None,
        artifact_type: str | None = None,
    ) -> Descriptor:
        digest, size = self.put_bytes(data)
        return Descriptor(
            media_type=media_type, digest=digest, size=size, annotations=dict(annotations or {}),
            artifact_type=artifact_type,
        )


def manifest_document(
    *,
    artifact_type: str,
    config: Descriptor,
    layers: Sequence[Descriptor],
    annotations: Mapping[str, str] | None = None,
    subject: Descriptor | None = None,
) -> dict[str, Any]:
    """An OCI 1.1 image manifest used as an artifact manifest."""
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "artifactType": artifact_type,
        "config": config.to_dict(),
        "layers": [layer.to_dict() for layer in layers],
    }
    if subject is not None:
        doc["subject"] = Descriptor(media_type=subject.media_type, digest=subject.digest, size=subject.size).to_dict()
    if annotations:
        doc["annotations"] = dict(annotations)
    return doc


def write_layout(root: Path, store: BlobStore, bundle_index: Descriptor, tag: str) -> None:
    """Write oci-layout and the top-level index.json naming the bundle index by tag."""
    entry = Descriptor(
        media_type=MT_INDEX, digest=bundle_index.digest, size=bundle_index.size, annotations={ANN_REF_NAME: tag}
    )
    index = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [entry.to_dict()]}
    (root / OCI_LAYOUT_FILE).write_bytes(canonical_json({"imageLayoutVersion": LAYOUT_VERSION}))
    (root / INDEX_FILE).write_bytes(canonical_json(index))


def is_bundle_dir(path: Path) -> bool:
    """An OCI image layout directory (what ``sovpack build`` writes)."""
    return path.is_dir() and (path / OCI_LAYOUT_FILE).is_file() and (path / INDEX_FILE).is_file()


# ------------------------------------------------------------------------------------ file classification


def check_relative_path(path: str, where: str) -> str:
    """A safe relative POSIX path for an extracted file: no absolute, parent, empty or odd components."""
    if not isinstance(path, str) or not path:
        raise VerificationError(f"{where}: empty file path")
    if "\\" in path or "\x00" in path or any(ord(c) < 32 for c in path):
        raise VerificationError(f"{where}: file path {path!r} contains a backslash or control character")
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        raise VerificationError(f"{where}: file path {path!r} is absolute")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise VerificationError(f"{where}: file path {path!r} has an empty, '.' or '..' component (path traversal)")
    return path


def layer_media_type(path: str) -> str:
    """ModelPack layer type for a target file (see the module docstring for the rule)."""
    name = PurePosixPath(path).name
    if name == PARITY_FILE:
        return MT_DOC
    lowered = name.lower()
    if lowered.endswith((".json", ".jinja", ".txt", ".yaml", ".yml")) or "tokenizer" in lowered:
        return MT_WEIGHT_CONFIG
    return MT_WEIGHT


def list_artifact_files(artifact_dir: Path) -> list[str]:
    """Every regular file below an artifact directory (relative POSIX paths, sorted); links are refused."""
    files: list[str] = []
    for entry in sorted(artifact_dir.rglob("*")):
        rel = entry.relative_to(artifact_dir).as_posix()
        if entry.is_symlink():
            raise SourceError(f"{entry}: artifact contains a symbolic link; refused")
        if entry.is_dir():
            continue
        if not entry.is_file():
            raise SourceError(f"{entry}: not a regular file")
        files.append(check_relative_path(rel, str(artifact_dir)))
    return sorted(files)


# ------------------------------------------------------------------------------------- ModelPack config


FLOAT_PRECISIONS = {
    "fp32": "float32", "f32": "float32", "float32": "float32",
    "fp16": "float16", "f16": "float16", "float16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
}  # fmt: skip


def modelpack_precision(precision: str) -> tuple[str, str | None]:
    """(ModelPack ``precision``, ``quantization``): float types by name; quantized weights by integer width."""
    key = precision.lower()
    if key in FLOAT_PRECISIONS:
        return FLOAT_PRECISIONS[key], None
    match = re.match(r"^(?:int|q)(\d)", key)
    if match:
        return f"int{match.group(1)}", key
    return key, None


def param_size(count: int) -> str:
    """ModelPack paramSize: a count with at most one decimal and a scale letter, e.g. 151.5K or 8B."""
    for letter, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if count >= scale:
            value = f"{count / scale:.1f}".removesuffix(".0")
            return f"{value}{letter}"
    value = f"{max(count / 1000, 0.1):.1f}".removesuffix(".0")
    return f"{value}K"


def modelpack_config(
    *,
    name: str,
    family: str,
    fmt: str,
    precision: str,
    parameters: int,
    layers: Sequence[Descriptor],
    metadata: BundleMetadata,
    created: str | None,
) -> dict[str, Any]:
    """The ``application/vnd.cncf.model.config.v1+json`` document of one target (ModelPack config schema)."""
    descriptor: dict[str, Any] = {"name": name, "family": family}
    optional = {
        "version": metadata.version,
        "vendor": metadata.vendor,
        "title": metadata.title,
        "description": metadata.description,
        "docURL": metadata.doc_url,
        "sourceURL": metadata.source_url,
        "revision": metadata.revision,
        "createdAt": created,
    }
    descriptor.update({k: v for k, v in optional.items() if v})
    if metadata.licenses:
        descriptor["licenses"] = list(metadata.licenses)
    if metadata.authors:
        descriptor["authors"] = list(metadata.authors)
    mp_precision, quantization = modelpack_precision(precision)
    config: dict[str, Any] = {
        "architecture": "transformer",
        "format": fmt,
        "paramSize": param_size(parameters),
        "precision": mp_precision,
        "capabilities": {"inputTypes": ["text"], "outputTypes": ["text"]},
    }
    if quantization:
        config["quantization"] = quantization
    return {
        "descriptor": descriptor,
        "config": config,
        "modelfs": {"type": "layers", "diffIds": [layer.digest for layer in layers]},
    }


# ------------------------------------------------------------------------------------- parity reference


@dataclass(frozen=True, kw_only=True, slots=True)
class ReferencePrompt:
    """One parity prompt as the reference saw it: ids, greedy tokens, and the logits layer that holds them."""

    index: int
    label: str | None
    ids: tuple[int, ...]
    greedy_ids: tuple[int, ...]
    logits: str  # layer title, e.g. logits-00.npy
    rows: int  # len(ids) + max(len(greedy_ids) - 1, 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "label": self.label,
            "ids": list(self.ids),
            "greedy_ids": list(self.greedy_ids),
            "logits": self.logits,
            "rows": self.rows,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReferencePrompt:
        return cls(
            index=int(data["index"]),
            label=data.get("label"),
            ids=tuple(int(i) for i in data["ids"]),
            greedy_ids=tuple(int(i) for i in data["greedy_ids"]),
            logits=str(data["logits"]),
            rows=int(data["rows"]),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class ReferenceConfig:
    """The parity reference manifest's config: what a re-check needs besides the logits themselves."""

    schema_version: int = 1
    vocab_size: int
    max_new_tokens: int
    stop_ids: tuple[int, ...]
    tokenizer: str | None
    reference_runtime: Mapping[str, str]
    prompts: tuple[ReferencePrompt, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "vocab_size": self.vocab_size,
            "max_new_tokens": self.max_new_tokens,
            "stop_ids": list(self.stop_ids),
            "tokenizer": self.tokenizer,
            "reference_runtime": dict(self.reference_runtime),
            "prompts": [p.to_dict() for p in self.prompts],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReferenceConfig:
        from jsonschema import ValidationError

        from sovpack.schemas_io import validate

        try:
            validate(dict(data), "parity-reference")
        except ValidationError as e:
            raise VerificationError(f"parity reference config is invalid: {e.message}") from None
        return cls(
            schema_version=int(data["schema_version"]),
            vocab_size=int(data["vocab_size"]),
            max_new_tokens=int(data["max_new_tokens"]),
            stop_ids=tuple(int(i) for i in data["stop_ids"]),
            tokenizer=data.get("tokenizer"),
            reference_runtime={str(k): str(v) for k, v in data["reference_runtime"].items()},
            prompts=tuple(ReferencePrompt.from_dict(p) for p in data["prompts"]),
        )


def compute_reference(
    model: Any, prompts: Sequence[str], progress: Progress = no_progress
) -> tuple[ReferenceConfig, list[tuple[str, bytes]]]:
    """Run the numpy reference once on the parity prompts; logits as .npy bytes (float32), one per prompt.

    Rows 0..T-1 are the prefill logits of the prompt exactly as parity compared them; rows T.. follow the
    reference's greedy path (logits after prompt + greedy[:k]), which is what the harness consults to excuse
    a divergence at a near-tie.
    """
    import numpy as np

    from sovpack.parity import DEFAULT_MAX_NEW_TOKENS
    from sovpack.prompts import PROMPT_LABELS, PROMPTS, encode_prompts
    from sovpack.reference import ReferenceModel

    tokenizer_json = model.checkpoint.tokenizer_json
    if tokenizer_json is None:
        raise ParityError(f"{model.path}: parity needs tokenizer.json to encode its prompts")
    encoded = encode_prompts(tokenizer_json, list(prompts) or list(PROMPTS))
    labels: Sequence[str | None] = [None] * len(encoded) if prompts else list(PROMPT_LABELS)
    reference = ReferenceModel(model)
    stop_ids = tuple(int(s) for s in model.spec.eos_token_ids)
    entries: list[ReferencePrompt] = []
    files: list[tuple[str, bytes]] = []
    for i, ids in enumerate(encoded):
        progress("parity reference", i, len(encoded))
        greedy = reference.greedy(ids, DEFAULT_MAX_NEW_TOKENS, stop_ids)
        rows = np.asarray(reference.prefill_logits(ids), dtype=np.float32)
        if len(greedy) > 1:
            path = np.asarray(reference.prefill_logits([*ids, *greedy[:-1]]), dtype=np.float32)[len(ids) :]
            rows = np.concatenate([rows, path])
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(rows), allow_pickle=False)
        title = f"logits-{i:02d}.npy"
        files.append((title, buffer.getvalue()))
        entries.append(
            ReferencePrompt(
                index=i, label=labels[i], ids=tuple(ids), greedy_ids=tuple(greedy), logits=title, rows=rows.shape[0]
            )
        )
    progress("parity reference", len(encoded), len(encoded))
    config = ReferenceConfig(
        vocab_size=int(model.spec.vocab_size),
        max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
        stop_ids=stop_ids,
        tokenizer=REFERENCE_TOKENIZER,
        reference_runtime={str(k): str(v) for k, v in reference.runtime_info().items()},
        prompts=tuple(entries),
    )
    return config, files


# ----------------------------------------------------------------------------------------------- build


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


def subject_name(name: str, target: str) -> str:
    """How statements name a target: ``<bundle name>/<format>-<precision>``."""
    return f"{name}/{target.replace(':', '-')}"


def _parity_predicate(report: Any, report_digest: str, reference_digest: str) -> dict[str, Any]:
    """in-toto test-result v0.1: verdict, the judged checks by outcome, and the report + reference by digest."""
    passed = [c.metric for c in report.checks if c.verdict == "pass"]
    warned = [c.metric for c in report.checks if c.verdict == "warn"]
    failed = [c.metric for c in report.checks if c.verdict == "fail"]
    return {
        "result": report.status,
        "configuration": [
            {"name": PARITY_FILE, "digest": {"sha256": report_digest.split(":", 1)[1]}, "mediaType": MT_PARITY_REPORT},
            {
                "name": KIND_REFERENCE,
                "digest": {"sha256": reference_digest.split(":", 1)[1]},
                "mediaType": MT_MANIFEST,
            },
        ],
        "passedTests": passed,
        "warnedTests": warned,
        "failedTests": failed,
    }


def _attestation_manifest(
    store: BlobStore,
    *,
    kind: str,
    statement: Statement,
    key: SigningKey,
    target: str,
    subject: Descriptor,
    created: str | None,
) -> Descriptor:
    """Sign a statement, store it as a Sigstore bundle layer and wrap it in a referrer manifest."""
    signed = SigstoreBundle.sign(statement, key)
    layer = store.add(signed.to_bytes(), AT_SIGSTORE)
    empty = store.add(EMPTY_JSON, MT_EMPTY)
    annotations = {
        ANN_BUNDLE_CONTENT: "dsse-envelope",
        ANN_PREDICATE_TYPE: statement.predicate_type,
        ANN_ATTESTATION: kind,
        ANN_TARGET: target,
    }
    if created:
        annotations[ANN_CREATED] = created
    doc = manifest_document(artifact_type=AT_SIGSTORE, config=empty, layers=[layer], annotations=annotations,
                            subject=subject)
    return store.add(
        canonical_json(doc),
        MT_MANIFEST,
        artifact_type=AT_SIGSTORE,
        annotations={
            ANN_KIND: KIND_ATTESTATION,
            ANN_ATTESTATION: kind,
            ANN_TARGET: target,
            ANN_SUBJECT: subject.digest,
        },
    )


def build_bundle(
    config: BuildConfig,
    *,
    key: SigningKey,
    force: bool = False,
    progress: Progress = no_progress,
) -> BuildResult:
    """Convert every target, check parity on its runtime, and write the signed bundle atomically.

    A FAILED target raises ParityError and nothing is written; WARNED targets are kept (their attestation
    says WARNED and ``sovpack verify`` policy decides).
    """
    from sovpack import oms, provenance
    from sovpack.convert import convert
    from sovpack.model import open_model
    from sovpack.parity import ParityReport
    from sovpack.targets import load_targets
    from sovpack.targets.base import ARTIFACT_FILE, TargetRef

    if config.checkpoint is None:
        raise UsageError("no checkpoint given (argument or 'checkpoint' in the config file)")
    if config.output is None:
        raise UsageError("no output given (-o or 'output' in the config file)")
    if not config.targets:
        raise UsageError("no targets given (-t FORMAT:PRECISION, or 'targets' in the config file)")
    if not TAG_RE.match(config.tag):
        raise UsageError(f"tag {config.tag!r} is not a valid OCI tag ([A-Za-z0-9_][A-Za-z0-9._-]*, max 128)")
    load_targets()
    refs: list[TargetRef] = []
    for text in config.targets:
        ref = TargetRef.parse(text)
        if ref not in refs:
            refs.append(ref)
    unknown = sorted(set(config.target_thresholds) - {str(r) for r in refs})
    if unknown:
        raise UsageError(f"threshold overrides for targets that are not built: {', '.join(unknown)}")

    model = open_model(config.checkpoint, allow_nonfinite=config.allow_nonfinite)
    name = config.metadata.name or model.name
    created = source_date()
    output = Path(config.output)
    total = len(refs)
    packages_base = provenance.package_versions(provenance.BASE_PACKAGES)
    external_common: dict[str, Any] = {
        "checkpoint": Path(config.checkpoint).resolve().name,
        "bundle": {"name": name, "tag": config.tag},
        "parity": {"prompts": list(config.prompts) if config.prompts else "builtin"},
        "allowNonfinite": config.allow_nonfinite,
    }
    if config.metadata.to_dict():
        external_common["metadata"] = config.metadata.to_dict()

    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.work.", dir=output.parent))
    try:
        with atomic_directory(output, force=force) as tmp:
            store = BlobStore(tmp)
            converted: list[tuple[TargetRef, Path]] = []
            for i, ref in enumerate(refs, start=1):
                stage = f"[{i}/{total}] {ref}"
                progress(f"{stage}: convert + parity", 0, 1)
                result = convert(
                    config.checkpoint,
                    ref,
                    work / f"{i:02d}-{ref.format}-{ref.precision}",
                    parity=True,
                    prompts=config.prompts,
                    threshold_overrides=config.overrides_for(str(ref)) or None,
                    allow_nonfinite=config.allow_nonfinite,
                    progress=progress,
                )
                progress(f"{stage}: convert + parity", 1, 1)
                converted.append((ref, result.out_dir))

            progress("parity reference", 0, 1)
            ref_config, logits_files = compute_reference(model, config.prompts, progress)
            tokenizer_path = model.checkpoint.tokenizer_json
            if tokenizer_path is None:
                raise ParityError(f"{model.path}: parity needs tokenizer.json")
            ref_layers = [store_file(store, tokenizer_path, REFERENCE_TOKENIZER, MT_WEIGHT_CONFIG)]
            for title, data in logits_files:
                ref_layers.append(store.add(data, MT_LOGITS, annotations={ANN_TITLE: title}))
            ref_cfg_desc = store.add(pretty_json(ref_config.to_dict()), MT_PARITY_REFERENCE_CONFIG)
            ref_annotations = {ANN_TITLE: f"{name} parity reference"}
            if created:
                ref_annotations[ANN_CREATED] = created
            ref_manifest = store.add(
                canonical_json(
                    manifest_document(
                        artifact_type=AT_PARITY_REFERENCE, config=ref_cfg_desc, layers=ref_layers,
                        annotations=ref_annotations,
                    )
                ),
                MT_MANIFEST,
                artifact_type=AT_PARITY_REFERENCE,
                annotations={ANN_KIND: KIND_REFERENCE},
            )

            target_entries: list[Descriptor] = []
            attestation_entries: list[Descriptor] = []
            built: list[BuiltTarget] = []
            for i, (ref, artifact_dir) in enumerate(converted, start=1):
                target = str(ref)
                stage = f"[{i}/{total}] {target}"
                progress(f"{stage}: store + sign", 0, 1)
                files = list_artifact_files(artifact_dir)
                if ARTIFACT_FILE not in files or PARITY_FILE not in files:
                    raise SourceError(f"{artifact_dir}: converted artifact lacks {ARTIFACT_FILE} or {PARITY_FILE}")
                report = ParityReport.load(artifact_dir / PARITY_FILE)
                _check_report_prompts(report, ref_config, target)
                layers = [store_file(store, artifact_dir / rel, rel, layer_media_type(rel)) for rel in files]
                by_path = {layer.annotations[ANN_FILEPATH]: layer for layer in layers}
                mp_config = modelpack_config(
                    name=name,
                    family=model.spec.family,
                    fmt=ref.format,
                    precision=ref.precision,
                    parameters=model.spec.parameter_count(),
                    layers=layers,
                    metadata=config.metadata,
                    created=created,
                )
                config_desc = store.add(pretty_json(mp_config), MT_MODEL_CONFIG)
                annotations = {
                    ANN_TARGET: target,
                    ANN_FORMAT: ref.format,
                    ANN_PRECISION: ref.precision,
                    ANN_TITLE: subject_name(name, target),
                    ANN_SOVPACK_VERSION: __version__,
                }
                if created:
                    annotations[ANN_CREATED] = created
                manifest = store.add(
                    canonical_json(
                        manifest_document(artifact_type=AT_MODEL, config=config_desc, layers=layers,
                                          annotations=annotations)
                    ),
                    MT_MANIFEST,
                    artifact_type=AT_MODEL,
                    annotations={ANN_KIND: KIND_TARGET, ANN_TARGET: target},
                )
                target_entries.append(manifest)

                subject = Subject(name=subject_name(name, target), digest={"sha256": manifest.digest.split(":", 1)[1]})
                overrides = dict(sorted(config.overrides_for(target).items()))
                provenance_input = provenance.ProvenanceInput(
                    subject_name=subject.name,
                    manifest_digest=manifest.digest,
                    target=target,
                    external_parameters={
                        **external_common,
                        "parity": {**external_common["parity"], "thresholdOverrides": overrides},
                    },
                    source_files=_artifact_sources(artifact_dir / ARTIFACT_FILE),
                    parity_runtime=report.runtime,
                    packages={
                        **packages_base,
                        **provenance.package_versions(provenance.RUNTIME_PACKAGES.get(ref.format, ())),
                    },
                    timestamp=created,
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
                        predicate=_parity_predicate(report, by_path[PARITY_FILE].digest, ref_manifest.digest),
                    ),
                }
                for kind in ATTESTATION_KINDS:
                    attestation_entries.append(
                        _attestation_manifest(
                            store, kind=kind, statement=statements[kind], key=key, target=target,
                            subject=manifest, created=created,
                        )
                    )
                built.append(
                    BuiltTarget(
                        target=target,
                        manifest_digest=manifest.digest,
                        files=tuple(files),
                        size=sum(layer.size for layer in layers),
                        parity=report.status,
                    )
                )
                shutil.rmtree(artifact_dir, ignore_errors=True)  # stored: free the disk before the next target
                progress(f"{stage}: store + sign", 1, 1)

            index_annotations = {
                ANN_REF_NAME: config.tag,
                ANN_TITLE: name,
                ANN_BUNDLE_VERSION: BUNDLE_FORMAT_VERSION,
                ANN_SOVPACK_VERSION: __version__,
                ANN_TARGETS: ",".join(str(r) for r in refs),
            }
            if config.metadata.licenses:
                index_annotations[ANN_LICENSES] = " AND ".join(config.metadata.licenses)
            if config.metadata.version:
                index_annotations[ANN_VERSION] = config.metadata.version
            if created:
                index_annotations[ANN_CREATED] = created
            index_doc = {
                "schemaVersion": 2,
                "mediaType": MT_INDEX,
                "artifactType": AT_BUNDLE,
                "manifests": [d.to_dict() for d in (*target_entries, ref_manifest, *attestation_entries)],
                "annotations": index_annotations,
            }
            bundle_index = store.add(canonical_json(index_doc), MT_INDEX)
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


def store_file(store: BlobStore, path: Path, rel: str, media_type: str) -> Descriptor:
    """Store one file as a layer annotated with its relative path."""
    digest, size = store.put_file(path)
    return Descriptor(
        media_type=media_type,
        digest=digest,
        size=size,
        annotations={ANN_FILEPATH: rel, ANN_TITLE: rel},
    )


def _artifact_sources(path: Path) -> list[dict[str, Any]]:
    import json

    data = json.loads(path.read_text(encoding="utf-8"))
    return [dict(f) for f in data.get("source", [])]


def _check_report_prompts(report: Any, reference: ReferenceConfig, target: str) -> None:
    """The stored reference must describe the very prompts the target's parity report judged."""
    lengths = [p.n_tokens for p in report.prompts]
    expected = [len(p.ids) for p in reference.prompts]
    if lengths != expected:
        raise ParityError(f"{target}: parity report prompts {lengths} differ from the reference prompts {expected}")
    for p, r in zip(report.prompts, reference.prompts, strict=True):
        if p.greedy is not None and tuple(p.greedy.reference_ids) != r.greedy_ids:
            raise ParityError(f"{target}: reference greedy tokens of prompt {p.index} differ from the parity report")
