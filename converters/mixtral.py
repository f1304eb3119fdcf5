"""Mixtral: Mistral's attention with a top-k mixture of experts (router softmax over all experts, the chosen
weights renormalised) in every layer; no shared expert, no router bias."""

from __future__ import annotations

from typing import Any

from sovpack._protocols import TensorSource
from sovpack.converters.base import ConfigReader, DecoderFamily, register_family
from sovpack.converters.moe import expert_count, experts_per_token, moe_tensor_map, sparse_layers
from sovpack.source.spec import ModelSpec, MoESpec


@register_family
class MixtralFamily(DecoderFamily):
    name = "mixtral"
    architectures = ("MixtralForCausalLM",)

    def features(self, cfg: ConfigReader, common: dict[str, Any]) -> dict[str, Any]:
        # NOTE: MixtralConfig has no attention_bias / mlp_bias: its projections never carry biases. Router jitter
        # noise is a training-time perturbation and plays no part in inference.
        experts = expert_count(cfg, 8)
        moe = MoESpec(
            num_experts=experts,
            experts_per_token=experts_per_token(cfg, experts, 2),
            # NOTE: Mixtral's intermediate_size is each expert's width (it has no dense layers)
            expert_intermediate_size=common["intermediate_size"],
            sparse_layers=sparse_layers(cfg, common["num_layers"], step=1, dense_only=()),
            norm_topk_prob=True,  # MixtralTopKRouter always renormalises the top-k probabilities
        )
        return {**super().features(cfg, common), "sliding_window": cfg.optional_positive("sliding_window"), "moe": moe}

    def tensor_map(self, spec: ModelSpec) -> dict[str, TensorSource]:
        # NOTE: the published layout (and what transformers 5 saves): block_sparse_moe, w1 = gate, w3 = up, w2 = down
        return moe_tensor_map(spec, "block_sparse_moe", router="gate", expert={"gate": "w1", "up": "w3", "down": "w2"})
