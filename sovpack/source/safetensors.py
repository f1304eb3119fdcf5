"""A validating, memory-mapped safetensors reader.

We parse the header ourselves (rather than calling the safetensors package) so that every way a file can be
broken — a header length past the end, offsets out of range or overlapping, an unknown dtype, a truncated data
section — becomes a SourceError naming the file, and so tensors are zero-copy views of one mmap per file.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import ml_dtypes
import numpy as np

from sovpack._io import open_regular, parse_json, shorten
from sovpack.errors import SourceError

# Spec: https://github.com/huggingface/safetensors#format
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_DIMS = 32  # numpy refuses more than 64 dimensions; real weights have at most a handful


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and byte range inside the data section."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsFile:
    """One open safetensors file: a validated header and a read-only memory map."""

    def __init__(self, path: Path, display_name: str | None = None) -> None:
        self.path = path
        self.display = display_name or path.name
        self.metadata: dict[str, str] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._mmap: mmap.mmap | None = None
        self._data_start = 0
        self._size = 0
        self._parse()

    def _fail(self, problem: str) -> SourceError:
        return SourceError(f"{self.display}: {problem}")

    def _open(self) -> BinaryIO:
        """The file, opened only if it is a regular file (a FIFO or device would block or never end)."""
        return open_regular(self.path, where=self.display)

    def _parse(self) -> None:
        with self._open() as fh:
            try:
                size = os.fstat(fh.fileno()).st_size
                prefix = fh.read(8)
                if len(prefix) < 8:
                    raise self._fail(f"not a safetensors file: {size} bytes, too short for a header")
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > MAX_HEADER_BYTES:
                    raise self._fail(f"corrupt header: length {header_len} is implausibly large")
                if 8 + header_len > size:
                    raise self._fail(
                        f"corrupt header: length {header_len} runs past the end of the file ({size} bytes)"
                    )
                raw = fh.read(header_len)
            except OSError as e:
                raise self._fail(f"cannot read: {e.strerror or e}") from e
        if len(raw) != header_len:
            raise self._fail(f"corrupt header: the file ended after {len(raw)} of {header_len} header bytes")
        # NOTE: parse_json refuses duplicate tensor names (json.loads keeps the last one, so a second entry could
        # silently re-point a tensor at other bytes), NaN/Infinity and deep nesting.
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self._fail(f"corrupt header: not UTF-8 text ({e.reason})") from e
        header = parse_json(text.rstrip(" "), f"{self.display}: corrupt header")
        if not isinstance(header, dict):
            raise self._fail("corrupt header: expected a JSON object")
        self._data_start = 8 + header_len
        self._size = size
        data_size = size - self._data_start
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise self._fail("corrupt header: __metadata__ is not an object of strings")
        self.metadata = dict(meta)
        spans: list[tuple[int, int, str]] = []
        for name, entry in header.items():
            info = self._entry(name, entry, data_size)
            self.tensors[name] = info
            spans.append((info.begin, info.end, name))
        spans.sort()
        for (_, prev_end, prev_name), (begin, _, name) in itertools.pairwise(spans):
            if begin < prev_end:
                raise self._fail(f"corrupt header: tensors {shorten(prev_name)} and {shorten(name)} overlap")

    def _entry(self, name: str, entry: object, data_size: int) -> TensorInfo:
        label = shorten(name)
        if not isinstance(entry, dict):
            raise self._fail(f"corrupt header: entry {label} is not an object")
        dtype = entry.get("dtype")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise self._fail(f"tensor {label} has unknown dtype {shorten(dtype)}; known: {', '.join(DTYPES)}")
        shape = entry.get("shape")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise self._fail(f"corrupt header: tensor {label} has an invalid shape {shorten(shape)}")
        offsets = entry.get("data_offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise self._fail(f"corrupt header: tensor {label} has invalid data_offsets {shorten(offsets)}")
        begin, end = offsets
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != expected:
            raise self._fail(
                f"corrupt header: tensor {label} spans {shorten(end - begin)} bytes but {dtype}{shorten(shape)} needs "
                f"{shorten(expected)}"
            )
        if end > data_size:
            raise self._fail(
                f"truncated or corrupt: tensor {label} ends at byte {shorten(end)} of the data section, "
                f"which has only {data_size} bytes"
            )
        return TensorInfo(name=name, path=self.path, dtype=dtype, shape=tuple(shape), begin=begin, end=end)

    def read(self, name: str) -> np.ndarray:
        """A read-only, zero-copy view of one tensor in its stored dtype."""
        info = self.tensors[name]
        if self._mmap is None:
            with self._open() as fh:
                # A file that shrank since its header was checked would make reading the map a SIGBUS crash.
                size = os.fstat(fh.fileno()).st_size
                if size < self._size:
                    raise self._fail(f"shrank from {self._size} to {size} bytes while being read")
                try:
                    self._mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                except (OSError, ValueError) as e:
                    raise self._fail(f"cannot map: {e}") from e
        dtype = DTYPES[info.dtype]
        count = math.prod(info.shape)
        if count == 0:
            return np.zeros(info.shape, dtype=dtype)
        array = np.frombuffer(self._mmap, dtype=dtype, count=count, offset=self._data_start + info.begin)
        return array.reshape(info.shape)

    def release_pages(self) -> None:
        """Drop this file's mapped pages from the process's resident set (Linux; a no-op elsewhere).

        Tensors are zero-copy views of one mmap per file: once touched, their pages stay resident until memory
        pressure evicts them, so a streaming writer would still peak at the whole checkpoint. MADV_DONTNEED on a
        read-only file mapping only unmaps the pages; touching them again re-reads them from the page cache.
        """
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if self._mmap is not None and advice is not None:
            with contextlib.suppress(OSError, ValueError):
                self._mmap.madvise(advice)

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # views still alive: the map goes when they do
                return
            self._mmap = None
