"""The decoder forward pass as an OpenVINO graph, stateful in the form optimum-intel exports and
openvino-genai's ``LLMPipeline`` runs.

Interface (batch ``B``, new tokens ``T``, cached tokens ``P``):

- inputs ``input_ids`` i64 [B, T], ``attention_mask`` i64 [B, P+T], ``position_ids`` i64 [B, T],
  ``beam_idx`` i32 [B];
- output ``logits`` f32 [B, T, vocab];
- per layer ``i`` two state variables, ``past_key_values.{i}.keypresent.{i}.key`` and
  ``past_key_values.{i}.valuepresent.{i}.value`` (optimum's names: the past input's name followed by the
  present output's name), each [B, kv_heads, P, head_dim] f32. ``ReadValue`` starts from an empty
  [B, kv_heads, 0, head_dim] tensor (genai finds the sequence axis as the 0-sized one and the batch axis as
  the dynamic one), the cache is reordered with ``Gather(cache, beam_idx, axis=0)``, the new keys/values are
  concatenated on axis 2 and written back with ``Assign``.

Attention is the opset13 ``ScaledDotProductAttention`` op with an explicit additive mask (causal, padding
from ``attention_mask``, optional sliding window), so the CPU plugin can fuse the cache update into its
stateful SDPA kernel and genai can turn it into paged attention. Grouped-query attention repeats the cached
keys/values with Unsqueeze/Broadcast/Reshape, as exported Hugging Face models do.

The arithmetic follows ``sovpack.reference`` op for op: RMSNorm ``x / sqrt(mean(x^2) + eps) * w``,
rotate-half RoPE from ``rope_inv_freq(spec)`` (with its cos/sin scale), per-head q/k norms before RoPE,
q/k/v biases, the embedding multiplier, tied heads and silu / gelu_tanh / gelu MLPs.

Names: every node gets a deterministic friendly name as it is built (``layers.3.q/matmul``,
``layers.3.attn/Reshape_0``: the block, then the role or the op type with a counter local to the block, see
:class:`NodeNames`). OpenVINO's default names (``Parameter_1126``) come from a process-wide instance counter, so
a second conversion in the same process would otherwise write a different IR for the same checkpoint, and
sovpack's artifacts must be byte-identical. :func:`canonicalize_names` does the same after the fact for graphs
built elsewhere (the tokenizer's) and checks the decoder graph.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from sovpack.errors import ConversionError
from sovpack.reference import rope_inv_freq
from sovpack.source.spec import ModelSpec

# The additive mask value for disallowed positions. -inf would turn a fully masked row (a left-padded
# position) into NaN that then leaks through 0 * NaN; the float16 minimum survives f16/bf16 execution too and
# still underflows exp() to exactly 0, as -inf does in the reference.
MASK_VALUE = float(np.finfo(np.float16).min)

INPUT_NAMES = ("input_ids", "attention_mask", "position_ids", "beam_idx")
OUTPUT_NAME = "logits"


def state_names(layer: int) -> tuple[str, str]:
    """The key and value variable ids of one layer, as optimum-intel names them."""
    return (
        f"past_key_values.{layer}.keypresent.{layer}.key",
        f"past_key_values.{layer}.valuepresent.{layer}.value",
    )


# OpenVINO's generated names: the op type, "_", the process-wide instance number, and for nodes a pass derives
# from another (PrePostProcessor's Converts) "." and an output index: Parameter_1126, RaggedToDense_129.0.
_AUTO_NAME = re.compile(r"[A-Z][A-Za-z0-9]*_[0-9]+(?:\.[0-9]+)*")


def is_generated_name(name: str) -> bool:
    """Whether ``name`` looks like one OpenVINO made up from its process-wide counter (``Constant_4711``)."""
    return _AUTO_NAME.fullmatch(name) is not None


class NodeNames:
    """Deterministic friendly names for the nodes of one graph build.

    Nodes built inside ``scope(block)`` without an explicit name become ``{block}/{OpType}_{k}``, ``k`` counting
    per block from 0 in build order; explicit names are kept as given (and must not look generated).
    """

    def __init__(self, scope: str) -> None:
        self._scope = scope
        self._counts: dict[str, int] = {}

    @contextmanager
    def scope(self, block: str) -> Iterator[None]:
        outer, self._scope = self._scope, block
        try:
            yield
        finally:
            self._scope = outer

    def next_name(self, type_name: str) -> str:
        k = self._counts.get(self._scope, 0)
        self._counts[self._scope] = k + 1
        return f"{self._scope}/{type_name}_{k}"

    def name(self, node: Any) -> Any:
        node.set_friendly_name(self.next_name(node.get_type_name()))
        return node


class NamedOps:
    """An opset module whose factories name each node they make through a :class:`NodeNames`."""

    def __init__(self, opset: Any, names: NodeNames) -> None:
        self._opset = opset
        self._names = names

    def __getattr__(self, attr: str) -> Callable[..., Any]:
        factory = getattr(self._opset, attr)
        names = self._names

        def make(*args: Any, name: str | None = None, **kwargs: Any) -> Any:
            made = factory(*args, **kwargs)
            node = made.get_node() if hasattr(made, "get_node") else made
            # Set here, not passed on: some factories (unsqueeze, assign) accept ``name=`` and ignore it.
            if name is None:
                names.name(node)
            else:
                node.set_friendly_name(name)
            return made

        return make


def canonicalize_names(model: Any, prefix: str) -> int:
    """Replace OpenVINO-generated node and tensor names in ``model`` by deterministic ones; returns how many nodes.

    Nodes are visited in ``get_ordered_ops()`` order (topological, fixed by the graph's structure) and a node whose
    friendly name is generated becomes ``{prefix}/{OpType}_{k}`` with ``k`` counting from 0. Meaningful names
    (``input_ids``, ``string_output``, the decoder's ``layers.3.q/matmul``) are kept. Generated tensor names are
    dropped; a tensor left with no name takes its node's new name (so inputs keep one, as before).
    """
    names = NodeNames(prefix)
    renamed = 0
    for node in model.get_ordered_ops():
        if is_generated_name(node.get_friendly_name()) or node.get_friendly_name() == node.get_name():
            names.name(node)
            renamed += 1
        for output in node.outputs():
            tensor_names = set(output.get_names())
            kept = {n for n in tensor_names if not is_generated_name(n)}
            if kept != tensor_names:
                output.get_tensor().set_names(kept or {node.get_friendly_name()})
    return renamed


class _Builder:
    def __init__(self, spec: ModelSpec, weights: Any) -> None:
        import openvino as ov
        import openvino.opset13 as opset

        self.ov = ov
        self.names = NodeNames("model")
        self.ops = NamedOps(opset, self.names)
        self.scope = self.names.scope
        self.spec = spec
        self.w = weights

    # -- small helpers ---------------------------------------------------------------------------------
    def const(self, value: Any, dtype: Any = np.float32) -> Any:
        return self.ops.constant(np.asarray(value, dtype=dtype))

    def i64(self, *values: int) -> Any:
        return self.const(list(values), np.int64)


    def rms_norm(self, x: Any, weight: Any, name: str) -> Any:
        ops = self.ops
        with self.scope(name):
            squared = ops.multiply(x, x)
            variance = ops.reduce_mean(squared, self.i64(-1), keep_dims=True)
            denom = ops.sqrt(ops.add(variance, self.const(self.spec.norm_eps)))
            return ops.multiply(ops.divide(x, denom), weight, name=f"{name}/normalized")

    def linear(self, x: Any, name: str, bias: str | None = None) -> Any:
        ops = self.ops
        with self.scope(name):
            y = ops.matmul(x, self.w.matrix(name), transpose_a=False, transpose_b=True, name=f"{name}/matmul")
            if bias is not None:
                y = ops.add(y, self.w.vector(bias), name=f"{name}/bias")
            return y

    def activation(self, x: Any) -> Any:
        ops = self.ops
        kind = self.spec.activation
        if kind == "silu":
            return ops.swish(x, self.const(np.float32(1.0)))  # beta, else swish makes an unnamed constant
        if kind == "gelu_tanh":
            return ops.gelu(x, approximation_mode="tanh")
        if kind == "gelu":
            return ops.gelu(x, approximation_mode="erf")
        raise ConversionError(f"the OpenVINO target has no activation {kind!r}")

    def rotate_half(self, x: Any) -> Any:
        ops = self.ops
        first, second = ops.split(x, self.const(-1, np.int64), 2).outputs()
        return ops.concat([ops.negative(second), first], axis=-1)

    def rope(self, x: Any, cos: Any, sin: Any, name: str) -> Any:
        ops = self.ops
        with self.scope(name):
            return ops.add(ops.multiply(x, cos), ops.multiply(self.rotate_half(x), sin), name=f"{name}/output")

    # -- the model -------------------------------------------------------------------------------------
    def build(self) -> Any:
        ov, ops, s = self.ov, self.ops, self.spec
        input_ids = ops.parameter([-1, -1], ov.Type.i64, name="input_ids")
        attention_mask = ops.parameter([-1, -1], ov.Type.i64, name="attention_mask")
        position_ids = ops.parameter([-1, -1], ov.Type.i64, name="position_ids")
        beam_idx = ops.parameter([-1], ov.Type.i32, name="beam_idx")
        params = [input_ids, attention_mask, position_ids, beam_idx]
        for p in params:
            p.output(0).get_tensor().set_names({p.get_friendly_name()})

        with self.scope("input_shape"):
            ids_shape = ops.shape_of(input_ids, output_type="i64")
            batch = ops.gather(ids_shape, self.i64(0), self.const(0, np.int64), name="input_shape/batch")
            steps = ops.gather(ids_shape, self.i64(1), self.const(0, np.int64), name="input_shape/steps")

        with self.scope("embed"):
            x = ops.gather(self.w.matrix("embed", role="embedding"), input_ids, self.const(0, np.int64),
                           name="embed/gather")
            if s.embedding_multiplier != 1.0:
                x = ops.multiply(x, self.const(np.float32(s.embedding_multiplier)), name="embed/multiplier")

        with self.scope("attention_mask"):
            mask = self.attention_mask(attention_mask, steps)
        with self.scope("rope"):
            cos, sin = self.rotary(position_ids)

        sinks = []
        for i in range(s.num_layers):
            x, layer_sinks = self.layer(i, x, mask, cos, sin, batch, beam_idx)
            sinks.extend(layer_sinks)

        x = self.rms_norm(x, self.w.vector("final_norm"), "final_norm")
        head = "embed" if s.tie_word_embeddings else "lm_head"
        with self.scope("lm_head"):
            logits = ops.matmul(x, self.w.matrix(head, role="head"), transpose_a=False, transpose_b=True,
                                name="lm_head/matmul")
            result = ops.result(logits, name=OUTPUT_NAME)
        result.output(0).get_tensor().set_names({OUTPUT_NAME})
        logits.output(0).get_tensor().set_names({OUTPUT_NAME})
        model = ov.Model([result], sinks, params, "sovpack-decoder")
        return model

    def attention_mask(self, attention_mask: Any, steps: Any) -> Any:
        """Additive mask [B, 1, T, P+T]: 0 where a query may attend, MASK_VALUE elsewhere.

        With a sliding window the boolean terms are combined in the shape OpenVINO's ``SDPAToPagedAttention``
        recognises as a sliding-window mask (its gpt-oss pattern: ``Greater(k, Add(q, -window))`` in a chain of
        four ``BitwiseAnd``, then ``Broadcast``, ``Select`` and ``Slice``), so genai's paged-attention path,
        which replaces the mask by its own causal logic, keeps the window (as PagedAttention's
        ``sliding_window`` input) instead of silently attending to everything.
        """
        ops, s = self.ops, self.spec
        total = ops.gather(ops.shape_of(attention_mask, output_type="i64"), self.i64(1), self.const(0, np.int64))
        past = ops.subtract(total, steps)
        zero, one = self.const(0, np.int64), self.const(1, np.int64)
        total_scalar = ops.squeeze(total, self.i64(0))
        q_pos = ops.range(ops.squeeze(past, self.i64(0)), total_scalar, one, "i64")
        k_pos = ops.range(zero, total_scalar, one, "i64")
        q_col = ops.unsqueeze(q_pos, self.i64(1))  # [T, 1]
        k_row = ops.unsqueeze(k_pos, self.i64(0))  # [1, S]
        causal = ops.less_equal(k_row, q_col)  # [T, S]
        padding = ops.unsqueeze(ops.not_equal(attention_mask, zero), self.i64(1, 2))  # [B, 1, 1, S]
        if s.sliding_window is None:
            allowed = ops.logical_and(ops.unsqueeze(causal, self.i64(0, 1)), padding)  # [B, 1, T, S]
            return ops.select(allowed, self.const(0.0), self.const(MASK_VALUE), name="attention_mask/additive")
        # keys strictly after q - window: (q - k) < window, as in the reference
        within = ops.greater(k_row, ops.add(q_col, self.const(-int(s.sliding_window), np.int64)))
        allowed = ops.bitwise_and(causal, within)  # [T, S]
        allowed = ops.bitwise_and(allowed, padding)  # [B, 1, T, S]
        # Two always-true range checks complete the chain the pattern expects (q and k inside the sequence).
        allowed = ops.bitwise_and(ops.greater_equal(q_col, zero), allowed)
        allowed = ops.bitwise_and(allowed, ops.less(k_row, total))
        batch = ops.gather(ops.shape_of(attention_mask, output_type="i64"), self.i64(0), zero)
        target = ops.concat([batch, self.i64(1), steps, total], axis=0)
        allowed = ops.broadcast(allowed, target)
        additive = ops.select(allowed, self.const(0.0), self.const(MASK_VALUE))
        return ops.slice(additive, self.i64(0), total, self.i64(1), self.i64(3), name="attention_mask/additive")

    def rotary(self, position_ids: Any) -> tuple[Any, Any]:
        """cos and sin [B, 1, T, head_dim], scaled like the reference."""
        ops = self.ops
        inv_freq, scale = rope_inv_freq(self.spec)
        positions = ops.convert(position_ids, "f32")
        freqs = ops.multiply(ops.unsqueeze(positions, self.i64(-1)),
                             self.const(inv_freq.reshape(1, 1, -1).astype(np.float32)))
        emb = ops.concat([freqs, freqs], axis=-1)
        cos, sin = ops.cos(emb), ops.sin(emb)
        if scale != 1.0:
            cos = ops.multiply(cos, self.const(np.float32(scale)))
            sin = ops.multiply(sin, self.const(np.float32(scale)))
        return ops.unsqueeze(cos, self.i64(1), name="rope/cos"), ops.unsqueeze(sin, self.i64(1), name="rope/sin")

    def layer(self, i: int, x: Any, mask: Any, cos: Any, sin: Any, batch: Any, beam_idx: Any
              ) -> tuple[Any, list[Any]]:
        ov, ops, s = self.ov, self.ops, self.spec
        from openvino.op.util import Variable, VariableInfo

        p = f"layers.{i}."
        h = self.rms_norm(x, self.w.vector(p + "attn_norm"), p + "attn_norm")
        bias = s.qkv_bias
        q = self.linear(h, p + "q", p + "q_bias" if bias else None)
        k = self.linear(h, p + "k", p + "k_bias" if bias else None)
        v = self.linear(h, p + "v", p + "v_bias" if bias else None)
        with self.scope(p + "attn"):
            q = ops.reshape(q, self.i64(0, 0, s.num_heads, s.head_dim), special_zero=True)
            k = ops.reshape(k, self.i64(0, 0, s.num_kv_heads, s.head_dim), special_zero=True)
            v = ops.reshape(v, self.i64(0, 0, s.num_kv_heads, s.head_dim), special_zero=True)
        if s.qk_norm:
            q = self.rms_norm(q, self.w.vector(p + "q_norm"), p + "q_norm")
            k = self.rms_norm(k, self.w.vector(p + "k_norm"), p + "k_norm")
        with self.scope(p + "attn"):
            q = ops.transpose(q, self.i64(0, 2, 1, 3))  # [B, H, T, D]
            k = ops.transpose(k, self.i64(0, 2, 1, 3))  # [B, KV, T, D]
            v = ops.transpose(v, self.i64(0, 2, 1, 3))
        q = self.rope(q, cos, sin, p + "attn.q_rope")
        k = self.rope(k, cos, sin, p + "attn.k_rope")

        sinks = []
        cached = []
        with self.scope(p + "attn.cache"):
            empty_shape = ops.concat([batch, self.i64(s.num_kv_heads, 0, s.head_dim)], axis=0)
        for new, var_id, present_name, block in zip(
            (k, v), state_names(i), (f"present.{i}.key", f"present.{i}.value"),
            (p + "attn.k_cache", p + "attn.v_cache"), strict=True,
        ):
            info = VariableInfo()
            info.variable_id = var_id
            info.data_type = ov.Type.f32
            info.data_shape = ov.PartialShape([-1, s.num_kv_heads, -1, s.head_dim])
            variable = Variable(info)
            with self.scope(block):
                init = ops.broadcast(self.const(0.0), empty_shape, name=f"{block}/empty")
                past = ops.read_value(init, variable, name=var_id)
                past = ops.gather(past, beam_idx, self.const(0, np.int64), name=f"{var_id}/beam_gather")
                present = ops.concat([past, new], axis=2, name=present_name)
                sinks.append(ops.assign(present, variable, name=f"{var_id}/assign"))
            cached.append(present)
        keys, values = cached
        group = s.num_heads // s.num_kv_heads
        if group > 1:
            keys = self.repeat_kv(keys, p + "attn.repeat_k")
            values = self.repeat_kv(values, p + "attn.repeat_v")

        with self.scope(p + "attn"):
            scale = self.const(np.float32(1.0 / math.sqrt(s.head_dim)))
            attn = ops.scaled_dot_product_attention(q, keys, values, mask, scale, causal=False,
                                                    name=p + "attention")
            attn = ops.transpose(attn, self.i64(0, 2, 1, 3))
            attn = ops.reshape(attn, self.i64(0, 0, s.q_size), special_zero=True)
        x = ops.add(x, self.linear(attn, p + "o"), name=p + "attn_residual")

        h = self.rms_norm(x, self.w.vector(p + "mlp_norm"), p + "mlp_norm")
        gate = self.linear(h, p + "gate")
        up = self.linear(h, p + "up")
        with self.scope(p + "mlp"):
            gated = ops.multiply(self.activation(gate), up, name=p + "mlp/gated")
        x = ops.add(x, self.linear(gated, p + "down"), name=p + "mlp_residual")
        return x, sinks

    def repeat_kv(self, t: Any, name: str) -> Any:
        """[B, KV, S, D] -> [B, H, S, D], each kv head repeated ``group`` times (like ``np.repeat(axis=1)``)."""
        ops, s = self.ops, self.spec
        group = s.num_heads // s.num_kv_heads
        with self.scope(name):
            shape = ops.shape_of(t, output_type="i64")
            b = ops.gather(shape, self.i64(0), self.const(0, np.int64))
            seq = ops.gather(shape, self.i64(2), self.const(0, np.int64))
            target = ops.concat([b, self.i64(s.num_kv_heads, group), seq, self.i64(s.head_dim)], axis=0)
            expanded = ops.broadcast(ops.unsqueeze(t, self.i64(2)), target)
            flat = ops.concat([b, self.i64(s.num_heads), seq, self.i64(s.head_dim)], axis=0)
            return ops.reshape(expanded, flat, special_zero=False, name=f"{name}/output")


def build_model(spec: ModelSpec, weights: Any) -> Any:
    """The stateful ``ov.Model`` of ``spec``; ``weights`` provides ``matrix(name, role=)`` and ``vector(name)``.

    Every node has a deterministic name (see :class:`NodeNames`); a node that slipped through unnamed is a bug.
    """
    if spec.norm_kind != "rms":
        raise ConversionError(f"the OpenVINO target supports RMSNorm only, not {spec.norm_kind!r}")
    if spec.num_heads % spec.num_kv_heads:
        raise ConversionError("num_heads must be a multiple of num_kv_heads")
    model = _Builder(spec, weights).build()
    unnamed = [op.get_name() for op in model.get_ordered_ops() if op.get_friendly_name() == op.get_name()
               or is_generated_name(op.get_friendly_name())]
    if unnamed:
        raise ConversionError(f"internal error: OpenVINO graph nodes without a deterministic name: {unnamed[:5]}")
    return model
