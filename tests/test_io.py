"""sovpack._io's work split over every core: the same answers as numpy's own calls, whatever the block count."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from sovpack import _io
from sovpack._io import parallel_all_finite, parallel_copyto


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_io, "COPY_BLOCK_BYTES", 4096)  # many blocks, so the split itself is exercised


def test_a_cast_split_by_rows_equals_numpys() -> None:
    source = np.random.default_rng(0).standard_normal((300, 77)).astype(ml_dtypes.bfloat16)
    out = np.empty(source.shape, dtype=np.float32)
    parallel_copyto(out, source)
    np.testing.assert_array_equal(out, source.astype(np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_value_in_any_block_is_found(bad: float) -> None:
    array = np.ones((500, 64), dtype=np.float32)
    assert parallel_all_finite(array)
    for row in (0, 250, 499):
        spoiled = array.copy()
        spoiled[row, 7] = bad
        assert not parallel_all_finite(spoiled)
    assert not parallel_all_finite(np.array(bad, dtype=np.float32))
