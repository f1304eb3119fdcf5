"""The CLI as a user meets it: real subprocesses for exit codes and stderr, CliRunner for output shapes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from sovpack import __version__
from sovpack.cli import cli
from sovpack.reference import ReferenceModel
from sovpack.source.model import open_model
from sovpack.source.tokenizer import SourceTokenizer


def sovpack(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sovpack", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_version_and_help() -> None:
    result = sovpack("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"sovpack, version {__version__}"
    help_text = sovpack("--help").stdout
    for command in ("inspect", "run", "convert", "targets"):
        assert command in help_text


def test_inspect_json(checkpoints: dict[str, Path]) -> None:
    result = CliRunner().invoke(cli, ["inspect", str(checkpoints["qwen3"]), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["kind"] == "checkpoint" and info["family"] == "qwen3"
    assert info["spec"]["qk_norm"] is True and info["spec"]["head_dim"] == 32
    assert info["parameters"] == open_model(checkpoints["qwen3"]).spec.parameter_count()
    assert {f["path"] for f in info["source_files"]} >= {"config.json", "model.safetensors", "tokenizer.json"}


def test_inspect_table(checkpoints: dict[str, Path]) -> None:
    result = CliRunner().invoke(cli, ["inspect", str(checkpoints["gemma"])])
    assert result.exit_code == 0 and "GemmaForCausalLM" in result.output and "sha256:" in result.output


def test_run_prompt_json_and_logits(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    path = checkpoints["llama3"]
    logits_file = tmp_path / "logits.npy"
    result = CliRunner().invoke(
        cli, ["run", str(path), "--prompt", "Hello world", "--max-new-tokens", "5", "--json",
              "--logits-out", str(logits_file)],
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    tokenizer = SourceTokenizer(path / "tokenizer.json")
    assert out["prompt_ids"] == tokenizer.encode("Hello world")
    reference = ReferenceModel(open_model(path))
    assert out["generated_ids"] == reference.greedy(out["prompt_ids"], 5, open_model(path).spec.eos_token_ids)
    assert out["text"] == tokenizer.decode(out["generated_ids"])
    logits = np.load(logits_file)
    assert logits.dtype == np.float32 and logits.shape == (len(out["prompt_ids"]), open_model(path).spec.vocab_size)
    np.testing.assert_array_equal(logits, reference.prefill_logits(out["prompt_ids"]))


def test_run_ids(checkpoints: dict[str, Path]) -> None:
    result = CliRunner().invoke(cli, ["run", str(checkpoints["phi3"]), "--ids", "1,5,9", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["prompt_ids"] == [1, 5, 9]


def test_bad_input_is_one_line_exit_1(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{nope")
    result = sovpack("inspect", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {tmp_path / 'config.json'}: malformed JSON")
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_usage_errors_exit_2(checkpoints: dict[str, Path]) -> None:
    assert sovpack("run", str(checkpoints["llama3"])).returncode == 2  # neither --prompt nor --ids
    bad_ids = sovpack("run", str(checkpoints["llama3"]), "--ids", "1,x")
    assert bad_ids.returncode == 2 and "--ids must be comma-separated integers" in bad_ids.stderr
    assert sovpack("frobnicate").returncode == 2


def test_convert_unknown_target_lists_known(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    result = sovpack("convert", str(checkpoints["llama3"]), "-t", "tflite:fp32", "-o", str(tmp_path / "out"))
    assert result.returncode == 2 and "unknown target format 'tflite'; known:" in result.stderr
    assert not (tmp_path / "out").exists()
