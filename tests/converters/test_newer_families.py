"""Gemma 2, Gemma 3 (text and vision-language checkpoints), long-context Phi-3, SmolLM3, OLMo 2 and Granite: both
config dialects map to the same canonical spec, transformers' defaults are kept, and what is not modelled is
refused with a message naming config.json and the key."""

from __future__ import annotations

import math
from typing import Any

import pytest

from sovpack._protocols import TensorSource
from sovpack.converters import family_for_config
from sovpack.converters.base import MAX_DERIVED_LAYERS, stored_layout
from sovpack.errors import SourceError
from sovpack.source.spec import ModelSpec
from tests.converters.configs import assert_config_refused, build_spec

BASE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "max_position_embeddings": 256,
}
LONGROPE = {"short_factor": [1.0] * 8, "long_factor": [2.0] * 8}


def spec_for(arch: str, **extra: Any) -> ModelSpec:
    return build_spec(BASE, arch, **extra)


def refused(arch: str, message: str, **extra: Any) -> None:
    assert_config_refused(BASE, arch, message, **extra)


# ------------------------------------------------------------------------------------------------------ Gemma 2


def test_gemma2_defaults_are_transformers_defaults() -> None:
    spec = spec_for("Gemma2ForCausalLM")
    assert spec.family == "gemma2" and spec.norm_placement == "sandwich" and spec.norm_weight_offset == 1.0
    assert spec.layer_types == ("sliding", "full") * 3 and spec.sliding_window == 4096
    assert spec.head_dim == 256 and spec.attention_scale == 256**-0.5  # Gemma2Config: head_dim 256, scalar 256
    assert (spec.attn_logit_softcap, spec.final_logit_softcap) == (50.0, 30.0)
    assert spec.tie_word_embeddings and spec.activation == "gelu_tanh" and spec.embedding_multiplier == 8.0
    assert [spec.layer_window(i) for i in range(2)] == [4096, None]
    assert [spec.layer_rope(i) for i in range(2)] == ["global", "global"]  # one rope for every layer


def test_gemma2_dialects_agree_and_null_turns_capping_off() -> None:
    keys = {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 24}
    v4 = spec_for("Gemma2ForCausalLM", rope_theta=10000.0, **keys)
    types = ["sliding_attention", "full_attention"] * 3
    v5 = spec_for("Gemma2ForCausalLM", layer_types=types, rope_parameters={"rope_type": "default"}, **keys)
    assert v4 == v5
    off = spec_for("Gemma2ForCausalLM", attn_logit_softcapping=None, final_logit_softcapping=None)
    assert off.attn_logit_softcap is None and off.final_logit_softcap is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"attention_bias": True}, "'attention_bias': true"),
        ({"use_bidirectional_attention": True}, "'use_bidirectional_attention': true"),
        ({"layer_types": ["sliding_attention"] * 5}, "'layer_types' lists 5 layers but 'num_hidden_layers' is 6"),
        ({"layer_types": ["chunked_attention"] * 6}, "layer type 'chunked_attention' is not supported"),
        ({"sliding_window": None}, "'sliding_window' is null but 'layer_types' has sliding-window layers"),
        ({"attn_logit_softcapping": 0}, "'attn_logit_softcapping' must be greater than 0"),
        ({"query_pre_attn_scalar": -1}, "'query_pre_attn_scalar' must be greater than 0"),
        ({"head_dim": 15}, "'head_dim' \\(15\\) must be even"),
        ({"partial_rotary_factor": 0.5}, "partial rotary"),
        ({"rope_parameters": {"full_attention": {}, "sliding_attention": {}}}, "per-layer-type 'rope_parameters'"),
        ({"num_hidden_layers": 2**31 - 1}, f"beyond any real model \\(at most {MAX_DERIVED_LAYERS} layers\\)"),
    ],
)
def test_gemma2_refuses(extra: dict[str, Any], message: str) -> None:
    refused("Gemma2ForCausalLM", message, **extra)


def test_gemma2_tensor_map_has_the_sandwich() -> None:
    spec = spec_for("Gemma2ForCausalLM", num_hidden_layers=1, head_dim=16)
    m = family_for_config({"architectures": ["Gemma2ForCausalLM"]}, "c").tensor_map(spec)
    assert m["layers.0.attn_norm"] == TensorSource(name="model.layers.0.input_layernorm.weight", add=1.0)
    assert m["layers.0.post_attn_norm"].name == "model.layers.0.post_attention_layernorm.weight"
    assert m["layers.0.mlp_norm"].name == "model.layers.0.pre_feedforward_layernorm.weight"
    assert m["layers.0.post_mlp_norm"].name == "model.layers.0.post_feedforward_layernorm.weight"
    assert all(m[f"layers.0.{n}"].add == 1.0 for n in ("post_attn_norm", "mlp_norm", "post_mlp_norm"))
    assert set(m) == set(spec.tensor_shapes())


