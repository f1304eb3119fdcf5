"""int8/int4 weights as MatMulNBits: int4 from sovpack.quantize's plan, int8 and heads round-to-nearest, packed here.

# NOTE: int4. The codes, scales and zero points come from sovpack.quantize's plan (calibrated method,
# mixed 4/8-bit by measured sensitivity) and are packed here into MatMulNBits' inputs (onnxruntime's contrib
# op spec): B uint8 [N, blocks, block_size * bits / 8] (4 bits: even k in the low nibble), scales [N, blocks]
# of T1 (the activation type: float32 in our graph; the plan rounds them to float16, the recipe openvino:int4
# shares, sovpack.quantize.cache), zero points either uint8
# (4 bits: two blocks a byte, low nibble first, a row's odd last block padded with 8, the default) or T1
# floats shaped like the scales. The packer reproduces MatMulNBitsQuantizer's bytes for its own RTN codes
# (tests/targets/test_onnx_quant.py), so only the codes differ from the old path.
# 4-bit tensors are planned with FLOAT zero points: a group's range is then not snapped to a multiple of its
# step (numpy reference, "weighted", blocks of 32, mean KL vs fp32: real SmolLM2 0.22 with integer zero points,
# 6e-5 with float ones, flattering because its weights lie on a Q4_1 grid; realistic-numerics llama3/qwen2
# 0.054/0.071 -> 0.048/0.063). MatMulNBits takes float zero points (onnxruntime >= 1.18) but its CPU kernel
# then dequantizes the whole matrix on every call: measured on a 14336 x 4096 weight, onnxruntime 1.32, 2
# threads, one token: 135 ms against 3.6 ms with uint8 zero points (an 8B model would decode at ~16 s a token).
# So they are stored as the fast uint8 zero points plus their fractional parts (``split_float_zero_points``):
# y = MatMulNBits(x) - (x summed per block) @ residual, residual [K / block, N] float32 (+1/32 of a float32
# weight, 0.125 byte a weight), exactly the float-zero-point weights, at 3.1 ms for that matrix and token.
# A tensor whose input size no block size (a power of two >= 16) divides stays 8-bit (the plan), packed by
# onnxruntime's quantizer with its zero-padded last block (RTN), so no model width makes the writer fail.
#
# NOTE: int8 and integer heads. Weight-only, round-to-nearest, block-wise (block 32, asymmetric with uint8
# zero points): ``quantize_rtn`` over a row block at a time (``rtn_by_rows``), packed into the bytes onnxruntime's
# ``MatMulNBitsQuantizer`` writes for the same codes (its scales and zero points exactly; a code may differ by
# one at a float32 .5 tie: tests/targets/test_onnx_quant.py). Peak memory is one row block's float32 copy plus
# the packed output, whatever the matrix (onnxruntime's quantizer took ~3 float32 copies of it, and 30 s for
# a 128k x 4096 head). Only a width no block size divides still goes through onnxruntime's quantizer (a
# one-MatMul model, its padded last block), as int4's fallback above does.
# The embedding table stays float16 (a Gather of float16 rows, cast: onnxruntime keeps the table as stored).
# An untied lm_head is 8-bit in both integer precisions, as NNCF's and OpenVINO's integer heads are (llama.cpp
# keeps its output tensor at 6-8 bits): the head is the most quantization-sensitive matrix (its error lands on
# the logits unfiltered; 4-bit there raises the fixtures' KL by ~20%), and as a float16 Gemm onnxruntime would
# widen it to float32 at load: 2 GB for a 128k vocabulary at hidden 4096, ~4 GB while it converts, the largest
# share of an 8B int4 session. A tied head reads the float16 embedding table in place (a Gemm with transB).
#
# NOTE: no 8-bit MatMulNBits node is written. onnxruntime 1.32's 8-bit CPU kernel has no fast float32 path
# here (14336 x 4096 weight, 2 threads: 229 ms a token against 13.6 ms for the same weight as two 4-bit nodes;
# 243 vs 55 ms for 8 rows; block size, symmetry and accuracy levels do not help), so an 8-bit weight (int8,
# int4's 8-bit share, the fallback above) is written as its high and low nibbles, two 4-bit MatMulNBits whose
# outputs are added: (q - z) s = (q_hi - z_hi) 16 s + (q_lo - z_lo) s, exact (``split_eight_bits``). The same
# bytes of codes; scales twice (+1/8 byte a weight at blocks of 32).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from sovpack.errors import ConversionError
from sovpack.quantize import GroupCodes, quantize_rtn

QUANT_BLOCK_SIZE = 32
MIN_BLOCK_SIZE = 16  # MatMulNBits' smallest block (a power of two >= 16)


def group_chooser(wanted: int) -> Callable[[int, int], int | None]:
    """The plan's ``group_for``: block size ``wanted`` (``QuantOptions.group_size_for``) or the largest smaller
    power of two >= 16 that divides the input size K; None when none does (that tensor stays 8-bit, see the
    NOTE)."""

    def group_for(bits: int, k: int) -> int | None:
        return block_for(k, wanted)

    return group_for


def block_for(k: int, wanted: int = QUANT_BLOCK_SIZE) -> int | None:
    """``wanted``, or the largest smaller power of two >= 16 that divides ``k``; None when none does."""
    size = wanted
    while size >= MIN_BLOCK_SIZE:
        if k % size == 0:
            return size
        size //= 2
    return None


def rtn_by_rows(read_rows: Callable[[slice], np.ndarray], rows: int, *, bits: int, block: int,
                rows_per_part: int = 4096) -> GroupCodes:
    """Round-to-nearest codes (asymmetric, integer zero points, float32 scales: what onnxruntime's quantizer
    makes) of a [rows, K] weight read ``rows_per_part`` rows at a time, so a 128k-row head never exists whole as
    float32."""
    parts = [quantize_rtn(read_rows(slice(start, min(start + rows_per_part, rows))), bits=bits, group_size=block,
                          symmetric=False, scale_dtype=np.float32) for start in range(0, rows, rows_per_part)]
    return GroupCodes(codes=np.concatenate([p.codes for p in parts]), scale=np.concatenate([p.scale for p in parts]),
                      zero=np.concatenate([p.zero for p in parts]), bits=bits, symmetric=False)


def is_block_size(size: int) -> bool:
    """Whether MatMulNBits accepts ``size`` as its block_size."""
    return size >= MIN_BLOCK_SIZE and size & (size - 1) == 0


def pack_matmulnbits(codes: GroupCodes) -> tuple[dict[str, Any], list[np.ndarray]]:
    """MatMulNBits' attributes and weight inputs (B, scales[, zero points]) for ``codes`` of a [N, K] weight.

    Symmetric codes (every zero point 2^(bits-1)) omit the zero points: the op's default is that value.
    """
    n, blocks, block = codes.codes.shape
    if codes.bits not in (4, 8) or not is_block_size(block):
        raise ConversionError(f"MatMulNBits cannot store {codes.bits}-bit codes in blocks of {block}")
    q = np.ascontiguousarray(codes.codes, dtype=np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8) if codes.bits == 4 else q
    scales = np.ascontiguousarray(codes.scale, dtype=np.float32)
    attrs: dict[str, Any] = {"K": blocks * block, "N": n, "bits": codes.bits, "block_size": block}
    half = 2 ** (codes.bits - 1)
    if codes.symmetric and bool(np.all(codes.zero == half)):
        return attrs, [packed, scales]
    if codes.zero.dtype != np.uint8:  # float zero points, stored in T1 like the scales
        return attrs, [packed, scales, np.ascontiguousarray(codes.zero, dtype=np.float32)]
    zero = codes.zero
    if codes.bits == 4:
        if blocks % 2:
            zero = np.concatenate([zero, np.full((n, 1), half, dtype=np.uint8)], axis=1)
        zero = (zero[:, 0::2] | (zero[:, 1::2] << 4)).astype(np.uint8)
    return attrs, [packed, scales, np.ascontiguousarray(zero, dtype=np.uint8)]


def split_float_zero_points(codes: GroupCodes) -> tuple[GroupCodes, np.ndarray | None]:
    """Float zero points as MatMulNBits' fast uint8 ones plus their fractional parts (see the NOTE).

    ``(q - z) * s = (q - round(z)) * s - (z - round(z)) * s``: the returned codes carry the integer zero
    points (clipped to the code range), and the residual [blocks, N] float32 holds ``(z - round(z)) * s`` per
    block and output, which the graph subtracts as ``(x summed per block) @ residual``. None when the zero
    points are integers already.
    """
    if codes.zero.dtype == np.uint8:
        return codes, None
    zero = np.asarray(codes.zero, dtype=np.float32)
    integer = np.clip(np.rint(zero), 0, 2**codes.bits - 1)
    residual = ((zero - integer) * codes.scale).T.astype(np.float32)
    integer_codes = GroupCodes(codes=codes.codes, scale=codes.scale, zero=integer.astype(np.uint8), bits=codes.bits,
                               symmetric=codes.symmetric)
    return integer_codes, np.ascontiguousarray(residual)


def split_eight_bits(attrs: dict[str, Any], arrays: list[np.ndarray]
                     ) -> list[tuple[dict[str, Any], list[np.ndarray]]]:
    """An 8-bit MatMulNBits' inputs as two 4-bit ones whose outputs sum to the same product (see the NOTE).

    ``(q - z) * s = (q_high - z_high) * 16 s + (q_low - z_low) * s`` for the nibbles of code q and zero point z,
    exactly (16 s is exact in float32). ``arrays``: uint8 codes [N, blocks, block] (or flat), scales and
    uint8 zero points (absent: 128) as pack_matmulnbits or onnxruntime's quantizer writes them.
    """
    n, block = int(attrs["N"]), int(attrs["block_size"])
    if attrs["bits"] != 8 or (len(arrays) > 2 and arrays[2].dtype != np.uint8):
        raise ConversionError(f"only 8-bit MatMulNBits weights with uint8 zero points split, not {attrs['bits']}-bit"
                              f" ones with {[str(a.dtype) for a in arrays]} inputs")
    codes = np.asarray(arrays[0], dtype=np.uint8).reshape(n, -1, block)
    blocks = codes.shape[1]
    scale = np.asarray(arrays[1], dtype=np.float32).reshape(n, blocks)
    zero = (np.asarray(arrays[2], dtype=np.uint8).reshape(n, -1)[:, :blocks] if len(arrays) > 2
            else np.full((n, blocks), 128, dtype=np.uint8))
    halves = []
    for shift, mask, factor in ((4, 0x0F, 16.0), (0, 0x0F, 1.0)):
        half = GroupCodes(codes=(codes >> shift) & mask, scale=scale * np.float32(factor), zero=(zero >> shift) & mask,
                          bits=4, symmetric=False)
        half_attrs, half_arrays = pack_matmulnbits(half)
        halves.append(({**attrs, **half_attrs, "K": attrs["K"]}, half_arrays))
    return halves


def quantize_matmul_weight(
    weight_t: Callable[[], np.ndarray], bits: int, block_size: int, opset: int
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Quantize one [K, N] float32 weight with onnxruntime's MatMulNBitsQuantizer.

    ``weight_t`` produces the weight (so no caller keeps a reference while the quantizer runs). The weight is
    the only initializer of a one-MatMul model (default-domain ``opset``); the quantizer rewrites that MatMul
    into MatMulNBits. Returns the node's attributes and its weight inputs in order (packed B, scales[, zero
    points]).
    """
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    array = weight_t()
    k, n = array.shape
    init = numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), "W")
    del array
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "W"], ["Y"], name="linear")],
        "one_linear",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        initializer=[init],
    )
    del init
    one = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    one.ir_version = helper.find_min_ir_version_for(list(one.opset_import), ignore_unknown=True)
    del graph
    quant_logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quant_logger.level
    quant_logger.setLevel(logging.WARNING)
    try:
        quantizer = MatMulNBitsQuantizer(one, bits=bits, block_size=block_size, is_symmetric=False)
        del one
        quantizer.process()
    finally:
        quant_logger.setLevel(level)
    result = quantizer.model.model
    nodes = [nd for nd in result.graph.node if nd.op_type == "MatMulNBits"]
    if len(nodes) != 1 or len(result.graph.node) != 1:
        raise ConversionError(
            f"MatMulNBitsQuantizer produced {[nd.op_type for nd in result.graph.node]}, expected one MatMulNBits"
        )
    node = nodes[0]
    inits = {t.name: t for t in result.graph.initializer}
    arrays = [numpy_helper.to_array(inits[name]) for name in node.input[1:] if name]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return attrs, arrays
