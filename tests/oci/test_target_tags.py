"""Per-target tags in a layout (issue 19): ``TAG-FORMAT-PRECISION`` beside the bundle tag in index.json, each
resolving straight to its target's ModelPack manifest; verify, extract, inspect and run accept either tag, and a
per-target tag that points elsewhere is refused. The registry side: tests/transport/test_target_tags.py."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from sovpack.attest.dsse import SigningKey, VerifyingKey, generate_key_pair
from sovpack.bundle import BuildConfig, build_bundle
from sovpack.cli import cli
from sovpack.errors import UsageError
from sovpack.oci.media import AT_MODEL, MT_INDEX, MT_MANIFEST
from sovpack.oci.tags import bundle_tag_of, target_tag
from sovpack.transport import copy_bundle
from sovpack.verify import extract_target, read_bundle, verify_bundle

TARGETS = ("onnx:fp32", "gguf:f16")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, checkpoints: dict[str, Path]) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("target-tags")
    keys = generate_key_pair(root / "keys")
    out = root / "bundle"
    build_bundle(BuildConfig(checkpoint=checkpoints["llama3"], output=out, tag="1.0", targets=TARGETS),
                 key=SigningKey.load(keys.private_key))
    return {"path": out, "keys": keys, "public": VerifyingKey.load(keys.public_key)}


def _index_json(path: Path) -> dict[str, Any]:
    return dict(json.loads((path / "index.json").read_text()))


def test_the_tag_scheme() -> None:
    assert target_tag("1.0", "gguf:q4_k_m") == "1.0-gguf-q4_k_m"
    assert bundle_tag_of("1.0-gguf-q4_k_m", "gguf:q4_k_m") == "1.0"
    assert bundle_tag_of("1.0-gguf-q8_0", "gguf:q4_k_m") is None and bundle_tag_of("gguf-f16", "gguf:f16") is None


def test_index_json_tags_every_target_beside_the_bundle(built: dict[str, Any]) -> None:
    entries = _index_json(built["path"])["manifests"]
    assert [e["annotations"]["org.opencontainers.image.ref.name"] for e in entries] == [
        "1.0", "1.0-onnx-fp32", "1.0-gguf-f16"]
    assert entries[0]["mediaType"] == MT_INDEX
    view = read_bundle(built["path"])
    for entry, target in zip(entries[1:], TARGETS, strict=True):
        assert (entry["mediaType"], entry.get("artifactType")) == (MT_MANIFEST, AT_MODEL)
        assert entry["digest"] == view.target(target).descriptor.digest


def test_verify_extract_and_inspect_by_a_per_target_tag(built: dict[str, Any], tmp_path: Path) -> None:
    report = verify_bundle(built["path"], keys=[built["public"]], tag="1.0-gguf-f16")
    assert report.ok, report.failures
    assert report.tag == "1.0"  # the bundle is the unit verify vouches for
    result = extract_target(built["path"], None, tmp_path / "gguf", keys=[built["public"]], tag="1.0-gguf-f16")
    assert result.target == "gguf:f16"
    verified = CliRunner().invoke(cli, ["verify", str(built["path"]), "--tag", "1.0-onnx-fp32",
                                      "--key", str(built["keys"].public_key)])
    assert verified.exit_code == 0, verified.output
    extracted = CliRunner().invoke(cli, ["extract", str(built["path"]), "--tag", "1.0-onnx-fp32", "-o",
                                            str(tmp_path / "onnx"), "--key", str(built["keys"].public_key)])
    assert extracted.exit_code == 0, extracted.output
    assert "onnx:fp32" in extracted.output and (tmp_path / "onnx" / "model.onnx").is_file()


def test_without_a_tag_the_bundle_is_chosen(built: dict[str, Any]) -> None:
    assert verify_bundle(built["path"], keys=[built["public"]]).ok
    with pytest.raises(UsageError, match="several targets"):
        extract_target(built["path"], None, built["path"].parent / "never", keys=[built["public"]])


def test_a_per_target_tag_pointing_at_another_manifest_is_refused(built: dict[str, Any], tmp_path: Path) -> None:
    """index.json is unsigned: a per-target tag moved to the other target's manifest must not pass."""
    copy = tmp_path / "moved"
    shutil.copytree(built["path"], copy)
    index = _index_json(copy)
    index["manifests"][2]["digest"] = index["manifests"][1]["digest"]
    index["manifests"][2]["size"] = index["manifests"][1]["size"]
    (copy / "index.json").write_text(json.dumps(index))
    for tag in (None, "1.0-gguf-f16"):
        report = verify_bundle(copy, keys=[built["public"]], tag=tag)
        assert not report.ok
        assert any("tag '1.0-gguf-f16' names manifest" in f and "which is not target gguf:f16" in f
                   for f in report.failures), report.failures


def test_every_copy_writes_the_same_tags(built: dict[str, Any], tmp_path: Path) -> None:
    """Derived from the bundle index, never stored in what is signed: a layout copy and an archive round trip
    carry the same index.json."""
    copy_bundle(built["path"], tmp_path / "copy")
    copy_bundle(built["path"], f"oci-archive:{tmp_path / 'b.tar'}")
    copy_bundle(f"oci-archive:{tmp_path / 'b.tar'}", tmp_path / "unpacked")
    expected = (built["path"] / "index.json").read_bytes()
    assert (tmp_path / "copy" / "index.json").read_bytes() == expected
    assert (tmp_path / "unpacked" / "index.json").read_bytes() == expected


def test_a_tag_too_long_for_its_target_tags_is_refused_before_building(checkpoints: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    keys = generate_key_pair(tmp_path / "keys")
    config = BuildConfig(checkpoint=checkpoints["llama3"], output=tmp_path / "b", tag="v" * 120, targets=TARGETS)
    with pytest.raises(UsageError, match="too long for its per-target tags"):
        build_bundle(config, key=SigningKey.load(keys.private_key))


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed (apt-get install -y skopeo)")
def test_skopeo_reads_one_target_by_its_tag(built: dict[str, Any], tmp_path: Path) -> None:
    """skopeo resolves a per-target tag to the ModelPack manifest itself, and copies just that target (its
    manifest and layers byte for byte) without --all."""
    raw = subprocess.run(["skopeo", "inspect", "--raw", f"oci:{built['path']}:1.0-gguf-f16"], capture_output=True,
                         text=True, check=True).stdout
    manifest = json.loads(raw)
    assert manifest["artifactType"] == AT_MODEL and manifest["annotations"]["dev.sovpack.target"] == "gguf:f16"
    subprocess.run(["skopeo", "copy", f"oci:{built['path']}:1.0-gguf-f16", f"oci:{tmp_path / 'one'}:gguf"],
                   capture_output=True, text=True, check=True)
    view = read_bundle(built["path"])
    copied = _index_json(tmp_path / "one")["manifests"][0]
    assert copied["digest"] == view.target("gguf:f16").descriptor.digest
    for layer in view.target("gguf:f16").layers:
        assert (tmp_path / "one" / "blobs" / "sha256" / layer.digest.split(":", 1)[1]).is_file()
