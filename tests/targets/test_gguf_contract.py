"""The gguf target's contract: its precision table and every precision written, refused families, errors, CLI."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from fixtures.generate import make_checkpoint
from sovpack.artifact import ArtifactMetadata
from sovpack.convert import convert
from sovpack.errors import ConversionError, MissingDependencyError
from sovpack.parity.thresholds import DEFAULT_THRESHOLDS, Thresholds
from sovpack.reference import ReferenceModel
from sovpack.source.model import SourceModel, open_model
from sovpack.targets import gguf as gguf_target
from sovpack.targets.base import TargetRef
from tests.targets.shared import fields, gguf_path

gguf = pytest.importorskip("gguf")
# Only check that llama_cpp is there: importing it here would load llama.cpp before the target sets its OpenMP
# wait policy (see sovpack.targets.gguf.runtime.import_llama_cpp), and busy-waiting threads crawl on a loaded machine.
if importlib.util.find_spec("llama_cpp") is None:
    pytest.skip("llama-cpp-python is not installed", allow_module_level=True)


# --------------------------------------------------------------------------------------------------------------
# the precision table, and the precisions beyond f32, f16 and q8_0


def test_precision_table_rows_are_consistent() -> None:
    target = gguf_target.GgufTarget()
    assert tuple(target.precisions) == ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "int4", "q5_k_m", "q6_k")
    assert target.default_precision == "f16"
    assert target.runtime_packages == ("gguf", "llama-cpp-python")
    for name, row in target.precisions.items():
        assert row.name == name
        assert isinstance(row.thresholds, Thresholds)
        assert row.thresholds == DEFAULT_THRESHOLDS[name]
        if row.quantized:
            assert row.weights.startswith("int"), row
        else:
            assert row.weights in ("float32", "float16", "bfloat16"), row
        assert TargetRef.parse(f"gguf:{name}").info == row
    assert {n for n, row in target.precisions.items() if row.quantized} == {"q8_0", "q4_0", "q4_k_m", "int4", "q5_k_m",
                                                                                   "q6_k"}


@pytest.fixture(scope="module")
def gemma256(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer Gemma whose matrices all have rows of 256 (K-quant super-blocks): nothing falls back."""
    root = tmp_path_factory.mktemp("gemma256")
    return make_checkpoint(
        "gemma", root / "gemma256", hidden_size=256, intermediate_size=256, head_dim=64, num_hidden_layers=1
    )


# The 4-bit precisions keep the plan's most sensitive tensors (up to 12.5% of the linear weights) at Q8_0;
# test_gguf_quant checks which.
K_TYPES = {"q4_k_m": {"Q4_K", "Q6_K", "Q8_0"}, "q5_k_m": {"Q5_K", "Q6_K"}, "q6_k": {"Q6_K"}}
OTHER_TYPES = {"q4_0": {"Q4_0", "Q8_0"}, "bf16": {"BF16"}}


