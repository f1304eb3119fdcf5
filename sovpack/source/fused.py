"""Reading one canonical tensor out of what a checkpoint stores: a whole tensor, a row range of a fused one,
one expert of a stacked-experts tensor (transposed, interleaved) or MXFP4-packed expert weights.

Everything here works on views of the memory-mapped stored tensor: picking an expert, transposing and taking
strided rows copy nothing, so reading one expert touches only that expert's bytes, never the whole fused tensor.
MXFP4 is dequantized one expert (and only the rows asked for) at a time, exactly, to float32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sovpack._io import shorten
from sovpack._protocols import TensorSource
from sovpack.errors import SourceError
from sovpack.source.checkpoint import Checkpoint

FLOAT_DTYPES = ("F32", "F16", "BF16")
# OCP Microscaling (MX) v1.0: FP4 E2M1 codes 0-15 (sign bit 3), and E8M0 scales 2^(s - 127) where 0xFF is NaN.
# transformers' integrations/mxfp4.py decodes gpt-oss the same way: low nibble first, then the high nibble.
FP4_E2M1 = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32
)
# Every byte's two values (low nibble first): one gather decodes a whole block with no temporaries.
FP4_PAIRS = np.stack([FP4_E2M1[np.arange(256) & 0x0F], FP4_E2M1[np.arange(256) >> 4]], axis=-1)
MXFP4_BLOCK = 32  # values per scale: 16 bytes of two FP4 codes
E8M0_NAN = 255
E8M0_BIAS = 127


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MXFP4 blocks [..., groups, 16] (uint8) and scales [..., groups] (uint8) -> float32 [..., groups * 32].

    Exact: every FP4 value times a power of two from 2^-127 to 2^127 is a float32 (scale 255, E8M0's NaN, is
    refused by the caller). Peak memory is the float32 output (plus the scales' factors, 1/32 of it).
    """
    out = FP4_PAIRS[blocks]  # [..., groups, 16, 2]
    factors = np.ldexp(np.float32(1.0), scales.astype(np.int32) - E8M0_BIAS).astype(np.float32)
    out *= factors[..., None, None]
    return out.reshape(*blocks.shape[:-2], blocks.shape[-2] * MXFP4_BLOCK)


def read_source(checkpoint: Checkpoint, source: TensorSource) -> np.ndarray:
    """The canonical tensor ``source`` describes, as a view of the stored tensor where it can be (MXFP4: float32).

    Assumes ``check_source`` passed for it (open_model validates every entry first).
    """
    array = checkpoint.read(source.name)
    if source.expert is not None:
        array = array[source.expert]
    rows = None if source.rows is None else slice(source.rows[0], source.rows[1], source.row_step)
    if source.mxfp4_scales is not None:
        scales = checkpoint.read(source.mxfp4_scales)
        if source.expert is not None:
            scales = scales[source.expert]
        if rows is not None and not source.transpose:
            # NOTE: packed rows are the output rows: dequantize only the ones asked for (gate or up of gate_up)
            array, scales, rows = array[rows], scales[rows], None
        if scales.size and int(scales.max()) == E8M0_NAN:
            info = checkpoint.tensors[source.mxfp4_scales]
            part = "" if source.expert is None else f" (expert {source.expert})"
            raise SourceError(
                f"{info.path}: tensor {shorten(source.mxfp4_scales)}{part} holds the MXFP4 scale 255 (NaN in E8M0; "
                "2^128 overflows float32)"
            )
        array = dequantize_mxfp4(array, scales)
    if source.transpose:
        array = array.swapaxes(-1, -2)
    if rows is not None:
        array = array[rows]
    return array


def read_mxfp4(checkpoint: Checkpoint, source: TensorSource) -> tuple[np.ndarray, np.ndarray] | None:
    """The packed MXFP4 blocks [rows, groups, 16] and scales [rows, groups] (uint8 views) of an MXFP4 canonical
    tensor, its rows only; None for any other source (or one stored transposed, which packing cannot express)."""
    if source.mxfp4_scales is None or source.transpose:
        return None
    blocks, scales = checkpoint.read(source.name), checkpoint.read(source.mxfp4_scales)
    if source.expert is not None:
        blocks, scales = blocks[source.expert], scales[source.expert]
    if source.rows is not None:
        rows = slice(source.rows[0], source.rows[1], source.row_step)
        blocks, scales = blocks[rows], scales[rows]
    return blocks, scales


