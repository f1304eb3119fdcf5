"""Phi-3: Llama-like, but q/k/v and gate/up are stored fused (``qkv_proj``, ``gate_up_proj``)."""

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
class Phi3Family:
    name: str = "phi3"
    architectures: tuple[str, ...] = ("Phi3ForCausalLM",)

    def build_spec(self, config: Mapping[str, Any], where: str) -> ModelSpec:
        cfg = ConfigReader(config, where)
        return ModelSpec(
            family=self.name,
            activation=cfg.activation("hidden_act", default="silu"),
            fused_qkv=True,
            fused_gate_up=True,
            sliding_window=cfg.optional_int("sliding_window"),
            **common_spec_fields(cfg),
        )

    def tensor_map(self, spec: ModelSpec) -> dict[str, TensorSource]:
        m = standard_tensor_map(spec)
        q, kv, inter = spec.q_size, spec.kv_size, spec.intermediate_size
        for i in range(spec.num_layers):
            hf = f"model.layers.{i}."
            c = f"layers.{i}."
            qkv = hf + "self_attn.qkv_proj.weight"
            m[c + "q"] = TensorSource(name=qkv, rows=(0, q))
            m[c + "k"] = TensorSource(name=qkv, rows=(q, q + kv))
            m[c + "v"] = TensorSource(name=qkv, rows=(q + kv, q + 2 * kv))
            gate_up = hf + "mlp.gate_up_proj.weight"
            m[c + "gate"] = TensorSource(name=gate_up, rows=(0, inter))
            m[c + "up"] = TensorSource(name=gate_up, rows=(inter, 2 * inter))
        return m


FAMILIES.add("phi3", Phi3Family())
