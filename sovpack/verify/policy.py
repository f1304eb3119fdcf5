"""What a deploy site requires of a bundle: trusted keys, required targets, accepted parity statuses."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sovpack._io import read_capped
from sovpack.errors import UsageError
from sovpack.oci.media import MAX_JSON_DOCUMENT

PARITY_STATUSES = ("PASSED", "WARNED", "FAILED")
# NOTE: WARNED means "inside the warn band", worth a look but not broken; a policy can allow PASSED only.
DEFAULT_ALLOWED_PARITY = ("PASSED", "WARNED")


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

        from sovpack._schemas import validate

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
            raw = read_capped(path, MAX_JSON_DOCUMENT, error=UsageError)
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


__all__ = ["DEFAULT_ALLOWED_PARITY", "PARITY_STATUSES", "Policy"]
