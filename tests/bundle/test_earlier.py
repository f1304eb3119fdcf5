"""``build --reference-from`` and ``--reuse-from``: a build that takes its parity reference (and unchanged
targets) from a signed earlier bundle, verified first (issue 18)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from fixtures.generate import make_checkpoint
from sovpack.attest.dsse import SigningKey, VerifyingKey, generate_key_pair
from sovpack.bundle import BuildConfig, BundleMetadata
from sovpack.bundle.assemble import assemble_bundle
from sovpack.bundle.publish import publish_build
from sovpack.cli import cli
from sovpack.errors import VerificationError
from sovpack.parity.recorded import RecordedReference
from sovpack.verify import read_bundle, verify_bundle

METADATA = BundleMetadata(name="tiny")


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return generate_key_pair(tmp_path_factory.mktemp("earlier-key") / "k")


@pytest.fixture(scope="module")
def earlier(tmp_path_factory: pytest.TempPathFactory, checkpoints: dict[str, Path], key: Any) -> Path:
    out = tmp_path_factory.mktemp("earlier") / "1.0"
    config = BuildConfig(checkpoint=checkpoints["llama3"], output=out, tag="1.0", targets=("onnx:fp32", "gguf:f16"),
                         metadata=METADATA)
    publish_build(config, key=SigningKey.load(key.private_key))
    return out


def _build(checkpoint: Path, out: Path, key: Any, targets: tuple[str, ...], **kwargs: Any) -> Any:
    config = BuildConfig(checkpoint=checkpoint, output=out, tag=out.name, targets=targets, metadata=METADATA,
                         **kwargs.pop("config", {}))
    return publish_build(config, key=SigningKey.load(key.private_key), **kwargs).build


def _reference_digest(bundle: Path) -> str:
    view = read_bundle(bundle)
    assert view.reference is not None
    return view.reference.descriptor.digest


def test_parts_from_machines_whose_references_differ_assemble_when_one_is_shared(
    earlier: Path, checkpoints: dict[str, Path], key: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another CPU's BLAS rounds the numpy reference differently: its own reference makes a part that does not
    assemble; judged against the first part's stored reference (--reference-from) it does."""
    original = RecordedReference.__init__

    def other_rounding(self: RecordedReference, config: Any, logits: Any, *, stored: bool) -> None:
        if not stored:
            logits = {i: np.nextafter(a, np.float32(np.inf)).astype(np.float32) for i, a in logits.items()}
        original(self, config, logits, stored=stored)

    monkeypatch.setattr(RecordedReference, "__init__", other_rounding)
    own = _build(checkpoints["llama3"], tmp_path / "own", key, ("gguf:f32",))
    assert _reference_digest(own.output) != _reference_digest(earlier)
    with pytest.raises(VerificationError, match="not the same parity reference as part"):
        assemble_bundle(tmp_path / "never", [earlier, own.output], key=SigningKey.load(key.private_key))
    shared = _build(checkpoints["llama3"], tmp_path / "shared", key, ("gguf:f32",), earlier=earlier)
    assert shared.reference_from == str(earlier)
    assert _reference_digest(shared.output) == _reference_digest(earlier)
    result = assemble_bundle(tmp_path / "release", [earlier, shared.output], key=SigningKey.load(key.private_key),
                             tag="1.0")
    report = verify_bundle(tmp_path / "release", keys=[VerifyingKey.load(key.public_key)])
    assert report.ok, report.failures
    assert result.targets == ("onnx:fp32", "gguf:f16", "gguf:f32")


def test_reference_from_a_bundle_of_other_prompts_is_refused(earlier: Path, checkpoints: dict[str, Path],
                                                             key: Any, tmp_path: Path) -> None:
    with pytest.raises(VerificationError, match=re.escape(f"{earlier}: its parity prompts differ")):
        _build(checkpoints["llama3"], tmp_path / "x", key, ("gguf:f32",), earlier=earlier,
               config={"prompts": ("Other prompts",)})
    assert not (tmp_path / "x").exists()


def test_reference_from_an_unverifiable_bundle_is_refused(earlier: Path, checkpoints: dict[str, Path],
                                                          tmp_path: Path) -> None:
    stranger = generate_key_pair(tmp_path / "stranger")
    with pytest.raises(VerificationError, match=re.escape(f"--reference-from {earlier}: does not verify")):
        _build(checkpoints["llama3"], tmp_path / "x", stranger, ("gguf:f32",), earlier=earlier)


def test_reuse_carries_unchanged_targets_over_and_rebuilds_the_rest(
    earlier: Path, checkpoints: dict[str, Path], key: Any, tmp_path: Path
) -> None:
    """onnx:fp32 unchanged (reused), gguf:f16 with a new threshold override (rebuilt), gguf:f32 new (built)."""
    override = {"gguf:f16": {"mean_kl": 0.0005}}  # stricter than the default: verify accepts it
    result = _build(checkpoints["llama3"], tmp_path / "1.1", key, ("onnx:fp32", "gguf:f16", "gguf:f32"),
                    earlier=earlier, reuse=True, config={"target_thresholds": override})
    by_target = {t.target: t for t in result.targets}
    assert by_target["onnx:fp32"].reused_from == str(earlier)
    assert by_target["gguf:f16"].reused_from is None and by_target["gguf:f32"].reused_from is None
    before = read_bundle(earlier)
    assert by_target["onnx:fp32"].manifest_digest == before.target("onnx:fp32").descriptor.digest
    report = verify_bundle(tmp_path / "1.1", keys=[VerifyingKey.load(key.public_key)])
    assert report.ok, report.failures
    assert report.release is not None
    origins = {t.target: t.part.tag if t.part else None for t in report.release.targets}
    assert origins == {"onnx:fp32": "1.0", "gguf:f16": None, "gguf:f32": None}


def test_reuse_from_a_bundle_of_another_checkpoint_rebuilds_everything(
    earlier: Path, key: Any, tmp_path: Path
) -> None:
    revised = make_checkpoint("llama3", tmp_path / "ckpt")
    (revised / "chat_template.jinja").write_text("{{ 'REVISED' }}{% for m in messages %}{{ m.content }}{% endfor %}")
    result = _build(revised, tmp_path / "2.0", key, ("onnx:fp32",), earlier=earlier, reuse=True)
    assert result.reference_from is None and all(t.reused_from is None for t in result.targets)
    assert verify_bundle(tmp_path / "2.0", keys=[VerifyingKey.load(key.public_key)]).ok


def test_build_command_reuse_and_exclusive_options(earlier: Path, checkpoints: dict[str, Path], key: Any,
                                                   tmp_path: Path) -> None:
    copy = tmp_path / "earlier-copy"
    shutil.copytree(earlier, copy)
    out = tmp_path / "1.0.1"
    args = ["build", str(checkpoints["llama3"]), "-o", str(out), "--tag", "1.0.1", "--name", "tiny",
            "-t", "onnx:fp32", "-t", "gguf:f16", "--key", str(key.private_key), "--reuse-from", str(copy), "--json",
            "-q"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["reference_from"] == str(copy)
    assert [t["reused_from"] for t in summary["targets"]] == [str(copy), str(copy)]
    both = CliRunner().invoke(cli, [*args[:-2], "--reference-from", str(copy)])
    assert both.exit_code == 2 and "exclusive" in both.output
