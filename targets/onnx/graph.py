"""The ONNX decoder graph, built straight from a ModelSpec while the weights stream to one external data file.

No torch, no tracing: every node is written here from the spec, in standard ONNX ops (default domain, opset
17) plus ``com.microsoft.MatMulNBits`` for the int8/int4 weight-only precisions (quantize.py) and
``com.microsoft.MoE`` / ``QMoE`` for mixture-of-experts layers (moe.py). Attention sinks (gpt-oss) join each
softmax as one extra score column per head, dropped after it.

# NOTE: graph library. The graph is built with ``onnx.helper`` and raw ``TensorProto`` messages, not onnx_ir.
# What matters for a >2 GB model is that no weight bytes ever enter a protobuf message: every initializer is
# a TensorProto whose ``external_data`` (location/offset/length) points into ``model.onnx.data``, which we
# append to ourselves one tensor at a time (chunked, aligned; external_data.py). With plain protobuf that is a
# handful of fields we control exactly; ``model.onnx`` then holds only the graph and is written with
# ``SerializeToString``. onnx_ir could do the same through lazy tensors, but it adds a dependency the ``onnx``
# extra does not declare and hides the offsets we want to own; onnx.helper ships with onnx, which we need for
# the checker.
#
# NOTE: fp16. "fp16" stores fp16 weights (half the disk of fp32) but computes in fp32: each fp16 matrix goes
# through a Cast to float before its Gemm (ONNX Runtime folds that Cast at load time, so a session holds
# those matrices as fp32) and embeddings are gathered from the fp16 table and cast. Activations, the KV cache
# and the logits stay float32. Reasons: ONNX Runtime's CPU provider has fp16 kernels for only some ops and
# silently inserts float casts around the rest, so "fp16 compute" would mean a per-op, per-version mix of
# precisions; on x86 without AVX512-FP16 the fp16 kernels convert internally anyway (no speed gain); and fp16
# accumulation over long residual streams costs accuracy the parity thresholds would have to absorb. 1-D
# parameters (norm weights, biases) stay fp32 in every precision: they are tiny and the reference applies
# them in fp32.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sovpack._io import Progress
from sovpack.errors import ConversionError
from sovpack.quantize import QuantPlan
from sovpack.source.model import SourceModel
from sovpack.source.spec import ModelSpec
from sovpack.targets.onnx.external_data import DATA_FILE, ExternalData, converted_chunks
from sovpack.targets.onnx.moe import ExpertWriter, moe_plan
from sovpack.targets.onnx.positions import attention_biases, rope_tables
from sovpack.targets.onnx.precisions import F32, plan_for
from sovpack.targets.onnx.quantize import (
    QUANT_BLOCK_SIZE,
    block_for,
    is_block_size,
    pack_matmulnbits,
    quantize_matmul_weight,
    rtn_by_rows,
    split_eight_bits,
    split_float_zero_points,
)

OPSET = 17
MS_DOMAIN = "com.microsoft"
MODEL_FILE = "model.onnx"


@dataclass
class Graph:
    """Nodes, initializers and helpers for unique names and small constants."""

    nodes: list[Any] = field(default_factory=list)
    initializers: list[Any] = field(default_factory=list)
    _names: dict[str, int] = field(default_factory=dict)
    _consts: dict[tuple[Any, ...], str] = field(default_factory=dict)

    def unique(self, base: str) -> str:
        n = self._names.get(base, 0)
        self._names[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    def op(self, op_type: str, *inputs: str, name: str | None = None, out: str | None = None,
           n_out: int = 1, domain: str = "", **attrs: Any) -> Any:
        from onnx import helper

        node_name = self.unique(name or op_type)
        outputs = [out] if out is not None else [f"{node_name}/out{i}" if n_out > 1 else f"{node_name}/out"
                                                  for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=node_name, domain=domain, **attrs))
        return outputs[0] if n_out == 1 else outputs

    def const(self, value: Any, dtype: Any, *, scalar: bool = False) -> str:
        """A small inline initializer (shape constants, eps, ...), shared between uses."""
        from onnx import numpy_helper

        array = np.asarray(value, dtype=dtype)
        if not scalar and array.ndim == 0:
            array = array.reshape(1)
        key = (array.dtype.str, array.shape, array.tobytes())
        name = self._consts.get(key)
        if name is None:
            name = self.unique(f"const/{array.dtype.name}")
            self.initializers.append(numpy_helper.from_array(array, name))
            self._consts[key] = name
        return name


@dataclass(frozen=True, kw_only=True, slots=True)
class BuiltModel:
    """The finished model proto (graph only) and what the writer reports about it."""

    proto: Any
    opset: int
    ir_version: int
    contrib_ops: list[tuple[str, dict[str, Any]]]
    largest_tensor_bytes: int
    data_bytes: int


class DecoderBuilder:
    """Builds the decoder graph for one SourceModel and precision, writing weights as it goes."""

    def __init__(self, model: SourceModel, precision: str, out_dir: Path, progress: Progress,
                 quant_plan: QuantPlan | None = None) -> None:
        self.plan = plan_for(precision)
        # The 4-bit recipe (codes per linear tensor, some kept at 8 bits); None: onnxruntime's quantizer.
        self.quant_plan = quant_plan
        self.fallback: list[str] = []  # planned tensors onnxruntime's quantizer packed instead (odd widths)
        self.model = model
        self.spec: ModelSpec = model.spec
        self.out_dir = out_dir
        self.progress = progress
        self.g = Graph()
        # Refuse what the MoE operator cannot compute before the data file exists.
        self.moe = moe_plan(self.spec, self.plan.matrix_dtype, self.plan.bits) if self.spec.moe else None
        self.data = ExternalData(out_dir / DATA_FILE)
        self.contrib: list[tuple[str, dict[str, Any]]] = []
        self._weights: dict[tuple[str, str], str] = {}
        self._total = len(model.tensor_names())
        self._done = 0

    # -- weights ---------------------------------------------------------------------------------------
    def tick(self, name: str) -> None:
        """Report one canonical tensor as written."""
        self._done += 1
        self.progress(f"onnx:{self.plan.name} {name}", min(self._done, self._total), self._total)

    def source(self, name: str) -> np.ndarray:
        """Canonical tensor ``name`` as float32 (release its pages with ``release`` once converted)."""
        return self.model.tensor(name, np.float32)

    def release(self, name: str) -> None:
        self.model.release_pages(name)

    def add_initializer(self, tensor: Any) -> None:
        self.g.initializers.append(tensor)

    def _store(self, name: str, dtype: np.dtype) -> str:
        """Write canonical tensor ``name`` as ``dtype`` in its canonical layout; returns the initializer name."""
        key = (name, np.dtype(dtype).str)
        if key in self._weights:
            return self._weights[key]
        if np.dtype(dtype) == np.float16 and self.model.stores_half(name):  # straight from bf16/f16
            array = self.model.stored(name)
            chunks = converted_chunks(name, array, np.dtype(dtype), lambda: self.model.tensor(name, np.float32))
        else:
            array = self.source(name)
            chunks = converted_chunks(name, array, np.dtype(dtype))
        tensor = self.data.write(name, array.shape, dtype, chunks)
        self.model.release_pages(name)
        del array
        self.g.initializers.append(tensor)
        self._weights[key] = name
        self.tick(name)
        return name

    def as_float(self, init: str, dtype: np.dtype) -> str:
        if np.dtype(dtype) == np.float32:
            return init
        from onnx import TensorProto

        return self.g.op("Cast", init, name=f"{init}/cast", to=TensorProto.FLOAT)

    # -- building blocks -------------------------------------------------------------------------------
    def dense(self, x: str, weight: str, dtype: np.dtype, bias: str | None = None) -> str:
        """x [M, in] @ weight[out, in]^T (+ bias) -> [M, out] as a Gemm over the stored (HF-layout) matrix."""
        w = self.as_float(self._store(weight, dtype), dtype)
        inputs = [x, w] + ([self._store(bias, F32)] if bias else [])
        return self.g.op("Gemm", *inputs, name=f"{weight}/gemm", transB=1)

    def linear(self, x: str, weight: str, bias: str | None = None) -> str:
        """An attention/MLP projection: a Gemm, or MatMulNBits (+ Add for the bias) when quantized."""
        bits = self.plan.bits
        if bits is None:
            return self.dense(x, weight, self.plan.matrix_dtype, bias)
        if self.quant_plan is not None and weight in self.quant_plan.tensors:
            bits = self.quant_plan.bits(weight)
        y = self.quantized_linear(x, weight, bits)
        if bias:
            y = self.g.op("Add", y, self._store(bias, F32), name=f"{weight}/bias")
        return y

    def quantized_linear(self, x: str, weight: str, bits: int) -> str:
        """x [M, in] @ weight^T as MatMulNBits over ``bits``-bit blocks: the plan's codes when the plan covers
        ``weight`` with a block size the op accepts, else onnxruntime's quantizer (RTN, blocks of 32)."""
        prefix = weight
        planned = self.quant_plan.tensors.get(weight) if self.quant_plan is not None else None
        if self.quant_plan is not None and planned is not None and is_block_size(planned.group_size):
            plan = self.quant_plan
            if planned.bits == 8 and not plan.integer_zero:  # the CPU kernel takes uint8 zero points at 8 bits
                plan = dataclasses.replace(plan, integer_zero=True)
            multiplier = plan.input_multiplier(weight)
            if multiplier is not None:  # activation-aware scaling: the codes are of weight * s, the input / s
                scale_name = f"{prefix}.input_scale"
                self.g.initializers.append(self.data.write_array(scale_name, multiplier))
                x = self.g.op("Mul", x, scale_name, name=f"{prefix}/input_scale")
            codes = plan.codes(weight, lambda: self.source(weight))  # maybe fitted by another target of the build
            self.model.release_pages(weight)
            codes, residual = split_float_zero_points(codes)
            attrs, arrays = pack_matmulnbits(codes)
            del codes
        elif planned is None and bits == 8 and (block := block_for((shape := self.spec.tensor_shapes()[weight])[1])):
            residual = None  # unplanned 8-bit (int8, an integer plan's head): our round-to-nearest, by row blocks
            codes = rtn_by_rows(lambda part: self.model.rows(weight, part), shape[0], bits=8, block=block)
            self.model.release_pages(weight)
            attrs, arrays = pack_matmulnbits(codes)
            del codes
        else:
            residual = None
            if planned is not None:
                self.fallback.append(weight)

            def transposed() -> np.ndarray:
                source = self.source(weight)
                out = np.ascontiguousarray(source.T)
                self.model.release_pages(weight)
                return out

            attrs, arrays = quantize_matmul_weight(transposed, bits, QUANT_BLOCK_SIZE, OPSET)
        if attrs["bits"] == 8:  # two 4-bit nodes, summed: onnxruntime's 8-bit CPU kernel is ~17x slower
            (high_attrs, high), (low_attrs, low) = split_eight_bits(attrs, arrays)
            y = self.g.op("Add", self._matmulnbits(x, f"{prefix}.high", high_attrs, high),
                          self._matmulnbits(x, f"{prefix}.low", low_attrs, low), name=f"{prefix}/eight_bits")
        else:
            y = self._matmulnbits(x, prefix, attrs, arrays)
        self.tick(weight)
        if residual is None:
            return y
        # The zero points' fractional parts: y -= (x summed per block) @ residual (see split_float_zero_points).
        residual_name = f"{prefix}.zero_residual"
        self.g.initializers.append(self.data.write_array(residual_name, residual))
        blocks = self.g.op("Reshape", x, self.g.const([-1, attrs["K"] // attrs["block_size"], attrs["block_size"]],
                                                      np.int64), name=f"{prefix}/blocks")
        sums = self.g.op("ReduceSum", blocks, self.g.const([-1], np.int64), name=f"{prefix}/block_sums",
                         keepdims=0)
        offset = self.g.op("MatMul", sums, residual_name, name=f"{prefix}/zero_residual")
        return self.g.op("Sub", y, offset, name=f"{prefix}/zero_corrected")

    def _matmulnbits(self, x: str, prefix: str, attrs: dict[str, Any], arrays: list[np.ndarray]) -> str:
        """One MatMulNBits node over stored inputs ``{prefix}.q{bits}``, ``.scales``[, ``.zero_points``]."""
        names = []
        for suffix, array in zip(("q", "scales", "zero_points"), arrays, strict=False):
            init_name = f"{prefix}.{suffix}{attrs['bits'] if suffix == 'q' else ''}"
            self.g.initializers.append(self.data.write_array(init_name, array))
            names.append(init_name)
        float_zero = len(arrays) == 3 and arrays[2].dtype == np.float32
        # ``float_zero_points`` is no node attribute: it tells min_onnxruntime which kernel the node needs.
        self.contrib.append(("MatMulNBits", {**attrs, "float_zero_points": float_zero}))
        return self.g.op("MatMulNBits", x, *names, name=f"{prefix}/matmulnbits", domain=MS_DOMAIN, **attrs)

    def rms_norm(self, x: str, weight: str, name: str) -> str:
        w = self._store(weight, F32)
        sq = self.g.op("Mul", x, x, name=f"{name}/square")
        mean = self.g.op("ReduceMean", sq, name=f"{name}/mean", axes=[-1], keepdims=1)
        eps = self.g.const(self.spec.norm_eps, np.float32)
        denom = self.g.op("Sqrt", self.g.op("Add", mean, eps, name=f"{name}/add_eps"), name=f"{name}/sqrt")
        normed = self.g.op("Div", x, denom, name=f"{name}/div")
        return self.g.op("Mul", normed, w, name=f"{name}/scale")

    def activation(self, x: str, name: str) -> str:
        kind = self.spec.activation
        g = self.g
        if kind == "silu":
            return g.op("Mul", x, g.op("Sigmoid", x, name=f"{name}/sigmoid"), name=f"{name}/silu")
        half = g.const(0.5, np.float32)
        one = g.const(1.0, np.float32)
        if kind == "gelu_tanh":
            cube = g.op("Mul", g.op("Mul", x, x, name=f"{name}/x2"), x, name=f"{name}/x3")
            inner = g.op("Add", x, g.op("Mul", cube, g.const(0.044715, np.float32), name=f"{name}/cube_coef"),
                         name=f"{name}/inner")
            scaled = g.op("Mul", inner, g.const(math.sqrt(2.0 / math.pi), np.float32), name=f"{name}/scale")
            tanh = g.op("Tanh", scaled, name=f"{name}/tanh")
            return g.op("Mul", g.op("Mul", x, half, name=f"{name}/half"),
                        g.op("Add", tanh, one, name=f"{name}/one_plus"), name=f"{name}/gelu")
        if kind == "gelu":
            erf = g.op("Erf", g.op("Mul", x, g.const(1.0 / math.sqrt(2.0), np.float32), name=f"{name}/div_sqrt2"),
                       name=f"{name}/erf")
            return g.op("Mul", g.op("Mul", x, half, name=f"{name}/half"),
                        g.op("Add", erf, one, name=f"{name}/one_plus"), name=f"{name}/gelu")
        raise ConversionError(f"onnx: activation {kind!r} is not supported")

    def rope(self, x: str, cos: str, sin: str, name: str) -> str:
        """Rotate-half rope on the leading ``rotary_size`` dims of x's last axis; the rest pass through."""
        s, g = self.spec, self.g
        rotary = s.rotary_size
        kept = None
        if rotary != s.head_dim:  # partial rotary (Phi-4-mini)
            x, kept = g.op("Split", x, g.const([rotary, s.head_dim - rotary], np.int64), name=f"{name}/split_rotary",
                           n_out=2, axis=-1)
        half = rotary // 2
        x1, x2 = g.op("Split", x, g.const([half, half], np.int64), name=f"{name}/split", n_out=2, axis=-1)
        rotated = g.op("Concat", g.op("Neg", x2, name=f"{name}/neg"), x1, name=f"{name}/rotate_half", axis=-1)
        with_cos = g.op("Mul", x, cos, name=f"{name}/mul_cos")
        with_sin = g.op("Mul", rotated, sin, name=f"{name}/mul_sin")
        out = g.op("Add", with_cos, with_sin, name=f"{name}/rope")
        if kept is not None:
            out = g.op("Concat", out, kept, name=f"{name}/with_pass_through", axis=-1)
        return out

    def with_sinks(self, scores: str, p: str) -> str:
        """scores [B, KV, G, T, S] with each head's sink logit (``sinks`` [heads]) appended as column S."""
        g, s = self.g, self.spec
        sinks = g.op("Reshape", self._store(p + "sinks", F32),
                     g.const([1, s.num_kv_heads, s.num_heads // s.num_kv_heads, 1, 1], np.int64),
                     name=f"{p}attn/sinks5")
        column = g.op("Concat", g.op("Shape", scores, name=f"{p}attn/scores_shape", end=4), g.const([1], np.int64),
                      name=f"{p}attn/sink_shape", axis=0)
        sink_column = g.op("Expand", sinks, column, name=f"{p}attn/sink_column")
        return g.op("Concat", scores, sink_column, name=f"{p}attn/with_sinks", axis=-1)

    def soft_cap(self, x: str, cap: float | None, name: str) -> str:
        """cap * tanh(x / cap) (Gemma 2's attention and final-logit soft-capping); x itself when cap is None."""
        if cap is None:
            return x
        g = self.g
        c = g.const(cap, np.float32)
        return g.op("Mul", g.op("Tanh", g.op("Div", x, c, name=f"{name}/div_cap"), name=f"{name}/tanh"), c,
                    name=f"{name}/softcap")

    def residual(self, x: str, out: str, post_norm: str, name: str) -> str:
        """x plus a sublayer's output, after its post norm and residual multiplier where the spec has them."""
        s, g = self.spec, self.g
        if s.post_norms:
            out = self.rms_norm(out, post_norm, f"{name}/post_norm")
        if s.residual_multiplier != 1.0:
            out = g.op("Mul", out, g.const(s.residual_multiplier, np.float32), name=f"{name}/residual_scale")
        return g.op("Add", x, out, name=f"{name}/residual")

    # -- the model -------------------------------------------------------------------------------------
    def build(self) -> BuiltModel:
        try:
            proto = self._build()
        finally:
            self.data.close()
        return BuiltModel(
            proto=proto,
            opset=OPSET,
            ir_version=proto.ir_version,
            contrib_ops=self.contrib,
            largest_tensor_bytes=self.data.largest,
            data_bytes=self.data.offset,
        )

    def _build(self) -> Any:
        from onnx import TensorProto, helper

        s = self.spec
        g = self.g
        kv, heads, dim = s.num_kv_heads, s.num_heads, s.head_dim
        if heads % kv:
            raise ConversionError(f"onnx: {heads} attention heads are not a multiple of {kv} KV heads")
        group = heads // kv
        f32 = TensorProto.FLOAT
        i64 = TensorProto.INT64

        inputs = [
            helper.make_tensor_value_info("input_ids", i64, ["batch_size", "sequence_length"]),
            helper.make_tensor_value_info("attention_mask", i64, ["batch_size", "total_sequence_length"]),
            helper.make_tensor_value_info("position_ids", i64, ["batch_size", "sequence_length"]),
        ]
        outputs = [helper.make_tensor_value_info("logits", f32, ["batch_size", "sequence_length", s.vocab_size])]
        for i in range(s.num_layers):
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kind}", f32, ["batch_size", kv, "past_sequence_length", dim]))
                outputs.append(helper.make_tensor_value_info(
                    f"present.{i}.{kind}", f32, ["batch_size", kv, "total_sequence_length", dim]))

        # Shapes: batch B, new tokens T, total S = past + T.
        batch = g.op("Shape", "input_ids", name="shape/batch", start=0, end=1)
        steps = g.op("Shape", "input_ids", name="shape/steps", start=1, end=2)
        total = g.op("Shape", "attention_mask", name="shape/total", start=1, end=2)
        q_shape = g.op("Concat", batch, steps, g.const([kv, group, dim], np.int64), name="shape/q", axis=0)
        kv_shape = g.op("Concat", batch, steps, g.const([kv, dim], np.int64), name="shape/kv", axis=0)
        scores5_shape = g.op("Concat", g.const([0, 0, group, -1], np.int64), total, name="shape/scores5", axis=0)
        probs4_shape = g.op("Concat", g.const([0, 0, -1], np.int64), total, name="shape/probs4", axis=0)
        ctx5_shape = g.const([0, 0, group, -1, dim], np.int64)
        flat_q_shape = g.const([-1, s.q_size], np.int64)
        logits_shape = g.op("Concat", batch, steps, g.const([s.vocab_size], np.int64), name="shape/logits", axis=0)

        biases = attention_biases(g, s, total, steps)
        ropes = rope_tables(g, s)

        # Embedding: gathered from the stored table, cast to float32, flattened to [B*T, hidden].
        embed = self._store("embed", self.plan.embed_dtype)
        x = g.op("Gather", embed, "input_ids", name="embed/gather", axis=0)
        if self.plan.embed_dtype != np.float32:
            x = g.op("Cast", x, name="embed/cast", to=f32)
        x = g.op("Reshape", x, g.const([-1, s.hidden_size], np.int64), name="embed/flatten")
        if s.embedding_multiplier != 1.0:
            x = g.op("Mul", x, g.const(s.embedding_multiplier, np.float32), name="embed/scale")

        scale = g.const(1.0 / math.sqrt(dim) if s.attention_scale is None else s.attention_scale, np.float32)
        for i in range(s.num_layers):
            p = f"layers.{i}."
            h = self.rms_norm(x, p + "attn_norm", f"{p}attn_norm") if s.pre_norms else x
            q = self.linear(h, p + "q", p + "q_bias" if s.qkv_bias else None)
            k = self.linear(h, p + "k", p + "k_bias" if s.qkv_bias else None)
            v = self.linear(h, p + "v", p + "v_bias" if s.qkv_bias else None)
            if s.qk_norm and s.qk_norm_scope == "projection":  # OLMo 2: over the whole projection
                q = self.rms_norm(q, p + "q_norm", f"{p}attn/q_norm")
                k = self.rms_norm(k, p + "k_norm", f"{p}attn/k_norm")
            q = g.op("Reshape", q, q_shape, name=f"{p}attn/q_heads")  # [B, T, KV, G, D]
            k = g.op("Reshape", k, kv_shape, name=f"{p}attn/k_heads")  # [B, T, KV, D]
            v = g.op("Reshape", v, kv_shape, name=f"{p}attn/v_heads")
            if s.qk_norm and s.qk_norm_scope == "head":
                q = self.rms_norm(q, p + "q_norm", f"{p}attn/q_norm")
                k = self.rms_norm(k, p + "k_norm", f"{p}attn/k_norm")
            q = g.op("Transpose", q, name=f"{p}attn/q_t", perm=[0, 2, 3, 1, 4])  # [B, KV, G, T, D]
            k = g.op("Transpose", k, name=f"{p}attn/k_t", perm=[0, 2, 1, 3])  # [B, KV, T, D]
            v = g.op("Transpose", v, name=f"{p}attn/v_t", perm=[0, 2, 1, 3])
            rope = s.layer_rope(i)
            if rope != "none":
                table = ropes[rope]
                q = self.rope(q, table.cos_q, table.sin_q, f"{p}attn/q_rope")
                k = self.rope(k, table.cos_k, table.sin_k, f"{p}attn/k_rope")
            keys = g.op("Concat", f"past_key_values.{i}.key", k, name=f"{p}attn/present_key",
                        out=f"present.{i}.key", axis=2)
            values = g.op("Concat", f"past_key_values.{i}.value", v, name=f"{p}attn/present_value",
                          out=f"present.{i}.value", axis=2)
            # Grouped-query attention without repeating K/V: the G query heads sharing a KV head are folded
            # into the row dimension, [B, KV, G*T, D] @ [B, KV, D, S].
            q = g.op("Reshape", q, g.const([0, 0, -1, dim], np.int64), name=f"{p}attn/q_rows")
            keys_t = g.op("Transpose", keys, name=f"{p}attn/keys_t", perm=[0, 1, 3, 2])
            scores = g.op("MatMul", q, keys_t, name=f"{p}attn/scores")
            scores = g.op("Reshape", scores, scores5_shape, name=f"{p}attn/scores5")  # [B, KV, G, T, S]
            scores = self.soft_cap(g.op("Mul", scores, scale, name=f"{p}attn/scale"), s.attn_logit_softcap,
                                   f"{p}attn")
            scores = g.op("Add", scores, biases[s.layer_window(i)], name=f"{p}attn/mask")
            if s.attention_sinks:
                scores = self.with_sinks(scores, p)
            probs = g.op("Softmax", scores, name=f"{p}attn/softmax", axis=-1)
            if s.attention_sinks:  # drop the sink column: it only joins the softmax's denominator
                probs = g.op("Slice", probs, g.const([0], np.int64), g.const([-1], np.int64),
                             g.const([-1], np.int64), name=f"{p}attn/drop_sinks")
            probs = g.op("Reshape", probs, probs4_shape, name=f"{p}attn/probs_rows")
            ctx = g.op("MatMul", probs, values, name=f"{p}attn/context")  # [B, KV, G*T, D]
            ctx = g.op("Reshape", ctx, ctx5_shape, name=f"{p}attn/context5")
            ctx = g.op("Transpose", ctx, name=f"{p}attn/context_t", perm=[0, 3, 1, 2, 4])  # [B, T, KV, G, D]
            ctx = g.op("Reshape", ctx, flat_q_shape, name=f"{p}attn/context_flat")
            o = self.linear(ctx, p + "o", p + "o_bias" if s.o_bias else None)
            x = self.residual(x, o, p + "post_attn_norm", f"{p}attn")

            h = self.rms_norm(x, p + "mlp_norm", f"{p}mlp_norm") if s.pre_norms else x
            if self.moe is not None and s.is_sparse(i):
                down = ExpertWriter(self, self.moe).build(h, i)
            else:
                gate = self.activation(self.linear(h, p + "gate"), f"{p}mlp/act")
                up = self.linear(h, p + "up")
                down = self.linear(g.op("Mul", gate, up, name=f"{p}mlp/gated"), p + "down")
            x = self.residual(x, down, p + "post_mlp_norm", f"{p}mlp")

        x = self.rms_norm(x, "final_norm", "final_norm")
        # The head reads the (tied) embedding table in place: Gemm with transB needs no transposed copy. An
        # untied head of an integer precision is 8-bit MatMulNBits (blocks of 32), as OpenVINO's and NNCF's
        # integer heads are 8-bit: as a float16 Gemm onnxruntime would widen it to float32 at load (2 GB for
        # a 128k vocabulary at hidden 4096, twice that while it converts).
        if self.plan.bits is not None and not s.tie_word_embeddings:
            logits = self.quantized_linear(x, "lm_head", 8)
        else:
            head = "embed" if s.tie_word_embeddings else "lm_head"
            head_dtype = self.plan.embed_dtype if s.tie_word_embeddings else self.plan.head_dtype
            logits = self.dense(x, head, head_dtype)
        if s.logits_divisor != 1.0:  # Granite's logits_scaling, before any soft-cap
            logits = g.op("Div", logits, g.const(s.logits_divisor, np.float32), name="lm_head/divide")
        logits = self.soft_cap(logits, s.final_logit_softcap, "lm_head")
        g.op("Reshape", logits, logits_shape, name="lm_head/unflatten", out="logits")

        graph = helper.make_graph(g.nodes, f"sovpack_{s.family}", inputs, outputs, initializer=g.initializers)
        opsets = [helper.make_opsetid("", OPSET)]
        if self.contrib:
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        proto = helper.make_model(graph, opset_imports=opsets, producer_name="sovpack")
        proto.ir_version = helper.find_min_ir_version_for(opsets, ignore_unknown=True)
        return proto
