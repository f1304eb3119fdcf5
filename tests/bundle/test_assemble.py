"""``sovpack assemble``: parts built (and signed) separately joined into one bundle that verifies like a build.

Parts here are local layouts and oci-archive files; tests/transport/test_fanout.py runs the same flow
through a real registry with concurrent builders.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fixtures.generate import make_checkpoint
from sovpack.attest.dsse import SigningKey, VerifyingKey, generate_key_pair
from sovpack.bundle import BuildConfig, BundleMetadata, build_bundle
from sovpack.bundle.assemble import assemble_bundle
from sovpack.cli import cli
from sovpack.errors import UsageError, VerificationError
from sovpack.transport import copy_bundle
from sovpack.verify import extract_target, inspect_bundle, read_bundle, recheck_parity, verify_bundle

METADATA = BundleMetadata(name="tiny", licenses=("Apache-2.0",))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("assemble-keys")
    pairs = {name: generate_key_pair(root / name) for name in ("release", "runner")}
    return {
        **{f"{n}_signing": SigningKey.load(p.private_key) for n, p in pairs.items()},
        **{f"{n}_public": VerifyingKey.load(p.public_key) for n, p in pairs.items()},
        **{f"{n}_files": p for n, p in pairs.items()},
    }


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory, checkpoints: dict[str, Path], keys: dict[str, Any]
          ) -> dict[str, Path]:
    """onnx (release key, sequence 3), gguf (runner key, sequence 5, expiring), and three that do not belong:
    another checkpoint revision, other parity prompts, and the gguf target again."""
    root = tmp_path_factory.mktemp("assemble-parts")
    revised = make_checkpoint("llama3", root / "ckpt-revised")
    (revised / "chat_template.jinja").write_text("{{ 'REVISED' }}{% for m in messages %}{{ m.content }}{% endfor %}")
    specs: dict[str, dict[str, Any]] = {
        "onnx": {"targets": ("onnx:fp32",), "tag": "1.0-onnx", "sequence": 3, "key": "release"},
        "gguf": {"targets": ("gguf:f16",), "tag": "1.0-gguf", "sequence": 5, "key": "runner",
                 "expires": "2099-01-01T00:00:00Z"},
        "revised": {"targets": ("gguf:f32",), "tag": "1.0-revised", "checkpoint": revised},
        "prompts": {"targets": ("gguf:f32",), "tag": "1.0-prompts", "prompts": ("Once upon a time", "2 + 2 =")},
        "again": {"targets": ("gguf:f16",), "tag": "1.0-again"},
    }
    out = {}
    for name, spec in specs.items():
        config = BuildConfig(
            checkpoint=spec.get("checkpoint", checkpoints["llama3"]), output=root / name, tag=spec["tag"],
            sequence=spec.get("sequence", 0), targets=spec["targets"], metadata=METADATA,
            expires=spec.get("expires"), prompts=spec.get("prompts", ()),
        )
        build_bundle(config, key=keys[f"{spec.get('key', 'release')}_signing"])
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def assembled(parts: dict[str, Path], keys: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("assembled") / "bundle"
    assemble_bundle(out, [parts["onnx"], parts["gguf"]], key=keys["release_signing"],
                    trusted=[keys["runner_public"]], tag="1.0")
    return out


def test_assembled_bundle_verifies_like_one_build(assembled: Path, parts: dict[str, Path],
                                                  keys: dict[str, Any]) -> None:
    report = verify_bundle(assembled, keys=[keys["release_public"], keys["runner_public"]])
    assert report.ok, report.failures
    release = report.release
    assert release is not None and (release.name, release.tag) == ("tiny", "1.0")
    assert [t.name for t in report.targets] == ["onnx:fp32", "gguf:f16"]
    assert report.release_signer == keys["release_public"].key_id
    assert dict(zip([t.name for t in report.targets], [t.signers for t in report.targets], strict=True)) == {
        "onnx:fp32": (keys["release_public"].key_id,), "gguf:f16": (keys["runner_public"].key_id,)}
    # sequence: the parts' highest; expiry: the parts' earliest; each target remembers its part
    assert (release.sequence, release.expires) == (5, "2099-01-01T00:00:00Z")
    origins = {t.target: t.part for t in release.targets}
    gguf_part = read_bundle(parts["gguf"]).releases[0].descriptor.digest
    assert origins["gguf:f16"] is not None and (origins["gguf:f16"].tag, origins["gguf:f16"].release) == (
        "1.0-gguf", gguf_part)
    # the parts' manifests are carried unchanged: same target manifest digests as in the parts
    for name, target in (("onnx", "onnx:fp32"), ("gguf", "gguf:f16")):
        part_view = read_bundle(parts[name])
        assert part_view.target(target).descriptor.digest == report.targets[
            [t.name for t in report.targets].index(target)].manifest_digest


def test_assembled_bundle_needs_every_parts_signer(assembled: Path, keys: dict[str, Any]) -> None:
    """The gguf part's attestations stay the runner's signatures: without its key they do not verify."""
    report = verify_bundle(assembled, keys=[keys["release_public"]])
    assert not report.ok
    assert any("target gguf:f16" in f for f in report.failures)
    assert not any("target onnx:fp32: no valid" in f for f in report.failures)


def test_extract_and_inspect_work_on_the_assembled_bundle(assembled: Path, keys: dict[str, Any],
                                                          tmp_path: Path) -> None:
    result = extract_target(assembled, "gguf:f16", tmp_path / "gguf",
                            keys=[keys["release_public"], keys["runner_public"]])
    assert (tmp_path / "gguf" / result.signature.name).is_file() and result.files
    info = inspect_bundle(assembled, keys=[keys["release_public"], keys["runner_public"]])
    assert [t["name"] for t in info["targets"]] == ["onnx:fp32", "gguf:f16"] and not info.get("problems")


def test_parity_rechecks_the_assembled_targets_against_the_shared_reference(assembled: Path,
                                                                            keys: dict[str, Any]) -> None:
    results = recheck_parity(assembled, keys=[keys["release_public"], keys["runner_public"]])
    assert [(r.target, r.status, r.signature_verified) for r in results] == [
        ("onnx:fp32", "PASSED", True), ("gguf:f16", "PASSED", True)]


def test_assembly_is_deterministic(assembled: Path, parts: dict[str, Path], keys: dict[str, Any],
                                   tmp_path: Path) -> None:
    again = assemble_bundle(tmp_path / "again", [parts["onnx"], parts["gguf"]], key=keys["release_signing"],
                            trusted=[keys["runner_public"]], tag="1.0")
    assert again.index_digest == read_bundle(assembled).index_descriptor.digest


@pytest.mark.parametrize(("other", "problem"), [
    ("revised", "not the same source checkpoint (file digests) as part"),
    ("prompts", "not the same parity prompts as part"),
    ("again", "target gguf:f16 is also in part"),
])
def test_a_part_that_does_not_belong_is_refused_by_name(parts: dict[str, Path], keys: dict[str, Any],
                                                        tmp_path: Path, other: str, problem: str) -> None:
    with pytest.raises(VerificationError) as err:
        assemble_bundle(tmp_path / "out", [parts["gguf"], parts[other]], key=keys["release_signing"],
                        trusted=[keys["runner_public"]])
    assert f"part {parts[other]}" in str(err.value) and problem in str(err.value)
    assert not (tmp_path / "out").exists()


def test_a_part_signed_by_an_untrusted_key_is_refused(parts: dict[str, Path], keys: dict[str, Any],
                                                      tmp_path: Path) -> None:
    with pytest.raises(VerificationError, match=re.escape(f"part {parts['gguf']}: does not verify")):
        assemble_bundle(tmp_path / "out", [parts["onnx"], parts["gguf"]], key=keys["release_signing"])


def test_a_tampered_part_is_refused(parts: dict[str, Path], keys: dict[str, Any], tmp_path: Path) -> None:
    copy = tmp_path / "tampered"
    shutil.copytree(parts["gguf"], copy)
    weights = read_bundle(copy).target("gguf:f16").files
    blob = next(layer for path, layer in weights.items() if path.endswith(".gguf"))
    path = copy / "blobs" / "sha256" / blob.digest.split(":", 1)[1]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match=re.escape(f"part {copy}: does not verify: ") + ".*corrupt"):
        assemble_bundle(tmp_path / "out", [parts["onnx"], copy], key=keys["release_signing"],
                        trusted=[keys["runner_public"]])


def test_assemble_from_and_to_oci_archives(parts: dict[str, Path], keys: dict[str, Any], tmp_path: Path) -> None:
    """The air-gapped path: parts carried in as tarballs, the assembled bundle carried out as one."""
    for name in ("onnx", "gguf"):
        copy_bundle(parts[name], f"oci-archive:{tmp_path / name}.tar")
    result = assemble_bundle(f"oci-archive:{tmp_path / 'release.tar'}",
                             [f"oci-archive:{tmp_path / 'onnx.tar'}", f"oci-archive:{tmp_path / 'gguf.tar'}"],
                             key=keys["release_signing"], trusted=[keys["runner_public"]], tag="1.0")
    assert result.output is None and result.pushed is not None
    copy_bundle(f"oci-archive:{tmp_path / 'release.tar'}", tmp_path / "unpacked")
    report = verify_bundle(tmp_path / "unpacked", keys=[keys["release_public"], keys["runner_public"]])
    assert report.ok, report.failures
    assert report.index_digest == result.index_digest


def test_an_assembled_bundle_can_be_a_part(assembled: Path, parts: dict[str, Path], keys: dict[str, Any],
                                           checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """Adding a target to a release later: the earlier targets keep the part they were built in."""
    extra = tmp_path / "extra"
    build_bundle(BuildConfig(checkpoint=checkpoints["llama3"], output=extra, tag="1.1-f32", targets=("gguf:f32",),
                             metadata=METADATA), key=keys["release_signing"])
    result = assemble_bundle(tmp_path / "1.1", [assembled, extra], key=keys["release_signing"],
                             trusted=[keys["runner_public"]], tag="1.1")
    report = verify_bundle(tmp_path / "1.1", keys=[keys["release_public"], keys["runner_public"]])
    assert report.ok, report.failures
    assert report.release is not None
    assert {t.target: t.part.tag for t in report.release.targets if t.part} == {
        "onnx:fp32": "1.0-onnx", "gguf:f16": "1.0-gguf", "gguf:f32": "1.1-f32"}
    assert result.targets == ("onnx:fp32", "gguf:f16", "gguf:f32")


def test_assemble_command(parts: dict[str, Path], keys: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "cli"
    args = ["assemble", str(out), "--from", str(parts["onnx"]), "--from", str(parts["gguf"]),
            "--key", str(keys["release_files"].private_key), "--trust", str(keys["runner_files"].public_key),
            "--tag", "1.0", "--sequence", "7", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["sequence"] == 7 and summary["targets"] == ["onnx:fp32", "gguf:f16"]
    assert [p["tag"] for p in summary["parts"]] == ["1.0-onnx", "1.0-gguf"]
    verify = CliRunner().invoke(cli, ["verify", str(out), "--key", str(keys["release_files"].public_key),
                                      "--key", str(keys["runner_files"].public_key)])
    assert verify.exit_code == 0, verify.output
    assert "release tiny tag 1.0 sequence 7" in verify.output
    assert "(built in part 1.0-gguf)" in verify.output
    as_json = CliRunner().invoke(cli, ["verify", str(out), "--key", str(keys["release_files"].public_key),
                                       "--key", str(keys["runner_files"].public_key), "--json"])
    assert json.loads(as_json.output)["release"]["parts"]["onnx:fp32"]["tag"] == "1.0-onnx"


def test_an_existing_destination_is_refused_before_any_part_is_read(parts: dict[str, Path], keys: dict[str, Any],
                                                                    tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("mine")
    (tmp_path / "taken.tar").write_text("mine")
    for destination in (tmp_path / "taken", f"oci-archive:{tmp_path / 'taken.tar'}"):
        with pytest.raises(UsageError, match="pass --force"):
            assemble_bundle(destination, [tmp_path / "no-such-part"], key=keys["release_signing"])
    assert (tmp_path / "taken" / "file").read_text() == "mine" and (tmp_path / "taken.tar").read_text() == "mine"


def test_assemble_refuses_a_tag_the_destination_contradicts(parts: dict[str, Path], keys: dict[str, Any]) -> None:
    with pytest.raises(UsageError, match=re.escape("names tag '1.0' but --tag is '2.0'")):
        assemble_bundle("docker://127.0.0.1:9/models/x:1.0", [parts["onnx"]], key=keys["release_signing"],
                        tag="2.0")
    result = CliRunner().invoke(cli, ["assemble", "docker://127.0.0.1:9/models/x:1.0", "--from", str(parts["onnx"]),
                                      "--key", str(keys["release_files"].private_key), "--tag", "2.0"])
    assert result.exit_code == 2, result.output
