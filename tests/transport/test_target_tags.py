"""Per-target tags in a registry (issue 19): a push tags every target beside the bundle, each tag resolving to
that target's ModelPack manifest, so one-model clients (ORAS, skopeo without --all) get one target; sovpack's
verify, extract, run and copy accept either tag and keep the bundle the unit that is verified and copied.

The registry is a real Distribution (``docker-registry``) on loopback, as in test_registry.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import oras.client
import pytest
from click.testing import CliRunner

from sovpack.cli import cli
from sovpack.errors import VerificationError
from sovpack.oci.media import AT_MODEL, MT_MANIFEST
from sovpack.transport import Reference, RegistryClient, RegistryLayout, RegistryOptions, copy_bundle
from sovpack.verify import read_bundle, verify_bundle
from tests.transport.registry_harness import BuiltBundle, Registry

REGISTRY_DIR = "target-tags"
PUSHED_REPOSITORY = "models/tagged"
PUSH_OPTIONS = RegistryOptions(plain_http=True, backoff=0.01)


def _target_ref(pushed: str, target: str) -> str:
    return f"{pushed}-{target.replace(':', '-')}"


def test_push_tags_every_target_beside_the_bundle(bundle: BuiltBundle, registry: Registry, pushed: str) -> None:
    client = RegistryClient(registry.host, PUSH_OPTIONS)
    ref = Reference.parse(pushed)
    for target, digest in bundle.target_digests.items():
        data, media_type, resolved = client.get_manifest(ref.repository, f"v1-{target.replace(':', '-')}")
        assert (media_type, resolved) == (MT_MANIFEST, digest)
        assert json.loads(data)["artifactType"] == AT_MODEL
    result = copy_bundle(bundle.path, registry.ref("models/again"), options=PUSH_OPTIONS)
    assert sorted(result.target_tags) == sorted(f"v1-{t.replace(':', '-')}" for t in bundle.target_digests)


def test_verify_extract_and_run_by_a_per_target_tag(bundle: BuiltBundle, pushed: str, tmp_path: Path) -> None:
    target = "gguf:q8_0"
    tagged = _target_ref(pushed, target)
    report = verify_bundle(RegistryLayout(Reference.parse(tagged), PUSH_OPTIONS), keys=[bundle.verifying])
    assert report.ok, report.failures
    assert report.tag == "v1" and report.index_digest == bundle.index_digest
    extracted = CliRunner().invoke(cli, ["extract", tagged, "-o", str(tmp_path / "gguf"), "--plain-http",
                                         "--key", str(bundle.public_key), "--json"])
    assert extracted.exit_code == 0, extracted.output
    assert json.loads(extracted.output)["target"] == target
    ran = CliRunner().invoke(cli, ["run", tagged, "--plain-http", "--key", str(bundle.public_key), "--prompt", "Hi",
                                   "--max-new-tokens", "2", "--json"])
    assert ran.exit_code == 0, ran.output


def test_copy_by_a_per_target_tag_copies_the_bundle(bundle: BuiltBundle, pushed: str, tmp_path: Path) -> None:
    result = copy_bundle(_target_ref(pushed, "onnx:fp32"), tmp_path / "copy", options=PUSH_OPTIONS)
    assert (result.digest, result.tag) == (bundle.index_digest, "v1")
    assert (tmp_path / "copy" / "index.json").read_bytes() == (bundle.path / "index.json").read_bytes()


def test_a_per_target_tag_moved_to_another_manifest_is_refused(bundle: BuiltBundle, registry: Registry,
                                                               tmp_path: Path) -> None:
    """Tags are not signed: one re-pointed at the other target's manifest must not verify as that target."""
    pushed = registry.ref("models/moved")
    copy_bundle(bundle.path, pushed, options=PUSH_OPTIONS)
    client = RegistryClient(registry.host, PUSH_OPTIONS)
    other = bundle.target_digests["onnx:fp32"]
    data, media_type, _ = client.get_manifest("models/moved", other)
    client.put_manifest("models/moved", "v1-gguf-q8_0", data, media_type)
    with pytest.raises(VerificationError, match="resolves to the manifest of target onnx:fp32, which this tag"):
        RegistryLayout(Reference.parse(_target_ref(pushed, "gguf:q8_0")), PUSH_OPTIONS)
    result = CliRunner().invoke(cli, ["verify", _target_ref(pushed, "gguf:q8_0"), "--plain-http",
                                      "--key", str(bundle.public_key)])
    assert result.exit_code == 1 and "moved to another manifest" in result.output


def test_oras_pulls_one_target_by_its_tag(bundle: BuiltBundle, registry: Registry, pushed: str,
                                          tmp_path: Path) -> None:
    """ORAS (oras-py) resolves the per-target tag to the ModelPack manifest and writes its files by title."""
    client = oras.client.OrasClient(hostname=registry.host, insecure=True)
    tagged = _target_ref(pushed, "gguf:q8_0").removeprefix("docker://")
    files = client.pull(target=tagged, outdir=str(tmp_path / "oras"))
    pulled = sorted(Path(f).relative_to(tmp_path / "oras").as_posix() for f in files)
    assert pulled == sorted(read_bundle(bundle.path).target("gguf:q8_0").files)


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed (apt-get install -y skopeo)")
def test_skopeo_inspects_and_copies_one_target_by_its_tag(bundle: BuiltBundle, pushed: str, tmp_path: Path) -> None:
    tagged = _target_ref(pushed, "onnx:fp32")
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", tagged], capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(raw)["annotations"]["dev.sovpack.target"] == "onnx:fp32"
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false", tagged, f"oci:{tmp_path / 'one'}:onnx"],
                   capture_output=True, text=True, check=True)
    index = json.loads((tmp_path / "one" / "index.json").read_text())
    assert index["manifests"][0]["digest"] == bundle.target_digests["onnx:fp32"]
