"""Llama (2, 3.x) and Mistral: the reference layout the other families vary on."""

from __future__ import annotations

from typing import Any

from sovpack.converters.base import ConfigReader, DecoderFamily, refuse_attention_bias, register_family


@register_family
class LlamaFamily(DecoderFamily):
    name = "llama"
    architectures = ("LlamaForCausalLM",)

    def features(self, cfg: ConfigReader, common: dict[str, Any]) -> dict[str, Any]:
        if cfg.flag("mlp_bias", False):
            raise cfg.fail("'mlp_bias': true is not supported")
        # NOTE: Llama's attention_bias also biases o_proj, which the spec does not model
        refuse_attention_bias(cfg)
        return super().features(cfg, common)


@register_family
class MistralFamily(LlamaFamily):
    name = "mistral"
    architectures = ("MistralForCausalLM",)

    def features(self, cfg: ConfigReader, common: dict[str, Any]) -> dict[str, Any]:
        return {**super().features(cfg, common), "sliding_window": cfg.optional_positive("sliding_window")}