# ------------------------------------------------------------------------------------------------------ Gemma 3

GEMMA3_V4 = {
    "head_dim": 16, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
    "rope_scaling": {"rope_type": "linear", "factor": 8.0},
    "sliding_window": 8, "sliding_window_pattern": 3, "query_pre_attn_scalar": 16,
}  # fmt: skip
GEMMA3_V5 = {
    "head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16,
    "layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * 2,
    "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
    },
}  # fmt: skip


def test_gemma3_dialects_agree() -> None:
    v4 = spec_for("Gemma3ForCausalLM", **GEMMA3_V4)
    v5 = spec_for("Gemma3ForCausalLM", **GEMMA3_V5)
    assert v4 == v5
    assert v4.family == "gemma3" and v4.qk_norm and v4.qk_norm_scope == "head"
    assert v4.rope_theta == 1e6 and v4.rope_scaling.kind == "linear" and v4.rope_local_theta == 1e4
    assert [v4.layer_rope(i) for i in range(3)] == ["local", "local", "global"]
    assert v4.attn_logit_softcap is None and v4.final_logit_softcap is None


def test_gemma3_defaults() -> None:
    spec = spec_for("Gemma3ForCausalLM")
    assert spec.layer_types == ("sliding",) * 5 + ("full",)  # every sixth layer global
    assert (spec.rope_theta, spec.rope_local_theta) == (1_000_000.0, 10_000.0)
    assert spec_for("Gemma3ForCausalLM", final_logit_softcapping=30.0).final_logit_softcap == 30.0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"attn_logit_softcapping": 50.0}, "transformers' Gemma 3 attention ignores it"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}, "must hold only per-layer-type objects"),
        ({"rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
         "rope scaling on sliding-window layers"),
        ({"rope_parameters": {"full_attention": {"rope_type": "longrope"}}}, "only supported for Phi-3"),
        ({"rope_parameters": {"full_attention": {"partial_rotary_factor": 0.5}}}, "partial rotary"),
        ({"sliding_window_pattern": 0}, "'sliding_window_pattern' must be an integer from 1"),
    ],
)  # fmt: skip
def test_gemma3_refuses(extra: dict[str, Any], message: str) -> None:
    refused("Gemma3ForCausalLM", message, **extra)


def conditional(text: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
            "text_config": {**BASE, "model_type": "gemma3_text", **text}, **top}


def test_gemma3_conditional_generation_reads_text_config() -> None:
    config = conditional(GEMMA3_V5, eos_token_id=[1, 7], torch_dtype="bfloat16")
    spec = family_for_config(config, "config.json").build_spec(config, "config.json")
    text_only = spec_for("Gemma3ForCausalLM", **GEMMA3_V5)
    assert spec.architecture == "Gemma3ForConditionalGeneration" and spec.family == "gemma3"
    assert spec.eos_token_ids == (1, 7) and spec.source_dtype == "bfloat16"  # the model's own, not text_config's
    differs = {"architecture", "eos_token_ids", "source_dtype"}
    assert {k: v for k, v in spec.to_dict().items() if k not in differs} == {
        k: v for k, v in text_only.to_dict().items() if k not in differs
    }
    untied = conditional(GEMMA3_V5, tie_word_embeddings=False)
    untied["text_config"]["tie_word_embeddings"] = True  # Gemma3Config's own value decides
    spec = family_for_config(untied, "c").build_spec(untied, "c")
    assert not spec.tie_word_embeddings
    m = family_for_config(untied, "c").tensor_map(spec)
    assert m["embed"].name == "model.language_model.embed_tokens.weight" and m["lm_head"].name == "lm_head.weight"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"architectures": ["Gemma3ForConditionalGeneration"]}, "missing required key 'text_config'"),
        (conditional({"final_logit_softcapping": 30.0}), "Gemma3ForConditionalGeneration ignores it"),
        (conditional({"hidden_size": "64"}), "'text_config.hidden_size' must be an integer"),
        ({"architectures": ["Gemma3ForConditionalGeneration"], "text_config": [1]}, "'text_config' must be a JSON"),
    ],
)
def test_gemma3_conditional_generation_refuses(config: dict[str, Any], message: str) -> None:
    with pytest.raises(SourceError, match=message):
        family_for_config(config, "config.json").build_spec(config, "config.json")


