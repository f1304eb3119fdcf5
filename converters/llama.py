"""Llama (2, 3.x) and Mistral: the reference layout the other families vary on."""

from __future__ import annotations

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


@dataclass(frozen=True)
class LlamaFamily:
    name: str = "llama"
    architectures: tuple[str, ...] = ("LlamaForCausalLM",)

    def build_spec(self, config: Mapping[str, Any], where: str) -> ModelSpec:
        cfg = ConfigReader(config, where)
        if cfg.flag("mlp_bias", False):
            raise cfg.fail("'mlp_bias': true is not supported")
        return ModelSpec(
            family=self.name,
            activation=cfg.activation("hidden_act", default="silu"),
            qkv_bias=cfg.flag("attention_bias", False),
            sliding_window=self.sliding_window(cfg),
            **common_spec_fields(cfg),
        )

    def sliding_window(self, cfg: ConfigReader) -> int | None:
        return None

    def tensor_map(self, spec: ModelSpec) -> dict[str, TensorSource]:
        return standard_tensor_map(spec)


@dataclass(frozen=True)
class MistralFamily(LlamaFamily):
    name: str = "mistral"
    architectures: tuple[str, ...] = ("MistralForCausalLM",)

    def sliding_window(self, cfg: ConfigReader) -> int | None:
        return cfg.optional_int("sliding_window")


FAMILIES.add("llama", LlamaFamily())
FAMILIES.add("mistral", MistralFamily())
