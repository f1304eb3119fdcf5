"""The ONNX graph of an embedding encoder (BERT, XLM-RoBERTa, ModernBERT), built from the spec like the decoder's.

I/O is Optimum's feature-extraction convention, so ``ORTModelForFeatureExtraction`` and sentence-transformers'
ONNX backend read the artifact as they read an ``optimum-cli export onnx`` one: ``input_ids``,
``attention_mask`` and (only when the model has more than one token type, as Optimum exports BERT but not
XLM-R) ``token_type_ids`` in, int64 [batch_size, sequence_length]; ``last_hidden_state`` [batch_size,
sequence_length, hidden] out, plus ``sentence_embedding`` [batch_size, hidden]: the token states pooled the way
the checkpoint's sentence-transformers files say (and L2-normalised when they say so), so the pooling meaning
travels inside the graph too.

The building blocks (weights streamed to the external data file, Gemm / MatMulNBits projections, fp16 storage
with fp32 compute, activations, rotate-half rope) are the decoder builder's (graph.py); only the forward pass
differs. BERT and XLM-R are post-LN with learned positions. ModernBERT (``layout == "pre_ln"``) is pre-LN (no
attention norm on layer 0, a final norm), rotates q and k by rope (its own base on local layers), lets local
layers attend only within ``|i - j| <= local_window``, has a GeGLU MLP, ``down(act(up(x)) * gate(x))``, and
(by default) no biases at all: its LayerNormalization nodes then take no bias input.

# NOTE: position ids are computed in the graph. BERT numbers every slot 0..T-1 whatever the mask (as
# transformers' BertEmbeddings does); XLM-RoBERTa numbers only real tokens, from padding_idx + 1, and gives
# padded slots padding_idx (transformers derives "real" from ``input_ids != pad``; we take it from
# ``attention_mask``, which is the same for tokenizer output and also right for left padding).
# NOTE: padded keys get the float32 minimum as an additive bias (the reference uses -inf; a finite value keeps
# a row whose mask is all zeros NaN-free, and exp() underflows to exactly 0 either way).
# NOTE: LayerNorm is the opset-17 LayerNormalization op rather than explicit ReduceMean/Sub/Sqrt/Div nodes: on
# the real all-MiniLM-L6-v2 both give the same token-state error against the numpy reference (max |d| 3.3e-6
# vs 3.0e-6 at fp32, identical at fp16/int8), and one fused node per norm is smaller and faster.
# NOTE: int4 is refused for encoders. Embedding models are small (MiniLM: hidden 384) and their output is a
# direction compared by cosine: block-32 4-bit round-to-nearest on every projection of the post-LN stack puts
# MiniLM's worst per-text cosine to the reference at 0.958 (int8: 0.9998), far under even int8's limit (0.99),
# while its weights are too small for the saving to matter. The issue's encoder precisions are fp32, fp16, int8.
# NOTE: ModernBERT's rope cos/sin are computed in the graph from the slot indices 0..T-1 (Range over the
# sequence length, angles position * inv_freq in fp32 as the reference computes them, then Cos/Sin), not read
# from a constant table: nothing in the data file grows with max_position_embeddings (ModernBERT-base has
# 8192 positions, two bases: 8 MB of tables at head size 64) and it is the decoder graph's Mul/Concat/Cos/Sin.
# Measured: onnxruntime's Cos/Sin are within 1.2e-7 of numpy's over all 8192 x 32 angles of both ModernBERT-base
# bases, and the fixture's fp32 token-state error is 1.7e-6 in-graph against 1.4e-6 with a numpy table.
# NOTE: local layers add the float32 minimum where |i - j| > local_window or the key is padded (one [B, 1, T, T]
# bias shared by every local layer). A padded query far from every real token then sees a uniform softmax
# over its row instead of the reference's zeros; padded states are never pooled or compared.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from sovpack._io import Progress
from sovpack.errors import ConversionError
from sovpack.source.model import SourceModel
from sovpack.source.spec import EncoderSpec
from sovpack.targets.onnx.graph import MS_DOMAIN, OPSET, DecoderBuilder
from sovpack.targets.onnx.precisions import F32

# Precisions an encoder artifact may have, and the Optimum feature-extraction output names.
ENCODER_PRECISIONS = ("fp32", "fp16", "int8")
LAST_HIDDEN_STATE = "last_hidden_state"
SENTENCE_EMBEDDING = "sentence_embedding"
ENCODER_OUTPUTS = (LAST_HIDDEN_STATE, SENTENCE_EMBEDDING)
# Max pooling fills padded slots with this before the max, as sentence-transformers does.
MAX_POOL_FILL = -1e9


def encoder_inputs(encoder: EncoderSpec) -> tuple[str, ...]:
    """The graph's input names: Optimum exports token_type_ids for BERT (2 types), not for XLM-R (1 type)."""
    base = ("input_ids", "attention_mask")
    return (*base, "token_type_ids") if encoder.type_vocab_size > 1 else base


