"""Gemma 2: Gemma 1's norms (x * (1 + w)), GELU-tanh and scaled embeddings, plus sandwich norms (pre and post
attention/MLP), sliding-window and global layers alternating (``layer_types``), ``query_pre_attn_scalar`` in place
of head_dim in the attention scale, and tanh soft-capping of attention scores and final logits."""

from __future__ import annotations

import math
from typing import Any

from sovpack._protocols import TensorSource
from sovpack.converters.base import (
    ConfigReader,
    DecoderFamily,
    layer_types,
    refuse_attention_bias,
    register_family,
    standard_tensor_map,
)
from sovpack.source.spec import LayerType, ModelSpec

NORM_OFFSET = 1.0
# Gemma2Config / Gemma3TextConfig defaults for keys a config may omit.
DEFAULT_HEAD_DIM = 256
DEFAULT_QUERY_PRE_ATTN_SCALAR = 256.0
DEFAULT_SLIDING_WINDOW = 4096


def capping(cfg: ConfigReader, key: str, class_default: float | None) -> float | None:
    """A soft-capping value: the config class's default when the key is absent, none when it is null.

    NOTE: an exception to "null counts as absent": transformers keeps an explicit null, which turns capping off
    (Gemma 2 configs saved without capping for attention kernels that lack it).
    """
    if key not in cfg.config:
        return class_default
    return None if cfg.config[key] is None else cfg.number(key, above=0.0)


def gemma_sandwich_features(
    cfg: ConfigReader, common: dict[str, Any], *, pattern: int, attn_softcap: float | None,
    final_softcap: float | None,
) -> dict[str, Any]:
    """What Gemma 2 and Gemma 3 share: Gemma norms as a sandwich, window pattern, query_pre_attn_scalar."""
    refuse_attention_bias(cfg)  # Gemma's attention_bias also biases o_proj
    if cfg.flag("use_bidirectional_attention", False):
        raise cfg.fail("'use_bidirectional_attention': true (an encoder, not a causal decoder) is not supported")
    head_dim = cfg.positive("head_dim", DEFAULT_HEAD_DIM)
    if head_dim % 2:
        raise cfg.fail(f"'head_dim' ({head_dim}) must be even for rotary embeddings")

    def derive(layer: int) -> LayerType:
        return "sliding" if (layer + 1) % pattern else "full"

    types = layer_types(cfg, common["num_layers"], derive)
    null_window = "sliding_window" in cfg.config and cfg.config["sliding_window"] is None
    window = None if null_window else cfg.positive("sliding_window", DEFAULT_SLIDING_WINDOW)
    if window is None and "sliding" in types:
        raise cfg.fail("'sliding_window' is null but 'layer_types' has sliding-window layers")
    scalar = cfg.number("query_pre_attn_scalar", DEFAULT_QUERY_PRE_ATTN_SCALAR, above=0.0)
    return {
        # NOTE: transformers uses hidden_activation only (default gelu_pytorch_tanh), whatever hidden_act says.
        "activation": cfg.activation("hidden_activation", default="gelu_pytorch_tanh"),
        "head_dim": head_dim,
        "norm_weight_offset": NORM_OFFSET,
        "norm_placement": "sandwich",
        "embedding_multiplier": math.sqrt(common["hidden_size"]),
        "tie_word_embeddings": cfg.flag("tie_word_embeddings", True),
        "layer_types": types,
        "sliding_window": window,
        "attention_scale": scalar**-0.5,
        "attn_logit_softcap": attn_softcap,
        "final_logit_softcap": final_softcap,
    }


@register_family
class Gemma2Family(DecoderFamily):
    name = "gemma2"
    architectures = ("Gemma2ForCausalLM",)

    def features(self, cfg: ConfigReader, common: dict[str, Any]) -> dict[str, Any]:
        return gemma_sandwich_features(
            cfg,
            common,
            pattern=2,  # Gemma2Config: layers alternate sliding, full, sliding, ...
            attn_softcap=capping(cfg, "attn_logit_softcapping", 50.0),
            final_softcap=capping(cfg, "final_logit_softcapping", 30.0),
        )

    def tensor_map(self, spec: ModelSpec) -> dict[str, TensorSource]:
        return standard_tensor_map(spec, norm_offset=NORM_OFFSET)
