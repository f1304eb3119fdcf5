"""Gemma (1): RMSNorm computes x * (1 + w), GELU-tanh MLP, embeddings scaled by sqrt(hidden), tied head."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sovpack.converters.base import (
    FAMILIES,
    ConfigReader,
    TensorSource,
    common_spec_fields,
    standard_tensor_map,
)

from sovpack.spec import ModelSpec

NORM_OFFSET = 1.0


@dataclass(frozen=True)
class GemmaFamily:
    name: str = "gemma"
    architectures: tuple[str, ...] = ("GemmaForCausalLM",)

    def build_spec(self, config: Mapping[str, Any], where: str) -> ModelSpec:
        cfg = ConfigReader(config, where)
        fields = common_spec_fields(cfg)
        # Gemma ties the head unless told otherwise (its config default is true).
        fields["tie_word_embeddings"] = cfg.flag("tie_word_embeddings", True)
        return ModelSpec(
            family=self.name,
            # NOTE: transformers uses hidden_activation and falls back to gelu_pytorch_tanh when it is unset,
            # whatever the legacy hidden_act says.
            activation=cfg.activation("hidden_activation", default="gelu_pytorch_tanh"),
            qkv_bias=cfg.flag("attention_bias", False),
            norm_weight_offset=NORM_OFFSET,
            embedding_multiplier=math.sqrt(fields["hidden_size"]),
            **fields,
        )

    def tensor_map(self, spec: ModelSpec) -> dict[str, TensorSource]:
        return standard_tensor_map(spec, norm_offset=NORM_OFFSET)


FAMILIES.add("gemma", GemmaFamily())
