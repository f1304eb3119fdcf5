"""Mixture-of-experts feed-forward for the OpenVINO graph: the "tiled" MoE block the CPU plugin routes.

OpenVINO 2026.4's CPU plugin (``ConvertToCPUSpecificOpset``) runs ``ConvertTiledMoeBlockToGatherMatmuls``, which
rewrites one specific dense subgraph, the one optimum-intel exports for Qwen3-MoE / Mixtral / gpt-oss, into its
``GatherMatmul`` kernels that multiply each token by its top-k experts only. The subgraph (tokens ``N``,
experts ``E``):

- routing: router ``MatMul`` (+ bias), ``Softmax`` / ``TopK`` as the spec says, the top-k weights scattered into
  a zero [N, E] tensor (``ScatterElementsUpdate`` on axis 1), ``Transpose`` [E, N], ``Reshape`` [E, N, 1];
- experts: the tokens [N, H] ``Tile``d E times and reshaped to [E, N, H], batched ``MatMul``s (transpose_b) against
  stacked expert constants [E, out, in]; either gate and up apart with a one-input ``Swish`` (or ``Gelu``) and a
  ``Multiply`` (3 GEMMs: Qwen3-MoE, Mixtral), or gate and up as one biased MatMul, two ``Slice``s, ``Clamp`` + ``Add``
  on up, ``Minimum`` + ``Swish(alpha)`` on gate (2 GEMMs, gpt-oss's clamped SwiGLU); then down (+ bias);
- the [E, N, H] outputs times the routing map, ``ReduceSum`` over experts (keep_dims false).

Where the rewrite applies, the compiled model holds ``GatherMatmul`` instead of the Tile/MatMuls/Scatter (checked by
tests/targets/test_openvino_moe.py); where it does not (another plugin, an older OpenVINO), the same graph is a
correct dense all-experts computation, unrouted experts weighted by exactly 0.

NOTE: the pattern matches ``Swish`` with one input only; the Python ``swish`` factory always adds a beta constant,
so the 3-GEMM Swish is made with ``NodeFactory``. Expert biases must be plain ``Constant``s for the 2-GEMM pattern,
so they stay f32 under every precision (they are small).

Weights: each stacked constant [E, out, in] is one postponed constant (see ``weights``) filled one expert at a time
from the per-expert canonical tensors; integer precisions quantize each expert as its own [out, in] matrix (the
codes land in the stacked tensor, the scales and zero points are small), so the writer holds one stacked
constant plus one expert.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sovpack.errors import ConversionError
from sovpack.source.spec import ModelSpec, MoESpec
from sovpack.targets.halves import check_fits_float16
from sovpack.targets.openvino.weights import (
    FLOAT16_ADVICE,
    WeightFactory,
    layer_format,
    pack_int4,
    quantize,
)

__all__ = ["check_moe", "moe_block"]


def check_moe(spec: ModelSpec) -> None:
    """Refuse, by name, the mixture-of-experts features this graph does not build."""
    moe = spec.moe
    if moe is None:
        return
    if moe.shared_expert_intermediate_size is not None:
        raise ConversionError("the OpenVINO target has no shared experts (shared_expert_intermediate_size)")
    if moe.expert_bias and moe.swiglu_limit is None:
        raise ConversionError("the OpenVINO target builds expert biases only with the clamped SwiGLU (gpt-oss)")
    if moe.swiglu_limit is None and spec.activation not in ("silu", "gelu", "gelu_tanh"):
        raise ConversionError(f"the OpenVINO target has no expert activation {spec.activation!r}")


# ---------------------------------------------------------------------------------------- stacked weights


def _expert_names(moe: MoESpec, p: str, parts: tuple[str, ...]) -> list[list[str]]:
    return [[f"{p}experts.{e}.{part}" for part in parts] for e in range(moe.num_experts)]


class _StackedQuantized:
    """Codes [E, out, (groups, group)] of every expert, quantized one expert at a time on first use.

    Like ``weights._LazyQuantized``: the codes are handed out once (they are the stacked constant), the scales
    and zero points kept until the serializer has asked for them.
    """

    def __init__(self, factory: WeightFactory, names: list[list[str]], rows: list[int], in_features: int,
                 bits: int, symmetric: bool, group: int | None) -> None:
        self.factory, self.names, self.rows, self.in_features = factory, names, rows, in_features
        self.bits, self.symmetric, self.group = bits, symmetric, group
        self._codes: Any = None
        self.scale: np.ndarray | None = None
        self.zero: np.ndarray | None = None

    def code_shape(self) -> list[int]:
        out = sum(self.rows)
        if self.group is None:
            return [len(self.names), out, self.in_features]
        return [len(self.names), out, self.in_features // self.group, self.group]

    def param_shape(self) -> list[int]:
        return [*self.code_shape()[:-1], 1]

    def _run(self) -> None:
        import openvino as ov

        code_type = _code_type(self.bits, self.symmetric)
        codes = ov.Tensor(code_type, ov.Shape(self.code_shape()))
        flat = codes.data.reshape(-1) if self.bits == 4 else codes.data.reshape(len(self.names), sum(self.rows), -1)
        scale = np.empty(self.param_shape(), dtype=np.float16)
        zero = None if self.symmetric else np.empty(self.param_shape(), dtype=np.uint8)
        expert_bytes = sum(self.rows) * self.in_features // 2
        for e, parts in enumerate(self.names):
            expert = np.empty([sum(self.rows), *self.code_shape()[2:]], dtype=np.int8 if self.symmetric else np.uint8)
            for k, name in enumerate(parts):
                q = self.factory._consume(name, lambda w: quantize(w, bits=self.bits, symmetric=self.symmetric,
                                                                   group_size=self.group))
                rows = _part_rows(k, len(parts))
                expert[rows] = q.codes.reshape(expert[rows].shape)
                scale[e, rows] = q.scale
                if zero is not None and q.zero_point is not None:
                    zero[e, rows] = q.zero_point
            if self.bits == 4:  # packed two per byte; each expert starts on a whole byte (even sizes)
                flat[e * expert_bytes:(e + 1) * expert_bytes] = pack_int4(expert)
            else:
                flat[e] = expert.reshape(flat[e].shape)
        self._codes, self.scale, self.zero = codes, scale, zero

    def take_codes(self) -> Any:
        if self._codes is None:
            self._run()
        codes, self._codes = self._codes, None
        return codes

    def params(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self.scale is None:
            self._run()
        if self.scale is None:  # _run always sets it; typed for mypy
            raise ConversionError("internal error: stacked expert scales missing")
        return self.scale, self.zero


def _part_rows(k: int, parts: int) -> slice:
    """The rows of an expert's stacked matrix that hold its part ``k`` of ``parts``: all of them, or every
    ``parts``-th row from ``k`` (gate/up interleaved, as gpt-oss publishes them).

    NOTE: interleaved, not gate-then-up halves: OpenVINO's GroupedSliceToVSplitOptimization turns two contiguous
    Slices into a VariadicSplit, which the tiled-MoE rewrite does not match; step-2 Slices stay Slices."""
    return slice(None) if parts == 1 else slice(k, None, parts)


def _code_type(bits: int, symmetric: bool) -> Any:
    import openvino as ov

    return {(8, False): ov.Type.u8, (8, True): ov.Type.i8, (4, False): ov.Type.u4, (4, True): ov.Type.i4}[
        (bits, symmetric)]


def stacked_matrix(factory: WeightFactory, names: list[list[str]], label: str) -> Any:
    """The experts' matrices as one f32 graph output [E, out, in]; ``names[e]`` are expert e's canonical tensors,
    stacked along ``out`` (gate and up row-interleaved for the fused 2-GEMM form), in the factory's precision."""
    import openvino as ov
    import openvino.opset13 as ops
    from openvino.utils import make_postponed_constant

    shapes = factory.model.spec.tensor_shapes()
    rows = [shapes[n][0] for n in names[0]]
    in_features = shapes[names[0][0]][1]
    experts = len(names)
    shape = [experts, sum(rows), in_features]
    scheme = factory.scheme
    factory.stats.tensors += experts * len(rows)
    if scheme.kind == "float":
        ov_type = ov.Type.f16 if scheme.float_dtype == np.float16 else ov.Type.f32

        def fill() -> Any:
            tensor = ov.Tensor(ov_type, ov.Shape(shape))
            for e, parts in enumerate(names):
                for k, name in enumerate(parts):
                    dst = tensor.data[e, _part_rows(k, len(parts))]  # a view of the stacked tensor
                    factory._consume(name, lambda a, dst=dst, name=name: _copy_float(
                        dst, a, ov_type == ov.Type.f16, factory, name))
            return tensor

        factory.stats.float_tensors += experts * len(rows)
        const = make_postponed_constant(ov_type, ov.Shape(shape), fill, name=label)
        if ov_type == ov.Type.f16:
            return ops.convert(const.output(0), ov.Type.f32, name=f"{label}/decompress").output(0)
        return const.output(0)

    bits, symmetric, group = layer_format(scheme, (rows[0], in_features), role="linear",
                                          group_size=factory.group_size)
    lazy = _StackedQuantized(factory, names, rows, in_features, bits, symmetric, group)
    code_type = _code_type(bits, symmetric)
    param_shape = lazy.param_shape()

    def codes_maker() -> Any:
        return lazy.take_codes()

    def scale_maker() -> Any:
        return _owned(lazy.params()[0])

    def zero_maker() -> Any:
        zero = lazy.params()[1]
        if zero is None:
            raise ConversionError(f"internal error: {label!r} was quantized without zero points")
        if bits == 4:
            tensor = ov.Tensor(code_type, ov.Shape(param_shape))
            tensor.data[:] = pack_int4(zero)
            return tensor
        return _owned(zero)

    codes = make_postponed_constant(code_type, ov.Shape(lazy.code_shape()), codes_maker, name=label)
    values = ops.convert(codes.output(0), ov.Type.f16, name=f"{label}/codes_f16")
    if not symmetric:
        zero = make_postponed_constant(code_type, ov.Shape(param_shape), zero_maker, name=f"{label}/zero_point")
        values = ops.subtract(values, ops.convert(zero.output(0), ov.Type.f16, name=f"{label}/zero_point_f16"),
                              name=f"{label}/zero_point/subtract")
    scale = make_postponed_constant(ov.Type.f16, ov.Shape(param_shape), scale_maker, name=f"{label}/scale")
    weight = ops.multiply(values, scale.output(0), name=f"{label}/dequantize")
    if group is not None:
        target = ops.constant(np.array(shape, dtype=np.int64), name=f"{label}/ungroup_shape")
        weight = ops.reshape(weight, target, special_zero=False, name=f"{label}/ungroup")
        factory.stats.group_sizes.add(group)
    if bits == 4:
        factory.stats.int4_layers += experts * len(rows)
    else:
        factory.stats.int8_layers += experts * len(rows)
    return ops.convert(weight, ov.Type.f32, name=f"{label}/decompress").output(0)


