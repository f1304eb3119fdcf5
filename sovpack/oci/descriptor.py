"""OCI content descriptors and digests."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sovpack.errors import VerificationError
from sovpack.oci.media import BLOBS_DIR, DIGEST_RE

# RFC 6838 section 4.2: type "/" subtype, restricted-name characters (no spaces, CR/LF or parameters).
MEDIA_TYPE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$")


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
        if not MEDIA_TYPE_RE.match(media_type):
            raise VerificationError(f"{where}: descriptor mediaType {media_type[:80]!r} is not a media type (RFC 6838)")
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


def blob_path(root: Path, digest: str) -> Path:
    """Where a layout rooted at ``root`` keeps the blob ``digest`` (checked: no path tricks from a digest)."""
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise VerificationError(f"not a sha256 digest: {digest!r}")
    return root / BLOBS_DIR / "sha256" / digest.split(":", 1)[1]
