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
from ``attention_mask``, the layer's sliding window if it has one: one mask per distinct window), so the CPU
plugin can fuse the cache update into its stateful SDPA kernel and genai can turn it into paged attention.
Attention soft-capping (Gemma 2) has no SDPA form and is spelled out. Grouped-query attention repeats the
cached keys/values with Unsqueeze/Broadcast/Reshape, as exported Hugging Face models do.

The arithmetic follows ``sovpack.reference`` op for op: RMSNorm ``x / sqrt(mean(x^2) + eps) * w`` before
and/or after each sublayer (``norm_placement``), rotate-half RoPE from ``rope_inv_freq`` (global, local or
none per layer, on the leading ``rotary_size`` dims, longrope's table chosen in the graph), q/k norms per head
or over the projection, q/k/v biases, the attention scale and soft-cap, residual and embedding multipliers,
tied heads, the logits divisor and final soft-cap, and silu / gelu_tanh / gelu MLPs. Mixture-of-experts layers
(``spec.is_sparse``) get the routed block of ``moe``; attention sinks (gpt-oss) are SDPA's sixth input, and the
output projection may carry a bias (``o_bias``).

Names: every node gets a deterministic friendly name as it is built (``layers.3.q/matmul``,
``layers.3.attn/Reshape_0``: the block, then the role or the op type with a counter local to the block, see
``names``), so the same checkpoint gives the same IR in any process.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np

from sovpack.errors import ConversionError
from sovpack.rope import rope_inv_freq
from sovpack.source.spec import ModelSpec
from sovpack.targets.openvino.moe import check_moe, moe_block
from sovpack.targets.openvino.names import NamedOps, NodeNames, canonicalize_names, is_generated_name

__all__ = [
    "INPUT_NAMES", "MASK_VALUE", "OUTPUT_NAME", "build_model", "canonicalize_names", "is_generated_name",
    "state_names",
]

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


RopeKind = Literal["local", "global"]


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

    def soft_cap(self, x: Any, cap: float, name: str) -> Any:
        """cap * tanh(x / cap), as ``sovpack.reference.soft_cap``."""
        ops = self.ops
        with self.scope(name):
            capped = ops.tanh(ops.divide(x, self.const(np.float32(cap))))
            return ops.multiply(capped, self.const(np.float32(cap)), name=f"{name}/output")

    def linear(self, x: Any, name: str, bias: str | None = None) -> Any:
        ops = self.ops
        with self.scope(name):
            multiplier = self.w.input_multiplier(name)
            if multiplier is not None:  # activation-aware scaling: the codes are of weight * s, the input / s
                x = ops.multiply(x, self.const(multiplier), name=f"{name}/input_scale")
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
        """Rotate-half rope on the leading ``rotary_size`` dims of each head; the rest pass through."""
        ops, s = self.ops, self.spec
        with self.scope(name):
            if s.rotary_size == s.head_dim:
                return ops.add(ops.multiply(x, cos), ops.multiply(self.rotate_half(x), sin), name=f"{name}/output")
            turned, kept = ops.variadic_split(x, self.const(-1, np.int64),
                                              self.i64(s.rotary_size, s.head_dim - s.rotary_size)).outputs()
            turned = ops.add(ops.multiply(turned, cos), ops.multiply(self.rotate_half(turned), sin))
            return ops.concat([turned, kept], axis=-1, name=f"{name}/output")

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

        # One mask per distinct window and one cos/sin pair per rotary embedding, shared by the layers using it.
        masks: dict[int | None, Any] = {}
        rotations: dict[RopeKind, tuple[Any, Any]] = {}
        sinks = []
        for i in range(s.num_layers):
            window = s.layer_window(i)
            if window not in masks:
                block = "attention_mask" if window is None else f"attention_mask.window{window}"
                with self.scope(block):
                    masks[window] = self.attention_mask(attention_mask, steps, window, block)
            kind = s.layer_rope(i)
            if kind != "none" and kind not in rotations:
                block = "rope" if kind == "global" else "rope.local"
                with self.scope(block):
                    rotations[kind] = self.rotary(position_ids, kind, block)
            x, layer_sinks = self.layer(i, x, masks[window], rotations.get(kind) if kind != "none" else None,
                                        batch, beam_idx)
            sinks.extend(layer_sinks)

        x = self.rms_norm(x, self.w.vector("final_norm"), "final_norm")
        head = "embed" if s.tie_word_embeddings else "lm_head"
        with self.scope("lm_head"):
            logits = ops.matmul(x, self.w.matrix(head, role="head"), transpose_a=False, transpose_b=True,
                                name="lm_head/matmul")
            if s.logits_divisor != 1.0:
                logits = ops.divide(logits, self.const(np.float32(s.logits_divisor)), name="lm_head/divisor")
        if s.final_logit_softcap is not None:
            logits = self.soft_cap(logits, s.final_logit_softcap, "lm_head.softcap")
        with self.scope("lm_head"):
            result = ops.result(logits, name=OUTPUT_NAME)
        result.output(0).get_tensor().set_names({OUTPUT_NAME})
        logits.output(0).get_tensor().set_names({OUTPUT_NAME})
        model = ov.Model([result], sinks, params, "sovpack-decoder")
        return model

    def attention_mask(self, attention_mask: Any, steps: Any, window: int | None, block: str) -> Any:
        """Additive mask [B, 1, T, P+T]: 0 where a query may attend, MASK_VALUE elsewhere.

        With a sliding window the boolean terms are combined in the shape OpenVINO's ``SDPAToPagedAttention``
        recognises as a sliding-window mask (its gpt-oss pattern: ``Greater(k, Add(q, -window))`` in a chain of
        four ``BitwiseAnd``, then ``Broadcast``, ``Select`` and ``Slice``), so genai's paged-attention path,
        which replaces the mask by its own causal logic, keeps the window (as PagedAttention's
        ``sliding_window`` input) instead of silently attending to everything. Models mixing windowed and full
        layers (Gemma 2/3) get one mask of each kind, as gpt-oss does.
        """
        ops = self.ops
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
        if window is None:
            allowed = ops.logical_and(ops.unsqueeze(causal, self.i64(0, 1)), padding)  # [B, 1, T, S]
            return ops.select(allowed, self.const(0.0), self.const(MASK_VALUE), name=f"{block}/additive")
        # keys strictly after q - window: (q - k) < window, as in the reference
        within = ops.greater(k_row, ops.add(q_col, self.const(-int(window), np.int64)))
        allowed = ops.bitwise_and(causal, within)  # [T, S]
        allowed = ops.bitwise_and(allowed, padding)  # [B, 1, T, S]
        # Two always-true range checks complete the chain the pattern expects (q and k inside the sequence).
        allowed = ops.bitwise_and(ops.greater_equal(q_col, zero), allowed)
        allowed = ops.bitwise_and(allowed, ops.less(k_row, total))
        batch = ops.gather(ops.shape_of(attention_mask, output_type="i64"), self.i64(0), zero)
        target = ops.concat([batch, self.i64(1), steps, total], axis=0)
        allowed = ops.broadcast(allowed, target)
        additive = ops.select(allowed, self.const(0.0), self.const(MASK_VALUE))
        return ops.slice(additive, self.i64(0), total, self.i64(1), self.i64(3), name=f"{block}/additive")

    def rotary(self, position_ids: Any, kind: RopeKind, block: str) -> tuple[Any, Any]:
        """cos and sin [B, 1, T, rotary_size] of one rotary embedding, scaled like the reference.

        LongRoPE picks its table in the graph: the long factors when the largest position of this forward pass
        + 1 exceeds original_max_position_embeddings, else the short ones; keys already in the cache keep the
        rotation they were stored with.

        NOTE: the largest position is taken over the whole ``position_ids`` tensor, as transformers does
        (``torch.max(position_ids) + 1``), not per row: genai's paged-attention rewrite feeds position_ids as
        [tokens, 1], where a per-row maximum would pick the table token by token. For one sequence (the parity
        runner, LLMPipeline) that is the reference's per-sequence switch; sequences batched together share it.
        """
        ops, s = self.ops, self.spec
        local = kind == "local"
        inv_freq, scale = rope_inv_freq(s, local=local)
        positions = ops.unsqueeze(ops.convert(position_ids, "f32"), self.i64(-1))  # [B, T, 1]
        inv = self.const(inv_freq.reshape(1, 1, -1).astype(np.float32))
        if s.rope_scaling.kind == "longrope" and not local:
            after = s.rope_scaling.original_max_position_embeddings
            if after is None:
                raise ConversionError("longrope needs original_max_position_embeddings")
            long_inv = rope_inv_freq(s, local=local, long=True)[0]
            last = ops.reduce_max(position_ids, self.i64(0, 1), keep_dims=False)  # scalar: see the NOTE
            use_long = ops.greater(last, self.const(after - 1, np.int64), name=f"{block}/use_long")
            inv = ops.select(use_long, self.const(long_inv.reshape(1, 1, -1).astype(np.float32)), inv)
        freqs = ops.multiply(positions, inv)
        emb = ops.concat([freqs, freqs], axis=-1)
        cos, sin = ops.cos(emb), ops.sin(emb)
        if scale != 1.0:
            cos = ops.multiply(cos, self.const(np.float32(scale)))
            sin = ops.multiply(sin, self.const(np.float32(scale)))
        return (ops.unsqueeze(cos, self.i64(1), name=f"{block}/cos"),
                ops.unsqueeze(sin, self.i64(1), name=f"{block}/sin"))

    def layer(self, i: int, x: Any, mask: Any, rotation: tuple[Any, Any] | None, batch: Any, beam_idx: Any
              ) -> tuple[Any, list[Any]]:
        ops, s = self.ops, self.spec
        p = f"layers.{i}."
        h = self.rms_norm(x, self.w.vector(p + "attn_norm"), p + "attn_norm") if s.pre_norms else x
        bias = s.qkv_bias
        q = self.linear(h, p + "q", p + "q_bias" if bias else None)
        k = self.linear(h, p + "k", p + "k_bias" if bias else None)
        v = self.linear(h, p + "v", p + "v_bias" if bias else None)
        if s.qk_norm and s.qk_norm_scope == "projection":  # over the whole projection, before the head split
            q = self.rms_norm(q, self.w.vector(p + "q_norm"), p + "q_norm")
            k = self.rms_norm(k, self.w.vector(p + "k_norm"), p + "k_norm")
        with self.scope(p + "attn"):
            q = ops.reshape(q, self.i64(0, 0, s.num_heads, s.head_dim), special_zero=True)
            k = ops.reshape(k, self.i64(0, 0, s.num_kv_heads, s.head_dim), special_zero=True)
            v = ops.reshape(v, self.i64(0, 0, s.num_kv_heads, s.head_dim), special_zero=True)
        if s.qk_norm and s.qk_norm_scope == "head":
            q = self.rms_norm(q, self.w.vector(p + "q_norm"), p + "q_norm")
            k = self.rms_norm(k, self.w.vector(p + "k_norm"), p + "k_norm")
        with self.scope(p + "attn"):
            q = ops.transpose(q, self.i64(0, 2, 1, 3))  # [B, H, T, D]
            k = ops.transpose(k, self.i64(0, 2, 1, 3))  # [B, KV, T, D]
            v = ops.transpose(v, self.i64(0, 2, 1, 3))
        if rotation is not None:
            q = self.rope(q, *rotation, p + "attn.q_rope")
            k = self.rope(k, *rotation, p + "attn.k_rope")

        sinks, (keys, values) = self.kv_cache(i, k, v, batch, beam_idx)
        if s.num_heads // s.num_kv_heads > 1:
            keys = self.repeat_kv(keys, p + "attn.repeat_k")
            values = self.repeat_kv(values, p + "attn.repeat_v")
        attn = self.attention(q, keys, values, mask, p)
        o = self.linear(attn, p + "o", p + "o_bias" if s.o_bias else None)
        x = self.residual(x, o, p + "post_attn_norm", p + "attn_residual")

        h = self.rms_norm(x, self.w.vector(p + "mlp_norm"), p + "mlp_norm") if s.pre_norms else x
        if s.is_sparse(i):
            return self.residual(x, moe_block(self, h, i), p + "post_mlp_norm", p + "mlp_residual"), sinks
        gate = self.linear(h, p + "gate")
        up = self.linear(h, p + "up")
        with self.scope(p + "mlp"):
            gated = ops.multiply(self.activation(gate), up, name=p + "mlp/gated")
        x = self.residual(x, self.linear(gated, p + "down"), p + "post_mlp_norm", p + "mlp_residual")
        return x, sinks

    def residual(self, x: Any, out: Any, post_norm: str, name: str) -> Any:
        """x plus a sublayer's output, after its post norm and residual multiplier where the spec has them."""
        ops, s = self.ops, self.spec
        if s.post_norms:
            out = self.rms_norm(out, self.w.vector(post_norm), post_norm)
        if s.residual_multiplier != 1.0:
            with self.scope(name):
                out = ops.multiply(out, self.const(np.float32(s.residual_multiplier)), name=f"{name}/multiplier")
        return ops.add(x, out, name=name)

    def kv_cache(self, i: int, k: Any, v: Any, batch: Any, beam_idx: Any) -> tuple[list[Any], list[Any]]:
        """The layer's ReadValue/Gather(beam_idx)/Concat/Assign state: (sinks, [keys, values] incl. the new)."""
        ov, ops, s = self.ov, self.ops, self.spec
        from openvino.op.util import Variable, VariableInfo

        p = f"layers.{i}."
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
        return sinks, cached

    def attention(self, q: Any, keys: Any, values: Any, mask: Any, p: str) -> Any:
        """softmax(scale * q.k [soft-capped] + mask) . v, as [B, T, q_size].

        NOTE: without attention soft-capping this is the opset13 ``ScaledDotProductAttention`` op (the CPU
        plugin's stateful SDPA kernel, genai's paged attention). SDPA has no soft-cap, so Gemma 2's capped
        scores are spelled out (MatMul, Tanh, Softmax, MatMul); genai's paged-attention rewrite, which looks
        for SDPA, then leaves the model alone and LLMPipeline runs it on the stateful (SDPA) backend.
        """
        ops, s = self.ops, self.spec
        scale = np.float32(1.0 / math.sqrt(s.head_dim) if s.attention_scale is None else s.attention_scale)
        with self.scope(p + "attn"):
            if s.attention_sinks:
                attn = self.sink_attention(q, keys, values, mask, scale, p)
            elif s.attn_logit_softcap is None:
                attn = ops.scaled_dot_product_attention(q, keys, values, mask, self.const(scale), causal=False,
                                                        name=p + "attention")
            else:
                scores = ops.multiply(ops.matmul(q, keys, transpose_a=False, transpose_b=True), self.const(scale))
        if s.attn_logit_softcap is not None:
            scores = self.soft_cap(scores, s.attn_logit_softcap, p + "attn.softcap")
            with self.scope(p + "attn"):
                weights = ops.softmax(ops.add(scores, mask), -1)
                attn = ops.matmul(weights, values, transpose_a=False, transpose_b=False, name=p + "attention")
        with self.scope(p + "attn"):
            attn = ops.transpose(attn, self.i64(0, 2, 1, 3))
            return ops.reshape(attn, self.i64(0, 0, s.q_size), special_zero=True)

    def sink_attention(self, q: Any, keys: Any, values: Any, mask: Any, scale: Any, p: str) -> Any:
        """SDPA with gpt-oss's per-head sink logits as its sixth input ([1, heads, 1, 1]): each head's sink joins
        the softmax as an extra score column and attends to nothing, as in ``sovpack.reference``.

        NOTE: the Python ``scaled_dot_product_attention`` factory takes five inputs; opset13's op accepts the sink
        as a sixth (what the CPU kernel and genai's PagedAttention rewrite read), so the node comes from
        ``NodeFactory``."""
        from openvino.utils.node_factory import NodeFactory

        ops, s = self.ops, self.spec
        sink = ops.reshape(self.w.vector(p + "sinks"), self.i64(1, s.num_heads, 1, 1), special_zero=False,
                           name=p + "attn/sinks")
        inputs = [t.output(0) if hasattr(t, "output") else t for t in (q, keys, values, mask, self.const(scale), sink)]
        node = NodeFactory("opset13").create("ScaledDotProductAttention", inputs, {"causal": False})
        node.set_friendly_name(p + "attention")
        return node

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
    if spec.rotary_size % 2 or not 0 < spec.rotary_size <= spec.head_dim:
        raise ConversionError(f"rotary_dim {spec.rotary_size} must be even and within head_dim {spec.head_dim}")
    check_moe(spec)
    model = _Builder(spec, weights).build()
    unnamed = [op.get_name() for op in model.get_ordered_ops() if op.get_friendly_name() == op.get_name()
               or is_generated_name(op.get_friendly_name())]
    if unnamed:
        raise ConversionError(f"internal error: OpenVINO graph nodes without a deterministic name: {unnamed[:5]}")
    return model
