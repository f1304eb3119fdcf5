"""Using a verified bundle: extract a target (refusing unsafe paths), run it, recheck its parity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from sovpack._io import check_relative_path
from sovpack._schemas import validate
from sovpack.cli import cli
from sovpack.errors import VerificationError
from sovpack.oci.media import ANN_FILEPATH
from sovpack.verify import TargetEntry, extract_target, read_bundle, recheck_parity, write_target_files
from tests.bundle.shared import Layout, failures, flip_byte

# ------------------------------------------------------------------------------------------------ extract


def test_extract_writes_verified_files_and_signature(built: Any, keys: dict[str, Any], tmp_path: Path) -> None:
    for target in built.targets:
        out = tmp_path / target.target.replace(":", "-")
        result = CliRunner().invoke(
            cli, ["extract", str(built.output), "-t", target.target, "-o", str(out), "--key", str(keys["public"]),
                  "--json"],
        )
        assert result.exit_code == 0, result.output
        assert sorted(p.name for p in out.iterdir()) == sorted([*target.files, "model.sig"])
        validate(json.loads((out / "model.sig").read_text()), "sigstore-bundle")
    again = CliRunner().invoke(
        cli, ["extract", str(built.output), "-t", built.targets[0].target, "-o", str(out), "--key",
              str(keys["public"])],
    )
    assert again.exit_code == 2 and "not empty" in again.output


def test_extract_refuses_an_unverified_bundle(copy: Path, keys: dict[str, Any], built: Any, tmp_path: Path) -> None:
    layout = Layout(copy)
    manifest = layout.json(layout.target_digest(built.targets[0].target))
    flip_byte(layout.blob(manifest["layers"][0]["digest"]))
    out = tmp_path / "out"
    with pytest.raises(VerificationError, match="is corrupt"):
        extract_target(copy, built.targets[0].target, out, keys=[keys["verifying"]])
    assert not out.exists()
    with pytest.raises(VerificationError, match="not signed by a trusted key"):
        extract_target(built.output, built.targets[0].target, out, keys=[keys["other_verifying"]])
    assert not out.exists()


@pytest.mark.parametrize(
    ("path", "reason"),
    [("../evil", "path traversal"), ("/etc/evil", "is absolute"), ("a/../../evil", "path traversal"),
     ("a\\..\\evil", "backslash"), ("link", "links are refused")],
)
def test_extract_refuses_traversal_absolute_and_link_paths(
    copy: Path, keys: dict[str, Any], built: Any, tmp_path: Path, path: str, reason: str
) -> None:
    """A crafted target manifest: verify reports the path, extract refuses, and nothing is written."""
    layout = Layout(copy)
    target = built.targets[0].target
    old = layout.target_digest(target)
    manifest = layout.json(old)
    layer = manifest["layers"][0]
    if path == "link":
        layer["annotations"]["org.cncf.model.file.metadata+json"] = json.dumps({"name": "x", "typeflag": 50})
    else:
        layer["annotations"][ANN_FILEPATH] = path
    layout.replace_entry(old, manifest)
    message = failures(copy, keys["verifying"])
    assert reason in message, message
    out = tmp_path / "out"
    with pytest.raises(VerificationError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        extract_target(copy, target, out, keys=[keys["verifying"]])
    assert not out.exists() and not (tmp_path / "evil").exists()


def test_the_writer_itself_refuses_bad_paths(built: Any, tmp_path: Path) -> None:
    """Even handed a manifest that skipped verification, the file writer re-checks every path."""
    view = read_bundle(built.output)
    entry = view.targets[0]
    layer = entry.layers[0]
    for i, bad in enumerate(("../escape", "/abs", "model.sig")):
        crafted = TargetEntry(
            name=entry.name, format=entry.format, precision=entry.precision, descriptor=entry.descriptor,
            config=entry.config,
            layers=(type(layer)(media_type=layer.media_type, digest=layer.digest, size=layer.size,
                                annotations={ANN_FILEPATH: bad}),),
        )
        out = tmp_path / f"out-{i}"
        out.mkdir()
        with pytest.raises(VerificationError):
            write_target_files(view, crafted, out, None)
        assert not (tmp_path / "escape").exists()
    for good in ("model.onnx", "sub/dir/file.bin"):
        assert check_relative_path(good, "t") == good


def test_a_blob_that_is_a_symlink_is_refused(copy: Path, keys: dict[str, Any], built: Any, tmp_path: Path) -> None:
    layout = Layout(copy)
    manifest = layout.json(layout.target_digest(built.targets[0].target))
    blob = layout.blob(manifest["layers"][0]["digest"])
    outside = tmp_path / "outside"
    shutil.copy(blob, outside)
    blob.unlink()
    blob.symlink_to(outside)
    assert "is a symbolic link; refused" in failures(copy, keys["verifying"])


# ------------------------------------------------------------------------------------------------ run/parity


def test_run_a_target_from_the_bundle(built: Any, keys: dict[str, Any], tmp_path: Path) -> None:
    target = next(t.target for t in built.targets if t.target.startswith("onnx"))
    args = ["--ids", "600,23,45,67", "--max-new-tokens", "4", "--json"]
    from_bundle = CliRunner().invoke(cli, ["run", str(built.output), "-t", target, "--key", str(keys["public"]), *args])
    assert from_bundle.exit_code == 0, from_bundle.output
    extracted = extract_target(built.output, target, tmp_path / "x", keys=[keys["verifying"]])
    from_dir = CliRunner().invoke(cli, ["run", str(extracted.out_dir), *args])
    assert json.loads(from_bundle.stdout)["generated_ids"] == json.loads(from_dir.stdout)["generated_ids"]
    assert json.loads(from_bundle.stdout)["verified"] is True
    assert json.loads(from_dir.stdout)["verified"] is False and "nothing was verified" in from_dir.stderr
    checked = CliRunner().invoke(cli, ["run", str(extracted.out_dir), "--key", str(keys["public"]), *args])
    assert checked.exit_code == 0 and json.loads(checked.stdout)["verified"] is True
    no_key = CliRunner().invoke(cli, ["run", str(built.output), "-t", target, *args])
    assert no_key.exit_code == 2 and "--key" in no_key.output


def test_parity_recheck_passes_without_the_checkpoint(built: Any, keys: dict[str, Any]) -> None:
    results = recheck_parity(built.output, keys=[keys["verifying"]])
    assert {r.target for r in results} == {t.target for t in built.targets}
    for r in results:
        assert r.ok and r.signature_verified
        assert r.status == r.signed_status, (r.target, r.reasons)
        assert r.report.runtime["reference"]["stored"] == "true"
    cli_result = CliRunner().invoke(
        cli, ["parity", str(built.output), "-t", built.targets[0].target, "--key", str(keys["public"]), "--json"]
    )
    assert cli_result.exit_code == 0, cli_result.output
    assert json.loads(cli_result.output)["ok"] is True


def test_parity_recheck_refuses_a_tampered_bundle(copy: Path, keys: dict[str, Any], built: Any) -> None:
    layout = Layout(copy)
    reference = layout.json(layout.entries("parity-reference")[0]["digest"])
    logits = next(layer for layer in reference["layers"] if layer["mediaType"].endswith(".npy"))
    flip_byte(layout.blob(logits["digest"]), offset=layout.blob(logits["digest"]).stat().st_size - 3)
    with pytest.raises(VerificationError, match="is corrupt"):
        recheck_parity(copy, targets=[built.targets[0].target], keys=[keys["verifying"]])
