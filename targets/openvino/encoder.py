"""An embedding encoder (BERT, XLM-RoBERTa, ModernBERT) as the OpenVINO IR that openvino-genai's
TextEmbeddingPipeline runs.

Interface (batch ``B``, tokens ``T``): inputs ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the
model has more than one token type, as Optimum exports BERT but not XLM-R), all i64 [B, T]; one output, tensor
names ``last_hidden_state`` and ``sentence_embedding``, f32 [B, 1, hidden]: the *pooled* sentence embedding
(L2-normalised when the sentence-transformers pipeline has a Normalize module).

NOTE: why the pooling is in the graph. ``TextEmbeddingPipeline(dir, "CPU")`` reads its pooling and normalisation
from its Config argument only (nothing from the model directory: not rt_info, not a config file); the defaults are
CLS pooling and L2 normalisation. It appends them to the model's single output (named ``last_hidden_state``) with
a PrePostProcessor: CLS slices row 0 of axis 1, NormalizeL2 divides by the norm. A model that already returns
[B, 1, hidden] with the sentence-transformers pooling applied therefore comes out of the defaults unchanged (CLS
takes the one row; normalising an already normalised vector is the identity up to rounding), whatever the
checkpoint's pooling: mean, max, CLS, mean/sqrt(len) or last token. The cost: a caller must keep the default
pooling (``pooling_type=MEAN`` or ``LAST_TOKEN`` on this output is wrong), and for a model without Normalize the
defaults still L2-normalise (same direction, unit length; ``normalize=False`` gives the raw vector).

Token states: the final LayerNorm's output is the node named :data:`HIDDEN_NODE`; the parity runner adds it as a
second output at load time (``ov.Model.add_outputs``), so the saved IR keeps the single output genai requires.

Positions are ``position_offset + cumsum(attention_mask) - 1`` (XLM-R's rule, and BERT's ``arange`` for every
right-padded row), so a text's embedding does not depend on its batch's padding side; pooling reads the mask
too (CLS/last token: the first/last real token). ModernBERT (``encoder_rope``: pre-LN layers, rotary q/k,
two-sided local windows, GeGLU, final norm) rotates by the same ranks and measures its window in them.

Runtime: AMX/AVX512-BF16 CPUs execute f32 models in bf16 unless told otherwise, and ``INFERENCE_PRECISION_HINT``
is not a property OpenVINO reads from a model's ``runtime_options`` rt_info (it reads KV-cache precision, dynamic
quantization group size, activations scale factor; measured), while TextEmbeddingPipeline passes no properties
of its own. An fp32 artifact therefore marks every compute node ``precise`` (``precise.mark_precise``: the IR
attribute behind ``ov::disable_fp16_compression``, which the CPU plugin honours when it lowers precision), and
the graph is shaped so that no CPU rewrite drops those marks (``linear``, ``attention``, ``softmax1``,
``encoder_rope.rotate``): compiled with no properties it gives the same numbers as with
``INFERENCE_PRECISION_HINT=f32``. fp16/int8 artifacts are not marked (their weights already round more than bf16
compute adds; measured in the tests), except a rotary encoder's angle computation (``encoder_rope.rotary``).
``runtime_options`` carries ``DYNAMIC_QUANTIZATION_GROUP_SIZE=0`` so integer weights are not met by quantized
activations.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from sovpack.errors import ConversionError
from sovpack.source.spec import EncoderSpec, ModelSpec
from sovpack.targets.openvino.encoder_rope import Rotation, local_mask, pre_ln_layer, rotary, rotate
from sovpack.targets.openvino.graph import MASK_VALUE
from sovpack.targets.openvino.names import NamedOps, NodeNames, is_generated_name

__all__ = [
    "EMBEDDING_NAMES", "ENCODER_RUNTIME_OPTIONS", "HIDDEN_NODE", "OUTPUT_NAME", "build_encoder", "input_names",
]

OUTPUT_NAME = "last_hidden_state"  # the tensor name TextEmbeddingPipeline reads
EMBEDDING_NAMES = frozenset({OUTPUT_NAME, "sentence_embedding"})
HIDDEN_NODE = "encoder/token_states"
# rt_info ``runtime_options`` OpenVINO applies at compile time (see the module docstring).
ENCODER_RUNTIME_OPTIONS: dict[str, str] = {"DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
# (layout, position, mlp) of the encoders the builder knows: BERT/XLM-R, and ModernBERT (``encoder_rope``).
_SHAPES = (("post_ln", "absolute", "plain"), ("pre_ln", "rope", "geglu"))


def input_names(encoder: EncoderSpec) -> tuple[str, ...]:
    """The graph's inputs: token types only when there is more than one (Optimum's BERT/XLM-R interfaces)."""
    base = ("input_ids", "attention_mask")
    return (*base, "token_type_ids") if encoder.type_vocab_size > 1 else base


class _EncoderBuilder:
    def __init__(self, spec: ModelSpec, encoder: EncoderSpec, weights: Any) -> None:
        import openvino as ov
        import openvino.opset13 as opset

        self.ov = ov
        self.names = NodeNames("encoder")
        self.ops = NamedOps(opset, self.names)
        self.scope = self.names.scope
        self.spec = spec
        self.enc = encoder
        self.w = weights
        self.runtime_one: Any = None

    def const(self, value: Any, dtype: Any = np.float32) -> Any:
        return self.ops.constant(np.asarray(value, dtype=dtype))

    def i64(self, *values: int) -> Any:
        return self.const(list(values), np.int64)

    def softmax1(self, x: Any, name: str) -> Any:
        """Softmax over the last axis as opset1's op (positive axis), which the CPU plugin runs as it is.

        NOTE: opset8's Softmax (opset13's factory) is rewritten to opset1's on the CPU, and the new node loses the
        ``precise`` mark, so it ran in bf16 at the defaults on AMX CPUs.
        """
        import openvino.opset1 as opset1

        node = opset1.softmax(x, 3)
        node.set_friendly_name(name)
        return node

    def layer_norm(self, x: Any, name: str) -> Any:
        """(x - mean) / sqrt(var + eps) * w + b over the hidden axis (MVN, which the CPU plugin fuses)."""
        ops = self.ops
        with self.scope(name):
            normed = ops.mvn(x, self.i64(-1), normalize_variance=True, eps=float(self.spec.norm_eps),
                             eps_mode="inside_sqrt")
            if not self.enc.norm_bias:
                return ops.multiply(normed, self.w.vector(name), name=f"{name}/output")
            scaled = ops.multiply(normed, self.w.vector(name))
            return ops.add(scaled, self.w.vector(name + "_bias"), name=f"{name}/output")

    def linear(self, x: Any, name: str) -> Any:
        """x W^T + b, the bias scaled by the graph's runtime 1.0 first (:meth:`build`, ``runtime_one``).

        NOTE: the CPU plugin fuses ``MatMul -> Add(constant bias)`` (and a bias broadcast to the product's shape,
        which a common pass folds back to a constant) into one FullyConnected node, and the fused node loses the
        ``precise`` mark (``mark_precise``): an fp32 artifact would run its projections in bf16 at the defaults on
        AMX CPUs. A bias that is computed at run time is not a constant, that fusion does not apply, and the
        projection stays f32 (measured: identical to INFERENCE_PRECISION_HINT=f32). It costs one multiply of
        ``out_features`` values per projection. Without biases (ModernBERT) the MatMul alone keeps its mark
        (measured the same way).
        """
        ops = self.ops
        with self.scope(name):
            y = ops.matmul(x, self.w.matrix(name), transpose_a=False, transpose_b=True, name=f"{name}/matmul")
            if not self.enc.linear_bias:
                return y
            bias = ops.multiply(self.w.vector(name + "_bias"), self.runtime_one, name=f"{name}/runtime_bias")
            return ops.add(y, bias, name=f"{name}/bias")

    def build(self) -> Any:
        ov, ops, s, enc = self.ov, self.ops, self.spec, self.enc
        params = [ops.parameter([-1, -1], ov.Type.i64, name=n) for n in input_names(enc)]
        for p in params:
            p.output(0).get_tensor().set_names({p.get_friendly_name()})
        input_ids, attention_mask = params[0], params[1]
        zero = self.const(0, np.int64)
        with self.scope("runtime_one"):  # 1.0 that constant folding cannot see through: see ``linear``
            batch = ops.gather(ops.shape_of(input_ids, output_type="i64"), self.i64(0), zero)
            self.runtime_one = ops.convert(ops.greater_equal(batch, zero), "f32", name="runtime_one/value")

        with self.scope("mask"):
            real = ops.not_equal(attention_mask, zero, name="mask/real")  # [B, T] bool
            real_f = ops.convert(real, "f32", name="mask/real_f32")
            keys = ops.unsqueeze(real, self.i64(1, 2))  # [B, 1, 1, T]
            additive = ops.select(keys, self.const(0.0), self.const(MASK_VALUE), name="mask/additive")

        with self.scope("embed"):
            x = ops.gather(self.w.matrix("embed", role="embedding"), input_ids, zero, name="embed/words")
            counted = ops.cumsum(ops.convert(real, "i64"), self.const(1, np.int64))
            index = ops.maximum(ops.subtract(counted, self.const(1, np.int64)), zero)
            if enc.position == "absolute":
                positions = ops.add(index, self.const(enc.position_offset, np.int64), name="embed/position_ids")
                x = ops.add(x, ops.gather(self.w.vector("pos_embed"), positions, zero), name="embed/with_positions")
            if enc.type_vocab_size > 1:
                types = ops.gather(self.w.vector("type_embed"), params[2], zero)
                x = ops.add(x, types, name="embed/with_types")
            elif enc.type_vocab_size == 1:  # one type: every token adds row 0
                x = ops.add(x, ops.gather(self.w.vector("type_embed"), self.i64(0), zero), name="embed/with_types")
        x = self.layer_norm(x, "embed_norm")

        if enc.layout == "pre_ln":
            x = self.pre_ln_layers(x, index, real, additive)
        else:
            for i in range(s.num_layers):
                x = self.layer(i, x, additive)
        with self.scope("encoder"):
            hidden = ops.convert(x, "f32", name=HIDDEN_NODE)  # a no-op anchor the runner exposes as an output
        pooled = self.pool(hidden, real, real_f)
        with self.scope("pooling"):
            out = ops.unsqueeze(pooled, self.i64(1), name="pooling/sentence_embedding")
            result = ops.result(out, name=OUTPUT_NAME)
        out.output(0).get_tensor().set_names(set(EMBEDDING_NAMES))
        return ov.Model([result], params, "sovpack-encoder")

    def pre_ln_layers(self, x: Any, positions: Any, real: Any, additive: Any) -> Any:
        """ModernBERT's layers (``encoder_rope``) and final norm; one mask and rotation per attention kind, shared
        by the layers of that kind."""
        enc = self.enc
        full = (additive, rotary(self, positions, enc.rope_theta, "rope"))
        local = full
        if enc.local_layers and enc.local_window is not None:  # build_encoder checked that both or neither are set
            local = (local_mask(self, positions, real, enc.local_window),
                     rotary(self, positions, enc.rope_local_theta, "rope.local"))
        for i in range(self.spec.num_layers):
            x = pre_ln_layer(self, i, x, *(local if i in enc.local_layers else full))
        return self.layer_norm(x, "final_norm")

    def layer(self, i: int, x: Any, mask: Any) -> Any:
        ops = self.ops
        p = f"layers.{i}."
        q, k, v = (self.linear(x, p + n) for n in ("q", "k", "v"))
        attn = self.attention(q, k, v, mask, p)
        out = self.linear(attn, p + "o")
        x = self.layer_norm(ops.add(x, out, name=p + "attn_residual"), p + "attn_output_norm")
        with self.scope(p + "mlp"):
            inner = ops.gelu(self.linear(x, p + "up"), approximation_mode="erf", name=p + "mlp/gelu")
        out = self.linear(inner, p + "down")
        return self.layer_norm(ops.add(x, out, name=p + "mlp_residual"), p + "output_norm")

    def attention(self, q: Any, k: Any, v: Any, mask: Any, p: str, rotation: Rotation | None = None) -> Any:
        """softmax(q.k^T * scale + padding mask) . v per head, as [B, T, q_size].

        NOTE: spelled out (MatMul, Softmax, MatMul) rather than ScaledDotProductAttention, in the one form whose
        every node keeps its ``precise`` mark through the CPU plugin's rewrites (each alternative was measured
        against INFERENCE_PRECISION_HINT=f32 at the defaults on an AMX CPU): the plugin decomposes SDPA and fuses
        MatMul-Softmax-MatMul into an MHA kernel that computes in bf16 inside whatever the marks say; v is
        therefore laid out [B, heads, dim, T] and the second MatMul takes it transposed, which that fusion does
        not match. A constant scale is moved into the q or k projection by a pass that drops the mark, so the
        scale is multiplied by the runtime 1.0 (see ``linear``); Softmax is opset1's (see ``softmax1``).
        """
        ops, s = self.ops, self.spec
        with self.scope(p + "attn"):
            split = [ops.reshape(t, self.i64(0, 0, s.num_heads, s.head_dim), special_zero=True) for t in (q, k, v)]
            qh = ops.transpose(split[0], self.i64(0, 2, 1, 3))  # [B, heads, T, dim]
            kh = ops.transpose(split[1], self.i64(0, 2, 1, 3))  # [B, heads, T, dim]
            if rotation is not None:
                qh, kh = rotate(self, qh, rotation, p + "attn.q_rope"), rotate(self, kh, rotation, p + "attn.k_rope")
            vh = ops.transpose(split[2], self.i64(0, 2, 3, 1))  # [B, heads, dim, T]
            scale = ops.multiply(self.const(np.float32(1.0 / math.sqrt(s.head_dim))), self.runtime_one)
            scores = ops.add(ops.multiply(ops.matmul(qh, kh, transpose_a=False, transpose_b=True), scale), mask)
            weights = self.softmax1(scores, p + "attn/softmax")
            attn = ops.matmul(weights, vh, transpose_a=False, transpose_b=True, name=p + "attention")
            return ops.reshape(ops.transpose(attn, self.i64(0, 2, 1, 3)), self.i64(0, 0, s.q_size),
                               special_zero=True)

    def pool(self, hidden: Any, real: Any, real_f: Any) -> Any:
        """sentence-transformers' Pooling (+ Normalize) over the real tokens: [B, T, H] -> [B, H]."""
        ops = self.ops
        pooling = self.enc.pooling
        with self.scope("pooling"):
            if pooling.mode in ("cls", "last_token"):
                steps = ops.gather(ops.shape_of(real, output_type="i64"), self.i64(1), self.const(0, np.int64))
                places = ops.range(self.const(0, np.int64), ops.squeeze(steps, self.i64(0)),
                                   self.const(1, np.int64), "i64")
                places = ops.unsqueeze(places, self.i64(0))  # [1, T]
                if pooling.mode == "cls":  # the first real token
                    chosen = ops.reduce_min(ops.select(real, places, steps), self.i64(1), keep_dims=False)
                else:  # the last real token
                    chosen = ops.reduce_max(ops.select(real, places, self.const(0, np.int64)), self.i64(1),
                                            keep_dims=False)
                out = ops.gather(hidden, chosen, self.const(1, np.int64), batch_dims=1, name="pooling/token")
            elif pooling.mode == "max":
                kept = ops.select(ops.unsqueeze(real, self.i64(-1)), hidden, self.const(-1e9))
                out = ops.reduce_max(kept, self.i64(1), keep_dims=False, name="pooling/max")
            elif pooling.mode in ("mean", "mean_sqrt_len"):
                weights = ops.unsqueeze(real_f, self.i64(-1))  # [B, T, 1]
                summed = ops.reduce_sum(ops.multiply(hidden, weights), self.i64(1), keep_dims=False)
                count = ops.maximum(ops.reduce_sum(weights, self.i64(1), keep_dims=False), self.const(1e-9))
                if pooling.mode == "mean_sqrt_len":
                    count = ops.sqrt(count)
                out = ops.divide(summed, count, name="pooling/mean")
            else:
                raise ConversionError(f"the OpenVINO encoder has no pooling mode {pooling.mode!r}")
            if pooling.normalize:
                norm = ops.sqrt(ops.reduce_sum(ops.multiply(out, out), self.i64(-1), keep_dims=True))
                out = ops.divide(out, ops.maximum(norm, self.const(1e-12)), name="pooling/normalized")
            return out


