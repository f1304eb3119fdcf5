"""4-bit options in a build: the [quantization] tables of sovpack.toml, per-target tables, flags on top, and
what the bundle records (each artifact's metadata and the signed provenance)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sovpack.attest.dsse import SigningKey, SigstoreBundle, VerifyingKey, generate_key_pair
from sovpack.bundle import build_bundle
from sovpack.bundle.config import BuildConfig, load_build_config
from sovpack.errors import UsageError
from sovpack.oci.media import ANN_ATTESTATION, ANN_TARGET
from sovpack.quantize.groups import GroupCodes
from sovpack.quantize.options import QuantOptions
from sovpack.quantize.plan import QuantPlan
from sovpack.targets.base import TargetRef
from sovpack.verify import Policy
from sovpack.verify.extract import extract_target

CONFIG = """
targets = ["onnx:int4", "openvino:int4"]
tag = "v1"

[quantization]
method = "awq"
int8_share = 0.0
calibration = "domain.txt"

[quantization.targets."openvino:int4"]
method = "rtn"

[parity]
thresholds = { mean_kl = 0.6 }  # the tiny fixture's sharp logits (see tests/targets/test_*_quant.py)
"""


def test_config_tables_resolve_per_target_and_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "release" / "sovpack.toml"
    path.parent.mkdir()
    path.write_text(CONFIG)
    config = load_build_config(path)
    domain = path.parent / "domain.txt"
    assert config.quantization_for("onnx:int4") == QuantOptions(method="awq", int8_share=0.0, calibration=domain)
    assert config.quantization_for("openvino:int4") == QuantOptions(method="rtn", int8_share=0.0,
                                                                    calibration=domain)
    again = BuildConfig.from_dict(config.to_dict())
    assert again.quantization == config.quantization
    assert again.target_quantization == config.target_quantization
    assert load_build_config(_write(tmp_path, 'targets = ["onnx:int4"]')).quantization is None


@pytest.mark.parametrize(("text", "message"), [
    ('[quantization]\nmethod = "fast"', "invalid at quantization/method"),
    ('[quantization]\nint8_share = 2', "invalid at quantization/int8_share"),
    ('[quantization.targets."onnx:int4"]\nbits = 3', "invalid at quantization/targets/onnx:int4"),
    ('[quantization]\ngroup_size = 48', "group size must be a power of two"),
])
def test_bad_quantization_tables_are_usage_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        load_build_config(_write(tmp_path, text))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sovpack.toml"
    path.write_text(text)
    return path


def test_build_applies_the_tables_and_flags_and_signs_what_it_used(checkpoints: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    pair = generate_key_pair(tmp_path / "keys")
    config = _write(tmp_path, CONFIG)
    (tmp_path / "domain.txt").write_text("Calibration text of this release's domain. " * 40)
    out = tmp_path / "bundle"
    args = [sys.executable, "-m", "sovpack", "build", str(checkpoints["llama3"]), "--config", str(config),
            "-o", str(out), "--key", str(pair.private_key), "--group-size", "16", "--json", "-q"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr
    keys = [VerifyingKey.load(pair.public_key)]
    policy = Policy(parity_limits={"int4": {"mean_kl": 0.6}})
    expected = {"onnx:int4": "awq", "openvino:int4": "rtn"}
    for target, method in expected.items():
        extracted = extract_target(out, target, tmp_path / target.replace(":", "-"), keys=keys, policy=policy)
        meta = json.loads((extracted.out_dir / "sovpack-artifact.json").read_text())["format_metadata"]
        plan = meta["quantization"].get("plan", meta["quantization"])  # onnx nests the plan
        assert plan["method"] == method
        assert plan["options"]["group_size"] == 16  # the flag wins over the file
        assert plan["options"]["calibration"] == "domain.txt" and plan["int8_tensors"] == []
        if method == "rtn":
            assert plan["calibration"] is None  # rtn reads no calibration text
        else:
            text_sha = plan["calibration"]["text_sha256"]
            assert text_sha == hashlib.sha256((tmp_path / "domain.txt").read_bytes()).hexdigest()
        provenance = _provenance(out, target)
        assert provenance["quantization"]["method"] == method
        assert provenance["quantization"]["group_size"] == 16


def _provenance(bundle: Path, target: str) -> dict[str, object]:
    """The signed SLSA externalParameters of one target's build."""
    index = json.loads((bundle / "index.json").read_text())
    blobs = bundle / "blobs" / "sha256"

    def load(digest: str) -> dict[str, object]:
        return json.loads((blobs / digest.split(":", 1)[1]).read_bytes())

    top = load(index["manifests"][0]["digest"])
    for entry in top["manifests"]:
        notes = entry.get("annotations", {})
        if notes.get(ANN_TARGET) == target and notes.get(ANN_ATTESTATION) == "provenance":
            raw = (blobs / load(entry["digest"])["layers"][0]["digest"].split(":", 1)[1]).read_bytes()
            predicate = json.loads(SigstoreBundle.from_bytes(raw).envelope.payload)["predicate"]
            return dict(predicate["buildDefinition"]["externalParameters"])
    raise AssertionError(f"no provenance attestation for {target}")


