"""SLSA provenance v1 for one target manifest: what it was built from, how, and by what.

- subject: the target's OCI manifest digest (its config and every file layer are bound through it);
- ``buildDefinition.externalParameters``: what the user asked for (target, bundle name/tag, parity prompts
  and threshold overrides, license);
- ``buildDefinition.internalParameters``: the sovpack version, the runtimes parity actually ran on (the
  report's runtime block: runtime name, library versions, threads...) and the runner that ran it (host,
  OS, CPU model and the CPU features numerics depend on), so a fanned-out release says which machine
  checked which part;
- ``buildDefinition.resolvedDependencies``: every source checkpoint file sovpack read, with its sha256;
- ``runDetails.builder``: sovpack as the builder, with the Python packages it used as builderDependencies
  (``pkg:pypi`` purls); ``runDetails.metadata`` carries timestamps only when SOURCE_DATE_EPOCH is set.
"""

from __future__ import annotations

import os
import platform
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
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


# CPU features the runtimes' kernels choose between (x86 flags, Arm "Features"), as /proc/cpuinfo names them.
NUMERIC_CPU_FEATURES = frozenset({
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16",
    "asimd", "asimdhp", "asimddp", "fphp", "i8mm", "bf16", "sve", "sve2", "sme",
})
CI_RUNNER_VARIABLES = ("RUNNER_NAME", "CI_RUNNER_DESCRIPTION", "SOVPACK_RUNNER")  # GitHub, GitLab, ours


def runner_facts(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """The machine a parity run happened on: host, OS, CPU model, numeric CPU features, CI runner name."""
    model, features = "", set()
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features"):
            features.update(value.split())
    facts: dict[str, Any] = {
        "host": socket.gethostname(),
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "cpu": model or platform.processor() or "unknown",
        "cpuCount": os.cpu_count() or 0,
        "cpuFeatures": sorted(features & NUMERIC_CPU_FEATURES),
    }
    runner = next((os.environ[v] for v in CI_RUNNER_VARIABLES if os.environ.get(v)), None)
    if runner is not None:
        facts["ciRunner"] = runner
    return facts


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
    runner: Mapping[str, Any] = field(default_factory=dict)  # runner_facts() of the machine parity ran on

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
            "runner": dict(self.runner),
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
                **({"runner": dict(info.runner)} if info.runner else {}),
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

