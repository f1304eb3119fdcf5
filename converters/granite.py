"""Granite 3.x: Llama's layout with four scalars: embeddings times ``embedding_multiplier``, sublayer outputs
times ``residual_multiplier`` before each residual add, ``attention_multiplier`` in place of 1/sqrt(head_dim),
and logits divided by ``logits_scaling``."""

from __future__ import annotations

from typing import Any

from sovpack.converters.base import ConfigReader, DecoderFamily, refuse_attention_bias, register_family


@register_family
class GraniteFamily(DecoderFamily):
    name = "granite"
    architectures = ("GraniteForCausalLM",)

    def features(self, cfg: ConfigReader, common: dict[str, Any]) -> dict[str, Any]:
        if cfg.flag("mlp_bias", False):
            raise cfg.fail("'mlp_bias': true is not supported")
        refuse_attention_bias(cfg)  # Granite's attention_bias also biases o_proj
        # NOTE: GraniteConfig's defaults are 1.0 for all four (attention_multiplier too, not 1/sqrt(head_dim)).
        return {
            **super().features(cfg, common),
            "embedding_multiplier": cfg.number("embedding_multiplier", 1.0),
            "residual_multiplier": cfg.number("residual_multiplier", 1.0),
            "attention_scale": cfg.number("attention_multiplier", 1.0, above=0.0),
            "logits_divisor": cfg.number("logits_scaling", 1.0, above=0.0),
        }
