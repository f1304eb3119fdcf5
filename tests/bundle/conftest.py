"""Fixtures of the llama3 bundle tests (test_bundle*.py): one signed bundle with every format, built once per
session, and two SOURCE_DATE_EPOCH builds; modules that define a fixture of the same name use their own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fixtures.generate import make_checkpoint
from sovpack.attest.dsse import SigningKey, VerifyingKey, generate_key_pair
from tests.bundle.shared import BUILD_OPTIONS, available_targets, cli_build

SDE = "1700000000"  # 2023-11-14T22:13:20Z


@pytest.fixture(scope="session")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bundle")


@pytest.fixture(scope="session")
def checkpoint(work: Path) -> Path:
    return make_checkpoint("llama3", work / "llama3")


@pytest.fixture(scope="session")
def keys(work: Path) -> dict[str, Any]:
    pair = generate_key_pair(work / "keys")
    other = generate_key_pair(work / "other-keys")
    return {
        "private": pair.private_key,
        "public": pair.public_key,
        "signing": SigningKey.load(pair.private_key),
        "verifying": VerifyingKey.load(pair.public_key),
        "other_public": other.public_key,
        "other_verifying": VerifyingKey.load(other.public_key),
    }


@pytest.fixture(scope="session")
def built(work: Path, checkpoint: Path, keys: dict[str, Any]) -> Any:
    result = cli_build(checkpoint, work / "bundle", keys["private"], available_targets(), *BUILD_OPTIONS)
    print(f"\nbuilt {[t.target for t in result.targets]} in {result.seconds} s, {result.size} bytes")
    return result


@pytest.fixture(scope="session")
def sde_bundles(work: Path, checkpoint: Path, keys: dict[str, Any]) -> tuple[Path, Path]:
    """Two builds through the CLI and a sovpack.toml, with SOURCE_DATE_EPOCH set."""
    config = work / "release" / "sovpack.toml"
    config.parent.mkdir()
    config.write_text(
        f'checkpoint = "{checkpoint}"\n'
        'tag = "release"\n'
        'targets = ["onnx:fp32"]\n'
        "[signing]\n"
        f'key = "{keys["private"]}"\n'
        "[metadata]\n"
        'name = "tiny-llama3"\n'
        'license = "Apache-2.0"\n'
        "[parity.targets.\"onnx:fp32\"]\n"
        "max_abs = 0.01\n"
    )
    env = {**os.environ, "SOURCE_DATE_EPOCH": SDE}
    outs = []
    for name in ("sde-a", "sde-b"):
        out = work / name
        result = subprocess.run(
            [sys.executable, "-m", "sovpack", "build", "--config", str(config), "-o", str(out), "--json"],
            capture_output=True, text=True, env=env, timeout=600, check=False,
        )
        assert result.returncode == 0, result.stderr
        assert "onnx:fp32: convert + parity" in result.stderr  # stage progress on stderr
        assert json.loads(result.stdout)["tag"] == "release"
        outs.append(out)
    return outs[0], outs[1]


@pytest.fixture
def copy(built: Any, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(built.output, dst)
    return dst