def _copy_float(dst: np.ndarray, array: np.ndarray, f16: bool, factory: WeightFactory, name: str) -> None:
    if f16:
        check_fits_float16(name, array, where=str(factory.model.path), advice=FLOAT16_ADVICE)
    np.copyto(dst, array, casting="unsafe")


def _owned(array: np.ndarray) -> Any:
    import openvino as ov

    tensor = ov.Tensor(ov.Type(array.dtype), ov.Shape(list(array.shape)))
    np.copyto(tensor.data, array)
    return tensor


def stacked_bias(factory: WeightFactory, names: list[list[str]], label: str) -> Any:
    """Expert biases as one f32 Constant [E, 1, out], parts row-interleaved like ``stacked_matrix``."""
    import openvino.opset13 as ops

    shapes = factory.model.spec.tensor_shapes()
    rows = [shapes[n][0] for n in names[0]]
    bias = np.zeros((len(names), 1, sum(rows)), dtype=np.float32)
    for e, parts in enumerate(names):
        for k, name in enumerate(parts):
            dst = bias[e, 0, _part_rows(k, len(parts))]
            factory._consume(name, lambda a, dst=dst: np.copyto(dst, a))
    factory.stats.tensors += len(names) * len(rows)
    factory.stats.float_tensors += len(names) * len(rows)
    return ops.constant(bias, name=label).output(0)


