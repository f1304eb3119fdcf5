"""``sovpack build --push``: a runner builds its targets, signs them and pushes the bundle in one step (issue 18).

The registry is a real Distribution (``docker-registry``) on loopback, as in test_registry.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from sovpack.attest.dsse import VerifyingKey, generate_key_pair
from sovpack.cli import cli
from sovpack.transport import Reference, RegistryLayout, RegistryOptions
from sovpack.verify import verify_bundle
from tests.transport.registry_harness import CHECKPOINT, Registry

REGISTRY_DIR = "push"
PUSHED_REPOSITORY = "models/unused"
PUSH_OPTIONS = RegistryOptions(plain_http=True, backoff=0.01)


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_build_pushes_its_signed_bundle_under_the_destination_tag(registry: Registry, tmp_path: Path) -> None:
    """No -o: built in a temporary directory (removed), pushed, and the registry copy verifies under its tag."""
    keys = generate_key_pair(tmp_path / "keys")
    ref = registry.ref("models/parts", tag="1.0-gguf")
    result = invoke("build", str(CHECKPOINT), "-t", "gguf:f32", "--key", str(keys.private_key), "--push", ref,
                    "--plain-http", "--json", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["tag"] == "1.0-gguf" and report["output"] is None
    assert report["pushed"]["tag"] == "1.0-gguf" and report["pushed"]["digest"] == report["index_digest"]
    assert not Path(report["pushed"]["source"]).exists()  # the scratch build is gone
    pulled = RegistryLayout(Reference.parse(ref), PUSH_OPTIONS)
    verified = verify_bundle(pulled, keys=[VerifyingKey.load(keys.public_key)])
    assert verified.ok, verified.to_dict()
    assert verified.tag == "1.0-gguf" and [t.name for t in verified.targets] == ["gguf:f32"]


def test_build_keeps_its_layout_with_output_and_push(registry: Registry, tmp_path: Path) -> None:
    keys = generate_key_pair(tmp_path / "keys")
    out = tmp_path / "bundle"
    ref = registry.ref("models/kept", tag="v2")
    result = invoke("build", str(CHECKPOINT), "-t", "gguf:f32", "--key", str(keys.private_key), "-o", str(out),
                    "--push", ref, "--plain-http", "--json", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["output"] == str(out) and report["pushed"]["digest"] == report["index_digest"]
    assert verify_bundle(out, keys=[VerifyingKey.load(keys.public_key)]).ok


def test_push_tag_that_contradicts_the_bundle_tag_is_refused_before_building(tmp_path: Path) -> None:
    keys = generate_key_pair(tmp_path / "keys")
    result = CliRunner().invoke(cli, ["build", str(CHECKPOINT), "-t", "gguf:f32", "--key", str(keys.private_key),
                                      "--tag", "v1", "--push", "docker://127.0.0.1:9/models/x:v2", "--plain-http"])
    assert result.exit_code == 2
    assert "names tag 'v2', the bundle's is 'v1'" in result.output
