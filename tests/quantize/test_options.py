"""The default 4-bit group follows the model's size, the same for ONNX and OpenVINO; an explicit one always wins."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sovpack.convert import convert
from sovpack.errors import UsageError
from sovpack.quantize import options as quant_options
from sovpack.quantize.options import (
    LARGE_MODEL_GROUP_SIZE,
    LARGE_MODEL_PARAMETERS,
    SMALL_MODEL_GROUP_SIZE,
    QuantOptions,
    default_group_size,
)
from sovpack.source.model import open_model


def test_default_group_by_model_size() -> None:
    assert SMALL_MODEL_GROUP_SIZE == 32 and LARGE_MODEL_GROUP_SIZE == 128
    # SmolLM2-135M, a 3.8B Phi-3-mini, just under the line, the line, Llama-3-8B's 8.03B.
    sizes = (134_515_008, 3_821_079_552, LARGE_MODEL_PARAMETERS - 1, LARGE_MODEL_PARAMETERS, 8_030_261_248)
    assert [default_group_size(n) for n in sizes] == [32, 32, 32, 128, 128]
    assert [QuantOptions().group_size_for(n) for n in sizes] == [32, 32, 32, 128, 128]
    for asked in (16, 64, 256):
        assert {QuantOptions(group_size=asked).group_size_for(n) for n in sizes} == {asked}


def test_group_size_must_be_a_power_of_two() -> None:
    with pytest.raises(UsageError, match="power of two"):
        QuantOptions(group_size=96)


def _quantization(checkpoint: Path, target: str, out: Path) -> dict[str, Any]:
    convert(checkpoint, target, out, parity=False, quant=QuantOptions(method="rtn"))
    meta = json.loads((out / "sovpack-artifact.json").read_text())
    return dict(meta["format_metadata"]["quantization"])


def test_a_large_model_gets_groups_of_128_in_both_formats(checkpoints: dict[str, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The fixture made "large" by lowering the line: q/k/v/o/gate/up (input 64) take 64, down (input 128) 128,
    in both formats, so a build of both shares its codes; above the line the small default returns."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    llama3 = checkpoints["llama3"]
    parameters = open_model(llama3).spec.parameter_count()
    small_onnx = _quantization(llama3, "onnx:int4", tmp_path / "onnx-small")
    small_ov = _quantization(llama3, "openvino:int4", tmp_path / "ov-small")
    assert small_onnx["block_size"] == SMALL_MODEL_GROUP_SIZE
    assert small_onnx["plan"]["int4_group_sizes"] == small_ov["int4_group_sizes"] == [32]

    monkeypatch.setattr(quant_options, "LARGE_MODEL_PARAMETERS", parameters)
    large_onnx = _quantization(llama3, "onnx:int4", tmp_path / "onnx-large")
    large_ov = _quantization(llama3, "openvino:int4", tmp_path / "ov-large")
    assert large_onnx["block_size"] == LARGE_MODEL_GROUP_SIZE
    assert large_onnx["plan"]["int4_group_sizes"] == large_ov["int4_group_sizes"] == [64, 128]
    assert large_onnx["plan"]["options"]["group_size"] is None  # the options stay as asked; the sizes say what ran
