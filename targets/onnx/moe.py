"""Mixture-of-experts feed-forward layers as onnxruntime's own ``com.microsoft.MoE`` / ``QMoE`` operators.

A sparse layer becomes two nodes: the router, a float32 Gemm over ``layers.<i>.router`` (+ ``router_bias``)
giving logits [tokens, experts], and one MoE (fp32, fp16) or QMoE (int8, int4) node that routes every token and
runs only its chosen experts. The expert weights are stacked per layer into two initializers, fc1
[experts, 2 * I, hidden] (gate and up rows interleaved: gate row 0, up row 0, gate row 1, ...) and fc2
[experts, hidden, I], and written to the external data file one expert at a time.

# NOTE: why the contrib operator. A graph of standard ops cannot skip unrouted experts without data-dependent
# control flow: the portable choice is a dense graph that runs every expert on every token and multiplies the
# unchosen ones by zero, which costs num_experts / experts_per_token times the expert compute and weight reads.
# Measured for one 16-expert top-2 layer (hidden 512, I 1024, fp32, 2 threads, shared machine): one decode token
# 2.5-3.5 ms with the MoE op against 18-35 ms dense; 128 prefill tokens 40-82 ms against 86-201 ms. onnxruntime's
# CPU MoE kernel (onnxruntime >= 1.23.1; QMoE >= 1.24, precisions.py) takes the router logits and does softmax,
# top-k, optional renormalisation and the per-expert GEMMs itself; onnxruntime-genai runs it like any node. Its
# CPU kernel accepts only the interleaved fused SwiGLU layout (swiglu_fusion=1; separate fc3 weights are
# NOT_IMPLEMENTED on CPU), and computes
# ``G = min(g, limit); L = clip(l, -limit, limit); G * sigmoid(alpha * G) * (L + beta)``: silu(gate) * up with
# alpha 1, beta 0 and no limit (Qwen3-MoE, Mixtral), gpt-oss's clamped SwiGLU with alpha 1.702, beta 1 (the up
# offset) and limit 7. Every attribute is written explicitly: their defaults changed between releases.
#
# NOTE: routing. The op always takes the softmax over all experts, then the top k; normalize_routing_weights=1
# divides the chosen k by their sum. before_topk + norm_topk_prob (Qwen3-MoE, Mixtral) -> 1; before_topk without
# it -> 0; after_topk (gpt-oss: softmax over the top-k logits) -> 1, since renormalising the top k of the full
# softmax is exactly the softmax over the top-k logits. The router is stored float32 at every precision: it is
# tiny (experts x hidden) and its output is a discrete choice, so rounding its weights would flip near-tie
# experts and turn a small weight error into a large logit error.
#
# NOTE: precisions. MoE's weights share the type of its input (T), so fp16 stores fp16 stacks and casts them to
# float32 in the graph (onnxruntime folds the Cast at load time), as the dense Gemms do. int8/int4 use QMoE on
# float32 activations, with weights quantized here by round-to-nearest, asymmetric with uint8 zero points (the
# style of quantize.py): int4 per block of 32 (16 where hidden or I is not a multiple of 32) along the input
# dimension; int8 per output row (one scale per row), because QMoE's block-wise 8-bit CPU kernel quantizes the
# activations to int8 as well, while its per-row 8-bit path dequantizes to float32 and computes exactly with the
# stored weights. The packed weights stream one expert at a time; a layer's scales and zero points are kept in
# memory until its packed stack is written (about a quarter of the packed int4 stack at block 32, ~1% for int8).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from sovpack.errors import ConversionError
from sovpack.source.spec import ModelSpec, MoESpec
from sovpack.targets.onnx.external_data import converted_chunks
from sovpack.targets.onnx.precisions import F32
from sovpack.targets.onnx.quantize import QUANT_BLOCK_SIZE

if TYPE_CHECKING:
    from sovpack.targets.onnx.graph import DecoderBuilder

MS_DOMAIN = "com.microsoft"
# QMoE block sizes tried for int4, largest first: both hidden and I must be multiples of the block.
INT4_BLOCK_SIZES = (QUANT_BLOCK_SIZE, 16)


@dataclass(frozen=True, kw_only=True, slots=True)
class MoePlan:
    """How one spec's sparse layers are written: the op, its attributes, and the expert weights' storage."""

    op: str  # "MoE" or "QMoE"
    attrs: dict[str, Any]
    weight_dtype: np.dtype  # stored dtype of fc1/fc2 for MoE (float32 or float16); uint8 for QMoE
    bits: int | None = None  # QMoE expert_weight_bits
    block_size: int | None = None  # QMoE int4 block along the input dimension; None: one scale per row

    def describe(self, spec: ModelSpec) -> dict[str, Any]:
        """The artifact metadata entry for the experts (format_metadata["moe"])."""
        moe = _moe(spec)
        info: dict[str, Any] = {
            "op": f"{MS_DOMAIN}.{self.op}",
            # JSON has no infinity: an unclamped swiglu_limit is recorded as the string "inf".
            "attributes": {k: "inf" if v == float("inf") else v for k, v in sorted(self.attrs.items())},
            "sparse_layers": list(moe.sparse_layers),
            "num_experts": moe.num_experts,
            "experts_per_token": moe.experts_per_token,
            "router": "float32 Gemm (router logits into the op)",
            "fc1_layout": "[experts, 2 * expert_intermediate_size, hidden], gate/up rows interleaved",
            "fc2_layout": "[experts, hidden, expert_intermediate_size]",
            "expert_weight_dtype": "uint8" if self.bits is not None else self.weight_dtype.name,
        }
        if self.bits is not None:
            info["quantization"] = {
                "bits": self.bits,
                "block_size": self.block_size,
                "scheme": "RTN, asymmetric, float32 scales and uint8 zero points "
                + (f"per block of {self.block_size} inputs" if self.block_size else "per output row"),
            }
        return info


def _moe(spec: ModelSpec) -> MoESpec:
    if spec.moe is None:
        raise ConversionError(f"onnx: model family {spec.family!r} has no mixture of experts")
    return spec.moe


def moe_plan(spec: ModelSpec, matrix_dtype: np.dtype, bits: int | None) -> MoePlan:
    """The op and attributes for ``spec``'s experts at a precision; a ConversionError for what the op lacks."""
    moe = _moe(spec)
    if moe.shared_expert_intermediate_size is not None:
        raise ConversionError(
            f"onnx: {spec.family!r} has a shared expert, which onnxruntime's MoE operator does not compute; "
            "the onnx target does not write shared experts"
        )
    if moe.swiglu_limit is None and spec.activation != "silu":
        raise ConversionError(
            f"onnx: {spec.family!r} experts use activation {spec.activation!r}; onnxruntime's CPU MoE kernel "
            "computes only SwiGLU (silu(gate) * up, optionally clamped)"
        )
    clamped = moe.swiglu_limit is not None
    attrs: dict[str, Any] = {
        "k": moe.experts_per_token,
        "activation_type": "swiglu",
        "swiglu_fusion": 1,
        "normalize_routing_weights": int(moe.router_softmax == "after_topk" or moe.norm_topk_prob),
        "activation_alpha": float(moe.swiglu_alpha) if clamped else 1.0,
        "activation_beta": float(moe.swiglu_up_offset) if clamped else 0.0,
        "swiglu_limit": float(moe.swiglu_limit) if moe.swiglu_limit is not None else float("inf"),
        "use_sparse_mixer": 0,
    }
    if bits is None:
        return MoePlan(op="MoE", attrs=attrs, weight_dtype=np.dtype(matrix_dtype))
    block: int | None = None
    if bits == 4:
        h, inter = spec.hidden_size, moe.expert_intermediate_size
        block = next((b for b in INT4_BLOCK_SIZES if h % b == 0 and inter % b == 0), None)
        if block is None:
            raise ConversionError(
                f"onnx:int4: QMoE needs hidden size ({h}) and expert width ({inter}) to be multiples of one "
                f"block size in {list(INT4_BLOCK_SIZES)}"
            )
        attrs["block_size"] = block
    attrs["expert_weight_bits"] = bits
    return MoePlan(op="QMoE", attrs=attrs, weight_dtype=np.dtype(np.uint8), bits=bits, block_size=block)


