"""Where a bundle can be: a layout directory, an ``oci-archive:`` tar, or a ``docker://`` registry reference."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from sovpack.errors import UsageError
from sovpack.transport.reference import REGISTRY_PREFIX, Reference

ARCHIVE_PREFIX = "oci-archive:"
LAYOUT_PREFIX = "oci:"
_OTHER_TRANSPORT = re.compile(r"^[a-z][a-z0-9+.-]*://")


@dataclass(frozen=True, slots=True)
class LayoutEndpoint:
    path: Path

    def __str__(self) -> str:
        return str(self.path)


@dataclass(frozen=True, slots=True)
class ArchiveEndpoint:
    path: Path

    def __str__(self) -> str:
        return f"{ARCHIVE_PREFIX}{self.path}"


@dataclass(frozen=True, slots=True)
class RegistryEndpoint:
    ref: Reference

    def __str__(self) -> str:
        return str(self.ref)


Endpoint = LayoutEndpoint | ArchiveEndpoint | RegistryEndpoint


def parse_endpoint(text: str | os.PathLike[str]) -> Endpoint:
    """``docker://...`` -> registry, ``oci-archive:FILE`` -> archive, ``oci:DIR`` or anything else -> directory."""
    if not isinstance(text, str):
        return LayoutEndpoint(Path(text))
    if text.startswith(REGISTRY_PREFIX):
        return RegistryEndpoint(Reference.parse(text))
    if text.startswith(ARCHIVE_PREFIX):
        path = text[len(ARCHIVE_PREFIX) :]
        if not path:
            raise UsageError(f"{text!r}: oci-archive: needs a file name")
        return ArchiveEndpoint(Path(path))
    if text.startswith(LAYOUT_PREFIX):
        return LayoutEndpoint(Path(text[len(LAYOUT_PREFIX) :]))
    if _OTHER_TRANSPORT.match(text):
        raise UsageError(f"{text!r}: unknown transport (use a directory, oci-archive:FILE.tar or docker://HOST/REPO:TAG)")
    return LayoutEndpoint(Path(text))


__all__ = ["ArchiveEndpoint", "Endpoint", "LayoutEndpoint", "RegistryEndpoint", "parse_endpoint"]
