"""Qwen3-MoE: Qwen3's attention (per-head q/k RMSNorm) with a top-k mixture of experts in every
``decoder_sparse_step``-th layer outside ``mlp_only_layers``."""

from __future__ import annotations

from typing import Any

from sovpack._protocols import TensorSource
from sovpack.converters.base import ConfigReader, DecoderFamily, refuse_attention_bias, register_family
from sovpack.converters.moe import expert_count, experts_per_token, moe_tensor_map, sparse_layers
from sovpack.source.spec import ModelSpec, MoESpec


@register_family
class Qwen3MoeFamily(DecoderFamily):
    name = "qwen3_moe"
    architectures = ("Qwen3MoeForCausalLM",)

    def features(self, cfg: ConfigReader, common: dict[str, Any]) -> dict[str, Any]:
        refuse_attention_bias(cfg)  # as in Qwen3, attention_bias also biases o_proj
        # NOTE: Qwen3MoeConfig drops sliding_window unless use_sliding_window, and then windows every layer
        # (it has no max_window_layers rule, unlike Qwen2/Qwen3).
        window = cfg.positive("sliding_window", 4096) if cfg.flag("use_sliding_window", False) else None
        # NOTE: transformers' Qwen3MoeConfig defaults, not the hub's: norm_topk_prob is false unless the config
        # says true (Qwen3-30B-A3B and -235B-A22B do).
        experts = expert_count(cfg, 128, minimum=0)
        moe = None
        if experts > 0:
            layers = sparse_layers(
                cfg, common["num_layers"], step=cfg.positive("decoder_sparse_step", 1),
                dense_only=cfg.integers("mlp_only_layers"),
            )
            if layers:
                moe = MoESpec(
                    num_experts=experts,
                    experts_per_token=experts_per_token(cfg, experts, 8),
                    expert_intermediate_size=cfg.positive("moe_intermediate_size", 768),
                    sparse_layers=layers,
                    norm_topk_prob=cfg.flag("norm_topk_prob", False),
                )
        return {**super().features(cfg, common), "qk_norm": True, "sliding_window": window, "moe": moe}

    def tensor_map(self, spec: ModelSpec) -> dict[str, TensorSource]:
        return moe_tensor_map(
            spec, "mlp", router="gate", expert={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
        )
