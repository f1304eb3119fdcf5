"""What ``verify``/``inspect`` read a bundle through, so the one verification code runs over any store.

``sovpack.verify.Layout`` (an OCI layout on disk) and ``sovpack.transfer.RegistryLayout`` (a bundle in an OCI
registry, read through the distribution API) both satisfy it. Every method checks bytes against their
descriptor before returning them, so callers never see unverified content.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from sovpack.bundle import Descriptor


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


__all__ = ["BlobSource"]
