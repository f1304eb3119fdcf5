"""The onnx precisions: the target's precision table, how each stores weights, and the oldest onnxruntime.

# NOTE: minimum onnxruntime version rule. min_ort = max over: the first ORT release implementing the default-
# domain opset (ORT_FOR_OPSET; opset 17 -> 1.12), the first release accepting the IR version
# (ORT_FOR_IR_VERSION; IR 8 -> 1.10), and, per contrib op used, the first release with a CPU kernel for it
# (MatMulNBits with accuracy_level unset, i.e. float32 compute: bits=4 -> 1.17, with float zero points 1.18,
# bits=8 -> 1.23). An opset/IR/op outside these tables is an error, so the rule can never silently under-report.
# Checked by loading and running artifacts of four families on old wheels (1.15.0 is the oldest with a Python
# 3.11 wheel): fp32/fp16 run on 1.15.0 and later; int4 is refused by 1.15.0 (no MatMulNBits), computes wrong
# logits on 1.16.3 when a column has an odd number of blocks (e.g. K=160, block 32), and is right from 1.17.0
# (float zero points: from 1.18.0, ORT_FOR_MATMULNBITS_FLOAT_ZERO); int8 is refused at load by 1.21.1, fails at
# run time on 1.22.0 (its 8-bit kernel covers only accuracy_level 4, int8 compute) and is right from 1.23.0;
# the writer no longer emits 8-bit nodes (two 4-bit ones instead, quantize.py), so int8 and int4 artifacts
# need 1.17 (checked by running both on 1.17.0). The precision table's ``runtime_floor`` is this rule's result
# for the opset and IR version the writer emits (17 and 8); the tests check that the two agree.
# Mixture-of-experts artifacts add their MoE/QMoE kernels (ORT_FOR_MOE: 1.23.1 and 1.24), so their
# min_onnxruntime lies above the table's floor.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from sovpack._protocols import Precision
from sovpack.errors import ConversionError
from sovpack.parity.thresholds import DEFAULT_THRESHOLDS
from sovpack.targets.base import precision_table

PRECISIONS: dict[str, Precision] = precision_table(
    Precision(name="fp32", weights="float32", quantized=False, thresholds=DEFAULT_THRESHOLDS["fp32"],
              runtime_floor="1.12"),
    # onnxruntime folds the graph's Cast of each fp16 initializer at load: the session holds fp32 weights
    # (measured on a 0.6B model: 2.7 GB of anonymous memory for a 1.2 GB artifact).
    Precision(name="fp16", weights="float16", quantized=False, thresholds=DEFAULT_THRESHOLDS["fp16"],
              runtime_floor="1.12", runtime_bytes_per_weight=4.0),
    # 8-bit weights are stored as two 4-bit MatMulNBits (quantize.split_eight_bits) and 4-bit float zero
    # points as uint8 ones plus a residual: both precisions need only the 4-bit, uint8-zero-point kernel.
    Precision(name="int8", weights="int8", quantized=True, thresholds=DEFAULT_THRESHOLDS["int8"],
              runtime_floor="1.17"),
    Precision(name="int4", weights="int4", quantized=True, thresholds=DEFAULT_THRESHOLDS["int4"],
              runtime_floor="1.17"),
)


@dataclass(frozen=True, kw_only=True, slots=True)
class PrecisionPlan:
    """How one precision stores weights: matrices, embedding table, and optional MatMulNBits bits."""

    name: str
    matrix_dtype: np.dtype  # unquantized attention/MLP matrices (Gemm weights)
    embed_dtype: np.dtype  # the Gather table
    head_dtype: np.dtype  # the lm_head's Gemm (float plans; an integer plan's untied head is 8-bit)
    bits: int | None = None  # MatMulNBits bits for the attention and MLP projections


F32, F16 = np.dtype(np.float32), np.dtype(np.float16)
PLANS: dict[str, PrecisionPlan] = {
    "fp32": PrecisionPlan(name="fp32", matrix_dtype=F32, embed_dtype=F32, head_dtype=F32),
    "fp16": PrecisionPlan(name="fp16", matrix_dtype=F16, embed_dtype=F16, head_dtype=F16),
    "int8": PrecisionPlan(name="int8", matrix_dtype=F32, embed_dtype=F16, head_dtype=F16, bits=8),
    "int4": PrecisionPlan(name="int4", matrix_dtype=F32, embed_dtype=F16, head_dtype=F16, bits=4),
}


def plan_for(precision: str) -> PrecisionPlan:
    """The storage plan of ``precision``; an unknown one is a ConversionError listing the known ones."""
    plan = PLANS.get(precision)
    if plan is None:
        raise ConversionError(f"onnx: unknown precision {precision!r}; known: {', '.join(PLANS)}")
    return plan


# First onnxruntime release implementing each default-domain opset / accepting each IR version, from the
# ORT compatibility matrix (onnxruntime.ai/docs/reference/compatibility.html).
# Only the opsets/IR versions this writer could emit are listed; anything else is refused by the rule.
ORT_FOR_OPSET: dict[int, tuple[int, int]] = {17: (1, 12), 18: (1, 14), 19: (1, 15), 20: (1, 17), 21: (1, 18)}
ORT_FOR_IR_VERSION: dict[int, tuple[int, int]] = {8: (1, 10), 9: (1, 15), 10: (1, 18)}
# Contrib ops: first release whose CPU kernel computes them correctly, per distinguishing attribute value.
ORT_FOR_MATMULNBITS_BITS: dict[int, tuple[int, int]] = {4: (1, 17), 8: (1, 23)}
# Float (T1) zero points at 4 bits, checked on one-node models (K = 96 and 160: odd block counts per column):
# 1.17.0 refuses them at load (type error); 1.18.0, 1.20.0, 1.23.0 and 1.32.0 match numpy to 4e-6. No CPU kernel
# takes them at 8 bits (1.32 refuses at session creation). Default int4 artifacts (mixed 4/8-bit, realistic llama3
# and qwen2 fixtures) give logits on 1.23.0 identical to 1.32.0's.
ORT_FOR_MATMULNBITS_FLOAT_ZERO: dict[int, tuple[int, int]] = {4: (1, 18)}
# Mixture-of-experts ops (moe.py) on float32 activations with interleaved SwiGLU, per expert_weight_bits (None:
# the unquantized MoE op). Checked with artifacts of the qwen3moe, mixtral and gptoss fixtures on old wheels:
# MoE has no CPU kernel in 1.23.0 and matches from 1.23.1; QMoE (fp32 input, uint8 zero points) is refused as an
# invalid graph by 1.23.x and matches from 1.24.1 (the first 1.24 wheel).
ORT_FOR_MOE: dict[tuple[str, int | None], tuple[int, ...]] = {("MoE", None): (1, 23, 1), ("QMoE", 4): (1, 24),
                                                              ("QMoE", 8): (1, 24)}


def _version(v: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in v)


def min_onnxruntime(
    opset: int, ir_version: int, contrib: Iterable[tuple[str, dict[str, Any]]]
) -> tuple[str, list[str]]:
    """The lowest onnxruntime version that loads and runs a model, and why (one reason per constraint)."""
    if opset not in ORT_FOR_OPSET:
        raise ConversionError(f"no known onnxruntime release for opset {opset}")
    if ir_version not in ORT_FOR_IR_VERSION:
        raise ConversionError(f"no known onnxruntime release for IR version {ir_version}")
    found: list[tuple[tuple[int, ...], str]] = [
        (ORT_FOR_OPSET[opset], f"ai.onnx opset {opset} needs onnxruntime >= {_version(ORT_FOR_OPSET[opset])}"),
        (
            ORT_FOR_IR_VERSION[ir_version],
            f"IR version {ir_version} needs onnxruntime >= {_version(ORT_FOR_IR_VERSION[ir_version])}",
        ),
    ]
    seen: set[tuple[str, int]] = set()
    for op_type, attrs in contrib:
        if op_type in ("MoE", "QMoE"):
            bits = int(attrs["expert_weight_bits"]) if op_type == "QMoE" else None
            if (op_type, bits) not in ORT_FOR_MOE:
                raise ConversionError(f"no known onnxruntime release with a CPU {op_type} kernel for bits={bits}")
            if (op_type, bits or 0) not in seen:
                seen.add((op_type, bits or 0))
                need = ORT_FOR_MOE[(op_type, bits)]
                what = op_type if bits is None else f"{op_type} with expert_weight_bits={bits}"
                found.append((need, f"com.microsoft.{what} needs onnxruntime >= {_version(need)}"))
            continue
        if op_type != "MatMulNBits":
            raise ConversionError(f"no known onnxruntime release for contrib op {op_type}")
        bits = int(attrs.get("bits", 4))
        if bits not in ORT_FOR_MATMULNBITS_BITS:
            raise ConversionError(f"no known onnxruntime release with a CPU MatMulNBits kernel for bits={bits}")
        float_zero = bool(attrs.get("float_zero_points", False))
        if float_zero and bits not in ORT_FOR_MATMULNBITS_FLOAT_ZERO:
            raise ConversionError(f"no known onnxruntime release with a CPU MatMulNBits kernel for bits={bits} "
                                  "and float zero points")
        if (op_type, bits + 100 * float_zero) in seen:
            continue
        seen.add((op_type, bits + 100 * float_zero))
        need = ORT_FOR_MATMULNBITS_FLOAT_ZERO[bits] if float_zero else ORT_FOR_MATMULNBITS_BITS[bits]
        what = f"bits={bits}" + (" and float zero points" if float_zero else "")
        found.append((need, f"com.microsoft.MatMulNBits with {what} needs onnxruntime >= {_version(need)}"))
    version = max(v for v, _ in found)
    return _version(version), [reason for _, reason in found]
