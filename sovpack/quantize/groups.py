"""Group-wise integer weight codes for a [out, in] matrix: groups of ``group_size`` consecutive input
features per output row share a scale and a zero point (asymmetric) or just a scale (symmetric).

``quantize_rtn`` is plain round-to-nearest over each group's min/max (widened to include 0, as onnxruntime's
and NNCF's quantizers do). ``fit_groups`` searches each group's range instead: candidate ranges shrink the
group's extremes (clipping outliers trades their error for finer steps everywhere else), with and without
0 inside, and the candidate with the least squared error weighted by each input channel's activation energy
wins (an unweighted search when there is no calibration); then the scale is refitted by weighted least
squares to the chosen codes. Scales are rounded to their storage dtype before codes are chosen, so the codes
fit the scale the runtime will read.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from sovpack.errors import ConversionError

# Range-shrink ratios tried by the search (1.0: the group's full min/max).
SEARCH_RATIOS = tuple(1.0 - 0.05 * i for i in range(10))
# NOTE: the search runs over blocks of this many rows, so every candidate's temporaries stay in the CPU's
# caches, on a thread per core (numpy releases the GIL in these loops). Measured on a 4096 x 14336 weight
# (an 8B model's MLP matrix), 2 cores: whole tensor 12.2 s, blocks of 64 rows 5.1 s, and on 2 threads 3.0 s
# (that day's machine; 5.2 s on a slower day, 2.6 s there with the in-place candidates below);
# temporaries shrink from ~10x the tensor to a few block-sized arrays per thread.
ROW_BLOCK = 64
ROW_BLOCK_RTN = 256  # round-to-nearest is one pass: larger blocks, fewer tasks
MAX_THREADS = 4
_Part = TypeVar("_Part")


@dataclass(frozen=True, slots=True)
class GroupCodes:
    """Integer codes of one weight: ``(codes - zero) * scale`` per group is the weight the runtime computes with."""

    codes: np.ndarray  # uint8 [out, groups, group], each in 0 .. 2^bits - 1
    scale: np.ndarray  # float32 [out, groups], already rounded to its storage dtype
    zero: np.ndarray  # uint8 [out, groups] (2^(bits-1) when symmetric), or float32 for float zero points
    bits: int
    symmetric: bool

    @property
    def group_size(self) -> int:
        return int(self.codes.shape[2])

    def dequantize(self) -> np.ndarray:
        """The float32 [out, in] weight these codes stand for."""
        values = (self.codes.astype(np.float32) - self.zero[..., None].astype(np.float32)) * self.scale[..., None]
        return values.reshape(values.shape[0], -1)


def _grouped(weight: np.ndarray, group_size: int) -> np.ndarray:
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim != 2:
        raise ConversionError(f"cannot quantize a tensor of rank {w.ndim}; expected [out, in]")
    if w.shape[1] % group_size:
        raise ConversionError(f"group size {group_size} does not divide the input size {w.shape[1]}")
    return w.reshape(w.shape[0], w.shape[1] // group_size, group_size)


def _round_scale(scale: np.ndarray, dtype: type) -> np.ndarray:
    finite = np.minimum(np.asarray(scale, dtype=np.float32), np.float32(np.finfo(dtype).max))  # never inf
    rounded = finite.astype(dtype).astype(np.float32)
    tiny = float(np.finfo(dtype).tiny)
    return np.where(rounded <= 0, np.float32(tiny), rounded).astype(np.float32)


def _params(low: np.ndarray, high: np.ndarray, bits: int, symmetric: bool, scale_dtype: type,
            integer_zero: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero) [.., groups] representing [low, high] (symmetric: ``low`` is the signed extreme)."""
    levels = 2**bits - 1
    half = 2 ** (bits - 1)
    if symmetric:
        scale = _round_scale(np.abs(low) / np.float32(half), scale_dtype)
        return scale, np.full(scale.shape, half, dtype=np.float32)
    scale = _round_scale((high - low) / np.float32(levels), scale_dtype)
    if not integer_zero:  # the zero point is stored in the scale's dtype: the range's low end exactly
        return scale, (-low / scale).astype(scale_dtype).astype(np.float32)
    return scale, np.clip(np.rint(-low / scale), 0, levels).astype(np.float32)


