"""sovpack._io's work split over every core: the same answers as numpy's own calls, whatever the block count."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from sovpack import _io
from sovpack._io import all_finite, parallel_all_finite, parallel_copyto


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_io, "COPY_BLOCK_BYTES", 4096)  # many blocks, so the split itself is exercised
    monkeypatch.setattr(_io, "FINITE_PIECE", 1000)  # and many pieces of the half-float test


def test_a_cast_split_by_rows_equals_numpys() -> None:
    source = np.random.default_rng(0).standard_normal((300, 77)).astype(ml_dtypes.bfloat16)
    out = np.empty(source.shape, dtype=np.float32)
    parallel_copyto(out, source)
    np.testing.assert_array_equal(out, source.astype(np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_value_in_any_block_is_found(bad: float, dtype: type) -> None:
    array = np.ones((500, 64), dtype=dtype)
    assert parallel_all_finite(array)
    for row in (0, 250, 499):
        spoiled = array.copy()
        spoiled[row, 7] = bad
        assert not parallel_all_finite(spoiled)
    assert not parallel_all_finite(np.array(bad, dtype=dtype))


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_the_half_float_bit_test_agrees_with_isfinite_on_every_bit_pattern(dtype: type) -> None:
    every = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(dtype)  # each of the 65536 values once
    finite = np.isfinite(every.astype(np.float32))
    assert all(all_finite(every[i : i + 1]) == finite[i] for i in range(0, 2**16, 7))  # one value at a time
    assert all_finite(every[finite]) and not all_finite(every)
    assert all_finite(every[finite].reshape(-1, 2)[:, 1])  # a strided view is read as it is
    assert all_finite(np.empty((0, 3), dtype=dtype))
