"""What ``verify``/``inspect`` read a bundle through, so the one verification code runs over any store.

``sovpack.verify.Layout`` (an OCI layout on disk) and ``sovpack.transfer.RegistryLayout`` (a bundle in an OCI
registry, read through the distribution API) both satisfy it. Every method checks bytes against their
descriptor before returning them, so callers never see unverified content.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Protocol, runtime_checkable

from sovpack.bundle import Descriptor
from sovpack.errors import VerificationError


@runtime_checkable
class BlobSource(Protocol):
    """A content-addressed store of one bundle: the top-level index, and verified reads of blobs."""

    root: Any  # names the store in messages; ``root / "index.json"`` names its top-level index
    index: dict[str, Any]  # the top-level OCI index (index.json, or the registry tag as a one-entry index)
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
    """Parse verified bytes that must hold one JSON object; ``context`` starts the error message."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VerificationError(f"{context} is not JSON: {e}") from e
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


__all__ = ["BlobSource", "VerifiedReads", "json_object"]