# -------------------------------------------------------------------------------------------------- graph


def moe_block(b: Any, h: Any, i: int) -> Any:
    """The sparse feed-forward of layer ``i`` on h [B, T, H] (``b``: the graph builder), as [B, T, H]."""
    ops, s = b.ops, b.spec
    moe: MoESpec = s.moe
    p = f"layers.{i}."
    block = p + "moe"
    experts, k = moe.num_experts, moe.experts_per_token
    with b.scope(p + "router"):
        flat = ops.reshape(h, b.i64(-1, s.hidden_size), special_zero=False, name=p + "moe/tokens")  # [N, H]
        logits = ops.matmul(flat, b.w.router(p + "router"), transpose_a=False, transpose_b=True,
                            name=p + "router/matmul")
        if moe.router_bias:
            logits = ops.add(logits, b.w.vector(p + "router_bias"), name=p + "router/bias")
        k_const = b.const(k, np.int64)
        if moe.router_softmax == "before_topk":
            probs = ops.softmax(logits, -1, name=p + "router/softmax")
            topk = ops.topk(probs, k_const, -1, "max", "value", "i64", True, name=p + "router/topk")
            weights = topk.output(0)
            if moe.norm_topk_prob:
                total = ops.reduce_sum(weights, b.i64(-1), keep_dims=True)
                weights = ops.divide(weights, total, name=p + "router/renormalize")
        else:
            topk = ops.topk(logits, k_const, -1, "max", "value", "i64", True, name=p + "router/topk")
            weights = ops.softmax(topk.output(0), -1, name=p + "router/softmax")
        zeros = ops.broadcast(b.const(0.0), ops.shape_of(logits, output_type="i64"))
        routing = ops.scatter_elements_update(zeros, topk.output(1), weights, b.const(1, np.int64),
                                              name=p + "router/scatter")  # [N, E], 0 where unrouted
        routing = ops.transpose(routing, b.i64(1, 0))
        routing = ops.reshape(routing, b.i64(experts, -1, 1), special_zero=False, name=p + "router/map")
    with b.scope(block):
        tiled = ops.tile(flat, b.i64(experts, 1))
        tiled = ops.reshape(tiled, b.i64(experts, -1, s.hidden_size), special_zero=False, name=block + "/tiled")
        if moe.swiglu_limit is None:
            gated = _three_gemm(b, tiled, p, moe)
            down = ops.matmul(gated, stacked_matrix(b.w, _expert_names(moe, p, ("down",)), p + "experts.down"),
                              transpose_a=False, transpose_b=True, name=block + "/down")
        else:
            gated = _two_gemm(b, tiled, p, moe)
            bias_parts: tuple[str, ...] = ("down_bias",) if moe.expert_bias else ()
            down = ops.matmul(gated, stacked_matrix(b.w, _expert_names(moe, p, ("down",)), p + "experts.down"),
                              transpose_a=False, transpose_b=True, name=block + "/down")
            down = ops.add(down, _bias(b, moe, p, bias_parts, s.hidden_size, p + "experts.down_bias"),
                           name=block + "/down_bias")
        down = ops.reshape(down, b.i64(experts, -1, s.hidden_size), special_zero=False, name=block + "/outputs")
        weighted = ops.multiply(down, routing, name=block + "/weighted")
        summed = ops.reduce_sum(weighted, b.i64(0), keep_dims=False, name=block + "/sum")
        return ops.reshape(summed, ops.shape_of(h, output_type="i64"), special_zero=False, name=block + "/output")


