"""Verifying the signed llama3 bundle: verify and inspect, and every kind of tampering verification must catch.

The bundle is built once per session (tests/bundle/conftest.py, real converters, runtimes and parity); tamper
cases work on copies. Its layout is checked in test_bundle_layout.py, rebuilding it in test_bundle_builds.py,
extracting, running and rechecking a target in test_bundle_extract.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from sovpack._schemas import validate
from sovpack.attest.dsse import VerifyingKey
from sovpack.cli import cli
from sovpack.errors import VerificationError
from sovpack.oci.media import ANN_FILEPATH, MT_WEIGHT
from sovpack.verify import Policy, inspect_bundle, verify_bundle
from tests.bundle.shared import Layout, failures, flip_byte

# ------------------------------------------------------------------------------------------- verify/inspect


def test_verify_ok(built: Any, keys: dict[str, Any]) -> None:
    report = verify_bundle(built.output, keys=[keys["verifying"]], required_targets=["gguf:q8_0"])
    assert report.ok, report.failures
    assert {t.name for t in report.targets} == {t.target for t in built.targets}
    for t in report.targets:
        assert t.signers == (keys["verifying"].key_id,)
        assert t.parity in ("PASSED", "WARNED")
    result = CliRunner().invoke(cli, ["verify", str(built.output), "--key", str(keys["public"]), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["ok"] is True


def test_inspect_json(built: Any, keys: dict[str, Any]) -> None:
    result = CliRunner().invoke(cli, ["inspect", str(built.output), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    # Without a key nothing is verified: the bundle's identity is reported only as unsigned.
    assert info["kind"] == "bundle" and info["name"] is None and info["signed"] is None
    assert info["unsigned"]["name"] == "llama3" and info["unsigned"]["tag"] == "v1"
    assert info["signatures_verified"] is False
    signed = inspect_bundle(built.output, keys=[keys["verifying"]])
    assert signed["name"] == "llama3" and signed["tag"] == "v1" and signed["signatures_verified"] is True
    assert signed["signed"]["sequence"] == 0 and signed["signed"]["targets"] == [t.target for t in built.targets]
    by_name = {t["name"]: t for t in info["targets"]}
    for t in built.targets:
        assert by_name[t.target]["manifest_digest"] == t.manifest_digest
        assert by_name[t.target]["parity"]["status"] == t.parity
        assert by_name[t.target]["size"] == t.size
    text = CliRunner().invoke(cli, ["inspect", str(built.output)])
    assert text.exit_code == 0 and built.targets[0].manifest_digest in text.output
    assert inspect_bundle(built.output)["targets"][0]["signers"]


@pytest.mark.parametrize(
    "what",
    ["weights", "model-config", "target-manifest", "signature-layer", "parity-report", "reference-logits",
     "bundle-index", "index.json", "oci-layout", "unreferenced-blob"],
)
def test_a_flipped_byte_anywhere_fails(copy: Path, keys: dict[str, Any], built: Any, what: str) -> None:
    layout = Layout(copy)
    target = built.targets[0].target
    manifest = layout.json(layout.target_digest(target))
    files = {layer["annotations"][ANN_FILEPATH]: layer for layer in manifest["layers"]}
    weights = max((layer for layer in manifest["layers"] if layer["mediaType"] == MT_WEIGHT), key=lambda x: x["size"])
    signature = layout.json(layout.entries("attestation", target, "signature")[0]["digest"])["layers"][0]
    reference = layout.json(layout.entries("parity-reference")[0]["digest"])
    logits = next(layer for layer in reference["layers"] if layer["mediaType"].endswith(".npy"))
    blob = {
        "weights": weights["digest"],
        "model-config": manifest["config"]["digest"],
        "target-manifest": layout.target_digest(target),
        "signature-layer": signature["digest"],
        "parity-report": files["parity.json"]["digest"],
        "reference-logits": logits["digest"],
        "bundle-index": layout.bundle_index_digest,
    }
    if what in blob:
        flip_byte(layout.blob(blob[what]))
        expected = f"blob {blob[what]} is corrupt"
    elif what == "unreferenced-blob":
        (copy / "blobs" / "sha256" / ("ab" * 32)).write_bytes(b"stray")
        expected = "(unreferenced): blob sha256:" + "ab" * 32 + " is corrupt"
    else:
        flip_byte(copy / what)
        expected = what if what == "oci-layout" else "index"
    message = failures_or_error(copy, keys["verifying"])
    assert expected in message, message


def failures_or_error(root: Path, key: VerifyingKey) -> str:
    """Failures as text, whether the layout could be read at all or not."""
    try:
        return failures(root, key)
    except VerificationError as e:
        return str(e)


def test_cli_names_the_reason_and_exits_1(copy: Path, keys: dict[str, Any], built: Any) -> None:
    layout = Layout(copy)
    manifest = layout.json(layout.target_digest(built.targets[0].target))
    flip_byte(layout.blob(manifest["config"]["digest"]))
    result = subprocess.run(
        [sys.executable, "-m", "sovpack", "verify", str(copy), "--key", str(keys["public"])],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 1
    assert f"target {built.targets[0].target}" in result.stderr and "is corrupt" in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_wrong_key_fails(built: Any, keys: dict[str, Any]) -> None:
    message = failures(built.output, keys["other_verifying"])
    assert "not signed by a trusted key" in message
    assert f"target {built.targets[0].target}: no valid model-signing signature" in message


def test_removed_signature_fails(copy: Path, keys: dict[str, Any], built: Any) -> None:
    layout = Layout(copy)
    target = built.targets[-1].target
    (entry,) = layout.entries("attestation", target, "signature")
    layout.replace_entry(entry["digest"], None)
    message = failures(copy, keys["verifying"])
    assert f"target {target}: no valid model-signing signature (https://model_signing/signature/v1.0)" in message


def test_removed_provenance_and_parity_attestations_fail(copy: Path, keys: dict[str, Any], built: Any) -> None:
    layout = Layout(copy)
    target = built.targets[0].target
    for kind in ("provenance", "parity"):
        (entry,) = layout.entries("attestation", target, kind)
        layout.replace_entry(entry["digest"], None)
    message = failures(copy, keys["verifying"])
    assert f"target {target}: no valid SLSA provenance" in message
    assert f"target {target}: no valid parity test-result" in message


def test_swapped_signatures_fail(copy: Path, keys: dict[str, Any], built: Any) -> None:
    layout = Layout(copy)
    a, b = built.targets[0].target, built.targets[1].target
    (entry_a,) = layout.entries("attestation", a, "signature")
    (entry_b,) = layout.entries("attestation", b, "signature")
    doc_a, doc_b = layout.json(entry_a["digest"]), layout.json(entry_b["digest"])
    doc_a["layers"], doc_b["layers"] = doc_b["layers"], doc_a["layers"]
    layout.replace_entry(entry_a["digest"], doc_a)
    layout.replace_entry(entry_b["digest"], doc_b)
    message = failures(copy, keys["verifying"])
    assert f"target {a}: attestation" in message and "the signed file list does not match" in message
    assert f"target {a}: no valid model-signing signature" in message
    assert f"target {b}: no valid model-signing signature" in message


def test_signature_from_another_bundle_fails(
    copy: Path, keys: dict[str, Any], sde_bundles: tuple[Path, Path]
) -> None:
    """The SOURCE_DATE_EPOCH build of onnx:fp32 has other manifest bytes: its signatures must not transfer."""
    other = Layout(sde_bundles[0])
    layout = Layout(copy)
    target = "onnx:fp32"
    for kind in ("signature", "provenance"):
        (foreign,) = other.entries("attestation", target, kind)
        doc = other.json(foreign["digest"])
        for digest in [foreign["digest"], doc["config"]["digest"], *(layer["digest"] for layer in doc["layers"])]:
            shutil.copy(other.blob(digest), layout.blob(digest))
        (own,) = layout.entries("attestation", target, kind)
        if kind == "provenance":  # re-point the foreign provenance at this bundle's target manifest
            doc["subject"]["digest"] = layout.target_digest(target)
            doc["subject"]["size"] = layout.blob(layout.target_digest(target)).stat().st_size
            layout.replace_entry(own["digest"], doc, **{"dev.sovpack.subject": layout.target_digest(target)})
        else:  # keep the index mapping consistent with the foreign manifest, as a careful attacker would
            layout.replace_entry(own["digest"], doc, **{"dev.sovpack.subject": doc["subject"]["digest"]})
    message = failures(copy, keys["verifying"])
    assert "which is not a target of this bundle (an attestation from another bundle?)" in message
    assert f"target {target}: no valid model-signing signature" in message
    assert "the signed statement names sha256:" in message and f"not {layout.target_digest(target)}" in message
    assert f"target {target}: no valid SLSA provenance" in message


def test_edited_parity_report_fails(copy: Path, keys: dict[str, Any], built: Any) -> None:
    """Edit parity.json and re-store it properly (new blob, manifest, config): the signatures no longer fit."""
    layout = Layout(copy)
    target = built.targets[0].target
    old_digest = layout.target_digest(target)
    manifest = layout.json(old_digest)
    layer = next(x for x in manifest["layers"] if x["annotations"][ANN_FILEPATH] == "parity.json")
    report = json.loads(layout.blob(layer["digest"]).read_text())
    report["metrics"]["max_abs_error"] = 0.0
    digest, size = layout.put((json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
    config = layout.json(manifest["config"]["digest"])
    config["modelfs"]["diffIds"] = [digest if d == layer["digest"] else d for d in config["modelfs"]["diffIds"]]
    layer.update(digest=digest, size=size)
    cdigest, csize = layout.put((json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    manifest["config"].update(digest=cdigest, size=csize)
    new_digest = layout.replace_entry(old_digest, manifest)
    assert new_digest is not None
    # re-point every attestation at the edited manifest, as an attacker would
    for entry in layout.entries("attestation", target):
        doc = layout.json(entry["digest"])
        doc["subject"].update(digest=new_digest, size=layout.blob(new_digest).stat().st_size)
        layout.replace_entry(entry["digest"], doc, **{"dev.sovpack.subject": new_digest})
    message = failures(copy, keys["verifying"])
    assert f"target {target}" in message
    assert "files whose digest differs from the signed one ['parity.json']" in message
    assert f"not {new_digest}" in message  # provenance and parity name the original manifest


# -------------------------------------------------------------------------------------------------- policy


def test_policy_decides_on_warned_parity(built: Any, keys: dict[str, Any], tmp_path: Path) -> None:
    statuses = {t.target: t.parity for t in built.targets}
    target, status = next(iter(statuses.items()))
    other = [s for s in ("PASSED", "WARNED") if s != status]
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"keys": [str(keys["public"])], "allowed_parity": other,
                                  "required_targets": [target]}))
    result = CliRunner().invoke(cli, ["verify", str(built.output), "--policy", str(policy)])
    assert result.exit_code == 1
    assert f"target {target}: parity {status} is not allowed (allowed: {other[0]})" in result.output
    toml_policy = tmp_path / "policy.toml"
    toml_policy.write_text(f'keys = ["{keys["public"]}"]\nallowed_parity = ["PASSED", "WARNED"]\n')
    loaded = Policy.load(toml_policy)
    validate(loaded.to_dict(), "bundle-policy")
    assert CliRunner().invoke(cli, ["verify", str(built.output), "--policy", str(toml_policy)]).exit_code == 0


def test_required_target_missing_fails(built: Any, keys: dict[str, Any]) -> None:
    message = failures(built.output, keys["verifying"], required_targets=["gguf:q4_0"])
    assert "required target gguf:q4_0 is not in the bundle" in message
