"""What a ModernBERT-style encoder adds to the OpenVINO encoder graph (``encoder``): rotary positions, the
two-sided local attention window, the GeGLU MLP and the pre-LN layer with its final norm.

Positions are the rank of a token among its row's real tokens (``cumsum(attention_mask) - 1``), for the rotation
and for the window alike. On right-padded rows (sentence-transformers, the parity runner, TextEmbeddingPipeline's
default) that is the slot index 0..T-1 the reference rotates by; on left-padded rows it still counts from the first
real token, so a text's embedding does not depend on the padding side (as for BERT's learned positions).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from sovpack.targets.openvino.graph import MASK_VALUE

if TYPE_CHECKING:
    from sovpack.targets.openvino.encoder import _EncoderBuilder

__all__ = [
    "ROTARY_BLOCKS", "Rotation", "geglu", "inverse_frequencies", "local_mask", "pre_ln_layer", "rotary", "rotate",
]

# The blocks computing the rotation angles: marked ``precise`` at every precision (see ``rotary``).
ROTARY_BLOCKS = ("rope", "rope.local")

Rotation = tuple[Any, Any]  # cos and signed sin [B, 1, T, head_dim] (see ``rotary``)


def inverse_frequencies(theta: float, dim: int) -> np.ndarray:
    """theta^(-2i/dim) for i < dim/2 in f32, the arithmetic of the reference (encoder_reference._rope)."""
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    return (1.0 / (theta ** exponents)).astype(np.float32)


def rotary(b: _EncoderBuilder, positions: Any, theta: float, block: str) -> Rotation:
    """cos and *signed* sin [B, 1, T, dim] of ``positions`` [B, T] (i64) times the inverse frequencies over both
    head halves; the sin's first half is negated (sin(-a) = -sin(a) exactly), which :func:`rotate` relies on.

    NOTE: computed in the graph (Convert, Multiply, Sin, Cos: a few nodes) instead of a [max_positions, head_dim]
    table per base, which would cost megabytes on an 8192-position model. The angle is the same f32 product the
    reference forms; Sin/Cos differ from numpy's by an ulp or so (measured in tests/targets/test_openvino_encoder.py).
    Its nodes are marked ``precise`` at every precision (the writer: ``mark_precise(xml, ROTARY_BLOCKS)``): in
    bf16 (the defaults on an AMX CPU) the positions themselves round above 256 and the angles become noise.
    """
    ops = b.ops
    inv = inverse_frequencies(theta, b.spec.head_dim)
    with b.scope(block):
        where = ops.unsqueeze(ops.convert(positions, "f32"), b.i64(1, 3))  # [B, 1, T, 1]
        angles = ops.multiply(where, b.const(np.concatenate([inv, inv]).reshape(1, 1, 1, -1)))
        signed = ops.multiply(where, b.const(np.concatenate([-inv, inv]).reshape(1, 1, 1, -1)))
        return ops.cos(angles, name=f"{block}/cos"), ops.sin(signed, name=f"{block}/signed_sin")


def rotate(b: _EncoderBuilder, x: Any, rotation: Rotation, name: str) -> Any:
    """x * cos + rotate_half(x) * sin over the whole head of x [B, heads, T, dim], as x * cos + swap(x) * signed sin
    (rotate_half(x) = [-x2, x1] = [x2, x1] * [-1, 1]).

    NOTE: the sign is in the sin, not a Negative node here: the CPU plugin rewrites Negative into a node without the
    ``precise`` mark, which ran in bf16 at the defaults on an AMX CPU (measured, as ``encoder.softmax1``).
    """
    ops = b.ops
    cos, signed_sin = rotation
    with b.scope(name):
        first, second = ops.split(x, b.const(-1, np.int64), 2).outputs()
        swapped = ops.concat([second, first], axis=-1)
        return ops.add(ops.multiply(x, cos), ops.multiply(swapped, signed_sin), name=f"{name}/output")


def local_mask(b: _EncoderBuilder, positions: Any, real: Any, window: int) -> Any:
    """Additive mask [B, 1, T, T]: 0 where the key is real and at most ``window`` positions from the query."""
    ops = b.ops
    with b.scope("mask.local"):
        rows = ops.unsqueeze(positions, b.i64(1, 3))  # [B, 1, T, 1]
        cols = ops.unsqueeze(positions, b.i64(1, 2))  # [B, 1, 1, T]
        near = ops.less_equal(ops.abs(ops.subtract(rows, cols)), b.const(window, np.int64))
        allowed = ops.logical_and(near, ops.unsqueeze(real, b.i64(1, 2)))
        return ops.select(allowed, b.const(0.0), b.const(MASK_VALUE), name="mask.local/additive")


def geglu(b: _EncoderBuilder, x: Any, p: str) -> Any:
    """down(gelu(up(x)) * gate(x))."""
    ops = b.ops
    with b.scope(p + "mlp"):
        inner = ops.gelu(b.linear(x, p + "up"), approximation_mode="erf", name=p + "mlp/gelu")
        inner = ops.multiply(inner, b.linear(x, p + "gate"), name=p + "mlp/geglu")
    return b.linear(inner, p + "down")


def pre_ln_layer(b: _EncoderBuilder, i: int, x: Any, mask: Any, rotation: Rotation) -> Any:
    """x + attn(norm(x)), then x + mlp(norm(x)); layer 0 has no attention norm (ModernBERT's Identity)."""
    ops = b.ops
    p = f"layers.{i}."
    h = x if i == 0 else b.layer_norm(x, p + "attn_norm")
    q, k, v = (b.linear(h, p + n) for n in ("q", "k", "v"))
    out = b.linear(b.attention(q, k, v, mask, p, rotation), p + "o")
    x = ops.add(x, out, name=p + "attn_residual")
    out = geglu(b, b.layer_norm(x, p + "mlp_norm"), p)
    return ops.add(x, out, name=p + "mlp_residual")
