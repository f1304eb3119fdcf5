"""A build's 4-bit codes fitted once: the on-disk cache behind QuantPlan.codes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from sovpack.quantize import QuantOptions, plan_quantization
from sovpack.quantize.cache import CodesCache
from sovpack.quantize.groups import GroupCodes, quantize_rtn
from sovpack.source.model import open_model


def _group_of_32(bits: int, cols: int) -> int | None:
    return 32 if cols % 32 == 0 else None


@pytest.mark.parametrize("float_zero", [False, True])
def test_codes_round_trip_exactly(tmp_path: Path, float_zero: bool) -> None:
    rng = np.random.default_rng(0)
    codes = quantize_rtn(rng.standard_normal((24, 96)).astype(np.float32), bits=4, group_size=32, symmetric=False)
    if float_zero:
        codes = GroupCodes(codes=codes.codes, scale=codes.scale, zero=codes.zero.astype(np.float32) + 0.25, bits=4,
                           symmetric=False)
    cache = CodesCache(tmp_path / "codes")
    assert cache.get(("w", 1)) is None
    cache.put(("w", 1), codes)
    kept = cache.get(("w", 1))
    assert kept is not None and cache.get(("w", 2)) is None
    for field in ("codes", "scale", "zero"):
        np.testing.assert_array_equal(getattr(kept, field), getattr(codes, field))
        assert getattr(kept, field).dtype == getattr(codes, field).dtype
    assert (kept.bits, kept.symmetric) == (4, False)
    assert [p.name for p in (tmp_path / "codes").iterdir() if p.name.endswith(".tmp.npz")] == []


def test_second_plan_with_the_same_recipe_reads_no_weight(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """Two plans of one opened model with a scratch directory (a build's onnx:int4 and openvino:int4): the
    second gets the first's codes without loading the weight; another recipe (float32 scales) fits its own."""
    model = open_model(checkpoints["llama3"])
    model.scratch = tmp_path
    options = QuantOptions(method="weighted")
    first = plan_quantization(model, options, _group_of_32, integer_zero=False)
    second = plan_quantization(model, options, _group_of_32, integer_zero=False)
    other = plan_quantization(model, options, _group_of_32, integer_zero=False, scale_dtype=np.float32)
    names = [name for name, tensor in first.tensors.items() if tensor.bits == 4]
    assert names
    loads: list[str] = []

    def loader(name: str) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            loads.append(name)
            return model.tensor(name, np.float32)
        return load

    for name in names:
        fitted = first.codes(name, loader(name))
        reused = second.codes(name, loader(name))
        np.testing.assert_array_equal(reused.dequantize(), fitted.dequantize())
        np.testing.assert_array_equal(fitted.dequantize(), first.quantize(name, model.tensor(name, np.float32))
                                      .dequantize())
        other.codes(name, loader(name))
    assert loads == [n for name in names for n in (name, name)]  # first and other load; second never