def check_source(
    checkpoint: Checkpoint, source: TensorSource, expected: tuple[int, ...], config: Path, family: str
) -> None:
    """The stored tensor(s) behind ``source`` exist, have a readable dtype and the shape the config implies
    (``expected``: the canonical shape); every error names the file and the tensor."""
    info = checkpoint.tensors.get(source.name)
    if info is None:
        raise SourceError(
            f"{checkpoint.root}: tensor {shorten(source.name)} is missing (the {family} layout in {config.name} "
            "needs it)"
        )
    shape = info.shape
    if source.mxfp4_scales is not None:
        shape = _check_mxfp4(checkpoint, source)
    elif info.dtype not in FLOAT_DTYPES:
        raise SourceError(
            f"{info.path}: tensor {shorten(source.name)} is stored as {info.dtype}; only F32, F16 and BF16 weights "
            "are supported (U8 only as the _blocks/_scales pair of MXFP4 experts)"
        )
    if source.stored_shape is not None and info.shape != source.stored_shape:
        raise SourceError(
            f"{info.path}: fused tensor {shorten(source.name)} has shape {list(info.shape)} but {config.name} "
            f"implies {list(source.stored_shape)}"
        )
    derived = _derived_shape(source, shape)
    if derived is None and source.rows is not None and source.stored_shape is None:
        raise SourceError(
            f"{info.path}: fused tensor {shorten(source.name)} has shape {list(info.shape)}, too small for rows "
            f"{source.rows[0]}:{source.rows[1]} of shape {list(expected)} ({config.name})"
        )
    if derived != expected:
        what = "fused tensor" if source.stored_shape is not None or source.rows is not None else "tensor"
        raise SourceError(
            f"{info.path}: {what} {shorten(source.name)} has shape {list(info.shape)} but {config.name} implies "
            f"{list(source.stored_shape or expected)}"
        )


def _check_mxfp4(checkpoint: Checkpoint, source: TensorSource) -> tuple[int, ...]:
    """MXFP4 blocks and scales: both U8, blocks [..., groups, 16], scales [..., groups]; the dequantized shape."""
    blocks = checkpoint.tensors[source.name]
    scales_name = source.mxfp4_scales or ""
    scales = checkpoint.tensors.get(scales_name)
    if scales is None:
        raise SourceError(
            f"{blocks.path}: MXFP4 tensor {shorten(source.name)} has no scales: tensor {shorten(scales_name)} "
            "is missing"
        )
    for info in (blocks, scales):
        if info.dtype != "U8":
            raise SourceError(
                f"{info.path}: MXFP4 tensor {shorten(info.name)} is stored as {info.dtype}; MXFP4 blocks and "
                "scales are U8"
            )
    if len(blocks.shape) < 2 or blocks.shape[-1] != MXFP4_BLOCK // 2:
        raise SourceError(
            f"{blocks.path}: MXFP4 blocks {shorten(source.name)} have shape {list(blocks.shape)}; expected "
            f"[..., groups, {MXFP4_BLOCK // 2}] (two FP4 values a byte, {MXFP4_BLOCK} values a scale)"
        )
    if scales.shape != blocks.shape[:-1]:
        raise SourceError(
            f"{scales.path}: MXFP4 scales {shorten(scales_name)} have shape {list(scales.shape)} but their blocks "
            f"{shorten(source.name)} need {list(blocks.shape[:-1])}"
        )
    return (*blocks.shape[:-2], blocks.shape[-2] * MXFP4_BLOCK)


def _derived_shape(source: TensorSource, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The canonical shape ``source`` cuts out of a stored (dequantized) ``shape``; None if it cannot."""
    if source.expert is not None:
        if not shape or not 0 <= source.expert < shape[0]:
            return None
        shape = shape[1:]
    if source.transpose:
        if len(shape) < 2:
            return None
        shape = (*shape[:-2], shape[-1], shape[-2])
    if source.rows is not None:
        start, stop = source.rows
        if not shape or not 0 <= start <= stop <= shape[0] or source.row_step < 1:
            return None
        shape = (len(range(start, stop, source.row_step)), *shape[1:])
    return shape


def source_shards(checkpoint: Checkpoint, source: TensorSource) -> set[str]:
    """The shard files a canonical tensor is read from (MXFP4 scales may live in another one)."""
    names = [source.name] if source.mxfp4_scales is None else [source.name, source.mxfp4_scales]
    return {checkpoint.shard_of(name) for name in names}
