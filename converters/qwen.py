"""Qwen2 / Qwen2.5 (q/k/v biases) and Qwen3 (per-head q/k RMSNorm, no biases)."""

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


def _qwen_sliding_window(cfg: ConfigReader) -> int | None:
    if not cfg.flag("use_sliding_window", False):
        return None
    layers = cfg.positive("num_hidden_layers")
    if cfg.config.get("max_window_layers", layers) < layers:
        raise cfg.fail("sliding window on only some layers (max_window_layers) is not supported")
    return cfg.optional_int("sliding_window")


@dataclass(frozen=True)
class Qwen2Family:
    name: str = "qwen2"
    architectures: tuple[str, ...] = ("Qwen2ForCausalLM",)

    def build_spec(self, config: Mapping[str, Any], where: str) -> ModelSpec:
        cfg = ConfigReader(config, where)
        return ModelSpec(
            family=self.name,
            activation=cfg.activation("hidden_act", default="silu"),
            qkv_bias=True,
            sliding_window=_qwen_sliding_window(cfg),
            **common_spec_fields(cfg),
        )

    def tensor_map(self, spec: ModelSpec) -> dict[str, TensorSource]:
        return standard_tensor_map(spec)


@dataclass(frozen=True)
class Qwen3Family:
    name: str = "qwen3"
    architectures: tuple[str, ...] = ("Qwen3ForCausalLM",)

    def build_spec(self, config: Mapping[str, Any], where: str) -> ModelSpec:
        cfg = ConfigReader(config, where)
        return ModelSpec(
            family=self.name,
            activation=cfg.activation("hidden_act", default="silu"),
            qkv_bias=cfg.flag("attention_bias", False),
            qk_norm=True,
            sliding_window=_qwen_sliding_window(cfg),
            **common_spec_fields(cfg),
        )

    def tensor_map(self, spec: ModelSpec) -> dict[str, TensorSource]:
        return standard_tensor_map(spec)


FAMILIES.add("qwen2", Qwen2Family())
FAMILIES.add("qwen3", Qwen3Family())
