"""SmolLM3: Llama's layout with NoPE layers (no rotary embedding: ``no_rope_layers`` / ``no_rope_layer_interval``),
optionally a sliding window on exactly those layers, and a tied head by default."""

from __future__ import annotations

from typing import Any

from sovpack._io import shorten
from sovpack.converters.base import (
    MAX_DERIVED_LAYERS,
    ConfigReader,
    DecoderFamily,
    layer_types,
    refuse_attention_bias,
    register_family,
)
from sovpack.source.spec import LayerType


@register_family
class SmolLM3Family(DecoderFamily):
    name = "smollm3"
    architectures = ("SmolLM3ForCausalLM",)
    default_rope_theta = 2_000_000.0  # SmolLM3Config.default_theta

    def features(self, cfg: ConfigReader, common: dict[str, Any]) -> dict[str, Any]:
        if cfg.flag("mlp_bias", False):
            raise cfg.fail("'mlp_bias': true is not supported")
        refuse_attention_bias(cfg)  # SmolLM3's attention_bias also biases o_proj
        layers = common["num_layers"]
        rope = uses_rope(cfg, layers)
        use_window = cfg.flag("use_sliding_window", False)
        window = cfg.optional_positive("sliding_window")

        def derive(layer: int) -> LayerType:
            # SmolLM3Config: with a sliding window on, the NoPE layers are the windowed ones.
            return "sliding" if use_window and window is not None and not rope[layer] else "full"

        types = layer_types(cfg, layers, derive)
        if "sliding" in types and not (use_window and window is not None):
            # NOTE: transformers would mask these layers with a window its flash-attention path does not apply
            raise cfg.fail("'layer_types' has sliding-window layers but 'use_sliding_window' is off or "
                           "'sliding_window' is null")
        windowed = "sliding" in types
        return {
            **super().features(cfg, common),
            "tie_word_embeddings": cfg.flag("tie_word_embeddings", True),
            "no_rope_layers": tuple(i for i in range(layers) if not rope[i]),
            "layer_types": types if windowed else (),
            "sliding_window": window if windowed else None,
        }


def uses_rope(cfg: ConfigReader, layers: int) -> tuple[bool, ...]:
    """Per layer, whether it applies rope: ``no_rope_layers`` (1 = rope, 0 = NoPE; transformers reads the first
    ``layers`` entries), or every ``no_rope_layer_interval``-th layer without rope."""
    raw = cfg.get("no_rope_layers")
    if raw is None:
        interval = cfg.positive("no_rope_layer_interval", 4)
        if layers > MAX_DERIVED_LAYERS:
            raise cfg.fail(f"'num_hidden_layers' ({layers}) is beyond any real model (at most "
                           f"{MAX_DERIVED_LAYERS} layers)")
        return tuple((i + 1) % interval != 0 for i in range(layers))
    if not isinstance(raw, list) or len(raw) < layers or not all(v in (0, 1) and type(v) is int for v in raw):
        raise cfg.fail(
            f"{cfg.name('no_rope_layers')} must be a list of 0/1 flags, at least one per layer ({layers}), "
            f"got {shorten(raw)}"
        )
    return tuple(bool(v) for v in raw[:layers])