def test_legacy_vision_language_names_are_resolved() -> None:
    """Checkpoints saved before transformers 4.52 store language_model.model.* and language_model.lm_head."""
    mapped = {"embed": TensorSource(name="model.language_model.embed_tokens.weight"),
              "final_norm": TensorSource(name="model.language_model.norm.weight", add=1.0),
              "lm_head": TensorSource(name="lm_head.weight")}
    legacy = {"language_model.model.embed_tokens.weight": 0, "language_model.model.norm.weight": 0,
              "language_model.lm_head.weight": 0, "vision_tower.vision_model.x": 0}
    resolved = stored_layout(mapped, legacy)
    assert {k: s.name for k, s in resolved.items()} == {
        "embed": "language_model.model.embed_tokens.weight",
        "final_norm": "language_model.model.norm.weight",
        "lm_head": "language_model.lm_head.weight",
    }
    assert resolved["final_norm"].add == 1.0
    current = {"model.language_model.embed_tokens.weight": 0, "model.language_model.norm.weight": 0,
               "lm_head.weight": 0}
    assert stored_layout(mapped, current) is mapped
    mixed = {**current, "language_model.model.norm.weight": 0}
    del mixed["model.language_model.norm.weight"]
    assert stored_layout(mapped, mixed) is mapped  # never half one layout, half the other: validate() reports it


# ------------------------------------------------------------------------------------------ Phi-3 long context


def test_phi3_longrope_dialects_agree() -> None:
    v4 = spec_for("Phi3ForCausalLM", rope_theta=10000.0, original_max_position_embeddings=32,
                  rope_scaling={"type": "longrope", **LONGROPE})
    v5 = spec_for("Phi3ForCausalLM", original_max_position_embeddings=32,
                  rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
                                   "original_max_position_embeddings": 32, **LONGROPE})
    legacy = spec_for("Phi3ForCausalLM", original_max_position_embeddings=32,
                      rope_scaling={"type": "su", **LONGROPE})
    assert v4 == v5 == legacy
    s = v4.rope_scaling
    assert v4.family == "phi3_longrope" and s.kind == "longrope" and s.original_max_position_embeddings == 32
    assert s.short_factor == (1.0,) * 8 and s.long_factor == (2.0,) * 8
    assert s.factor == 256 / 32 and s.attention_factor == math.sqrt(1 + math.log(8) / math.log(32))


def test_phi3_longrope_follows_phi3config() -> None:
    # The top-level original_max_position_embeddings (default 4096) replaces the rope object's value.
    spec = spec_for("Phi3ForCausalLM", max_position_embeddings=131072,
                    rope_parameters={"rope_type": "longrope", "original_max_position_embeddings": 64, **LONGROPE})
    assert spec.rope_scaling.original_max_position_embeddings == 4096 and spec.rope_scaling.factor == 32.0
    given = spec_for("Phi3ForCausalLM", rope_scaling={"type": "longrope", "factor": 2.0, "attention_factor": 1.5,
                                                       **LONGROPE})
    assert (given.rope_scaling.factor, given.rope_scaling.attention_factor) == (2.0, 1.5)
    short_context = spec_for("Phi3ForCausalLM", original_max_position_embeddings=512, rope_scaling=None)
    assert short_context.family == "phi3" and short_context.rope_scaling.kind == "none"


def test_phi4_mini_partial_rotary() -> None:
    v4 = spec_for("Phi3ForCausalLM", partial_rotary_factor=0.75, rope_scaling={"type": "longrope", **{
        k: v[:6] for k, v in LONGROPE.items()}})
    assert v4.family == "phi3_longrope" and v4.rotary_dim == 12 and v4.rotary_size == 12
    v5 = spec_for("Phi3ForCausalLM", rope_parameters={"rope_type": "longrope", "partial_rotary_factor": 0.75,
                                                       **{k: v[:6] for k, v in LONGROPE.items()}})
    assert v4 == v5
    # Partial rotary alone (no longrope) is a long-context family too: short-context targets do not rotate it.
    partial = spec_for("Phi3ForCausalLM", partial_rotary_factor=0.5)
    assert partial.family == "phi3_longrope" and partial.rotary_dim == 8 and partial.rope_scaling.kind == "none"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 7, "long_factor": [1.0] * 8}},
         "'rope_scaling.short_factor' must be a list of 8 numbers"),
        ({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8}}, "missing required key 'rope_scaling.long"),
        ({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 7 + [0], "long_factor": [1.0] * 8}},
         "'rope_scaling.short_factor.7' must be greater than 0"),
        ({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 7 + ["x"], "long_factor": [1.0] * 8}},
         "'rope_scaling.short_factor.7' must be a number"),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "missing required key 'rope_scaling.short_factor'"),
        ({"partial_rotary_factor": 0.0}, "'partial_rotary_factor' must be in \\(0, 1\\]"),
        ({"partial_rotary_factor": 0.6}, "rotates 9 dims; it must be even"),
        ({"original_max_position_embeddings": 1, "rope_scaling": {"type": "longrope", **LONGROPE}},
         "divides by log\\('original_max_position_embeddings'\\)"),
    ],
)  # fmt: skip
def test_phi3_longrope_refuses(extra: dict[str, Any], message: str) -> None:
    refused("Phi3ForCausalLM", message, **extra)


