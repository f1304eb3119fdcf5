"""GPTQ-style error-compensating rounding (Frantar et al., 2022), in numpy.

Columns (input features) are quantized in order; each column's rounding error is spread over the columns
not yet quantized through the inverse of the input's second-moment matrix H = E[x x^T], so the layer's
output on calibration-like inputs stays close to the float layer's even where single weights move. Each
group's scale and zero point are fitted (``groups.fit_params``, weighted by diag(H)) on the group's
error-updated weights when the group is reached.

# NOTE: damping. The built-in calibration text is ~730 tokens, fewer than the widest inputs (SmolLM2's
# down projection reads 1536 channels), so H is rank-deficient and GPTQ with the paper's 1% damping overfits
# it: on SmolLM2 it cut the calibration-set output error 2-5x below the weighted range search yet raised the
# parity prompts' mean KL (integer zero points, groups of 32: 0.33 vs 0.22). With 50% of mean(diag(H)) on
# the diagonal, on the realistic-numerics fixtures (llama3 / qwen2, 1/8 of weights at 8 bits): damping 0.01
# 0.069 / 0.072, 0.1 0.046 / 0.062, 0.5 0.040 / 0.046, against the weighted search's 0.046 / 0.043.
"""

from __future__ import annotations

import numpy as np

from sovpack.errors import ConversionError
from sovpack.quantize.groups import GroupCodes, fit_params

DAMPING = 0.5  # share of mean(diag(H)) added to H's diagonal: the best of 0.01 / 0.1 / 0.5 (see NOTE)
BLOCK = 128  # columns updated together (lazy batch updates)


def _inverse_cholesky(hessian: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U), H damped until it factorises."""
    h = np.asarray(hessian, dtype=np.float64)
    damp = DAMPING * float(np.mean(np.diag(h)))
    eye = np.eye(h.shape[0])
    for _ in range(6):
        try:
            lower = np.linalg.cholesky(h + damp * eye)
            inv = np.linalg.inv(lower)
            hinv = inv.T @ inv
            return np.linalg.cholesky(hinv).T
        except np.linalg.LinAlgError:
            damp *= 10
    raise ConversionError("GPTQ: the calibration Hessian is not positive definite even after damping")


def gptq_quantize(weight: np.ndarray, hessian: np.ndarray, *, bits: int, group_size: int, symmetric: bool,
                  scale_dtype: type = np.float16, integer_zero: bool = True) -> GroupCodes:
    """Codes of ``weight`` [out, in] by GPTQ with groups of ``group_size`` and the input Hessian [in, in]."""
    w = np.array(weight, dtype=np.float64)
    rows, cols = w.shape
    if cols % group_size or hessian.shape != (cols, cols):
        raise ConversionError(f"GPTQ: weight {w.shape}, group {group_size}, Hessian {hessian.shape} disagree")
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    importance = np.maximum(np.diag(h), 1e-12).astype(np.float32)
    upper = _inverse_cholesky(h)
    groups = cols // group_size
    scale = np.zeros((rows, groups), dtype=np.float32)
    zero = np.zeros((rows, groups), dtype=np.float32)
    codes = np.zeros((rows, cols), dtype=np.uint8)
    levels = 2**bits - 1
    block = max(BLOCK // group_size, 1) * group_size
    for start in range(0, cols, block):
        stop = min(start + block, cols)
        w1 = w[:, start:stop].copy()
        err1 = np.zeros_like(w1)
        u1 = upper[start:stop, start:stop]
        for i in range(stop - start):
            col = start + i
            if col % group_size == 0:
                g = col // group_size
                piece = w1[:, i:i + group_size].astype(np.float32)[:, None, :]
                s, z = fit_params(piece, importance[None, col:col + group_size], bits=bits, symmetric=symmetric,
                                  scale_dtype=scale_dtype, integer_zero=integer_zero)
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
            g = col // group_size
            column = w1[:, i]
            q = np.clip(np.rint(column / scale[:, g] + zero[:, g]), 0, levels)
            codes[:, col] = q.astype(np.uint8)
            err = (column - (q - zero[:, g]) * scale[:, g]) / u1[i, i]
            w1[:, i:] -= np.outer(err, u1[i, i:])
            err1[:, i] = err
        w[:, stop:] -= err1 @ upper[start:stop, stop:]
    return GroupCodes(codes=codes.reshape(rows, groups, group_size), scale=scale,
                      zero=zero.astype(np.uint8) if integer_zero else zero, bits=bits, symmetric=symmetric)
