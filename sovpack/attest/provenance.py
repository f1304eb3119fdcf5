"""SLSA provenance v1 for one target manifest: what it was built from, how, and by what.

- subject: the target's OCI manifest digest (its config and every file layer are bound through it);
- ``buildDefinition.externalParameters``: what the user asked for (target, bundle name/tag, parity prompts
  and threshold overrides, license);
- ``buildDefinition.internalParameters``: the sovpack version and the runtimes parity actually ran on (the
  report's runtime block: runtime name, library versions, threads...);
- ``buildDefinition.resolvedDependencies``: every source checkpoint file sovpack read, with its sha256;
- ``runDetails.builder``: sovpack as the builder, with the Python packages it used as builderDependencies
  (``pkg:pypi`` purls); ``runDetails.metadata`` carries timestamps only when SOURCE_DATE_EPOCH is set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from typing import Any

from sovpack import __version__
from sovpack.attest.dsse import Statement, Subject
from sovpack.errors import VerificationError

PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "https://sovpack.dev/buildtypes/bundle/v1"
BUILDER_ID = "https://sovpack.dev/builder/sovpack-cli"
BASE_PACKAGES = ("sovpack", "numpy", "tokenizers", "safetensors", "cryptography")


def package_versions(names: Sequence[str]) -> dict[str, str]:
    """Installed versions of the named distributions; missing ones are left out."""
    versions: dict[str, str] = {}
    for name in names:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return versions


@dataclass(frozen=True, kw_only=True, slots=True)
class ProvenanceInput:
    """Everything the provenance of one target records."""

    subject_name: str
    manifest_digest: str  # "sha256:<hex>"
    target: str
    external_parameters: Mapping[str, Any]
    source_files: Sequence[Mapping[str, Any]]  # {"path", "size", "sha256"}
    parity_runtime: Mapping[str, Any]
    packages: Mapping[str, str]
    timestamp: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "subject_name": self.subject_name,
            "manifest_digest": self.manifest_digest,
            "target": self.target,
            "external_parameters": dict(self.external_parameters),
            "source_files": [dict(f) for f in self.source_files],
            "parity_runtime": dict(self.parity_runtime),
            "packages": dict(self.packages),
            "timestamp": self.timestamp,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProvenanceInput:
        return cls(**dict(data))


def predicate(info: ProvenanceInput) -> dict[str, Any]:
    """The SLSA v1 predicate (see the module docstring for what goes where)."""
    resolved = [
        {"name": f["path"], "digest": {"sha256": f["sha256"]}, "annotations": {"size": int(f["size"])}}
        for f in sorted(info.source_files, key=lambda f: str(f["path"]))
    ]
    builder_deps = [
        {"name": name, "uri": f"pkg:pypi/{name}@{version}"} for name, version in sorted(info.packages.items())
    ]
    run_details: dict[str, Any] = {
        "builder": {
            "id": BUILDER_ID,
            "version": {"sovpack": __version__},
            "builderDependencies": builder_deps,
        },
    }
    if info.timestamp is not None:
        run_details["metadata"] = {"startedOn": info.timestamp, "finishedOn": info.timestamp}
    return {
        "buildDefinition": {
            "buildType": BUILD_TYPE,
            "externalParameters": {"target": info.target, **dict(info.external_parameters)},
            "internalParameters": {
                "sovpackVersion": __version__,
                "parityRuntime": {str(k): v for k, v in info.parity_runtime.items()},
            },
            "resolvedDependencies": resolved,
        },
        "runDetails": run_details,
    }


def statement(info: ProvenanceInput) -> Statement:
    algorithm, _, hexdigest = info.manifest_digest.partition(":")
    subject = Subject(name=info.subject_name, digest={algorithm: hexdigest})
    return Statement(subjects=(subject,), predicate_type=PREDICATE_TYPE, predicate=predicate(info))


def check(stmt: Statement, *, manifest_digest: str, target: str) -> None:
    """A provenance statement must name exactly this manifest and this target."""
    if stmt.predicate_type != PREDICATE_TYPE:
        raise VerificationError(f"predicate type is {stmt.predicate_type!r}, expected {PREDICATE_TYPE!r}")
    check_subject(stmt, manifest_digest)
    definition = stmt.predicate.get("buildDefinition")
    params = definition.get("externalParameters") if isinstance(definition, Mapping) else None
    named = params.get("target") if isinstance(params, Mapping) else None
    if named != target:
        raise VerificationError(f"provenance is for target {named!r}, not {target!r}")


def check_subject(stmt: Statement, manifest_digest: str) -> None:
    """The statement must name ``manifest_digest`` among its subjects."""
    algorithm, _, hexdigest = manifest_digest.partition(":")
    named = sorted(f"{a}:{d}" for s in stmt.subjects for a, d in s.digest.items())
    if not any(s.digest.get(algorithm) == hexdigest for s in stmt.subjects):
        raise VerificationError(f"the signed statement names {', '.join(named) or 'nothing'}, not {manifest_digest}")

