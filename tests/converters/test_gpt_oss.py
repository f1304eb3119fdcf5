"""gpt-oss (GptOssForCausalLM): the spec from gpt-oss-20b's config in both dialects, GptOssConfig's defaults,
the fused/MXFP4 expert tensor map, and refusals that name config.json and the key."""

from __future__ import annotations

from typing import Any

import pytest

from sovpack.converters import family_for_config
from sovpack.source.spec import MoESpec, RopeScaling
from tests.converters.configs import assert_config_refused, build_spec

ARCH = "GptOssForCausalLM"
YARN = {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
        "rope_type": "yarn", "truncate": False}
# gpt-oss-20b's config.json (transformers 4.55 dialect), minus the 24 layers and the vocabulary's size
GPT_OSS_20B: dict[str, Any] = {
    "attention_bias": True, "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 2880, "initial_context_length": 4096, "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 2, "max_position_embeddings": 131072,
    "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 4, "num_key_value_heads": 8,
    "num_local_experts": 32, "pad_token_id": 199999, "rms_norm_eps": 1e-05, "rope_scaling": YARN,
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "vocab_size": 201088,
    "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]},
}
EXPECTED_MOE = MoESpec(
    num_experts=32, experts_per_token=4, expert_intermediate_size=2880, sparse_layers=(0, 1, 2, 3),
    router_softmax="after_topk", router_bias=True, expert_bias=True, swiglu_limit=7.0, swiglu_alpha=1.702,
    swiglu_up_offset=1.0,
)
EXPECTED_ROPE = RopeScaling(kind="yarn", factor=32.0, original_max_position_embeddings=4096, beta_fast=32.0,
                            beta_slow=1.0, truncate=False)


def test_gpt_oss_20b_config() -> None:
    spec = build_spec(GPT_OSS_20B, ARCH)
    assert spec.family == "gpt_oss" and spec.architecture == ARCH
    assert spec.moe == EXPECTED_MOE
    assert spec.rope_theta == 150000.0 and spec.rope_scaling == EXPECTED_ROPE
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.q_size) == (64, 8, 64, 4096)
    assert spec.qkv_bias and spec.o_bias and spec.attention_sinks and not spec.qk_norm
    assert spec.layer_types == ("sliding", "full", "sliding", "full") and spec.sliding_window == 128
    assert spec.norm_eps == 1e-5 and not spec.tie_word_embeddings and spec.pad_token_id == 199999
    shapes = spec.tensor_shapes()
    assert shapes["layers.0.sinks"] == (64,) and shapes["layers.0.o_bias"] == (2880,)
    assert shapes["layers.0.o"] == (2880, 4096) and shapes["layers.3.router_bias"] == (32,)
    assert shapes["layers.1.experts.31.down_bias"] == (2880,) and "layers.0.gate" not in shapes


def test_v5_rope_parameters_is_the_same_spec() -> None:
    v4 = build_spec(GPT_OSS_20B, ARCH)
    v5_config = {k: v for k, v in GPT_OSS_20B.items() if k not in ("rope_scaling", "rope_theta")}
    v5 = build_spec(v5_config, ARCH, rope_parameters={**YARN, "rope_theta": 150000.0})
    assert v5 == v4


def test_gpt_oss_config_class_defaults() -> None:
    """Keys a config may leave out take GptOssConfig's values, not the Llama ones the shared reader assumes."""
    bare = {"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 16,
            "vocab_size": 100}
    spec = build_spec(bare, ARCH)
    assert spec.rope_scaling == EXPECTED_ROPE and spec.rope_theta == 150000.0  # YaRN even with no rope keys
    assert (spec.head_dim, spec.num_kv_heads, spec.sliding_window) == (64, 8, 128)
    assert spec.layer_types == ("sliding", "full", "sliding")  # even layers slide
    assert spec.max_position_embeddings == 131072 and spec.norm_eps == 1e-5
    assert spec.moe is not None and (spec.moe.num_experts, spec.moe.experts_per_token) == (128, 4)
    assert spec.moe.swiglu_limit == 7.0 and spec.moe.swiglu_alpha == 1.702
    full = build_spec(bare, ARCH, sliding_window=None, layer_types=["full_attention"] * 3)
    assert full.sliding_window is None and full.layer_types == ("full",) * 3
    plain = build_spec(bare, ARCH, attention_bias=False, rope_theta=1e4, rope_scaling={"rope_type": "default"})
    assert not plain.qkv_bias and not plain.o_bias and plain.rope_scaling == RopeScaling()