# -------------------------------------------------------------------------------------------- SmolLM3, OLMo 2, Granite


def test_smollm3_nope_layers() -> None:
    spec = spec_for("SmolLM3ForCausalLM", num_hidden_layers=8)
    assert spec.family == "smollm3" and spec.no_rope_layers == (3, 7) and spec.rope_theta == 2_000_000.0
    assert spec.tie_word_embeddings and spec.layer_types == () and spec.sliding_window is None
    assert [spec.layer_rope(i) for i in range(4)] == ["global", "global", "global", "none"]
    listed = spec_for("SmolLM3ForCausalLM", num_hidden_layers=4, no_rope_layers=[1, 0, 1, 1, 0], rope_theta=5e6)
    assert listed.no_rope_layers == (1,) and listed.rope_theta == 5e6  # transformers reads the first 4 entries
    windowed = spec_for("SmolLM3ForCausalLM", num_hidden_layers=4, use_sliding_window=True, sliding_window=16)
    assert windowed.layer_types == ("full", "full", "full", "sliding") and windowed.sliding_window == 16


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"no_rope_layers": [1, 1]}, "'no_rope_layers' must be a list of 0/1 flags, at least one per layer \\(6\\)"),
        ({"no_rope_layers": [1, 2, 1, 1, 1, 1]}, "'no_rope_layers' must be a list of 0/1 flags"),
        ({"no_rope_layers": [True] * 6}, "'no_rope_layers' must be a list of 0/1 flags"),
        ({"no_rope_layer_interval": 0}, "'no_rope_layer_interval' must be an integer from 1"),
        ({"layer_types": ["sliding_attention"] * 6, "sliding_window": 8}, "'use_sliding_window' is off"),
        ({"mlp_bias": True}, "'mlp_bias': true is not supported"),
        ({"attention_bias": True}, "'attention_bias': true"),
    ],
)
def test_smollm3_refuses(extra: dict[str, Any], message: str) -> None:
    refused("SmolLM3ForCausalLM", message, **extra)


def test_olmo2_post_norms_and_projection_qk_norms() -> None:
    spec = spec_for("Olmo2ForCausalLM", num_hidden_layers=1)
    assert spec.family == "olmo2" and spec.norm_placement == "post" and not spec.pre_norms
    assert spec.qk_norm and spec.qk_norm_scope == "projection"
    shapes = spec.tensor_shapes()
    assert "layers.0.attn_norm" not in shapes and "layers.0.mlp_norm" not in shapes
    assert shapes["layers.0.q_norm"] == (spec.q_size,) and shapes["layers.0.k_norm"] == (spec.kv_size,)
    m = family_for_config({"architectures": ["Olmo2ForCausalLM"]}, "c").tensor_map(spec)
    assert m["layers.0.post_attn_norm"].name == "model.layers.0.post_attention_layernorm.weight"
    assert m["layers.0.post_mlp_norm"].name == "model.layers.0.post_feedforward_layernorm.weight"
    assert set(m) == set(shapes)
    refused("Olmo2ForCausalLM", "'attention_bias': true", attention_bias=True)


def test_granite_scalars() -> None:
    spec = spec_for("GraniteForCausalLM", embedding_multiplier=12.0, residual_multiplier=0.22,
                    attention_multiplier=0.015625, logits_scaling=8.0)
    assert (spec.embedding_multiplier, spec.residual_multiplier) == (12.0, 0.22)
    assert (spec.attention_scale, spec.logits_divisor) == (0.015625, 8.0)
    plain = spec_for("GraniteForCausalLM")  # GraniteConfig's defaults: all 1.0, attention_multiplier too
    assert (plain.embedding_multiplier, plain.residual_multiplier, plain.attention_scale, plain.logits_divisor) == (
        1.0, 1.0, 1.0, 1.0)
    refused("GraniteForCausalLM", "'logits_scaling' must be greater than 0", logits_scaling=0)
    refused("GraniteForCausalLM", "'attention_multiplier' must be greater than 0", attention_multiplier=-1.0)
    refused("GraniteForCausalLM", "'residual_multiplier' must be a number", residual_multiplier="0.2")
    refused("GraniteForCausalLM", "'mlp_bias': true is not supported", mlp_bias=True)


def test_new_fields_round_trip() -> None:
    for spec in (
        spec_for("Gemma3ForCausalLM", **GEMMA3_V5),
        spec_for("Phi3ForCausalLM", partial_rotary_factor=0.75,
                 rope_scaling={"type": "longrope", **{k: v[:6] for k, v in LONGROPE.items()}}),
        spec_for("SmolLM3ForCausalLM"),
        spec_for("GraniteForCausalLM", logits_scaling=2.0),
    ):
        assert ModelSpec.from_dict(spec.to_dict()) == spec