# NOTE: the range search evaluates ~13 candidates per group; computing each in place in one buffer (the same
# operations in the same order, so the same bits) halves its time (4096 x 14336 weight: 5.2 -> 2.6 s).
def _encode(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """round(w / scale + zero) clipped to the code range, as float32 (a new array)."""
    codes = np.divide(w, scale[..., None])
    codes += zero[..., None]
    np.rint(codes, out=codes)
    return np.clip(codes, 0, 2**bits - 1, out=codes)


def _error(w: np.ndarray, codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, weights: np.ndarray
           ) -> np.ndarray:
    """The weighted squared error per group of ``codes``, which it overwrites (pass a fresh ``_encode``)."""
    codes -= zero[..., None]
    codes *= scale[..., None]
    np.subtract(w, codes, out=codes)
    codes *= codes
    return np.einsum("ngk,gk->ng", codes, weights)


def quantize_rtn(weight: np.ndarray, *, bits: int, group_size: int, symmetric: bool,
                 scale_dtype: type = np.float16) -> GroupCodes:
    """Round-to-nearest over each group's min/max widened to include 0 (symmetric: the largest magnitude)."""
    w = _grouped(weight, group_size)
    if symmetric:
        extreme = np.take_along_axis(w, np.argmax(np.abs(w), axis=-1)[..., None], axis=-1)[..., 0]
        scale, zero = _params(extreme, extreme, bits, True, scale_dtype)
    else:
        scale, zero = _params(np.minimum(w.min(axis=-1), 0.0), np.maximum(w.max(axis=-1), 0.0), bits, False,
                              scale_dtype)
    codes = _encode(w, scale, zero, bits)
    return GroupCodes(codes=codes.astype(np.uint8), scale=scale, zero=zero.astype(np.uint8), bits=bits,
                      symmetric=symmetric)


def rtn_error(weight: np.ndarray, channel: np.ndarray, *, bits: int, group_size: int, symmetric: bool,
              scale_dtype: type = np.float16) -> tuple[float, float]:
    """(sum of channel-weighted squared round-to-nearest errors, the same sum of the weight itself): a tensor's
    rounding sensitivity without keeping its codes, in blocks of rows on every core (as ``fit_groups``)."""
    w = _grouped(weight, group_size)
    weights = np.asarray(channel, dtype=np.float32).reshape(w.shape[1], w.shape[2])

    def block(start: int) -> tuple[float, float]:
        part = w[start:start + ROW_BLOCK_RTN]
        codes = quantize_rtn(part.reshape(part.shape[0], -1), bits=bits, group_size=group_size, symmetric=symmetric,
                             scale_dtype=scale_dtype)
        error = _error(part, codes.codes.astype(np.float32), codes.scale, codes.zero.astype(np.float32), weights)
        return float(error.sum(dtype=np.float64)), float(np.einsum("ngk,ngk,gk->", part, part, weights))

    sums = _over_row_blocks(block, w.shape[0], ROW_BLOCK_RTN)
    return sum(e for e, _ in sums), sum(n for _, n in sums)


def _over_row_blocks(work: Callable[[int], _Part], rows: int, block: int) -> list[_Part]:
    """``work(start)`` for every block of ``block`` rows, in order, on a thread per core (see the NOTE above)."""
    starts = range(0, rows, block)
    threads = min(len(starts), os.cpu_count() or 1, MAX_THREADS)
    if threads <= 1:
        return [work(start) for start in starts]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(work, starts))


