"""Phi-3 / Phi-3.5 / Phi-4-mini: Llama-like, with q/k/v and gate/up stored fused (``qkv_proj``, ``gate_up_proj``).

Long-context checkpoints (longrope: short and long rope factors) and partial rotary embeddings
(``partial_rotary_factor`` < 1, Phi-4-mini) get the spec family ``phi3_longrope``: the same layout with rope
fields a short-context target does not honour, so targets that only write ``phi3`` refuse them by name.
"""

from __future__ import annotations

import math
from typing import Any

from sovpack._protocols import TensorSource
from sovpack.converters.base import ConfigReader, DecoderFamily, register_family, standard_tensor_map
from sovpack.source.spec import ModelSpec, RopeScaling

# Phi3Config's defaults when a config omits them.
DEFAULT_ROPE_THETA = 10000.0
DEFAULT_ORIGINAL_MAX_POSITIONS = 4096


@register_family
class Phi3Family(DecoderFamily):
    name = "phi3"
    architectures = ("Phi3ForCausalLM",)

    def rope_fields(self, cfg: ConfigReader, common: dict[str, Any]) -> dict[str, Any]:
        return phi3_rope(cfg, common["head_dim"], common["max_position_embeddings"])

    def features(self, cfg: ConfigReader, common: dict[str, Any]) -> dict[str, Any]:
        long_context = common["rope_scaling"].kind == "longrope" or common["rotary_dim"] is not None
        return {
            **super().features(cfg, common),
            "family": Phi3LongropeFamily.name if long_context else self.name,
            "fused_qkv": True,
            "fused_gate_up": True,
            "sliding_window": cfg.optional_positive("sliding_window"),
        }

    def tensor_map(self, spec: ModelSpec) -> dict[str, TensorSource]:
        m = standard_tensor_map(spec)
        q, kv, inter = spec.q_size, spec.kv_size, spec.intermediate_size
        for i in range(spec.num_layers):
            hf = f"model.layers.{i}."
            c = f"layers.{i}."
            qkv = hf + "self_attn.qkv_proj.weight"
            m[c + "q"] = TensorSource(name=qkv, rows=(0, q))
            m[c + "k"] = TensorSource(name=qkv, rows=(q, q + kv))
            m[c + "v"] = TensorSource(name=qkv, rows=(q + kv, q + 2 * kv))
            gate_up = hf + "mlp.gate_up_proj.weight"
            m[c + "gate"] = TensorSource(name=gate_up, rows=(0, inter))
            m[c + "up"] = TensorSource(name=gate_up, rows=(inter, 2 * inter))
        return m


@register_family
class Phi3LongropeFamily(Phi3Family):
    """The spec family of long-context / partial-rotary Phi-3 checkpoints (Phi3Family builds both)."""

    name = "phi3_longrope"


def phi3_rope(cfg: ConfigReader, head_dim: int, max_positions: int) -> dict[str, Any]:
    """rope_theta, rope_scaling and rotary_dim as transformers 5's Phi3Config reads them.

    NOTE: precedence follows Phi3Config.convert_rope_params_to_dict: a transformers-4 ``rope_scaling`` object
    wins over ``rope_parameters``; ``partial_rotary_factor`` inside it wins over the top-level key; the rope types
    "su" and "yarn" are legacy names of longrope; the top-level ``original_max_position_embeddings`` (default
    4096) replaces any value inside the rope object (standardize_rope_params).
    """
    scaling_raw = cfg.get("rope_scaling")
    if scaling_raw:
        sub: ConfigReader | None = cfg.child("rope_scaling", scaling_raw)
        theta = cfg.number("rope_theta", DEFAULT_ROPE_THETA, above=0.0)
    elif cfg.get("rope_parameters") is not None:
        sub = cfg.child("rope_parameters", cfg.get("rope_parameters"))
        theta = sub.number("rope_theta", cfg.number("rope_theta", DEFAULT_ROPE_THETA), above=0.0)
    else:
        sub = None
        theta = cfg.number("rope_theta", DEFAULT_ROPE_THETA, above=0.0)
    top_partial = cfg.number("partial_rotary_factor", 1.0)
    partial = top_partial if sub is None else sub.number("partial_rotary_factor", top_partial)
    if not 0.0 < partial <= 1.0:
        raise cfg.fail(f"'partial_rotary_factor' must be in (0, 1], got {partial:g}")
    rotary = int(head_dim * partial)
    if rotary < 2 or rotary % 2:
        raise cfg.fail(
            f"'partial_rotary_factor' {partial:g} of head_dim {head_dim} rotates {rotary} dims; "
            "it must be even and at least 2"
        )
    fields: dict[str, Any] = {"rope_theta": theta, "rotary_dim": None if rotary == head_dim else rotary}
    if sub is None or sub.rope_type() == "default":
        return {**fields, "rope_scaling": RopeScaling()}
    if sub.rope_type() not in ("longrope", "su", "yarn"):
        raise cfg.fail(
            f"rope type {sub.rope_type()!r} is not supported for Phi-3 (transformers accepts default and longrope)"
        )
    return {**fields, "rope_scaling": _longrope(cfg, sub, rotary, max_positions)}


def _longrope(cfg: ConfigReader, sub: ConfigReader, rotary: int, max_positions: int) -> RopeScaling:
    """LongRoPE as transformers' _compute_longrope_parameters resolves it: the factors, where the long ones start,
    the extension factor and the attention (cos/sin) factor."""
    original = cfg.positive("original_max_position_embeddings", DEFAULT_ORIGINAL_MAX_POSITIONS, integral_float=True)
    short = sub.numbers("short_factor", rotary // 2, above=0.0)
    long = sub.numbers("long_factor", rotary // 2, above=0.0)
    factor = sub.number("factor", above=0.0) if sub.get("factor") is not None else max_positions / original
    if sub.get("attention_factor") is not None:
        attention = sub.number("attention_factor", above=0.0)
    elif factor <= 1.0:
        attention = 1.0
    elif original < 2:
        raise cfg.fail("longrope's default attention factor divides by log('original_max_position_embeddings'): "
                       f"it must be at least 2, got {original}")
    else:
        attention = math.sqrt(1 + math.log(factor) / math.log(original))
    return RopeScaling(
        kind="longrope",
        factor=factor,
        original_max_position_embeddings=original,
        attention_factor=attention,
        short_factor=short,
        long_factor=long,
    )
