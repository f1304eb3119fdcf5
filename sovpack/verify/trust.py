"""A local trust-state file: the newest release seen per bundle name, so older ones are refused offline.

TUF-style rollback protection without an online root: each successful ``verify --trust-state FILE`` records the
signed sequence number and bundle index digest of the release it accepted; a later release of the same name
with a lower sequence (rollback), or the same sequence but a different index (a fork or a freeze attack serving
a stale copy under a reused number), is refused. The file is JSON, written atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from sovpack._io import atomic_write_bytes, read_json_file
from sovpack.attest.release import Release
from sovpack.errors import UsageError

MAX_STATE_BYTES = 16 * 1024 * 1024
STATE_VERSION = 1


@dataclass(frozen=True, kw_only=True, slots=True)
class Seen:
    sequence: int
    index_digest: str


@dataclass(kw_only=True)
class TrustState:
    """The releases accepted so far, by bundle name."""

    path: Path
    seen: dict[str, Seen] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> TrustState:
        path = Path(path)
        if not path.exists():
            return cls(path=path)
        data = read_json_file(path, MAX_STATE_BYTES, error=UsageError)
        bundles = data.get("bundles") if isinstance(data, dict) and data.get("version") == STATE_VERSION else None
        if not isinstance(bundles, dict):
            raise UsageError(f"{path}: not a sovpack trust-state file (version {STATE_VERSION})")
        seen = {}
        for name, entry in bundles.items():
            if not (isinstance(entry, dict) and isinstance(entry.get("sequence"), int)
                    and isinstance(entry.get("index_digest"), str)):
                raise UsageError(f"{path}: entry {name!r} is malformed")
            seen[str(name)] = Seen(sequence=entry["sequence"], index_digest=entry["index_digest"])
        return cls(path=path, seen=seen)

    def problems(self, release: Release, index_digest: str) -> list[str]:
        """Why this release must be refused given what was accepted before (empty: acceptable)."""
        before = self.seen.get(release.name)
        if before is None:
            return []
        if release.sequence < before.sequence:
            return [
                f"rollback: release sequence {release.sequence} of {release.name!r} is older than sequence "
                f"{before.sequence} accepted before ({self.path})"
            ]
        if release.sequence == before.sequence and index_digest != before.index_digest:
            return [
                f"release sequence {release.sequence} of {release.name!r} was accepted before with another bundle "
                f"index ({before.index_digest}); a reused sequence number is refused ({self.path})"
            ]
        return []

    def record(self, release: Release, index_digest: str) -> None:
        """Remember an accepted release (only ever raises the recorded sequence) and save atomically."""
        before = self.seen.get(release.name)
        if before is not None and before.sequence > release.sequence:
            return
        self.seen[release.name] = Seen(sequence=release.sequence, index_digest=index_digest)
        document = {
            "version": STATE_VERSION,
            "bundles": {
                name: {"sequence": s.sequence, "index_digest": s.index_digest} for name, s in sorted(self.seen.items())
            },
        }
        atomic_write_bytes(self.path, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8"))


__all__ = ["TrustState"]
