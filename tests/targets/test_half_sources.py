"""float16 artifacts written straight from a bfloat16 checkpoint (no float32 copy): the same bytes as through
float32, and the same errors for NaN/Inf in the checkpoint and for values beyond float16's range."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from sovpack.convert import convert
from sovpack.errors import ConversionError, SourceError
from sovpack.source.model import SourceModel, open_model

HALF_TARGETS = ("onnx:fp16", "gguf:f16", "openvino:fp16")
TENSOR = "model.layers.0.self_attn.q_proj.weight"


def test_every_bfloat16_value_converts_to_float16_as_through_float32() -> None:
    values = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(ml_dtypes.bfloat16)
    with np.errstate(all="ignore"):
        direct, wide = values.astype(np.float16), values.astype(np.float32).astype(np.float16)
    same = (direct.view(np.uint16) == wide.view(np.uint16)) | (np.isnan(direct) & np.isnan(wide))
    assert same.all()


@pytest.mark.parametrize("target", HALF_TARGETS)
def test_direct_cast_writes_the_bytes_of_the_float32_path(checkpoints: dict[str, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    checkpoint = checkpoints["llama2"]  # bfloat16, two shards
    assert open_model(checkpoint).stores_half("layers.0.q")
    direct = convert(checkpoint, target, tmp_path / "direct", parity=False).out_dir
    monkeypatch.setattr(SourceModel, "stores_half", lambda self, name: False)
    wide = convert(checkpoint, target, tmp_path / "wide", parity=False).out_dir
    files = sorted(p.name for p in direct.iterdir())
    assert files == sorted(p.name for p in wide.iterdir())
    for name in files:
        assert (direct / name).read_bytes() == (wide / name).read_bytes(), name


def _poisoned(source: Path, out: Path, value: float) -> Path:
    """A copy of a bfloat16 checkpoint whose layer-0 q projection holds ``value`` once."""
    shutil.copytree(source, out)
    for path in sorted(out.glob("*.safetensors")):
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        if TENSOR in header:
            begin = 8 + n + header[TENSOR]["data_offsets"][0]
            patch = np.array([value], dtype=np.float32).astype(ml_dtypes.bfloat16).tobytes()
            path.write_bytes(raw[:begin] + patch + raw[begin + 2 :])
            return out
    raise AssertionError(f"{TENSOR} not found")


@pytest.mark.parametrize("target", HALF_TARGETS)
def test_nan_and_overflow_in_a_bfloat16_source(checkpoints: dict[str, Path], tmp_path: Path, target: str) -> None:
    nan = _poisoned(checkpoints["llama2"], tmp_path / "nan", float("nan"))
    with pytest.raises(SourceError, match="contains NaN or Inf values"):
        convert(nan, target, tmp_path / "out-nan", parity=False)
    big = _poisoned(checkpoints["llama2"], tmp_path / "big", 7e4)  # finite in bfloat16, beyond float16
    with pytest.raises(ConversionError, match="float16"):
        convert(big, target, tmp_path / "out-big", parity=False)
    assert not (tmp_path / "out-nan").exists() and not (tmp_path / "out-big").exists()