def build_encoder(spec: ModelSpec, weights: Any) -> Any:
    """The ``ov.Model`` of an encoder spec; ``weights`` provides ``matrix(name, role=)`` and ``vector(name)``."""
    if spec.encoder is None:
        raise ConversionError(f"{spec.family} is not an embedding encoder")
    if spec.activation != "gelu":
        raise ConversionError(f"the OpenVINO encoder supports the erf GELU only, not {spec.activation!r}")
    if spec.num_heads != spec.num_kv_heads:
        raise ConversionError("an encoder's num_kv_heads must equal num_heads")
    enc = spec.encoder
    shape = (enc.layout, enc.position, enc.mlp)
    if shape not in _SHAPES:
        raise ConversionError(f"the OpenVINO encoder builds {' or '.join('/'.join(s) for s in _SHAPES)} "
                              f"(layout/position/mlp) encoders, not {'/'.join(shape)}")
    if bool(enc.local_layers) != (enc.local_window is not None) or (enc.local_layers and enc.position != "rope"):
        raise ConversionError("local attention layers need a local_window and rope positions")
    if enc.position == "rope" and spec.head_dim % 2:
        raise ConversionError(f"rotary positions need an even head size, not {spec.head_dim}")
    model = _EncoderBuilder(spec, spec.encoder, weights).build()
    unnamed = [op.get_name() for op in model.get_ordered_ops() if op.get_friendly_name() == op.get_name()
               or is_generated_name(op.get_friendly_name())]
    if unnamed:
        raise ConversionError(f"internal error: OpenVINO encoder nodes without a deterministic name: {unnamed[:5]}")
    return model