@pytest.mark.slow
@pytest.mark.parametrize("precision", [*K_TYPES, *OTHER_TYPES])
def test_other_precisions(gemma256: Path, tmp_path: Path, precision: str) -> None:
    """llama.cpp's k-quant mixes and q4_0 (with sovpack's importance matrix) and gguf-py's bf16, judged by the
    default thresholds."""
    out = tmp_path / "out"
    result = convert(gemma256, f"gguf:{precision}", out)
    assert result.parity is not None and result.parity.status == "PASSED", result.parity.reasons
    meta = ArtifactMetadata.load(out).format_metadata
    weights = set(meta["tensor_types"]) - {"F32"}
    assert weights == {**K_TYPES, **OTHER_TYPES}[precision], "a weight fell back to another type"
    if precision in K_TYPES:
        assert meta["quantizer"].startswith("llama.cpp") and "importance matrix" in meta["quantizer"]
        main = {"q4_k_m": "Q4_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K"}[precision]
        assert meta["tensor_types"][main] >= 4  # the bulk of the weights, not just a few
    ftype = {
        "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
        "q5_k_m": gguf.LlamaFileType.MOSTLY_Q5_K_M,
        "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    }[precision]
    assert fields(out / f"gemma256-{precision}.gguf")["general.file_type"] == int(ftype)
    # The intermediate file and temporaries are gone.
    assert [p.name for p in out.iterdir() if p.name.startswith(".") or "intermediate" in p.name] == []


# --------------------------------------------------------------------------------------------------------------
# families, refusals and errors


def test_a_family_outside_families_is_refused_by_name(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    target = gguf_target.GgufTarget()
    assert target.families == {
        *("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma"),
        *("granite", "olmo2", "smollm3", "gemma2", "gemma3"),
        *("qwen3_moe", "mixtral", "gpt_oss"),  # tests/targets/test_gguf_moe.py
        *("bert", "xlm_roberta", "modernbert"),  # tests/targets/test_gguf_encoder.py
    }
    model = open_model(checkpoints["llama3"])
    falcon = dataclasses.replace(model, spec=dataclasses.replace(model.spec, family="falcon"))
    with pytest.raises(ConversionError, match="'falcon'"):
        TargetRef.parse("gguf:f16").check_family(falcon.spec)
    with pytest.raises(ConversionError, match="'falcon'"):
        convert(falcon, "gguf:f16", tmp_path / "out", parity=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConversionError, match="'falcon'"):
        target.write(falcon, "f16", tmp_path, lambda *_: None)
    with pytest.raises(ConversionError, match="'falcon'"):  # no silent fallback to another family's limits
        gguf_target.parity_limits(falcon.spec, "f32")


def test_unsupported_pre_tokenizer_is_a_conversion_error(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    ckpt = tmp_path / "odd-tokenizer"
    shutil.copytree(checkpoints["llama3"], ckpt)
    path = ckpt / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+|\s+"
    path.write_text(json.dumps(data), encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=r"llama\.cpp cannot express this tokenizer"):
        convert(ckpt, "gguf:f16", out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != "odd-tokenizer"] == []


def test_failed_write_leaves_nothing(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tensor that cannot be read half-way through: the temporary file is removed, nothing is renamed."""
    model = open_model(checkpoints["llama2"])
    original = SourceModel.stored

    def failing(self: SourceModel, name: str) -> np.ndarray:
        if name == "layers.1.down":
            raise ConversionError("simulated read failure")
        return original(self, name)

    monkeypatch.setattr(SourceModel, "stored", failing)
    with pytest.raises(ConversionError, match="simulated"):
        gguf_target.GgufTarget().write(model, "q8_0", tmp_path, lambda *_: None)
    assert [p.name for p in tmp_path.iterdir() if p.suffix in (".gguf", ".tmp")] == []


def test_missing_packages_name_their_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(MissingDependencyError, match=r"sovpack\[llama\]"):
        gguf_target.import_llama_cpp()
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(MissingDependencyError, match=r"sovpack\[gguf\]"):
        gguf_target.import_gguf()


# --------------------------------------------------------------------------------------------------------------
# the source's license, and the CLI


def test_license_from_readme(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    ckpt = tmp_path / "licensed"
    shutil.copytree(checkpoints["qwen3"], ckpt)
    (ckpt / "README.md").write_text("---\nlicense: apache-2.0\ntags: [test]\n---\n# A model\n", encoding="utf-8")
    result = convert(ckpt, "gguf:f16", tmp_path / "out", parity=False)
    assert fields(gguf_path(result))["general.license"] == "apache-2.0"
    no_license = fields(gguf_path(convert(checkpoints["qwen3"], "gguf:f16", tmp_path / "plain", parity=False)))
    assert "general.license" not in no_license


def test_cli_convert_run_inspect(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from sovpack.cli import cli

    out = tmp_path / "cli-gguf"
    args = ["convert", str(checkpoints["qwen3"]), "-t", "gguf:q8_0", "-o", str(out), "--json"]
    result = CliRunner().invoke(cli, args)  # at the default limits
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["target"] == "gguf:q8_0" and summary["parity"] == "PASSED"
    assert {"qwen3-q8_0.gguf", "tokenizer.json"} <= set(summary["files"])
    assert (out / "parity.json").is_file()

    ran = CliRunner().invoke(cli, ["run", str(out), "--prompt", "Hello world", "--max-new-tokens", "5", "--json"])
    assert ran.exit_code == 0, ran.output
    info = json.loads(ran.stdout)
    assert info["runtime"] == "llama.cpp" and isinstance(info["text"], str)
    model = open_model(checkpoints["qwen3"])
    assert info["generated_ids"] == ReferenceModel(model).greedy(info["prompt_ids"], 5, model.spec.eos_token_ids)

    shown = CliRunner().invoke(cli, ["inspect", str(out), "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["kind"] == "artifact"
