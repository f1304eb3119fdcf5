"""Naming things on a registry: ``docker://HOST[:PORT]/REPO[:TAG][@sha256:...]``.

The host is always explicit: there is no default registry, so a bundle never goes somewhere by accident.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sovpack.errors import UsageError
from sovpack.oci.media import DIGEST_RE, MANIFEST_TYPES, TAG_RE

REGISTRY_PREFIX = "docker://"

ACCEPT_MANIFESTS = ", ".join(MANIFEST_TYPES)  # what a manifest GET accepts: OCI and Docker, indexes too

_REPO_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REPOSITORY_RE = re.compile(rf"^{_REPO_COMPONENT}(?:/{_REPO_COMPONENT})*$")
HOST_RE = re.compile(r"^(?:\[[0-9a-fA-F:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(?::[0-9]{1,5})?$")


@dataclass(frozen=True, slots=True)
class Reference:
    """``docker://HOST[:PORT]/REPO[:TAG][@sha256:...]``: the host is always explicit (no default registry)."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        raw = text.removeprefix(REGISTRY_PREFIX)
        host, _, rest = raw.partition("/")
        if not rest or not HOST_RE.match(host):
            raise UsageError(f"{text!r}: a registry reference is docker://HOST[:PORT]/REPOSITORY[:TAG]")
        digest = None
        if "@" in rest:
            rest, digest = rest.split("@", 1)
            if not DIGEST_RE.match(digest):
                raise UsageError(f"{text!r}: {digest!r} is not a sha256 digest")
        tag = None
        last = rest.rsplit("/", 1)[-1]
        if ":" in last:
            rest, tag = rest.rsplit(":", 1)
            if not TAG_RE.match(tag):
                raise UsageError(f"{text!r}: {tag!r} is not a valid tag")
        if not REPOSITORY_RE.match(rest) or len(rest) > 255:
            raise UsageError(f"{text!r}: {rest!r} is not a valid repository name (lowercase path components)")
        return cls(registry=host, repository=rest, tag=tag, digest=digest)

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest if pinned, else the tag (default ``latest``)."""
        return self.digest or self.tag or "latest"

    def with_tag(self, tag: str | None) -> Reference:
        return Reference(registry=self.registry, repository=self.repository, tag=tag, digest=None)

    def __str__(self) -> str:
        text = f"{REGISTRY_PREFIX}{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def is_registry_reference(text: object) -> bool:
    return isinstance(text, str) and text.startswith(REGISTRY_PREFIX)


def fallback_tag(digest: str) -> str:
    """The referrers tag schema: ``sha256:<hex>`` -> ``sha256-<hex>``."""
    algorithm, _, hexdigest = digest.partition(":")
    return f"{algorithm}-{hexdigest}"


__all__ = [
    "ACCEPT_MANIFESTS",
    "Reference",
    "fallback_tag",
    "is_registry_reference",
]