def rtn_quantize(weight: np.ndarray, bits: int, block: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round-to-nearest asymmetric quantization of ``weight`` [N, K] as QMoE reads one expert.

    Returns packed weights [N, K * bits / 8] (4-bit: low nibble first), float32 scales [N, K / block] (or [N]
    per row when ``block`` is None) and uint8 zero points [N, ceil(blocks * bits / 8)] (or [N]).
    """
    n, k = weight.shape
    size = k if block is None else block
    blocks = weight.astype(np.float32).reshape(n, k // size, size)
    qmax = (1 << bits) - 1
    lo = np.minimum(blocks.min(axis=-1), 0.0)
    hi = np.maximum(blocks.max(axis=-1), 0.0)
    scale = ((hi - lo) / qmax).astype(np.float32)
    scale[scale == 0] = 1.0
    zero = np.clip(np.round(-lo / scale), 0, qmax)
    q = np.clip(np.round(blocks / scale[..., None]) + zero[..., None], 0, qmax).astype(np.uint8).reshape(n, k)
    zero_u8 = zero.astype(np.uint8)
    if bits == 4:
        q = q[:, 0::2] | (q[:, 1::2] << 4)
        if zero_u8.shape[1] % 2:
            zero_u8 = np.concatenate([zero_u8, np.zeros((n, 1), np.uint8)], axis=1)
        zero_u8 = zero_u8[:, 0::2] | (zero_u8[:, 1::2] << 4)
    if block is None:
        return q, scale.reshape(n), zero_u8.reshape(n)
    return q, scale, zero_u8


class ExpertWriter:
    """Writes one sparse layer's router and stacked experts through a DecoderBuilder, and emits its nodes."""

    def __init__(self, builder: DecoderBuilder, plan: MoePlan) -> None:
        self.b = builder
        self.plan = plan
        self.spec = builder.spec
        self.moe = _moe(builder.spec)

    def _fc1_rows(self, prefix: str, e: int) -> np.ndarray:
        """Expert ``e``'s fc1 rows [2I, H] as float32: its gate and up rows interleaved."""
        x = f"{prefix}experts.{e}."
        gate = self.b.source(x + "gate")
        up = self.b.source(x + "up")
        fc1 = np.stack([gate, up], axis=1).reshape(-1, gate.shape[1])
        del gate, up
        self.b.release(x + "gate")
        self.b.release(x + "up")
        return fc1

    def _fc2_rows(self, prefix: str, e: int) -> np.ndarray:
        name = f"{prefix}experts.{e}.down"
        fc2 = self.b.source(name)
        self.b.release(name)
        return fc2

    def _bias_rows(self, prefix: str, fc: str) -> Iterator[np.ndarray]:
        """fc1 bias rows [1, 2I] (gate/up interleaved) or fc2 bias rows [1, H], one expert at a time."""
        for e in range(self.moe.num_experts):
            x = f"{prefix}experts.{e}."
            names = [x + "gate_bias", x + "up_bias"] if fc == "fc1" else [x + "down_bias"]
            yield np.stack([self.b.source(n) for n in names], axis=1).reshape(1, -1)
            for name in names:
                self.b.tick(name)

    def _float_stacks(self, prefix: str) -> tuple[str, str]:
        """fc1 and fc2 at the plan's float dtype, each written expert by expert (cast to float32 if fp16)."""
        e_count, inter, h = self.moe.num_experts, self.moe.expert_intermediate_size, self.spec.hidden_size
        dtype = self.plan.weight_dtype

        def fc1_chunks() -> Iterator[np.ndarray]:
            for e in range(e_count):
                yield from converted_chunks(f"{prefix}experts.{e}.gate/up", self._fc1_rows(prefix, e), dtype)
                self.b.tick(f"{prefix}experts.{e}.gate")
                self.b.tick(f"{prefix}experts.{e}.up")

        def fc2_chunks() -> Iterator[np.ndarray]:
            for e in range(e_count):
                yield from converted_chunks(f"{prefix}experts.{e}.down", self._fc2_rows(prefix, e), dtype)
                self.b.tick(f"{prefix}experts.{e}.down")

        fc1, fc2 = f"{prefix}moe.fc1", f"{prefix}moe.fc2"
        self.b.add_initializer(self.b.data.write(fc1, (e_count, 2 * inter, h), dtype, fc1_chunks()))
        self.b.add_initializer(self.b.data.write(fc2, (e_count, h, inter), dtype, fc2_chunks()))
        return self.b.as_float(fc1, dtype), self.b.as_float(fc2, dtype)

    def _quantized_stacks(self, prefix: str) -> list[str]:
        """Packed fc1/fc2 stacks (streamed expert by expert) and their scales and zero points (kept per layer
        until the packed stack is written), in QMoE's input order."""
        bits, block = self.plan.bits, self.plan.block_size
        if bits is None:
            raise ConversionError("onnx: quantized experts need a bit width")
        e_count, inter, h = self.moe.num_experts, self.moe.expert_intermediate_size, self.spec.hidden_size
        u8 = np.dtype(np.uint8)
        names: list[str] = []
        for fc, rows, shape in (("fc1", self._fc1_rows, (e_count, 2 * inter, h * bits // 8)),
                                ("fc2", self._fc2_rows, (e_count, h, inter * bits // 8))):
            scales: list[np.ndarray] = []
            zero_points: list[np.ndarray] = []

            def chunks(fc: str = fc, rows: Any = rows, scales: list[np.ndarray] = scales,
                       zero_points: list[np.ndarray] = zero_points) -> Iterator[np.ndarray]:
                for e in range(e_count):
                    q, s, z = rtn_quantize(rows(prefix, e), bits, block)
                    scales.append(s)
                    zero_points.append(z)
                    yield q[None]
                    for kind in (("gate", "up") if fc == "fc1" else ("down",)):
                        self.b.tick(f"{prefix}experts.{e}.{kind}")

            packed = f"{prefix}moe.{fc}.q{bits}"
            self.b.add_initializer(self.b.data.write(packed, shape, u8, chunks()))
            self.b.add_initializer(self.b.data.write_array(f"{prefix}moe.{fc}.scales", np.stack(scales)))
            self.b.add_initializer(self.b.data.write_array(f"{prefix}moe.{fc}.zero_points", np.stack(zero_points)))
            names += [packed, f"{prefix}moe.{fc}.scales", f"{prefix}moe.{fc}.zero_points"]
        return names

    def build(self, h: str, layer: int) -> str:
        """The layer's MoE output [tokens, hidden] for the normed hidden states ``h`` [tokens, hidden]."""
        p = f"layers.{layer}."
        router_bias = p + "router_bias" if self.moe.router_bias else None
        logits = self.b.dense(h, p + "router", F32, router_bias)  # [tokens, experts], float32 always
        fc1_bias = fc2_bias = ""
        if self.moe.expert_bias:
            e_count, inter, hidden = self.moe.num_experts, self.moe.expert_intermediate_size, self.spec.hidden_size
            fc1_bias, fc2_bias = f"{p}moe.fc1_bias", f"{p}moe.fc2_bias"
            self.b.add_initializer(self.b.data.write(fc1_bias, (e_count, 2 * inter), F32, self._bias_rows(p, "fc1")))
            self.b.add_initializer(self.b.data.write(fc2_bias, (e_count, hidden), F32, self._bias_rows(p, "fc2")))
        attrs = self.plan.attrs
        if self.plan.op == "MoE":
            fc1, fc2 = self._float_stacks(p)
            inputs = [h, logits, fc1, fc1_bias, fc2, fc2_bias]
        else:
            fc1, s1, z1, fc2, s2, z2 = self._quantized_stacks(p)
            # input, router_probs, fc1 (weights, scales, bias), fc2 (...), fc3 (...) unused, fc1/fc2 zero points
            inputs = [h, logits, fc1, s1, fc1_bias, fc2, s2, fc2_bias, "", "", "", z1, z2]
        while inputs and not inputs[-1]:
            inputs.pop()
        self.b.contrib.append((self.plan.op, dict(attrs)))
        return self.b.g.op(self.plan.op, *inputs, name=f"{p}moe/{self.plan.op.lower()}", domain=MS_DOMAIN, **attrs)