def test_onnx_and_openvino_int4_in_one_build_fit_each_tensor_once(checkpoints: dict[str, Path], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The two targets share one recipe (float zero points, float16-rounded scales, groups of 32): the second
    reads the first's 4-bit codes from the build's scratch directory (sovpack.quantize.cache), which is gone
    afterwards."""
    fitted: list[tuple[str, int]] = []
    original = QuantPlan.quantize

    def counting(self: QuantPlan, name: str, weight: np.ndarray) -> GroupCodes:
        fitted.append((name, self.tensors[name].bits))
        return original(self, name, weight)

    monkeypatch.setattr(QuantPlan, "quantize", counting)
    pair = generate_key_pair(tmp_path / "keys")
    config = BuildConfig(checkpoint=checkpoints["llama3"], output=tmp_path / "bundle",
                         targets=("onnx:int4", "openvino:int4"), tag="v1",
                         thresholds={"mean_kl": 0.6})
    result = build_bundle(config, key=SigningKey.load(pair.private_key))
    assert [t.parity for t in result.targets] == ["PASSED", "PASSED"]
    four = [name for name, bits in fitted if bits == 4]
    assert four and len(four) == len(set(four))  # each 4-bit tensor fitted once for both targets
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "keys"]  # the scratch codes are gone


def test_options_a_target_cannot_honour_are_refused_before_any_work(checkpoints: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    """A build-wide 4-bit group of 128 with a GGUF K-quant target (GGML's blocks are 32 wide) is refused before
    the reference or any other target runs, with the per-target table as the way out; nothing is written."""
    pair = generate_key_pair(tmp_path / "keys")
    stages: list[str] = []
    config = BuildConfig(checkpoint=checkpoints["llama3"], output=tmp_path / "bundle", tag="v1",
                         targets=("onnx:int4", "gguf:q4_k_m"), quantization=QuantOptions(group_size=128))
    with pytest.raises(UsageError, match="gguf: the 4-bit types use GGML's 32-wide blocks; group size 128"):
        build_bundle(config, key=SigningKey.load(pair.private_key),
                     progress=lambda what, done, _total: stages.append(what) if done == 0 else None)
    assert stages == [] and not (tmp_path / "bundle").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["keys"]  # no scratch directory either
    per_target = BuildConfig(checkpoint=checkpoints["llama3"], output=tmp_path / "bundle", tag="v1",
                             targets=("onnx:int4", "gguf:q4_k_m"),
                             target_quantization={"onnx:int4": QuantOptions(group_size=128)})
    for ref in ("onnx:int4", "gguf:q4_k_m"):  # the way the message points to: accepted up front
        TargetRef.parse(ref).check_quantization(per_target.quantization_for(ref))
