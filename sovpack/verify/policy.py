"""What a deploy site requires of a bundle: a ceiling that command-line flags may only narrow.

A policy names the trusted keys (and, optionally, which keys may sign which kind of statement), the targets
that must be present, the parity statuses accepted, upper bounds on the parity limits a build may have used,
the bundle name and tag, a minimum release sequence, an index digest pin, and how many trusted keys must
have signed every attestation of a target. ``sovpack verify|extract|run|parity --policy FILE`` all apply it.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sovpack._io import parse_json, read_capped
from sovpack.errors import UsageError
from sovpack.oci.media import MAX_JSON_DOCUMENT

PARITY_STATUSES = ("PASSED", "WARNED", "FAILED")
# NOTE: WARNED means "inside the warn band", worth a look but not broken; a policy can allow PASSED only.
DEFAULT_ALLOWED_PARITY = ("PASSED", "WARNED")
STATEMENT_KINDS = ("release", "signature", "provenance", "parity")
# Upper-bound limits (a larger value is looser) and lower-bound limits (a smaller value is looser).
UPPER_LIMITS = ("max_abs", "max_rel", "mean_kl", "warn_factor", "max_hidden_abs")
LOWER_LIMITS = ("min_top1", "min_greedy", "clear_margin", "min_cosine")


@dataclass(frozen=True, kw_only=True, slots=True)
class Policy:
    """What a deploy site requires of a bundle (``--policy FILE``, JSON or TOML; schema bundle-policy).

    - ``keys``: trusted public keys (paths relative to the policy file); ``key_roles``: for a statement kind
      (release, signature, provenance, parity), the only keys allowed to sign it (each also trusted).
    - ``required_targets``; ``allowed_parity`` (default PASSED and WARNED).
    - ``parity_limits``: per precision (or ``"*"``) the loosest limit a build may have judged with, e.g.
      ``{"q8_0": {"mean_kl": 0.02}}``. Without an entry the ceiling is the target's default limits (plus the
      limits the target itself publishes for its runtime): a PASSED built with loosened limits is refused.
    - ``name``, ``tag``: the signed bundle name and tag must be these. ``min_sequence``: refuse older
      releases. ``index_digest``: the bundle index must be exactly this one. ``min_signers``: every
      attestation of a target must be signed by at least this many of the same trusted keys (default 1: one
      signing identity across a target's attestations).
    """

    keys: tuple[Path, ...] = ()
    key_roles: Mapping[str, tuple[Path, ...]] = field(default_factory=dict)
    required_targets: tuple[str, ...] = ()
    allowed_parity: tuple[str, ...] = DEFAULT_ALLOWED_PARITY
    parity_limits: Mapping[str, Mapping[str, float | None]] = field(default_factory=dict)
    name: str | None = None
    tag: str | None = None
    min_sequence: int | None = None
    index_digest: str | None = None
    min_signers: int = 1

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "keys": [str(k) for k in self.keys],
            "required_targets": list(self.required_targets),
            "allowed_parity": list(self.allowed_parity),
            "min_signers": self.min_signers,
        }
        if self.key_roles:
            data["key_roles"] = {kind: [str(k) for k in keys] for kind, keys in self.key_roles.items()}
        if self.parity_limits:
            data["parity_limits"] = {p: dict(v) for p, v in self.parity_limits.items()}
        for name in ("name", "tag", "min_sequence", "index_digest"):
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
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

        def paths(raw: Sequence[str]) -> tuple[Path, ...]:
            return tuple(Path(p) if Path(p).is_absolute() or base_dir is None else base_dir / p for p in raw)

        roles = {str(kind): paths(keys) for kind, keys in (data.get("key_roles") or {}).items()}
        return cls(
            keys=paths(data.get("keys", ())),
            key_roles=roles,
            required_targets=tuple(data.get("required_targets", ())),
            allowed_parity=tuple(data.get("allowed_parity", DEFAULT_ALLOWED_PARITY)),
            parity_limits={str(p): dict(v) for p, v in (data.get("parity_limits") or {}).items()},
            name=data.get("name"),
            tag=data.get("tag"),
            min_sequence=data.get("min_sequence"),
            index_digest=data.get("index_digest"),
            min_signers=int(data.get("min_signers", 1)),
        )

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        path = Path(path)
        raw = read_capped(path, MAX_JSON_DOCUMENT, error=UsageError)
        try:
            data = tomllib.loads(raw.decode("utf-8")) if path.suffix.lower() == ".toml" else parse_json(
                raw, str(path), error=UsageError
            )
        except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as e:
            raise UsageError(f"{path}: not a valid policy file: {e}") from None
        if not isinstance(data, dict):
            raise UsageError(f"{path}: a policy is a JSON/TOML object")
        return cls.from_dict(data, base_dir=path.parent, source=str(path))

    def narrowed(
        self, *, key_paths: Sequence[str | Path] = (), tag: str | None = None, required_targets: Sequence[str] = ()
    ) -> Policy:
        """Apply command-line flags, which may only narrow the policy (never widen it).

        ``--key`` selects among the policy's keys (any key when the policy names none), ``--tag`` must agree
        with the policy's tag, ``--require-target`` adds requirements.
        """
        keys = tuple(Path(k) for k in key_paths)
        if keys and self.keys:
            allowed = {p.resolve() for p in self.keys}
            outside = [str(k) for k in keys if k.resolve() not in allowed]
            if outside:
                raise UsageError(
                    f"--key {', '.join(outside)} is not among the policy's keys: command-line flags may only narrow "
                    "a policy"
                )
        if tag is not None and self.tag is not None and tag != self.tag:
            raise UsageError(f"--tag {tag!r} contradicts the policy's tag {self.tag!r}")
        return replace(
            self,
            keys=keys or self.keys,
            tag=tag if tag is not None else self.tag,
            required_targets=(*self.required_targets, *required_targets),
        )

    def limit_violations(
        self, precision: str, used: Mapping[str, Any], ceiling: Mapping[str, Any]
    ) -> list[str]:
        """How the limits a build ``used`` are looser than this policy allows for ``precision``.

        ``ceiling`` is the default (the target's own limits) used where the policy names no bound.
        """
        bounds = {**ceiling, **self.parity_limits.get("*", {}), **self.parity_limits.get(precision, {})}
        problems = []
        for metric, bound in sorted(bounds.items()):
            value = used.get(metric)
            if metric in UPPER_LIMITS:
                if bound is None:
                    continue
                if value is None or float(value) > float(bound) * (1 + 1e-9):
                    problems.append(f"{metric} {value} (allowed at most {bound})")
            elif metric in LOWER_LIMITS:
                if bound is None:
                    continue
                if value is None or float(value) < float(bound) * (1 - 1e-9):
                    problems.append(f"{metric} {value} (allowed at least {bound})")
            elif metric == "tokenizer_exact" and bound and not used.get(metric, True):
                problems.append("tokenizer_exact false (the policy requires exact tokenizers)")
        return problems


__all__ = ["DEFAULT_ALLOWED_PARITY", "LOWER_LIMITS", "PARITY_STATUSES", "STATEMENT_KINDS", "UPPER_LIMITS", "Policy"]
