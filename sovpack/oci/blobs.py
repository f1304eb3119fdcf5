"""Reading OCI content verified: the store ``verify``/``inspect`` read a bundle through, and what a bundle reaches.

:class:`BlobSource`: ``sovpack.oci.reader.Layout`` (an OCI layout on disk) and
``sovpack.transport.RegistryLayout`` (a bundle in an OCI registry, read through the distribution API) both
satisfy it, so the one verification code runs over any store. Every method checks bytes against their
descriptor before returning them, so callers never see unverified content.

:func:`collect` walks a bundle from its top index (indexes, manifests, blobs): what ``copy`` moves and what an
``oci-archive`` holds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from sovpack._io import parse_json
from sovpack.errors import VerificationError
from sovpack.oci.descriptor import Descriptor
from sovpack.oci.media import ANN_BUNDLE_TAG, ANN_REF_NAME, DIGEST_RE, INDEX_TYPES, MANIFEST_TYPES, TAG_RE

# NOTE: Docker's own manifest types are accepted when reading (a registry may answer with them); sovpack
# only ever writes the OCI ones.
MAX_DEPTH = 8  # indexes nested deeper than this are refused (a bundle nests two)
MAX_GRAPH = 10_000  # manifests + distinct blobs one bundle may reach (a bundle of ten targets reaches ~300)


@runtime_checkable
class BlobSource(Protocol):
    """A content-addressed store of one bundle: the top-level index, and verified reads of blobs."""

    root: Any  # names the store in messages; ``root / "index.json"`` names its top-level index
    index: dict[str, Any]  # the top-level OCI index (index.json, or the registry tag as a one-entry index)
    requested_tag: str | None  # the tag the store was opened by, if it names one itself (a registry reference)
    bytes_checked: int

    @property
    def blobs_checked(self) -> int: ...

    def read(self, desc: Descriptor, where: str, limit: int = ...) -> bytes:
        """A small blob's bytes, verified against the descriptor's digest and size."""
        ...

    def read_json(self, desc: Descriptor, where: str) -> dict[str, Any]: ...

    def check(self, desc: Descriptor, where: str) -> None:
        """The blob exists and hashes to its digest with the declared size (streamed, any size)."""
        ...

    def stray_blob_problems(self) -> list[str]: ...

    def stored_size(self) -> int:
        """Bytes the store holds for the bundle (every distinct blob once)."""
        ...


def json_object(data: bytes, context: str) -> dict[str, Any]:
    """Parse verified bytes that must hold one JSON object; ``context`` starts the error message.

    Through :func:`sovpack._io.parse_json`: standard JSON only, unique keys, bounded nesting (a hash check
    says the bytes are the ones named, not that they are harmless).
    """
    doc = parse_json(data, context, error=VerificationError)
    if not isinstance(doc, dict):
        raise VerificationError(f"{context} is not a JSON object")
    return doc


class VerifiedReads:
    """The verified small-blob reads both stores share; a store supplies ``_raw`` (the unverified bytes)."""

    def __init__(self) -> None:
        self._checked: dict[str, str | None] = {}  # digest -> None if good, else the problem
        self.bytes_checked = 0

    @property
    def blobs_checked(self) -> int:
        return len(self._checked)

    def _raw(self, desc: Descriptor, where: str, limit: int) -> bytes:
        raise NotImplementedError

    def _read_limited(self, desc: Descriptor, where: str, limit: int) -> bytes:
        """A small blob's bytes, hashed and compared with the descriptor's digest and size before use."""
        if desc.size > limit:
            raise VerificationError(f"{where}: blob {desc.digest} declares {desc.size} bytes, more than {limit}")
        data = self._raw(desc, where, limit)
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        self.bytes_checked += len(data)
        if actual != desc.digest:
            self._checked[desc.digest] = f"blob {desc.digest} is corrupt: its content hashes to {actual}"
            raise VerificationError(f"{where}: {self._checked[desc.digest]}")
        self._checked[desc.digest] = None
        if len(data) != desc.size:
            raise VerificationError(
                f"{where}: blob {desc.digest} has {len(data)} bytes, the descriptor says {desc.size}"
            )
        return data

    def read_json(self, desc: Descriptor, where: str) -> dict[str, Any]:
        data = self.read(desc, where)  # type: ignore[attr-defined]
        return json_object(data, f"{where}: blob {desc.digest}")


# ------------------------------------------------------------------------------------------ the bundle graph


def bundle_index_tag(document: Mapping[str, Any]) -> Any:
    """The tag a bundle index records for itself: ``dev.sovpack.tag``, or (bundles before it) the ref.name
    annotation, which image-spec reserves for index.json descriptors. Unchecked: callers validate it."""
    annotations = document.get("annotations")
    if not isinstance(annotations, Mapping):
        return None
    return annotations.get(ANN_BUNDLE_TAG, annotations.get(ANN_REF_NAME))


@dataclass(frozen=True, kw_only=True, slots=True)
class ManifestNode:
    """One index or manifest of a bundle: its descriptor, verified bytes and parsed document."""

    descriptor: Descriptor
    data: bytes
    document: Mapping[str, Any]

    @property
    def subject(self) -> str | None:
        subject = self.document.get("subject")
        digest = subject.get("digest") if isinstance(subject, Mapping) else None
        return digest if isinstance(digest, str) and DIGEST_RE.match(digest) else None

    @property
    def tag(self) -> str | None:
        """The tag the bundle was built with (the bundle index's ``dev.sovpack.tag``; older bundles: ref.name).

        A value that is not a valid OCI tag is refused: it would become part of a registry URL.
        """
        tag = bundle_index_tag(self.document)
        if tag is None:
            return None
        if not isinstance(tag, str) or not TAG_RE.match(tag):
            raise VerificationError(f"bundle index {self.descriptor.digest}: its tag {tag!r} is not a valid OCI tag")
        return tag

    def referrer_descriptor(self) -> dict[str, Any]:
        """How a referrers index lists this manifest: artifactType and annotations copied up."""
        doc = self.document
        config = doc.get("config") if isinstance(doc.get("config"), Mapping) else {}
        artifact_type = doc.get("artifactType") or (config or {}).get("mediaType")
        entry: dict[str, Any] = {
            "mediaType": self.descriptor.media_type,
            "digest": self.descriptor.digest,
            "size": self.descriptor.size,
        }
        if isinstance(artifact_type, str) and artifact_type:
            entry["artifactType"] = artifact_type
        if isinstance(doc.get("annotations"), Mapping) and doc["annotations"]:
            entry["annotations"] = dict(doc["annotations"])
        return entry


@dataclass(frozen=True, kw_only=True, slots=True)
class Graph:
    """Everything a tagged bundle reaches: blobs, and manifests children-first (the top index last)."""

    top: Descriptor
    blobs: tuple[Descriptor, ...]
    manifests: tuple[ManifestNode, ...]

    @property
    def size(self) -> int:
        return sum(b.size for b in self.blobs) + sum(m.descriptor.size for m in self.manifests)

    def descriptors(self) -> dict[str, Descriptor]:
        """Every distinct blob and manifest by digest."""
        items = {d.digest: d for d in self.blobs}
        items.update({m.descriptor.digest: m.descriptor for m in self.manifests})
        return items


def references(desc: Descriptor, doc: Mapping[str, Any]) -> tuple[list[Descriptor], list[Descriptor]]:
    """What one parsed index or manifest points at: (child manifests, blobs); malformed lists are refused."""
    media_type = doc.get("mediaType") or desc.media_type
    if media_type in INDEX_TYPES or (media_type not in MANIFEST_TYPES and "manifests" in doc):
        children = doc.get("manifests")
        if not isinstance(children, list):
            raise VerificationError(f"index {desc.digest}: no manifests list")
        return [Descriptor.from_dict(raw, f"index {desc.digest} manifests[{i}]") for i, raw in enumerate(children)], []
    if media_type in MANIFEST_TYPES or "layers" in doc:
        config = doc.get("config")
        parts = [config] if config is not None else []
        layers = doc.get("layers") or []
        if not isinstance(layers, list):
            raise VerificationError(f"manifest {desc.digest}: layers is not a list")
        return [], [Descriptor.from_dict(raw, f"manifest {desc.digest} blob {i}")
                    for i, raw in enumerate([*parts, *layers])]
    raise VerificationError(f"manifest {desc.digest}: unknown media type {media_type!r}")


def collect(read_manifest: Callable[[Descriptor], bytes], top: Descriptor) -> Graph:
    """Walk indexes and manifests from ``top``; ``read_manifest`` returns verified bytes.

    Iterative (an explicit stack, children in order), so no input can exhaust the interpreter's stack;
    nesting deeper than ``MAX_DEPTH`` is refused.
    """
    blobs: dict[str, Descriptor] = {}
    manifests: list[ManifestNode] = []
    seen: set[str] = set()
    # (descriptor, depth, expanded): a node is appended to ``manifests`` after its children (children first)
    stack: list[tuple[Descriptor, int, ManifestNode | None]] = [(top, 0, None)]
    while stack:
        desc, depth, node = stack.pop()
        if node is not None:
            manifests.append(node)
            continue
        if desc.digest in seen:
            continue
        if depth > MAX_DEPTH:
            raise VerificationError(f"manifest {desc.digest}: indexes nested deeper than {MAX_DEPTH}")
        seen.add(desc.digest)
        data = read_manifest(desc)
        doc = json_object(data, f"manifest {desc.digest}")
        children, parts = references(desc, doc)
        for blob in parts:
            known = blobs.get(blob.digest)
            if known is not None and known.size != blob.size:
                raise VerificationError(f"blob {blob.digest} is listed with sizes {known.size} and {blob.size}")
            blobs.setdefault(blob.digest, blob)
        if len(seen) + len(stack) + len(children) + len(blobs) > MAX_GRAPH:  # counted before anything is read
            raise VerificationError(f"bundle {top.digest}: reaches more than {MAX_GRAPH} manifests and blobs; refused")
        stack.append((desc, depth, ManifestNode(descriptor=desc, data=data, document=doc)))
        stack.extend((child, depth + 1, None) for child in reversed(children))
    return Graph(top=top, blobs=tuple(blobs.values()), manifests=tuple(manifests))


__all__ = [
    "BlobSource",
    "Graph",
    "ManifestNode",
    "VerifiedReads",
    "collect",
    "json_object",
    "references",
]
