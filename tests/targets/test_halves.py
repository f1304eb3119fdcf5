"""The float16 cast every float16 writer shares: exact from bfloat16, NaN/Inf blamed on the source, overflow refused."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from sovpack.errors import ConversionError, SourceError
from sovpack.targets.halves import check_fits_float16, to_float16


def test_every_bfloat16_converts_as_through_float32() -> None:
    every = np.arange(1 << 16, dtype=np.uint16).view(ml_dtypes.bfloat16)
    wide = every.astype(np.float32)
    finite = np.isfinite(wide) & (np.abs(wide) <= 65504)
    direct = to_float16("w", every[finite], where="", advice="")
    assert np.array_equal(direct.view(np.uint16), wide[finite].astype(np.float16).view(np.uint16))


def test_values_beyond_float16_are_refused_with_the_writers_advice() -> None:
    block = np.array([[1.0, 7e4]], dtype=ml_dtypes.bfloat16)
    with pytest.raises(ConversionError, match=r"ckpt: tensor 'w' has values up to 70\d+, beyond the float16 range "
                                              r"\(65504\); use gguf:f32"):
        to_float16("w", block, where="ckpt", advice="use gguf:f32")
    with pytest.raises(ConversionError, match="beyond the float16 range"):
        check_fits_float16("w", np.array([-7e4, 1.0], dtype=np.float32), where="ckpt", advice="")
    check_fits_float16("w", np.array([-65504.0, 65504.0], dtype=np.float32), where="ckpt", advice="")


def test_nan_in_the_source_is_the_sources_error() -> None:
    def blame_source() -> None:
        raise SourceError("ckpt: tensor 'w' contains NaN or Inf values")

    block = np.array([1.0, np.nan], dtype=ml_dtypes.bfloat16)
    with pytest.raises(SourceError, match="NaN"):
        to_float16("w", block, where="ckpt", advice="", check_source=blame_source)
    # a model that allows non-finite values: its checker returns, and the NaN passes through
    assert np.isnan(to_float16("w", block, where="ckpt", advice="", check_source=lambda: None)[1])