def test_tensor_map_reads_experts_out_of_the_fused_tensors() -> None:
    spec = build_spec(GPT_OSS_20B, ARCH)
    family = family_for_config({**GPT_OSS_20B, "architectures": [ARCH]}, "config.json")
    m = family.tensor_map(spec)
    assert list(m) == list(spec.tensor_shapes())
    assert m["layers.1.sinks"].name == "model.layers.1.self_attn.sinks"
    assert m["layers.1.o_bias"].name == "model.layers.1.self_attn.o_proj.bias"
    assert m["layers.1.router"].name == "model.layers.1.mlp.router.weight"
    assert m["layers.1.router_bias"].name == "model.layers.1.mlp.router.bias"
    up = m["layers.1.experts.5.up"]
    x = "model.layers.1.mlp.experts."
    assert (up.name, up.expert, up.transpose, up.rows, up.row_step) == (x + "gate_up_proj", 5, True, (1, 5760), 2)
    assert up.stored_shape == (32, 2880, 5760)
    assert up.alternative is not None and up.alternative.mxfp4_scales == x + "gate_up_proj_scales"
    assert (up.alternative.name, up.alternative.transpose, up.alternative.stored_shape) == (
        x + "gate_up_proj_blocks", False, (32, 5760, 90, 16))
    down = m["layers.1.experts.5.down"]
    assert (down.name, down.transpose, down.rows, down.stored_shape) == (x + "down_proj", True, None, (32, 2880, 2880))
    assert down.alternative is not None and down.alternative.stored_shape == (32, 2880, 90, 16)
    bias = m["layers.1.experts.5.gate_bias"]
    assert (bias.name, bias.expert, bias.rows, bias.row_step, bias.alternative) == (
        x + "gate_up_proj_bias", 5, (0, 5760), 2, None)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"quantization_config": {"quant_method": "bitsandbytes"}},
         "'quantization_config.quant_method' 'bitsandbytes' is not supported for gpt-oss; supported: mxfp4"),
        ({"quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": "lm_head"}},
         "'quantization_config.modules_to_not_convert' must be a list of strings"),
        ({"quantization_config": ["mxfp4"]}, "'quantization_config' must be a JSON object"),
        ({"num_experts_per_tok": 33}, "'num_experts_per_tok' \\(33\\) is more than the number of experts \\(32\\)"),
        ({"num_local_experts": 0}, "'num_local_experts' must be an integer from 1"),
        ({"swiglu_limit": 0}, "'swiglu_limit' must be greater than 0"),
        ({"swiglu_alpha": "1.7"}, "'swiglu_alpha' must be a number"),
        ({"attention_bias": "yes"}, "'attention_bias' must be true or false"),
        ({"layer_types": ["sliding_attention"] * 3}, "'layer_types' lists 3 layers but 'num_hidden_layers' is 4"),
        ({"layer_types": ["chunked_attention"] * 4}, "layer type 'chunked_attention' is not supported"),
        ({"sliding_window": 0}, "'sliding_window' must be an integer from 1"),
        ({"sliding_window": None}, "'sliding_window' is null but 'layer_types' has sliding_attention layers"),
        ({"num_key_value_heads": 6}, "not a multiple of num_key_value_heads"),
        ({"head_dim": 63}, "'head_dim' \\(63\\) must be even"),
        ({"rope_scaling": {**YARN, "rope_type": "longrope"}}, "rope scaling 'longrope' is only supported for Phi-3"),
        ({"rope_scaling": {**YARN, "mscale": 0.7}}, "yarn rope scaling with 'mscale'"),
        ({"partial_rotary_factor": 0.5}, "partial rotary embeddings"),
    ],
)
def test_gpt_oss_refuses(extra: dict[str, Any], message: str) -> None:
    assert_config_refused(GPT_OSS_20B, ARCH, message, **extra)
