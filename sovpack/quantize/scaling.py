"""Activation-aware channel scaling (AWQ-style, Lin et al., 2023), in numpy.

A few input channels of a linear layer carry most of the activation energy; the rounding error of the weights
they multiply matters most. Scaling those weight columns up by ``s`` before rounding (and the input down by
``1/s`` at run time, an elementwise multiply the target places before the quantized matmul) gives them finer
steps relative to their size, at the expense of the quiet channels. ``s = m^alpha`` with ``m`` the channel's
RMS activation on the calibration text, normalised so its geometric middle is 1; ``alpha`` is searched per
tensor over a grid, the candidate with the least expected output error ``E|dW x|^2`` (the input Hessian when
kept, else per-channel energies) wins, and ``alpha = 0`` (no scaling) is always a candidate, so scaling never
makes a tensor worse on the calibration inputs.
"""

from __future__ import annotations

import numpy as np

from sovpack.quantize.groups import fit_groups

ALPHAS = tuple(i / 10 for i in range(11))  # 0.0 (no scaling) .. 1.0


def output_error(delta: np.ndarray, importance: np.ndarray, hessian: np.ndarray | None) -> float:
    """E|delta x|^2 over the calibration inputs: tr(delta H delta^T), or the diagonal approximation."""
    if hessian is not None:
        return float(np.einsum("nk,nk->", delta @ hessian, delta))
    return float(((delta * delta) @ importance).sum())


def channel_scale(importance: np.ndarray, alpha: float) -> np.ndarray:
    """``m^alpha`` for channel RMS ``m = sqrt(importance)``, divided by its geometric middle (float32 [K])."""
    scale = np.power(np.sqrt(np.maximum(importance, 1e-30)), alpha, dtype=np.float64)
    scale /= np.sqrt(scale.max() * scale.min())
    return scale.astype(np.float32)


def search_input_scale(weight: np.ndarray, importance: np.ndarray, hessian: np.ndarray | None, *, bits: int,
                       group_size: int, symmetric: bool, scale_dtype: type = np.float16, integer_zero: bool = True
                       ) -> tuple[np.ndarray | None, float]:
    """(per-input-channel weight scale ``s`` or None when no scaling wins, relative output error at ``bits``)
    for ``weight`` [out, in], each candidate judged by the importance-weighted range search's codes (the
    rounding the plan's methods start from: judging by plain min/max rounding would favour scaling on weights
    whose float-offset grid the search recovers exactly)."""
    h = None if hessian is None else hessian.astype(np.float32)
    base = output_error(weight, importance, h)
    best: tuple[np.ndarray | None, float] = (None, np.inf)
    for alpha in ALPHAS:
        scale = channel_scale(importance, alpha) if alpha else None
        scaled = weight if scale is None else weight * scale
        channel = importance if scale is None else importance / (scale * scale)
        codes = fit_groups(scaled, bits=bits, group_size=group_size, symmetric=symmetric, importance=channel,
                           scale_dtype=scale_dtype, integer_zero=integer_zero)
        effective = codes.dequantize() if scale is None else codes.dequantize() / scale
        error = output_error(effective - weight, importance, h)
        if error < best[1]:
            best = (scale, error)
    return best[0], best[1] / max(base, 1e-30)
