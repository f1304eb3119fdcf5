"""Gemma (1): RMSNorm computes x * (1 + w), GELU-tanh MLP, embeddings scaled by sqrt(hidden), tied head."""

from __future__ import annotations

import math
from typing import Any

from sovpack._protocols import TensorSource
from sovpack.converters.base import (
    ConfigReader,
    DecoderFamily,
    refuse_attention_bias,
    register_family,
    standard_tensor_map,
)
from sovpack.source.spec import ModelSpec

NORM_OFFSET = 1.0


@register_family
class GemmaFamily(DecoderFamily):
    name = "gemma"
    architectures = ("GemmaForCausalLM",)

    def features(self, cfg: ConfigReader, common: dict[str, Any]) -> dict[str, Any]:
        refuse_attention_bias(cfg)  # Gemma's attention_bias also biases o_proj
        return {
            # NOTE: transformers uses hidden_activation and falls back to gelu_pytorch_tanh when it is unset,
            # whatever the legacy hidden_act says.
            "activation": cfg.activation("hidden_activation", default="gelu_pytorch_tanh"),
            "norm_weight_offset": NORM_OFFSET,
            "embedding_multiplier": math.sqrt(common["hidden_size"]),
            # Gemma ties the head unless told otherwise (its config default is true).
            "tie_word_embeddings": cfg.flag("tie_word_embeddings", True),
        }

    def tensor_map(self, spec: ModelSpec) -> dict[str, TensorSource]:
        return standard_tensor_map(spec, norm_offset=NORM_OFFSET)