def fit_params(w: np.ndarray, weights: np.ndarray, *, bits: int, symmetric: bool, scale_dtype: type,
               integer_zero: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The best (scale, zero) [out, groups] for grouped ``w`` [out, groups, group] under channel ``weights``
    [groups, group]: a range search, then a weighted least-squares refit of the scale."""
    lo, hi = w.min(axis=-1), w.max(axis=-1)
    candidates: list[tuple[np.ndarray, np.ndarray]] = []
    for ratio in SEARCH_RATIOS:
        r = np.float32(ratio)
        if symmetric:
            extreme = np.take_along_axis(w, np.argmax(np.abs(w), axis=-1)[..., None], axis=-1)[..., 0]
            candidates.append(_params(extreme * r, extreme * r, bits, True, scale_dtype))
        else:
            mid, half = (hi + lo) / 2, (hi - lo) / 2 * r
            candidates.append(_params(mid - half, mid + half, bits, False, scale_dtype, integer_zero))
            if integer_zero:
                candidates.append(_params(np.minimum(lo, 0) * r, np.maximum(hi, 0) * r, bits, False, scale_dtype))
    best_scale, best_zero = candidates[0]
    best_err = _error(w, _encode(w, best_scale, best_zero, bits), best_scale, best_zero, weights)
    for scale, zero in candidates[1:]:
        err = _error(w, _encode(w, scale, zero, bits), scale, zero, weights)
        better = err < best_err
        best_scale = np.where(better, scale, best_scale)
        best_zero = np.where(better, zero, best_zero)
        best_err = np.minimum(err, best_err)
    # Weighted least-squares scale for the chosen codes (zero fixed), kept where it lowers the error.
    centred = _encode(w, best_scale, best_zero, bits) - best_zero[..., None]
    num = np.einsum("ngk,ngk,gk->ng", centred, w, weights)
    den = np.einsum("ngk,ngk,gk->ng", centred, centred, weights)
    refit = _round_scale(np.where(den > 0, num / np.maximum(den, 1e-30), best_scale), scale_dtype)
    refit_err = _error(w, _encode(w, refit, best_zero, bits), refit, best_zero, weights)
    better = refit_err < best_err
    best_scale, best_err = np.where(better, refit, best_scale), np.minimum(refit_err, best_err)
    if integer_zero or symmetric:
        return best_scale, best_zero
    # Float zero points: weighted least squares for scale and offset together (w ~ a * code + b), twice.
    for _ in range(2):
        codes = _encode(w, best_scale, best_zero, bits)
        sw = weights.sum(axis=-1)[None]
        sq = np.einsum("ngk,gk->ng", codes, weights)
        sqq = np.einsum("ngk,ngk,gk->ng", codes, codes, weights)
        sx = np.einsum("ngk,gk->ng", w, weights)
        sqx = np.einsum("ngk,ngk,gk->ng", codes, w, weights)
        det = sw * sqq - sq * sq
        ok = det > 1e-30
        a = np.where(ok, (sw * sqx - sq * sx) / np.where(ok, det, 1), best_scale)
        b = np.where(ok, (sqq * sx - sq * sqx) / np.where(ok, det, 1), -best_zero * best_scale)
        scale = _round_scale(np.where(a > 0, a, best_scale), scale_dtype)
        zero = (-b / scale).astype(scale_dtype).astype(np.float32)
        err = _error(w, _encode(w, scale, zero, bits), scale, zero, weights)
        better = err < best_err
        best_scale, best_zero = np.where(better, scale, best_scale), np.where(better, zero, best_zero)
        best_err = np.minimum(err, best_err)
    return best_scale, best_zero


def fit_groups(weight: np.ndarray, *, bits: int, group_size: int, symmetric: bool,
               importance: np.ndarray | None = None, scale_dtype: type = np.float16,
               integer_zero: bool = True) -> GroupCodes:
    """Codes whose per-group ranges minimise the importance-weighted squared error (see the module doc)."""
    w = _grouped(weight, group_size)
    channel = np.ones(w.shape[1] * w.shape[2], dtype=np.float32) if importance is None else importance
    weights = np.asarray(channel, dtype=np.float32).reshape(w.shape[1], w.shape[2])

    def fit(start: int) -> tuple[np.ndarray, np.ndarray]:
        return fit_params(w[start:start + ROW_BLOCK], weights, bits=bits, symmetric=symmetric,
                          scale_dtype=scale_dtype, integer_zero=integer_zero)

    parts = _over_row_blocks(fit, w.shape[0], ROW_BLOCK)
    scale = np.concatenate([part[0] for part in parts])
    zero = np.concatenate([part[1] for part in parts])
    codes = _encode(w, scale, zero, bits)
    return GroupCodes(codes=codes.astype(np.uint8), scale=scale,
                      zero=zero.astype(np.uint8) if integer_zero else zero, bits=bits, symmetric=symmetric)