def check_encoder_precision(precision: str) -> None:
    """Refuse, by name and with the reason, a precision the encoder graph does not offer."""
    if precision == "int4":
        raise ConversionError(
            "onnx:int4 is not offered for embedding encoders: 4-bit round-to-nearest noise on every projection "
            "of a small post-LN encoder moves embedding directions more than retrieval tolerates; use onnx:int8, "
            "onnx:fp16 or onnx:fp32"
        )
    if precision not in ENCODER_PRECISIONS:
        raise ConversionError(f"onnx: precision {precision!r} is not offered for embedding encoders; known: "
                              f"{', '.join(ENCODER_PRECISIONS)}")


class EncoderBuilder(DecoderBuilder):
    """Builds the encoder graph for one SourceModel and precision, writing weights as it goes."""

    def __init__(self, model: SourceModel, precision: str, out_dir: Path, progress: Progress) -> None:
        check_encoder_precision(precision)
        if model.spec.encoder is None:
            raise ConversionError(f"onnx: {model.spec.family} is not an embedding encoder")
        super().__init__(model, precision, out_dir, progress)
        self.encoder: EncoderSpec = model.spec.encoder

    def layer_norm(self, x: str, weight: str, name: str) -> str:
        """LayerNorm over the last axis with weight and ``<weight>_bias``, as the ONNX LayerNormalization op
        (no bias input when the spec's norms have none: ModernBERT's default)."""
        w = self._store(weight, F32)
        b = [self._store(weight + "_bias", F32)] if self.encoder.norm_bias else []
        return self.g.op("LayerNormalization", x, w, *b, name=name, axis=-1, epsilon=float(self.spec.norm_eps))

    def projection(self, x: str, weight: str) -> str:
        """An attention/MLP projection with its ``_bias`` when the spec's projections have biases."""
        return self.linear(x, weight, weight + "_bias" if self.encoder.linear_bias else None)

    def gather_table(self, table: str, indices: str, name: str) -> str:
        """Rows of an embedding table (stored in the plan's embedding dtype), as float32."""
        from onnx import TensorProto

        dtype = self.plan.embed_dtype
        out = self.g.op("Gather", self._store(table, dtype), indices, name=f"{name}/gather", axis=0)
        return out if dtype == np.float32 else self.g.op("Cast", out, name=f"{name}/cast", to=TensorProto.FLOAT)

    def positions(self) -> str:
        """Position ids [B, T]: offset + slot index (BERT), or offset + rank among real tokens (XLM-R)."""
        from onnx import TensorProto, helper

        g, enc = self.g, self.encoder
        if enc.position_offset > 0:
            counted = "attention_mask"
        else:
            ones = helper.make_tensor("one", TensorProto.INT64, [1], [1])
            counted = g.op("ConstantOfShape", g.op("Shape", "input_ids", name="positions/shape"),
                           name="positions/ones", value=ones)
        rank = g.op("CumSum", counted, g.const(1, np.int64, scalar=True), name="positions/cumsum")
        if enc.position_offset > 0:  # padded slots: rank 0, so they get padding_idx = offset - 1
            rank = g.op("Mul", rank, "attention_mask", name="positions/real_only")
        return g.op("Add", rank, g.const(enc.position_offset - 1, np.int64), name="positions/ids")

    def embeddings(self) -> str:
        """LN(word (+ absolute position) (+ token type)) [B, T, H]."""
        g, enc = self.g, self.encoder
        x = self.gather_table("embed", "input_ids", "embed")
        if enc.position == "absolute":  # rope (ModernBERT) rotates q and k in each layer instead
            positions = self.gather_table("pos_embed", self.positions(), "pos_embed")
            x = g.op("Add", x, positions, name="embed/add_positions")
        if enc.type_vocab_size > 1:
            types = self.gather_table("type_embed", "token_type_ids", "type_embed")
            x = g.op("Add", x, types, name="embed/add_types")
        elif enc.type_vocab_size == 1:  # one type: every token adds row 0 (no token_type_ids input, as Optimum)
            row = self.gather_table("type_embed", g.const(0, np.int64, scalar=True), "type_embed")
            x = g.op("Add", x, row, name="embed/add_type")
        return self.layer_norm(x, "embed_norm", "embed_norm")

    def pool(self, hidden: str, mask: str) -> str:
        """sentence_embedding [B, H] from last_hidden_state and the int64 mask, per spec.encoder.pooling."""
        from onnx import TensorProto

        g, pooling = self.g, self.encoder.pooling
        mode = pooling.mode
        axis1 = g.const([1], np.int64)
        if mode == "cls":
            out = g.op("Gather", hidden, g.const(0, np.int64, scalar=True), name="pool/cls", axis=1)
        elif mode == "last_token":
            length = g.op("ReduceSum", mask, axis1, name="pool/length", keepdims=1)  # [B, 1]
            last = g.op("Max", g.op("Sub", length, g.const([1], np.int64), name="pool/last"),
                        g.const([0], np.int64), name="pool/last_clamped")
            out = g.op("GatherND", hidden, last, name="pool/last_token", batch_dims=1)
        else:
            mask3 = g.op("Unsqueeze", g.op("Cast", mask, name="pool/mask_f", to=TensorProto.FLOAT),
                         g.const([2], np.int64), name="pool/mask3")  # [B, T, 1]
            if mode == "max":
                real = g.op("Cast", mask3, name="pool/mask_bool", to=TensorProto.BOOL)
                filled = g.op("Where", real, hidden, g.const(MAX_POOL_FILL, np.float32), name="pool/fill")
                out = g.op("ReduceMax", filled, name="pool/max", axes=[1], keepdims=0)
            else:
                summed = g.op("ReduceSum", g.op("Mul", hidden, mask3, name="pool/masked"), axis1, name="pool/sum",
                              keepdims=0)
                count = g.op("Max", g.op("ReduceSum", mask3, axis1, name="pool/count", keepdims=0),
                             g.const(1e-9, np.float32), name="pool/count_clamped")  # [B, 1]
                if mode == "mean_sqrt_len":
                    count = g.op("Sqrt", count, name="pool/sqrt_count")
                elif mode != "mean":
                    raise ConversionError(f"onnx: pooling mode {mode!r} is not supported")
                out = g.op("Div", summed, count, name="pool/mean")
        if pooling.normalize:
            sq = g.op("ReduceSum", g.op("Mul", out, out, name="pool/square"), g.const([-1], np.int64),
                      name="pool/sum_squares", keepdims=1)
            norm = g.op("Max", g.op("Sqrt", sq, name="pool/norm"), g.const(1e-12, np.float32),
                        name="pool/norm_clamped")
            out = g.op("Div", out, norm, name="pool/normalize")
        return g.op("Identity", out, name="pool/out", out=SENTENCE_EMBEDDING)

    def attention(self, x: str, p: str, bias: str, shapes: tuple[str, str], rope: tuple[str, str] | None = None
                  ) -> str:
        """Self-attention of x [B*T, H] under an additive scores bias, after ``o``: [B*T, H]. ``shapes``: the
        [B, T, N, D] shape and the 1/sqrt(D) scale; ``rope``: (cos, sin) [T, 1, D] rotating q and k."""
        g, flat = self.g, self.g.const([-1, self.spec.hidden_size], np.int64)
        heads_shape, scale = shapes
        q, k, v = (g.op("Reshape", self.projection(x, p + n), heads_shape, name=f"{p}attn/{n}_heads")
                   for n in ("q", "k", "v"))  # [B, T, N, D]
        if rope is not None:
            q, k = (self.rope(t, *rope, f"{p}attn/{n}_rope") for t, n in ((q, "q"), (k, "k")))
        q = g.op("Transpose", q, name=f"{p}attn/q_t", perm=[0, 2, 1, 3])  # [B, N, T, D]
        k = g.op("Transpose", k, name=f"{p}attn/k_t", perm=[0, 2, 3, 1])  # [B, N, D, T]
        v = g.op("Transpose", v, name=f"{p}attn/v_t", perm=[0, 2, 1, 3])
        scores = g.op("Mul", g.op("MatMul", q, k, name=f"{p}attn/scores"), scale, name=f"{p}attn/scale")
        scores = g.op("Add", scores, bias, name=f"{p}attn/mask")
        probs = g.op("Softmax", scores, name=f"{p}attn/softmax", axis=-1)
        ctx = g.op("MatMul", probs, v, name=f"{p}attn/context")  # [B, N, T, D]
        ctx = g.op("Transpose", ctx, name=f"{p}attn/context_t", perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", ctx, flat, name=f"{p}attn/context_flat")
        return self.projection(ctx, p + "o")

    def rope_table(self, slots: str, theta: float, name: str) -> tuple[str, str]:
        """cos, sin [T, 1, D] of rotate-half rope at the slot indices ``slots`` [T] (int64) with base theta."""
        from onnx import TensorProto

        g, dim = self.g, self.spec.head_dim
        inv_freq = (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)
        pos = g.op("Unsqueeze", g.op("Cast", slots, name=f"{name}/positions", to=TensorProto.FLOAT),
                   g.const([1], np.int64), name=f"{name}/positions_col")  # [T, 1]
        freqs = g.op("Mul", pos, g.const(inv_freq, np.float32), name=f"{name}/freqs")  # [T, D/2]
        angles = g.op("Unsqueeze", g.op("Concat", freqs, freqs, name=f"{name}/angles", axis=-1),
                      g.const([1], np.int64), name=f"{name}/angles_heads")  # [T, 1, D]: broadcast over heads
        return g.op("Cos", angles, name=f"{name}/cos"), g.op("Sin", angles, name=f"{name}/sin")

    def window_bias(self, slots: str, real: str, window: int) -> str:
        """Additive bias [B, 1, T, T]: float32 minimum on padded keys and on keys more than window slots away."""
        g = self.g
        distance = g.op("Abs", g.op("Sub", g.op("Unsqueeze", slots, g.const([1], np.int64), name="window/query"),
                                    g.op("Unsqueeze", slots, g.const([0], np.int64), name="window/key"),
                                    name="window/offset"), name="window/distance")  # [T, T]
        inside = g.op("LessOrEqual", distance, g.const(window, np.int64, scalar=True), name="window/inside")
        keys = g.op("Unsqueeze", real, g.const([1, 2], np.int64), name="window/real_keys")  # [B, 1, 1, T]
        allowed = g.op("And", inside, keys, name="window/allowed")
        return g.op("Where", allowed, g.const(0.0, np.float32), g.const(float(np.finfo(np.float32).min), np.float32),
                    name="window/bias")

    def pre_ln_layers(self, x: str, real: str, key_bias: str, shapes: tuple[str, str]) -> str:
        """ModernBERT's layers and final norm over x [B*T, H]: x += attn(LN(x)) (no LN on layer 0), then
        x += down(act(up(LN(x))) * gate(LN(x))); global layers see every real key, local ones a window."""
        g, s, enc = self.g, self.spec, self.encoder
        steps = g.op("Squeeze", g.op("Shape", "input_ids", name="rope/steps", start=1, end=2), name="rope/steps_scalar")
        slots = g.op("Range", g.const(0, np.int64, scalar=True), steps, g.const(1, np.int64, scalar=True),
                     name="rope/slots")  # [T]: slot index, whatever the padding (as the reference)
        ropes = {theta: self.rope_table(slots, theta, f"rope/theta{theta:g}")
                 for theta in sorted({enc.rope_local_theta if i in enc.local_layers else enc.rope_theta
                                      for i in range(s.num_layers)})}
        local_bias = key_bias
        if enc.local_layers:
            if enc.local_window is None:
                raise ConversionError(f"onnx: {s.family} has local layers {list(enc.local_layers)} but no window")
            local_bias = self.window_bias(slots, real, enc.local_window)
        for i in range(s.num_layers):
            p = f"layers.{i}."
            local = i in enc.local_layers
            h = x if i == 0 else self.layer_norm(x, p + "attn_norm", f"{p}attn_norm")
            o = self.attention(h, p, local_bias if local else key_bias, shapes,
                               ropes[enc.rope_local_theta if local else enc.rope_theta])
            x = g.op("Add", x, o, name=f"{p}attn/residual")
            h = self.layer_norm(x, p + "mlp_norm", f"{p}mlp_norm")
            act = self.activation(self.projection(h, p + "up"), f"{p}mlp/act")
            inner = act
            if enc.mlp == "geglu":
                inner = g.op("Mul", act, self.projection(h, p + "gate"), name=f"{p}mlp/geglu")
            x = g.op("Add", x, self.projection(inner, p + "down"), name=f"{p}mlp/residual")
        return self.layer_norm(x, "final_norm", "final_norm")

    def _build(self) -> Any:
        from onnx import TensorProto, helper

        s, g = self.spec, self.g
        heads, dim, hidden = s.num_heads, s.head_dim, s.hidden_size
        f32, i64 = TensorProto.FLOAT, TensorProto.INT64
        axes = ["batch_size", "sequence_length"]
        inputs = [helper.make_tensor_value_info(name, i64, axes) for name in encoder_inputs(self.encoder)]
        outputs = [helper.make_tensor_value_info(LAST_HIDDEN_STATE, f32, [*axes, hidden]),
                   helper.make_tensor_value_info(SENTENCE_EMBEDDING, f32, ["batch_size", hidden])]

        batch = g.op("Shape", "input_ids", name="shape/batch", start=0, end=1)
        steps = g.op("Shape", "input_ids", name="shape/steps", start=1, end=2)
        heads_shape = g.op("Concat", batch, steps, g.const([heads, dim], np.int64), name="shape/heads", axis=0)
        hidden_shape = g.op("Concat", batch, steps, g.const([hidden], np.int64), name="shape/hidden", axis=0)
        flat = g.const([-1, hidden], np.int64)
        # Padded keys: float32 minimum added to their scores, [B, 1, 1, T] (broadcast over heads and queries).
        real = g.op("Cast", "attention_mask", name="mask/bool", to=TensorProto.BOOL)
        key_bias = g.op("Where", real, g.const(0.0, np.float32),
                        g.const(float(np.finfo(np.float32).min), np.float32), name="mask/bias")
        key_bias = g.op("Unsqueeze", key_bias, g.const([1, 2], np.int64), name="mask/bias4")
        scale = g.const(1.0 / math.sqrt(dim), np.float32)

        x = g.op("Reshape", self.embeddings(), flat, name="embed/flatten")  # [B*T, H] for the Gemms
        if self.encoder.layout == "pre_ln":
            x = self.pre_ln_layers(x, real, key_bias, (heads_shape, scale))
        else:
            for i in range(s.num_layers):
                p = f"layers.{i}."
                o = self.attention(x, p, key_bias, (heads_shape, scale))
                x = self.layer_norm(g.op("Add", x, o, name=f"{p}attn/residual"), p + "attn_output_norm",
                                    f"{p}attn_output_norm")
                inner = self.activation(self.linear(x, p + "up", p + "up_bias"), f"{p}mlp/act")
                down = self.linear(inner, p + "down", p + "down_bias")
                x = self.layer_norm(g.op("Add", x, down, name=f"{p}mlp/residual"), p + "output_norm",
                                    f"{p}output_norm")

        states = g.op("Reshape", x, hidden_shape, name="output/unflatten", out=LAST_HIDDEN_STATE)
        self.pool(states, "attention_mask")

        graph = helper.make_graph(g.nodes, f"sovpack_{s.family}_encoder", inputs, outputs,
                                  initializer=g.initializers)
        opsets = [helper.make_opsetid("", OPSET)]
        if self.contrib:
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        proto = helper.make_model(graph, opset_imports=opsets, producer_name="sovpack")
        proto.ir_version = helper.find_min_ir_version_for(opsets, ignore_unknown=True)
        return proto
