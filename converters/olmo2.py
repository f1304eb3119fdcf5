"""OLMo 2: Llama's projections with norms after attention and MLP instead of before (no input norms), and q/k
RMSNorms over the whole q and k projections (before splitting into heads)."""

from __future__ import annotations

from typing import Any

from sovpack.converters.base import ConfigReader, DecoderFamily, refuse_attention_bias, register_family


@register_family
class Olmo2Family(DecoderFamily):
    name = "olmo2"
    architectures = ("Olmo2ForCausalLM",)

    def features(self, cfg: ConfigReader, common: dict[str, Any]) -> dict[str, Any]:
        refuse_attention_bias(cfg)  # OLMo 2's attention_bias also biases o_proj
        return {
            **super().features(cfg, common),
            "norm_placement": "post",
            "qk_norm": True,
            "qk_norm_scope": "projection",
        }