def _bias(b: Any, moe: MoESpec, p: str, parts: tuple[str, ...], width: int, label: str) -> Any:
    if parts:
        return stacked_bias(b.w, _expert_names(moe, p, parts), label)
    return b.ops.constant(np.zeros((moe.num_experts, 1, width), dtype=np.float32), name=label).output(0)


def _three_gemm(b: Any, tiled: Any, p: str, moe: MoESpec) -> Any:
    """act(gate) * up of every expert, gate and up as separate batched MatMuls."""
    from openvino.utils.node_factory import NodeFactory

    ops, s = b.ops, b.spec
    block = p + "moe"
    gate = ops.matmul(tiled, stacked_matrix(b.w, _expert_names(moe, p, ("gate",)), p + "experts.gate"),
                      transpose_a=False, transpose_b=True, name=block + "/gate")
    up = ops.matmul(tiled, stacked_matrix(b.w, _expert_names(moe, p, ("up",)), p + "experts.up"),
                    transpose_a=False, transpose_b=True, name=block + "/up")
    if s.activation == "silu":
        act = NodeFactory("opset4").create("Swish", [gate.output(0)])  # one input: see the module NOTE
        act.set_friendly_name(block + "/act")
    else:
        act = ops.gelu(gate, approximation_mode="tanh" if s.activation == "gelu_tanh" else "erf",
                       name=block + "/act")
    return ops.multiply(act, up, name=block + "/gated")


def _two_gemm(b: Any, tiled: Any, p: str, moe: MoESpec) -> Any:
    """gpt-oss's clamped SwiGLU of every expert: gate and up as one biased MatMul [E, N, 2I], sliced apart."""
    ops = b.ops
    block = p + "moe"
    inter = moe.expert_intermediate_size
    limit = np.float32(moe.swiglu_limit)
    gate_up = ops.matmul(tiled, stacked_matrix(b.w, _expert_names(moe, p, ("gate", "up")), p + "experts.gate_up"),
                         transpose_a=False, transpose_b=True, name=block + "/gate_up")
    parts: tuple[str, ...] = ("gate_bias", "up_bias") if moe.expert_bias else ()
    gate_up = ops.add(gate_up, _bias(b, moe, p, parts, 2 * inter, p + "experts.gate_up_bias"),
                      name=block + "/gate_up_bias")
    gate = ops.slice(gate_up, b.i64(0), b.i64(2 * inter), b.i64(2), b.i64(2), name=block + "/gate")  # rows 0::2
    up = ops.slice(gate_up, b.i64(1), b.i64(2 * inter), b.i64(2), b.i64(2), name=block + "/up")  # rows 1::2
    up = ops.clamp(up, -float(limit), float(limit), name=block + "/up_clamp")
    up = ops.add(up, b.const(np.float32(moe.swiglu_up_offset)), name=block + "/up_offset")
    gate = ops.minimum(gate, b.const(limit), name=block + "/gate_limit")
    glu = ops.swish(gate, b.const(np.float32(moe.swiglu_alpha)), name=block + "/glu")
    return ops.multiply(up, glu, name=block + "/gated")
