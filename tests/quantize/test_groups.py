"""Group-wise integer codes: round-to-nearest, the calibrated range search (integer and float zero points) and GPTQ."""

from __future__ import annotations

import numpy as np
import pytest

from sovpack.errors import ConversionError
from sovpack.quantize.gptq import gptq_quantize
from sovpack.quantize.groups import fit_groups, quantize_rtn


def _weights(seed: int = 0, shape: tuple[int, int] = (48, 128)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32) * 0.02
    w[rng.integers(0, shape[0], 6), rng.integers(0, shape[1], 6)] *= 12  # a few outliers, as trained weights have
    return w


def _weighted_error(w: np.ndarray, deq: np.ndarray, importance: np.ndarray) -> float:
    return float((((w - deq) ** 2) * importance[None]).sum())


def test_rtn_asymmetric_codes_cover_zero_and_stay_within_half_a_step() -> None:
    w = _weights()
    codes = quantize_rtn(w, bits=4, group_size=32, symmetric=False, scale_dtype=np.float32)
    assert codes.codes.shape == (48, 4, 32) and codes.codes.max() <= 15
    step = np.repeat(codes.scale, 32, axis=1)
    assert np.all(np.abs(codes.dequantize() - w) <= step / 2 + 1e-7)
    # 0 is representable in every group (the range was widened to include it): zero points are codes
    assert np.all((codes.zero >= 0) & (codes.zero <= 15))


def test_rtn_symmetric_centres_codes_on_half_the_range() -> None:
    codes = quantize_rtn(_weights(), bits=4, group_size=32, symmetric=True)
    assert np.all(codes.zero == 8)
    assert codes.symmetric


def test_search_never_loses_to_round_to_nearest_under_its_own_weighting() -> None:
    w = _weights(1)
    importance = np.random.default_rng(2).gamma(0.5, 1.0, 128).astype(np.float32)
    rtn = quantize_rtn(w, bits=4, group_size=32, symmetric=False)
    fitted = fit_groups(w, bits=4, group_size=32, symmetric=False, importance=importance)
    rtn_err = _weighted_error(w, rtn.dequantize(), importance)
    fit_err = _weighted_error(w, fitted.dequantize(), importance)
    assert fit_err < 0.8 * rtn_err  # measured: 0.5-0.6x on these outlier-bearing weights


def test_importance_moves_the_error_to_unimportant_channels() -> None:
    w = _weights(3)
    importance = np.ones(128, dtype=np.float32)
    importance[:16] = 100.0  # the first 16 channels of the first group carry the activations
    plain = fit_groups(w, bits=4, group_size=32, symmetric=False)
    aware = fit_groups(w, bits=4, group_size=32, symmetric=False, importance=importance)
    hot = slice(0, 16)
    assert _weighted_error(w[:, hot], aware.dequantize()[:, hot], importance[hot]) < \
        _weighted_error(w[:, hot], plain.dequantize()[:, hot], importance[hot])


def test_float_zero_points_recover_an_offset_grid_exactly_where_integer_ones_cannot() -> None:
    """Weights already on a block-32 asymmetric grid (scale d, float offset m: GGUF Q4_1's form, as the real
    SmolLM2 weights are) come back exactly with float zero points; integer zero points must snap m."""
    rng = np.random.default_rng(4)
    d = rng.uniform(0.001, 0.01, (16, 4, 1)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-0.08, -0.01, (16, 4, 1)).astype(np.float16).astype(np.float32)
    q = rng.integers(0, 16, (16, 4, 32)).astype(np.float32)
    q[..., 0], q[..., 1] = 0, 15  # every group spans the whole grid
    w = (q * d + m).reshape(16, 128)
    step = np.repeat(d[..., 0], 32, axis=1)
    exact = fit_groups(w, bits=4, group_size=32, symmetric=False, integer_zero=False, scale_dtype=np.float32)
    assert np.abs(exact.dequantize() - w).max() < 1e-6
    # fp16 zero points (what the runtimes store) miss by their own rounding: under 1% of a step
    stored = fit_groups(w, bits=4, group_size=32, symmetric=False, integer_zero=False)
    assert (np.abs(stored.dequantize() - w) / step).max() < 0.01
    snapped = fit_groups(w, bits=4, group_size=32, symmetric=False)
    assert (np.abs(snapped.dequantize() - w) / step).max() > 0.2


def test_a_group_size_that_does_not_divide_the_input_is_refused() -> None:
    with pytest.raises(ConversionError, match="does not divide"):
        quantize_rtn(np.zeros((4, 48), dtype=np.float32), bits=4, group_size=32, symmetric=False)


def test_gptq_lowers_the_output_error_on_correlated_inputs() -> None:
    """GPTQ minimises |dW x|^2 over the calibration inputs: with correlated channels it beats per-group rounding."""
    rng = np.random.default_rng(5)
    mix = rng.standard_normal((128, 128)).astype(np.float32)
    x = rng.standard_normal((2048, 128)).astype(np.float32) @ mix * 0.1 + rng.standard_normal(128) * 0.3
    hessian = (x.T @ x / len(x)).astype(np.float64)
    w = _weights(6)
    importance = np.diag(hessian).astype(np.float32)

    def output_error(deq: np.ndarray) -> float:
        d = deq - w
        return float(np.einsum("nk,nk->", d @ hessian, d))

    fitted = fit_groups(w, bits=4, group_size=32, symmetric=False, importance=importance)
    gptq = gptq_quantize(w, hessian, bits=4, group_size=32, symmetric=False)
    assert gptq.codes.shape == fitted.codes.shape and gptq.codes.max() <= 15
    assert output_error(gptq.dequantize()) < 0.7 * output_error(fitted.dequantize())
    # the stored codes are the ones dequantize() reads: GPTQ's result is self-consistent
    again = (gptq.codes.astype(np.float32) - gptq.zero[..., None]) * gptq.scale[..., None]
    assert np.array_equal(again.reshape(w.shape), gptq.dequantize())


def test_gptq_is_deterministic() -> None:
    w = _weights(7)
    h = np.eye(128) + 0.1
    a = gptq_quantize(w, h, bits=4, group_size=32, symmetric=False)
    b = gptq_quantize(w, h, bits=4, group_size=32, symmetric=False)
    assert np.array_equal(a.codes, b.codes) and np.array_equal(a.scale, b.scale)
