"""4-bit codes kept on disk for the length of a build, so targets with the same recipe fit each tensor once.

A build's ``onnx:int4`` and ``openvino:int4`` plan the same 4-bit tensors with the same groups, method,
calibration and float16-rounded scales; the importance-weighted fit (or GPTQ) of an 8B model's linear
weights takes minutes. The first target's codes are written here (nibbles packed, scales and zero points as
float32: ~0.75 byte a weight) and the second reads them back instead of fitting again; a 4-bit recipe retried
with a larger 8-bit share reuses the codes of the tensors that stay 4-bit. Memory stays at one tensor: the
codes live in the page cache and on disk, not in the process.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sovpack.quantize.groups import GroupCodes


@dataclass(frozen=True, slots=True)
class CodesCache:
    """A directory of 4-bit GroupCodes, one file per recipe key; belongs to one opened model."""

    directory: Path

    def _path(self, key: tuple[object, ...]) -> Path:
        return self.directory / (hashlib.sha256(repr(key).encode()).hexdigest()[:40] + ".npz")

    def get(self, key: tuple[object, ...]) -> GroupCodes | None:
        """The codes stored under ``key``, or None."""
        path = self._path(key)
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as stored:
            packed, scale, zero = stored["packed"], stored["scale"], stored["zero"]
            symmetric = bool(stored["symmetric"])
        codes = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=np.uint8)
        codes[..., 0::2] = packed & 0x0F
        codes[..., 1::2] = packed >> 4
        return GroupCodes(codes=codes, scale=scale, zero=zero, bits=4, symmetric=symmetric)

    def put(self, key: tuple[object, ...], codes: GroupCodes) -> None:
        """Store 4-bit ``codes`` under ``key`` (written whole, then renamed: never half a file)."""
        if codes.bits != 4 or codes.codes.shape[-1] % 2:
            return  # only 4-bit codes in even groups are worth a file; the rest is cheap to redo
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(key)
        tmp = path.with_suffix(".tmp.npz")
        packed = (codes.codes[..., 0::2] | (codes.codes[..., 1::2] << 4)).astype(np.uint8)
        np.savez(tmp, packed=packed, scale=codes.scale, zero=codes.zero, symmetric=np.bool_(codes.symmetric))
        os.replace(tmp, path)
