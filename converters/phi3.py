"""Phi-3: Llama-like, but q/k/v and gate/up are stored fused (``qkv_proj``, ``gate_up_proj``)."""

from __future__ import annotations

from typing import Any

from sovpack._protocols import TensorSource
from sovpack.converters.base import ConfigReader, DecoderFamily, register_family, standard_tensor_map
from sovpack.source.spec import ModelSpec


@register_family
class Phi3Family(DecoderFamily):
    name = "phi3"
    architectures = ("Phi3ForCausalLM",)

    def features(self, cfg: ConfigReader, common: dict[str, Any]) -> dict[str, Any]:
        return {
            **super().features(cfg, common),
            "fused_qkv": True,
            "fused_gate_up": True,
            "sliding_window": cfg.optional_int("sliding_window"),
        }

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
