"""float16 weights from the checkpoint's own bfloat16/float16: the one cast every float16 writer shares.

Every bfloat16 value converts to float16 exactly as it would through float32, so writers cast the stored
tensor directly (no float32 copy). Only a result holding Inf or NaN is looked at again, in float32: NaN/Inf in
the checkpoint is the model's SourceError (``check_source`` raises it), a finite value beyond float16's range
is this ConversionError, with the writer's advice on what to use instead.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sovpack._io import all_finite
from sovpack.errors import ConversionError

FP16_MAX = float(np.finfo(np.float16).max)


def float16_overflow(name: str, peak: float, *, where: str, advice: str) -> ConversionError:
    """The error for tensor ``name`` whose values reach ``peak``, beyond float16 (``where``: a file, or empty)."""
    prefix = f"{where}: " if where else ""
    return ConversionError(f"{prefix}tensor {name!r} has values up to {peak:.6g}, beyond the float16 range "
                           f"({FP16_MAX:g}); {advice}")


def to_float16(name: str, source: np.ndarray, *, where: str, advice: str,
               check_source: Callable[[], object] | None = None) -> np.ndarray:
    """``source`` (bfloat16, float16 or float32) as float16; see the module docstring for what it refuses."""
    with np.errstate(over="ignore"):  # overflow is checked below, with a clearer message
        converted = source.astype(np.float16)
    if all_finite(converted):
        return converted
    wide = source.astype(np.float32)
    finite = np.isfinite(wide)
    if check_source is not None and not finite.all():
        check_source()  # NaN/Inf in the checkpoint: SourceError (unless the model allows them)
    if (np.isinf(converted) & finite).any():
        raise float16_overflow(name, float(np.max(np.abs(wide[finite]))), where=where, advice=advice)
    return converted


def check_fits_float16(name: str, array: np.ndarray, *, where: str, advice: str) -> None:
    """Refuse a finite ``array`` (float32) whose largest magnitude is beyond float16, before it is cast; max and
    min, so no |array| temporary is made."""
    if array.size:
        peak = max(float(array.max()), -float(array.min()))
        if peak > FP16_MAX:
            raise float16_overflow(name, peak, where=where, advice=advice)
