"""Qwen2 / Qwen2.5 (q/k/v biases) and Qwen3 (per-head q/k RMSNorm, no biases)."""

from __future__ import annotations

from typing import Any

from sovpack.converters.base import ConfigReader, DecoderFamily, refuse_attention_bias, register_family


def _qwen_sliding_window(cfg: ConfigReader) -> int | None:
    if not cfg.flag("use_sliding_window", False):
        return None
    layers = cfg.positive("num_hidden_layers")
    if cfg.integer("max_window_layers", layers) < layers:
        raise cfg.fail("sliding window on only some layers (max_window_layers) is not supported")
    return cfg.optional_positive("sliding_window")


@register_family
class Qwen2Family(DecoderFamily):
    name = "qwen2"
    architectures = ("Qwen2ForCausalLM",)

    def features(self, cfg: ConfigReader, common: dict[str, Any]) -> dict[str, Any]:
        return {**super().features(cfg, common), "qkv_bias": True, "sliding_window": _qwen_sliding_window(cfg)}


@register_family
class Qwen3Family(DecoderFamily):
    name = "qwen3"
    architectures = ("Qwen3ForCausalLM",)

    def features(self, cfg: ConfigReader, common: dict[str, Any]) -> dict[str, Any]:
        refuse_attention_bias(cfg)  # Qwen3's attention_bias also biases o_proj
        return {
            **super().features(cfg, common),
            "qk_norm": True,
            "sliding_window": _qwen_sliding_window(cfg),
        }
