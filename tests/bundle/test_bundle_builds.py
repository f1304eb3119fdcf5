"""Building again gives the same bytes (CLI, library, SOURCE_DATE_EPOCH), and a failed parity leaves no bundle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sovpack.attest.dsse import SigningKey, SigstoreBundle
from sovpack.bundle import build_bundle
from sovpack.bundle.config import BuildConfig, BundleMetadata
from sovpack.errors import ParityError
from sovpack.verify import Policy, verify_bundle
from tests.bundle.shared import BUILD_OPTIONS, Layout, available_targets, cli_build


def _build(checkpoint: Path, out: Path, key: SigningKey, targets: list[str], **config: Any) -> Any:
    """build_bundle in this process."""
    cfg = BuildConfig(checkpoint=checkpoint, output=out, targets=tuple(targets), **config)
    return build_bundle(cfg, key=key)


# ---------------------------------------------------------------------------------------------- determinism


def test_two_builds_are_byte_identical(built: Any, work: Path, checkpoint: Path, keys: dict[str, Any]) -> None:
    again = cli_build(checkpoint, work / "again", keys["private"], available_targets(), *BUILD_OPTIONS)
    assert [t.manifest_digest for t in again.targets] == [t.manifest_digest for t in built.targets]
    first = {p.name: p.read_bytes() for p in (built.output / "blobs" / "sha256").iterdir()}
    second = {p.name: p.read_bytes() for p in (again.output / "blobs" / "sha256").iterdir()}
    assert first.keys() == second.keys()  # manifests, configs, layers, and (RFC 6979) signatures alike
    assert (built.output / "index.json").read_bytes() == (again.output / "index.json").read_bytes()


def test_library_builds_in_one_process_are_identical(
    built: Any, work: Path, checkpoint: Path, keys: dict[str, Any]
) -> None:
    """build_bundle twice in one process; manifests equal each other and the CLI build's (same options)."""
    targets = ["onnx:fp32", "gguf:q8_0"]
    metadata = BundleMetadata(licenses=("Apache-2.0",))
    first = _build(checkpoint, work / "lib-a", keys["signing"], targets, tag="v1", metadata=metadata)
    second = _build(checkpoint, work / "lib-b", keys["signing"], targets, tag="v1", metadata=metadata)
    digests = [t.manifest_digest for t in first.targets]
    assert digests == [t.manifest_digest for t in second.targets]
    by_name = {t.target: t.manifest_digest for t in built.targets}
    assert digests == [by_name[t] for t in targets]


def test_source_date_epoch_adds_stable_timestamps(sde_bundles: tuple[Path, Path], keys: dict[str, Any]) -> None:
    a, b = sde_bundles
    assert (a / "index.json").read_bytes() == (b / "index.json").read_bytes()
    names = [sorted(p.name for p in (root / "blobs/sha256").iterdir()) for root in (a, b)]
    assert names[0] == names[1]
    layout = Layout(a)
    created = "2023-11-14T22:13:20Z"
    assert layout.bundle_index["annotations"]["org.opencontainers.image.created"] == created
    manifest = layout.json(layout.target_digest("onnx:fp32"))
    assert manifest["annotations"]["org.opencontainers.image.created"] == created
    config = layout.json(manifest["config"]["digest"])
    assert config["descriptor"]["createdAt"] == created and config["descriptor"]["name"] == "tiny-llama3"
    (entry,) = layout.entries("attestation", "onnx:fp32", "provenance")
    raw = layout.blob(layout.json(entry["digest"])["layers"][0]["digest"]).read_bytes()
    predicate = json.loads(SigstoreBundle.from_bytes(raw).envelope.payload)["predicate"]
    assert predicate["runDetails"]["metadata"] == {"startedOn": created, "finishedOn": created}
    overrides = predicate["buildDefinition"]["externalParameters"]["parity"]["thresholdOverrides"]
    assert overrides == {"max_abs": 0.01}  # from [parity.targets."onnx:fp32"] in sovpack.toml
    # A build judged with looser limits than the target's defaults passes only a policy that allows them.
    default = verify_bundle(a, keys=[keys["verifying"]])
    assert not default.ok and any("max_abs 0.01 (allowed at most 0.001)" in f for f in default.failures)
    lenient = Policy(parity_limits={"fp32": {"max_abs": 0.01}})
    assert verify_bundle(a, keys=[keys["verifying"]], policy=lenient).ok


def test_failed_parity_writes_no_bundle(work: Path, checkpoint: Path, keys: dict[str, Any]) -> None:
    out = work / "failed"
    with pytest.raises(ParityError, match="gguf:q8_0: parity FAILED"):
        _build(
            checkpoint, out, keys["signing"], ["onnx:fp32", "gguf:q8_0"],
            target_thresholds={"gguf:q8_0": {"mean_kl": 1e-12, "warn_factor": 1.0}},
        )
    assert not out.exists()
    assert not [p for p in work.iterdir() if p.name.startswith(".failed")]
