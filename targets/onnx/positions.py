"""What every layer of the decoder graph shares from the positions: attention biases and rotary cos/sin tables.

Both are computed once per forward pass from the graph's inputs and reused by each layer that needs them: one
attention bias per distinct window (a full layer's window is None) and one cos/sin pair per rotary embedding
(``global``, and ``local`` where sliding layers rotate with their own base, Gemma 3).

# NOTE: LongRoPE (Phi-3.5 / Phi-4-mini) is decided in the graph, per sequence and per forward pass, as the
# reference and transformers decide it: a pass whose largest position + 1 exceeds
# original_max_position_embeddings rotates all its queries and keys with the long factors, any other pass with
# the short ones. The graph computes ReduceMax(position_ids) + 1 and selects between the two frequency tables
# with a Where, so a decode step that crosses the switch rotates its new token with the long factors while the
# keys already in the KV cache keep the short rotation they were stored with -- exactly what the reference does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from sovpack.errors import ConversionError
from sovpack.rope import rope_inv_freq
from sovpack.source.spec import ModelSpec

if TYPE_CHECKING:
    from sovpack.targets.onnx.graph import Graph

RopeKind = Literal["global", "local"]


@dataclass(frozen=True, kw_only=True, slots=True)
class RopeNodes:
    """cos/sin of one rotary embedding, [B, T, rotary] unsqueezed for the q [B, KV, G, T, R] and k [B, KV, T, R]
    layouts."""

    cos_q: str
    sin_q: str
    cos_k: str
    sin_k: str


def attention_biases(g: Graph, spec: ModelSpec, total: str, steps: str) -> dict[int | None, str]:
    """Additive attention bias [B, 1, 1, T, S] per distinct layer window (None: full attention).

    Causal on cache indices (query t sits at index past + t), the caller's padding mask, and the layer's
    window. Masked scores get the float32 minimum rather than -inf so fully masked rows (left padding) stay
    finite instead of turning into NaN.
    """
    from onnx import TensorProto

    total_s = g.op("Squeeze", total, name="mask/total_scalar")
    steps_s = g.op("Squeeze", steps, name="mask/steps_scalar")
    past_s = g.op("Sub", total_s, steps_s, name="mask/past_len")
    one_i = g.const(1, np.int64, scalar=True)
    zero_i = g.const(0, np.int64, scalar=True)
    q_idx = g.op("Range", past_s, total_s, one_i, name="mask/query_index")
    k_idx = g.op("Range", zero_i, total_s, one_i, name="mask/key_index")
    dist = g.op("Sub", g.op("Unsqueeze", q_idx, g.const([1], np.int64), name="mask/q_col"),
                g.op("Unsqueeze", k_idx, g.const([0], np.int64), name="mask/k_row"), name="mask/distance")
    causal = g.op("GreaterOrEqual", dist, g.const(0, np.int64, scalar=True), name="mask/causal")
    padding = g.op("Unsqueeze", g.op("Cast", "attention_mask", name="mask/padding_bool", to=TensorProto.BOOL),
                   g.const([1, 2, 3], np.int64), name="mask/padding")
    zero = g.const(0.0, np.float32, scalar=True)
    lowest = g.const(np.finfo(np.float32).min, np.float32, scalar=True)
    biases: dict[int | None, str] = {}
    for layer in range(spec.num_layers):
        window = spec.layer_window(layer)
        if window in biases:
            continue
        tag = "full" if window is None else f"window{window}"
        allowed = causal
        if window is not None:
            inside = g.op("Less", dist, g.const(window, np.int64, scalar=True), name=f"mask/{tag}/inside")
            allowed = g.op("And", allowed, inside, name=f"mask/{tag}/causal_window")
        allowed = g.op("And", allowed, padding, name=f"mask/{tag}/allowed")
        biases[window] = g.op("Where", allowed, zero, lowest, name=f"mask/{tag}/bias")
    return biases


def rope_tables(g: Graph, spec: ModelSpec) -> dict[RopeKind, RopeNodes]:
    """cos/sin per rotary embedding some layer applies, from the caller's ``position_ids``."""
    from onnx import TensorProto

    kinds = {spec.layer_rope(i) for i in range(spec.num_layers)} - {"none"}
    if not kinds:
        return {}
    pos = g.op("Unsqueeze", g.op("Cast", "position_ids", name="rope/positions", to=TensorProto.FLOAT),
               g.const([2], np.int64), name="rope/positions_col")  # [B, T, 1]
    tables: dict[RopeKind, RopeNodes] = {}
    for kind in sorted(kinds):
        rope_kind: RopeKind = "local" if kind == "local" else "global"
        tables[rope_kind] = _rope_table(g, spec, pos, rope_kind)
    return tables


def _rope_table(g: Graph, spec: ModelSpec, pos: str, kind: RopeKind) -> RopeNodes:
    local = kind == "local"
    p = f"rope/{kind}"
    inv_freq, scale = rope_inv_freq(spec, local=local)
    inv = g.const(inv_freq.astype(np.float32), np.float32)  # [R/2], broadcast against [B, T, 1]
    scaling = spec.rope_scaling
    if scaling.kind == "longrope" and not (local and spec.rope_local_theta is not None):
        long_after = scaling.original_max_position_embeddings
        if long_after is None:
            raise ConversionError("onnx: longrope rope scaling needs original_max_position_embeddings")
        long_inv, _ = rope_inv_freq(spec, local=local, long=True)
        seen = g.op("Add", g.op("ReduceMax", "position_ids", name=f"{p}/max_position", axes=[1], keepdims=1),
                    g.const(1, np.int64, scalar=True), name=f"{p}/seen")  # [B, 1]
        use_long = g.op("Unsqueeze", g.op("Greater", seen, g.const(long_after, np.int64, scalar=True),
                                          name=f"{p}/use_long"), g.const([2], np.int64), name=f"{p}/use_long3")
        short_t = g.const(inv_freq.astype(np.float32)[None, None], np.float32)
        long_t = g.const(long_inv.astype(np.float32)[None, None], np.float32)
        inv = g.op("Where", use_long, long_t, short_t, name=f"{p}/inv_freq")  # [B, 1, R/2]
    freqs = g.op("Mul", pos, inv, name=f"{p}/freqs")
    emb = g.op("Concat", freqs, freqs, name=f"{p}/emb", axis=-1)
    cos = g.op("Cos", emb, name=f"{p}/cos")
    sin = g.op("Sin", emb, name=f"{p}/sin")
    if scale != 1.0:
        cos = g.op("Mul", cos, g.const(scale, np.float32), name=f"{p}/cos_scaled")
        sin = g.op("Mul", sin, g.const(scale, np.float32), name=f"{p}/sin_scaled")
    return RopeNodes(
        cos_q=g.op("Unsqueeze", cos, g.const([1, 2], np.int64), name=f"{p}/cos_q"),
        sin_q=g.op("Unsqueeze", sin, g.const([1, 2], np.int64), name=f"{p}/sin_q"),
        cos_k=g.op("Unsqueeze", cos, g.const([1], np.int64), name=f"{p}/cos_k"),
        sin_k=g.op("Unsqueeze", sin, g.const([1], np.int64), name=f"{p}/sin_k"),
    )
