"""The external data file: every weight appended to ``model.onnx.data``, one tensor (in chunks) at a time.

# NOTE: no weight bytes ever enter a protobuf message. Every initializer is a TensorProto whose
# ``external_data`` (location/offset/length) points into the data file, which we append to ourselves, chunked
# and aligned; with plain protobuf that is a handful of fields we control exactly (see graph.py for why not
# onnx_ir).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sovpack._digests import HashingWriter
from sovpack._io import ordered_map
from sovpack.errors import ConversionError
from sovpack.targets.halves import to_float16

DATA_FILE = "model.onnx.data"
# Offsets in the data file: big tensors on 64 KiB boundaries (the mmap allocation granularity on Windows,
# a multiple of every page size), small ones on 64 bytes, so ONNX Runtime can map weights in place.
BIG_TENSOR_BYTES = 1 << 20
BIG_ALIGN = 1 << 16
SMALL_ALIGN = 64
# Rows per chunk when converting a matrix to its stored dtype: bounds the temporary to ~16 MB.
CHUNK_BYTES = 16 << 20


class ExternalData:
    """Appends tensors to one data file and returns TensorProtos that point into it (no bytes in protobuf)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = path.name
        self._fh = HashingWriter(path)  # hashed as written: the bundle stores it without reading it again
        self.offset = 0
        self.largest = 0  # bytes of the largest tensor written

    def close(self) -> None:
        self._fh.close()

    def _align(self, nbytes: int) -> None:
        align = BIG_ALIGN if nbytes >= BIG_TENSOR_BYTES else SMALL_ALIGN
        pad = -self.offset % align
        if pad:
            self._fh.write(b"\0" * pad)
            self.offset += pad

    def write(self, name: str, shape: Sequence[int], dtype: np.dtype, chunks: Iterable[np.ndarray]) -> Any:
        """Write ``chunks`` (C-order pieces of one tensor, in order) and return its external TensorProto."""
        from onnx import TensorProto, helper

        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        self._align(nbytes)
        start = self.offset
        written = 0
        for chunk in chunks:
            piece = np.ascontiguousarray(chunk, dtype=dtype)
            self._fh.write(piece.reshape(-1).view(np.uint8))
            written += piece.nbytes
        if written != nbytes:
            raise ConversionError(f"tensor {name!r}: wrote {written} bytes, shape {list(shape)} needs {nbytes}")
        self.offset += written
        self.largest = max(self.largest, written)
        tensor = TensorProto()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(dtype)
        tensor.dims.extend(int(d) for d in shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(start)), ("length", str(nbytes))):
            entry = tensor.external_data.add()
            entry.key = key
            entry.value = value
        return tensor

    def write_array(self, name: str, array: np.ndarray) -> Any:
        return self.write(name, array.shape, array.dtype, [array])


def converted_chunks(name: str, array: np.ndarray, dtype: np.dtype,
                     check_source: Callable[[], object] | None = None) -> Iterable[np.ndarray]:
    """``array`` converted to ``dtype`` in row blocks of ~CHUNK_BYTES, so no full-size converted copy exists.

    ``array`` may be the checkpoint's stored tensor itself (bfloat16 converts to float16 directly, exactly as
    through float32); then ``check_source`` raises the model's SourceError when a block turns out to hold NaN
    or Inf, which a float32 source was already checked for.
    """
    rows = array.reshape(array.shape[0], -1) if array.ndim > 1 else array.reshape(1, -1)
    step = max(1, CHUNK_BYTES // max(1, rows.shape[1] * 4))

    def convert(start: int) -> np.ndarray:
        source = rows[start : start + step]
        if dtype != np.float16:
            return source.astype(dtype)
        return to_float16(name, source, where="", advice="use onnx:fp32 or a quantized precision",
                          check_source=check_source)

    # a copy to the same type is memory-bound (one thread); a cast runs on every core, blocks kept in order
    starts = range(0, rows.shape[0], step)
    yield from (map(convert, starts) if dtype == array.dtype else ordered_map(convert, starts))
