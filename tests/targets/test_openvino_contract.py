"""The openvino target's contract: registration, precision table, refusals, reproducible files and the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fixtures.generate import make_checkpoint
from sovpack.cli import cli
from sovpack.convert import convert
from sovpack.errors import ConversionError, MissingDependencyError
from sovpack.parity import Thresholds, thresholds_for
from sovpack.parity.prompts import encode_prompts
from sovpack.reference import ReferenceModel
from sovpack.source.model import open_model
from sovpack.targets import TARGETS, TargetRef, load_targets
from tests.targets.test_openvino import FAMILIES

ov = pytest.importorskip("openvino")
pytest.importorskip("openvino_genai")
pytest.importorskip("openvino_tokenizers")

from sovpack.targets.openvino import PRECISIONS, OpenvinoRunner, OpenvinoTarget  # noqa: E402
from sovpack.targets.openvino.weights import SCHEMES  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------- registration


def test_import_is_light_and_target_is_registered() -> None:
    code = (
        "import sys, sovpack.targets.openvino\n"
        "heavy = [n for n in ('openvino', 'openvino_genai', 'openvino_tokenizers', 'nncf', 'torch', "
        "'transformers') if n in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from sovpack.targets import TARGETS\n"
        "t = TARGETS.get('openvino')\n"
        "assert tuple(t.precisions) == ('fp32', 'fp16', 'int8', 'int8_sym', 'int4', 'int4_sym'), t.precisions\n"
        "assert t.default_precision == 'fp16'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    load_targets()
    assert tuple(TARGETS.get("openvino").precisions) == PRECISIONS


def test_missing_openvino_names_the_extra(ckpts: dict[str, Path], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # what an uninstalled package looks like to import
    with pytest.raises(MissingDependencyError, match=r"'openvino'.*sovpack\[openvino\]"):
        OpenvinoRunner(tmp_path)
    with pytest.raises(MissingDependencyError, match=r"sovpack\[openvino\]"):
        OpenvinoTarget().write(open_model(ckpts["llama3"]), "fp16", tmp_path, lambda *_: None)


def test_precision_table_rows_are_consistent() -> None:
    load_targets()
    target = TARGETS.get("openvino")
    assert target.default_precision == "fp16" and target.default_precision in target.precisions
    assert set(target.precisions) == set(SCHEMES)  # one weight scheme per row
    for name, row in target.precisions.items():
        assert row.name == name and row.aliases == ()
        assert isinstance(row.thresholds, Thresholds) and row.thresholds == thresholds_for(name)
        assert row.quantized == name.startswith("int")
        if row.quantized:
            assert row.weights.startswith("int") and row.weights == name.split("_")[0]
        else:
            assert row.weights == {"fp32": "float32", "fp16": "float16"}[name]
    assert target.runtime_packages == ("openvino", "openvino-tokenizers", "openvino-genai", "nncf")


def test_family_outside_families_is_refused_by_name(ckpts: dict[str, Path], tmp_path: Path) -> None:
    load_targets()
    target = TARGETS.get("openvino")
    moe = {"qwen3_moe", "mixtral", "gpt_oss"}  # issue 14: tests/targets/test_openvino_moe.py
    encoders = {"bert", "xlm_roberta", "modernbert"}  # issue 15: tests/targets/test_openvino_encoder.py
    assert target.families == {open_model(ckpts[v]).spec.family for v in FAMILIES} | moe | encoders
    model = open_model(ckpts["llama3"])
    alien = dataclasses.replace(model, spec=dataclasses.replace(model.spec, family="falcon"))
    with pytest.raises(ConversionError, match=r"'openvino' cannot write model family 'falcon'"):
        TargetRef.parse("openvino:fp16").check_family(alien.spec)
    with pytest.raises(ConversionError, match=r"model family 'falcon'"):
        OpenvinoTarget().write(alien, "fp16", tmp_path, lambda *_: None)
    assert list(tmp_path.iterdir()) == []  # refused before writing anything


# -------------------------------------------------------------------------------------- reproducible files


def _generated_names(xml: Path) -> list[str]:
    """Node and tensor names in a saved IR that OpenVINO made up from its process-wide counter."""
    import re

    text = xml.read_text(encoding="utf-8")
    found = re.findall(r'<layer id="\d+" name="([^"]*)"', text)
    found += [n for names in re.findall(r' names="([^"]*)"', text) for n in names.split(",")]
    return [n for n in found if re.fullmatch(r"[A-Z][A-Za-z0-9]*_[0-9]+(?:\.[0-9]+)*", n)]


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_same_checkpoint_gives_byte_identical_files_within_one_process(ckpts: dict[str, Path], tmp_path: Path,
                                                                      precision: str) -> None:
    """OpenVINO numbers unnamed nodes from a process-wide counter; every node must have a name of its own.

    Converting the same checkpoint again in the same process (other conversions have run before it in this
    module), and once more after another family, must write the very same bytes: bundles are content-addressed.
    """
    target = f"openvino:{precision}"
    runs = [convert(ckpts["llama3"], target, tmp_path / "first", parity=False).out_dir,
            convert(ckpts["llama3"], target, tmp_path / "second", parity=False).out_dir]
    convert(ckpts["qwen2"], target, tmp_path / "other", parity=False)
    runs.append(convert(ckpts["llama3"], target, tmp_path / "third", parity=False).out_dir)
    names = sorted(p.name for p in runs[0].iterdir())
    assert {"openvino_model.xml", "openvino_tokenizer.xml", "openvino_detokenizer.xml"} <= set(names)
    for run in runs[1:]:
        assert sorted(p.name for p in run.iterdir()) == names
        differ = [n for n in names if (run / n).read_bytes() != (runs[0] / n).read_bytes()]
        assert differ == [], f"{run.name}: {differ}"
    for xml in ("openvino_model.xml", "openvino_tokenizer.xml", "openvino_detokenizer.xml"):
        assert _generated_names(runs[0] / xml) == [], xml
    # the decoder's nodes are named after their block and role, and no two share a name
    model = ov.Core().read_model(runs[0] / "openvino_model.xml")
    friendly = [op.get_friendly_name() for op in model.get_ordered_ops()]
    assert len(set(friendly)) == len(friendly)
    assert {"layers.0.q/matmul", "layers.1.attention", "lm_head/matmul", "logits"} <= set(friendly)
    assert any(name.startswith("layers.0.attn/Reshape_") for name in friendly)


# --------------------------------------------------------------------- what a conversion refuses and needs


def test_unsupported_tokenizer_component_is_refused(ckpts: dict[str, Path], tmp_path: Path) -> None:
    from sovpack.targets.openvino.tokenizer import convert_tokenizer

    data = json.loads((ckpts["llama3"] / "tokenizer.json").read_text())
    data["pre_tokenizer"]["pretokenizers"].append({"type": "UnicodeScripts"})
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConversionError, match="pre-tokenizer 'UnicodeScripts'"):
        convert_tokenizer(path, {}, chat_template=None, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def test_conversion_needs_neither_transformers_nor_torch(ckpts: dict[str, Path], tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "for name in ('transformers', 'torch', 'nncf'):\n"
        "    sys.modules[name] = None  # importing any of them now fails\n"
        "from sovpack.convert import convert\n"
        f"r = convert({str(ckpts['qwen3'])!r}, 'openvino:int8', {str(tmp_path / 'out')!r})\n"
        "assert r.parity.status == 'PASSED', r.parity.reasons\n"
        "assert r.parity.tokenizer.matched == r.parity.tokenizer.total\n"
        "assert [n for n in ('transformers', 'torch', 'nncf') if sys.modules.get(n) is not None] == []\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]


# ------------------------------------------------------------------------------------------- errors, CLI


def test_fp16_overflow_is_a_conversion_error(tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    ckpt = make_checkpoint("llama3", tmp_path / "ckpt")
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] *= np.float32(1e6)
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"'layers\.1\.up'.*float16"):
        convert(ckpt, "openvino:fp16", tmp_path / "out", parity=False)
    assert not (tmp_path / "out").exists()
    assert convert(ckpt, "openvino:int8", tmp_path / "int8", parity=False).parity is None  # ints are fine


def test_cli_convert_run_inspect(ckpts: dict[str, Path], tmp_path: Path,
                                 references: Callable[[str], ReferenceModel]) -> None:
    out = tmp_path / "ov-fp16"
    runner = CliRunner()
    result = runner.invoke(cli, ["convert", str(ckpts["phi3"]), "-t", "openvino:fp16", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["parity"] == "PASSED"
    assert json.loads((out / "parity.json").read_text())["status"] == "PASSED"
    ids = encode_prompts(ckpts["phi3"] / "tokenizer.json")[0]
    result = runner.invoke(cli, ["run", str(out), "--ids", ",".join(map(str, ids)), "--max-new-tokens", "6",
                                 "--json"])
    assert result.exit_code == 0, result.output
    ran = json.loads(result.stdout)
    ref = references("phi3")
    assert ran["runtime"] == "openvino"
    assert ran["generated_ids"] == ref.greedy(ids, 6, ref.spec.eos_token_ids)
    result = runner.invoke(cli, ["inspect", str(out), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["format"] == "openvino" and info["precision"] == "fp16" and info["parity"]["status"] == "PASSED"
    assert info["format_metadata"]["openvino_version"] == ov.get_version()
    # a moved artifact directory still opens (the IR references its .bin relative to the .xml)
    moved = tmp_path / "moved"
    shutil.move(out, moved)
    runner_ = OpenvinoRunner(moved)
    assert math.isfinite(float(runner_.prefill_logits(ids).max()))
