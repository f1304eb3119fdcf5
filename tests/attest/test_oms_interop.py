"""OpenSSF model-signing interop, with the real ``model_signing`` CLI and an openssl-made key.

sovpack extract writes DIR/model.sig; ``model_signing verify key`` must accept DIR, and reject it once a file
changes, goes missing or appears. In the other direction, model_signing's own signature of the same directory
must describe exactly the files sovpack signed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.generate import make_checkpoint
from sovpack.attest import oms
from sovpack.attest.dsse import SigningKey, SigstoreBundle, VerifyingKey, verify_bundle_signature
from sovpack.bundle import build_bundle
from sovpack.bundle.config import BuildConfig
from sovpack.verify import extract_target, read_bundle

MODEL_SIGNING = Path(sys.executable).parent / "model_signing"
pytestmark = [
    pytest.mark.skipif(not MODEL_SIGNING.exists(), reason="model-signing is not installed in this environment"),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed"),
]
TARGET = "onnx:fp32"


def model_signing(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(MODEL_SIGNING), *args], capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("oms")
    subprocess.run(["openssl", "ecparam", "-genkey", "-name", "prime256v1", "-out", "key.pem"], cwd=root, check=True,
                   capture_output=True)
    subprocess.run(["openssl", "ec", "-in", "key.pem", "-pubout", "-out", "pub.pem"], cwd=root, check=True,
                   capture_output=True)
    checkpoint = make_checkpoint("llama3", root / "llama3")
    bundle = root / "bundle"
    build_bundle(
        BuildConfig(checkpoint=checkpoint, output=bundle, targets=(TARGET,)), key=SigningKey.load(root / "key.pem")
    )
    return {"root": root, "bundle": bundle, "public": root / "pub.pem", "private": root / "key.pem"}


@pytest.fixture
def extracted(setup: dict[str, Path], tmp_path: Path) -> Path:
    out = tmp_path / "model"
    extract_target(setup["bundle"], TARGET, out, keys=[VerifyingKey.load(setup["public"])])
    return out


def verify_dir(directory: Path, public: Path) -> subprocess.CompletedProcess[str]:
    return model_signing("verify", "key", "--signature", str(directory / "model.sig"), "--public_key", str(public),
                         str(directory))


def test_model_signing_cli_accepts_an_extracted_target(extracted: Path, setup: dict[str, Path]) -> None:
    result = verify_dir(extracted, setup["public"])
    assert result.returncode == 0, result.stderr
    assert "Verification succeeded" in result.stdout


@pytest.mark.parametrize("change", ["edit", "remove", "add"])
def test_model_signing_cli_rejects_a_changed_directory(extracted: Path, setup: dict[str, Path], change: str) -> None:
    if change == "edit":
        weights = extracted / "model.onnx.data"
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 1
        weights.write_bytes(bytes(data))
    elif change == "remove":
        (extracted / "tokenizer.json").unlink()
    else:
        (extracted / "extra.txt").write_text("not signed")
    result = verify_dir(extracted, setup["public"])
    assert result.returncode != 0
    assert "Verification failed" in result.stderr


def test_model_signing_cli_rejects_another_key(extracted: Path, setup: dict[str, Path], tmp_path: Path) -> None:
    subprocess.run(["openssl", "ecparam", "-genkey", "-name", "prime256v1", "-out", "other.pem"], cwd=tmp_path,
                   check=True, capture_output=True)
    subprocess.run(["openssl", "ec", "-in", "other.pem", "-pubout", "-out", "other.pub"], cwd=tmp_path, check=True,
                   capture_output=True)
    result = verify_dir(extracted, tmp_path / "other.pub")
    assert result.returncode != 0


def test_model_signing_signature_lists_the_same_files(extracted: Path, setup: dict[str, Path], tmp_path: Path) -> None:
    """model_signing's own signature of the extracted directory describes exactly what sovpack signed."""
    theirs_path = tmp_path / "theirs.sig"
    signed = model_signing("sign", "key", "--private_key", str(setup["private"]), "--signature", str(theirs_path),
                           "--ignore-paths", str(extracted / "model.sig"), str(extracted))
    assert signed.returncode == 0, signed.stderr
    public = VerifyingKey.load(setup["public"])
    theirs = verify_bundle_signature(SigstoreBundle.from_bytes(theirs_path.read_bytes()), [public]).statement
    ours = verify_bundle_signature(SigstoreBundle.from_bytes((extracted / "model.sig").read_bytes()), [public])
    their_files, our_files = oms.parse_statement(theirs), oms.parse_statement(ours.statement)
    assert dict(their_files.files) == dict(our_files.files)
    assert theirs.subjects[0].digest == ours.statement.subjects[0].digest  # same root digest over the same order
    target = read_bundle(setup["bundle"]).target(TARGET)
    assert dict(our_files.files) == {p: d.digest.split(":", 1)[1] for p, d in target.files.items()}
    assert json.loads((extracted / "model.sig").read_text())["verificationMaterial"]["publicKey"]["hint"] == (
        public.key_id
    )
