"""The signed release statement: one in-toto statement that vouches for a whole bundle.

Per-target attestations prove what each target is; only the release statement says which targets belong
together, under which name, tag, version and sequence number, built from which source files with which
options and parity limits. Its subjects are every manifest of the bundle (targets, the parity reference, every
attestation), so a manifest spliced in from another signed build, or one left out, is caught by ``verify``;
its tag, sequence and times are what rollback and freeze protection compare.

It is signed like the other attestations (DSSE, in a Sigstore bundle v0.3) and stored as its own manifest,
never as index bytes: tools such as ``skopeo copy --all`` re-serialise indexes but copy manifests verbatim.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sovpack.attest.dsse import Statement, Subject
from sovpack.errors import VerificationError
from sovpack.source.checkpoint import SourceFile

PREDICATE_TYPE = "https://sovpack.dev/release/v1"
SCHEMA = "release-predicate"


@dataclass(frozen=True, kw_only=True, slots=True)
class PartOrigin:
    """Where an assembled target was built: the part bundle's signed tag and its release statement's manifest."""

    tag: str
    release: str  # sha256:<hex> of the part's release statement manifest

    def to_dict(self) -> dict[str, str]:
        return {"tag": self.tag, "release": self.release}


@dataclass(frozen=True, kw_only=True, slots=True)
class ReleaseTarget:
    """One target as the release vouches for it."""

    target: str  # format:precision
    manifest: str  # sha256:<hex> of the target manifest
    attestations: Mapping[str, str]  # kind (signature, provenance, parity) -> attestation manifest digest
    parity: str  # PASSED | WARNED
    thresholds: Mapping[str, float | bool | None]  # the limits the build's parity was judged with
    threshold_overrides: Mapping[str, float | bool | None] = field(default_factory=dict)  # what the user asked
    part: PartOrigin | None = None  # set by ``sovpack assemble``; None: built in this bundle's own build

    def to_dict(self) -> dict[str, Any]:
        document = {
            "target": self.target,
            "manifest": self.manifest,
            "attestations": dict(sorted(self.attestations.items())),
            "parity": self.parity,
            "thresholds": dict(sorted(self.thresholds.items())),
            "thresholdOverrides": dict(sorted(self.threshold_overrides.items())),
        }
        if self.part is not None:
            document["part"] = self.part.to_dict()
        return document

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReleaseTarget:
        part = data.get("part")
        return cls(
            target=str(data["target"]),
            manifest=str(data["manifest"]),
            attestations={str(k): str(v) for k, v in data["attestations"].items()},
            parity=str(data["parity"]),
            thresholds=dict(data["thresholds"]),
            threshold_overrides=dict(data.get("thresholdOverrides") or {}),
            part=PartOrigin(tag=str(part["tag"]), release=str(part["release"])) if part else None,
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Release:
    """What one signed build released: the bundle's identity, inputs, options and members."""

    name: str
    tag: str
    sequence: int
    version: str | None = None
    created: str | None = None  # RFC 3339 UTC; only with SOURCE_DATE_EPOCH (deterministic builds)
    expires: str | None = None  # RFC 3339 UTC; verify refuses the release after it
    licenses: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)  # the build config's descriptive metadata
    sovpack_version: str
    source: tuple[SourceFile, ...]
    prompts: Sequence[str] | None  # None: the built-in parity prompts
    reference: str  # sha256:<hex> of the parity reference manifest
    targets: tuple[ReleaseTarget, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tag": self.tag,
            "sequence": self.sequence,
            "version": self.version,
            "created": self.created,
            "expires": self.expires,
            "licenses": list(self.licenses),
            "metadata": dict(self.metadata),
            "sovpackVersion": self.sovpack_version,
            "source": [f.to_dict() for f in self.source],
            "parityPrompts": list(self.prompts) if self.prompts is not None else "builtin",
            "reference": self.reference,
            "targets": [t.to_dict() for t in self.targets],
        }

    @classmethod
    def from_dict(cls, data: Any) -> Release:
        """Validate against ``schemas/release-predicate.schema.json``, then build; VerificationError otherwise."""
        from jsonschema import ValidationError

        from sovpack._schemas import validate

        try:
            validate(data, SCHEMA)
        except ValidationError as e:
            path = "/".join(str(p) for p in e.absolute_path)
            raise VerificationError(f"release statement is invalid at '{path or '/'}': {e.message}") from None
        prompts = data["parityPrompts"]
        return cls(
            name=data["name"],
            tag=data["tag"],
            sequence=int(data["sequence"]),
            version=data.get("version"),
            created=data.get("created"),
            expires=data.get("expires"),
            licenses=tuple(data.get("licenses") or ()),
            metadata=dict(data.get("metadata") or {}),
            sovpack_version=data["sovpackVersion"],
            source=tuple(SourceFile(path=f["path"], size=int(f["size"]), sha256=f["sha256"]) for f in data["source"]),
            prompts=None if prompts == "builtin" else tuple(prompts),
            reference=data["reference"],
            targets=tuple(ReleaseTarget.from_dict(t) for t in data["targets"]),
        )

    # -- the statement -------------------------------------------------------------------------------------
    def subjects(self) -> tuple[Subject, ...]:
        """Every manifest the release vouches for, named ``<name>/<what>``."""
        subjects = [Subject(name=f"{self.name}/parity-reference", digest=_digest(self.reference))]
        for t in self.targets:
            stem = f"{self.name}/{t.target.replace(':', '-')}"
            subjects.append(Subject(name=stem, digest=_digest(t.manifest)))
            for kind, digest in sorted(t.attestations.items()):
                subjects.append(Subject(name=f"{stem}/{kind}", digest=_digest(digest)))
        return tuple(subjects)

    def statement(self) -> Statement:
        return Statement(subjects=self.subjects(), predicate_type=PREDICATE_TYPE, predicate=self.to_dict())

    @classmethod
    def from_statement(cls, statement: Statement) -> Release:
        """The release a verified statement carries; its subjects must be exactly the manifests it lists."""
        if statement.predicate_type != PREDICATE_TYPE:
            raise VerificationError(f"predicate type is {statement.predicate_type!r}, expected {PREDICATE_TYPE!r}")
        release = cls.from_dict(statement.predicate)
        listed = {(s.name, tuple(sorted(s.digest.items()))) for s in release.subjects()}
        signed = {(s.name, tuple(sorted(s.digest.items()))) for s in statement.subjects}
        if listed != signed:
            raise VerificationError("release statement subjects differ from the manifests its predicate lists")
        return release

    # -- what verify asks ----------------------------------------------------------------------------------
    def manifest_digests(self) -> set[str]:
        """Every manifest digest the release covers."""
        digests = {self.reference}
        for t in self.targets:
            digests.add(t.manifest)
            digests.update(t.attestations.values())
        return digests

    def target(self, name: str) -> ReleaseTarget | None:
        return next((t for t in self.targets if t.target == name), None)

    def expired(self, now: datetime | None = None) -> bool:
        if self.expires is None:
            return False
        moment = now or datetime.now(UTC)
        return moment >= parse_time(self.expires, "release expiry")


def _digest(digest: str) -> dict[str, str]:
    algorithm, _, hexdigest = digest.partition(":")
    return {algorithm: hexdigest}


def parse_time(text: str, what: str) -> datetime:
    """An RFC 3339 UTC time as sovpack writes it (``2026-11-29T12:00:00Z``)."""
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        raise VerificationError(f"{what} {text!r} is not an RFC 3339 UTC time (YYYY-MM-DDTHH:MM:SSZ)") from None
