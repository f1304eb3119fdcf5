"""Fan-out release through a real registry (issue 18): three runners build and push one target each at the
same time, one job assembles them into the release tag, and the result verifies and extracts like a build.

The registry is a real Distribution (``docker-registry``) on loopback; the builders are separate
``python -m sovpack build --push`` processes running concurrently, as a CI matrix's jobs would.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from sovpack.attest.dsse import SigningKey, VerifyingKey, generate_key_pair
from sovpack.bundle.assemble import AssembleResult, assemble_bundle
from sovpack.cli import cli
from sovpack.errors import VerificationError
from sovpack.transport import Reference, RegistryLayout, RegistryOptions
from sovpack.verify import read_bundle, verify_bundle
from tests.transport.registry_harness import CHECKPOINT, Registry

REGISTRY_DIR = "fanout"
PUSHED_REPOSITORY = "models/unused"
PUSH_OPTIONS = RegistryOptions(plain_http=True, backoff=0.01)
ROOT = Path(__file__).resolve().parents[2]
RUNNERS = {"onnx": "onnx:fp32", "gguf": "gguf:f32", "openvino": "openvino:fp32"}


@pytest.fixture(scope="module")
def keys(work: Path) -> dict[str, Any]:
    return {"release": generate_key_pair(work / "release-key"), "runner": generate_key_pair(work / "runner-key")}


def _build(ref: str, target: str, key: Path, *extra: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "sovpack", "build", str(CHECKPOINT), "-t", target, "--name", "fan",
               "--key", str(key), "--push", ref, "--plain-http", "-q", *extra]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def parts(registry: Registry, keys: dict[str, Any]) -> dict[str, str]:
    """Three concurrent builders (the openvino one with the runner's own key) pushing to one repository."""
    refs = {name: registry.ref("models/fan", tag=f"1.0-{name}") for name in RUNNERS}
    running = {
        name: _build(refs[name], target, keys["runner" if name == "openvino" else "release"].private_key)
        for name, target in RUNNERS.items()
    }
    for name, process in running.items():
        output, _ = process.communicate(timeout=900)
        assert process.returncode == 0, f"{name}: {output.decode(errors='replace')}"
    return refs


@pytest.fixture(scope="module")
def assembled(registry: Registry, parts: dict[str, str], keys: dict[str, Any]) -> tuple[str, AssembleResult]:
    release = registry.ref("models/fan", tag="1.0")
    result = assemble_bundle(release, list(parts.values()), key=SigningKey.load(keys["release"].private_key),
                             trusted=[VerifyingKey.load(keys["runner"].public_key)], options=PUSH_OPTIONS)
    return release, result


def test_assembled_release_in_the_registry_verifies_and_extracts(
    assembled: tuple[str, AssembleResult], keys: dict[str, Any], tmp_path: Path
) -> None:
    release, result = assembled
    assert result.tag == "1.0" and result.targets == tuple(RUNNERS.values())
    assert result.pushed is not None and result.pushed.blobs_transferred == 1  # only the new release signature
    trusted = [VerifyingKey.load(keys[k].public_key) for k in ("release", "runner")]
    report = verify_bundle(RegistryLayout(Reference.parse(release), PUSH_OPTIONS), keys=trusted)
    assert report.ok, report.failures
    assert [t.name for t in report.targets] == list(RUNNERS.values())
    assert report.release is not None and {t.part.tag for t in report.release.targets if t.part} == {
        "1.0-onnx", "1.0-gguf", "1.0-openvino"}
    extracted = CliRunner().invoke(cli, [
        "extract", release, "-t", "openvino:fp32", "-o", str(tmp_path / "ov"), "--plain-http",
        "--key", str(keys["release"].public_key), "--key", str(keys["runner"].public_key)])
    assert extracted.exit_code == 0, extracted.output
    assert (tmp_path / "ov" / "openvino_model.xml").is_file()


def test_a_foreign_part_in_the_registry_is_refused(registry: Registry, parts: dict[str, str],
                                                   keys: dict[str, Any]) -> None:
    """Built from the same checkpoint but judged on other prompts: not part of this release."""
    foreign = registry.ref("models/fan", tag="1.0-foreign")
    process = _build(foreign, "gguf:f16", keys["release"].private_key, "--prompt", "Other prompts entirely")
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output.decode(errors="replace")
    with pytest.raises(VerificationError, match=re.escape(f"part {foreign}: not the same parity prompts as part")):
        assemble_bundle(registry.ref("models/fan", tag="1.0-bad"), [parts["onnx"], foreign],
                        key=SigningKey.load(keys["release"].private_key), options=PUSH_OPTIONS)


def test_a_part_corrupted_in_the_registry_is_refused(registry: Registry, parts: dict[str, str],
                                                     keys: dict[str, Any], work: Path) -> None:
    """A registry serving a changed weight blob: the pull checks every digest and names the part."""
    layout = RegistryLayout(Reference.parse(parts["gguf"]), PUSH_OPTIONS)
    weights = next(layer for path, layer in read_bundle(layout, deep=False).target("gguf:f32").files.items()
                   if path.endswith(".gguf"))
    stored = registry.blob_data(weights.digest)
    original = stored.read_bytes()
    try:
        stored.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
        with pytest.raises(VerificationError, match=re.escape(f"part {parts['gguf']}: ")):
            assemble_bundle(work / "never", [parts["onnx"], parts["gguf"]],
                            key=SigningKey.load(keys["release"].private_key), options=PUSH_OPTIONS)
    finally:
        stored.write_bytes(original)
    assert not (work / "never").exists()


def test_next_release_reuses_every_unchanged_target_from_the_registry(
    registry: Registry, assembled: tuple[str, AssembleResult], keys: dict[str, Any]
) -> None:
    """1.0.1 of the same checkpoint and options: nothing is rebuilt, only a new release is signed and pushed."""
    release, _result = assembled
    nxt = registry.ref("models/fan", tag="1.0.1")
    command = [sys.executable, "-m", "sovpack", "build", str(CHECKPOINT), *(f"-t{t}" for t in RUNNERS.values()),
               "--name", "fan", "--key", str(keys["release"].private_key), "--trust", str(keys["runner"].public_key),
               "--reuse-from", release, "--push", nxt, "--plain-http", "-q", "--json"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, timeout=900)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    summary = json.loads(done.stdout)
    assert [t["reused_from"] for t in summary["targets"]] == [release] * len(RUNNERS)
    assert summary["pushed"]["blobs_transferred"] == 1  # the new release signature; every artifact was there
    trusted = [VerifyingKey.load(keys[k].public_key) for k in ("release", "runner")]
    report = verify_bundle(RegistryLayout(Reference.parse(nxt), PUSH_OPTIONS), keys=trusted)
    assert report.ok, report.failures
