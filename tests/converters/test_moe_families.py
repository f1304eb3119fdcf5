"""Mixture-of-experts families (Qwen3-MoE, Mixtral): the MoE block in the canonical spec, both config dialects,
transformers' defaults, one canonical tensor per expert, and refusals that name config.json and the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fixtures.generate import make_checkpoint
from sovpack.converters import family_for_config
from sovpack.source.model import open_model
from sovpack.source.spec import ModelSpec, MoESpec
from tests.converters.configs import assert_config_refused, build_spec

BASE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "max_position_embeddings": 256,
}
QWEN3_MOE = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32}


def spec_for(arch: str, **extra: Any) -> ModelSpec:
    return build_spec(BASE, arch, **extra)


def refused(arch: str, message: str, **extra: Any) -> None:
    assert_config_refused(BASE, arch, message, **extra)


def test_dense_specs_have_no_moe() -> None:
    spec = spec_for("LlamaForCausalLM")
    assert spec.moe is None and not spec.is_sparse(0)
    assert spec.to_dict()["moe"] is None
    assert not any("expert" in name or "router" in name for name in spec.tensor_shapes())


def test_qwen3_moe_defaults_are_transformers_defaults() -> None:
    spec = spec_for("Qwen3MoeForCausalLM", **QWEN3_MOE)
    assert spec.family == "qwen3_moe" and spec.qk_norm and spec.sliding_window is None
    assert spec.moe == MoESpec(
        num_experts=8, experts_per_token=2, expert_intermediate_size=32, sparse_layers=(0, 1, 2, 3),
        router_softmax="before_topk", norm_topk_prob=False, router_bias=False,
    )
    default = spec_for("Qwen3MoeForCausalLM")  # Qwen3MoeConfig: 128 experts, 8 per token, width 768
    assert default.moe is not None
    assert (default.moe.num_experts, default.moe.experts_per_token, default.moe.expert_intermediate_size) == (
        128, 8, 768)


def test_qwen3_moe_sparse_layers_and_dialects() -> None:
    spec = spec_for("Qwen3MoeForCausalLM", **QWEN3_MOE, decoder_sparse_step=2, mlp_only_layers=[3],
                    norm_topk_prob=True, rope_theta=1e6)
    assert spec.moe is not None and spec.moe.sparse_layers == (1,) and spec.moe.norm_topk_prob
    v5 = spec_for("Qwen3MoeForCausalLM", **QWEN3_MOE, decoder_sparse_step=2, mlp_only_layers=[3],
                  norm_topk_prob=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    assert v5 == spec
    shapes = spec.tensor_shapes()
    assert shapes["layers.0.gate"] == (128, 64) and "layers.0.router" not in shapes
    assert "layers.1.gate" not in shapes and shapes["layers.1.router"] == (8, 64)
    assert shapes["layers.1.experts.7.down"] == (64, 32) and "layers.1.experts.8.gate" not in shapes
    dense = spec_for("Qwen3MoeForCausalLM", **{**QWEN3_MOE, "num_experts": 0})
    assert dense.moe is None  # Qwen3MoeDecoderLayer: no experts, every layer dense
    windowed = spec_for("Qwen3MoeForCausalLM", **QWEN3_MOE, use_sliding_window=True, sliding_window=16)
    assert windowed.sliding_window == 16
    assert spec_for("Qwen3MoeForCausalLM", **QWEN3_MOE, sliding_window=16).sliding_window is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"num_experts_per_tok": 9}, "'num_experts_per_tok' \\(9\\) is more than the number of experts \\(8\\)"),
        ({"num_experts_per_tok": 0}, "'num_experts_per_tok' must be an integer from 1"),
        ({"mlp_only_layers": [4]}, "'mlp_only_layers' names layer 4 but 'num_hidden_layers' is 4"),
        ({"mlp_only_layers": "1"}, "'mlp_only_layers' must be a list of integers"),
        ({"mlp_only_layers": [-1]}, "'mlp_only_layers.0' must be an integer from 0"),
        ({"decoder_sparse_step": 0}, "'decoder_sparse_step' must be an integer from 1"),
        ({"norm_topk_prob": "yes"}, "'norm_topk_prob' must be true or false"),
        ({"attention_bias": True}, "'attention_bias': true"),
        ({"num_hidden_layers": 2**30}, "beyond any real model"),
    ],
)
def test_qwen3_moe_refuses(extra: dict[str, Any], message: str) -> None:
    refused("Qwen3MoeForCausalLM", message, **{**QWEN3_MOE, **extra})


def test_mixtral_spec_and_tensor_map() -> None:
    spec = spec_for("MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2, sliding_window=32)
    assert spec.family == "mixtral" and spec.sliding_window == 32 and not spec.qk_norm
    assert spec.moe == MoESpec(num_experts=4, experts_per_token=2, expert_intermediate_size=128,
                               sparse_layers=(0, 1, 2, 3), norm_topk_prob=True)
    assert spec_for("MixtralForCausalLM").moe == MoESpec(  # MixtralConfig: 8 experts, 2 per token
        num_experts=8, experts_per_token=2, expert_intermediate_size=128, sparse_layers=(0, 1, 2, 3))
    family = family_for_config({**BASE, "architectures": ["MixtralForCausalLM"]}, "config.json")
    tensor_map = family.tensor_map(spec)
    assert set(tensor_map) == set(spec.tensor_shapes())
    assert tensor_map["layers.2.router"].name == "model.layers.2.block_sparse_moe.gate.weight"
    assert tensor_map["layers.2.experts.3.gate"].name == "model.layers.2.block_sparse_moe.experts.3.w1.weight"
    assert tensor_map["layers.2.experts.3.up"].name == "model.layers.2.block_sparse_moe.experts.3.w3.weight"
    assert tensor_map["layers.2.experts.3.down"].name == "model.layers.2.block_sparse_moe.experts.3.w2.weight"
    refused("MixtralForCausalLM", "'num_experts_per_tok' \\(3\\) is more than", num_local_experts=2,
            num_experts_per_tok=3)
    refused("MixtralForCausalLM", "'num_local_experts' must be an integer from 1", num_local_experts=0)


def test_moe_specs_round_trip() -> None:
    for spec in (
        spec_for("Qwen3MoeForCausalLM", **QWEN3_MOE, mlp_only_layers=[0]),
        spec_for("MixtralForCausalLM"),
    ):
        assert ModelSpec.from_dict(spec.to_dict()) == spec
    shared = MoESpec(num_experts=2, experts_per_token=1, expert_intermediate_size=8, sparse_layers=(0,),
                     router_bias=True, shared_expert_intermediate_size=16, shared_expert_gate=True)
    assert MoESpec.from_dict(shared.to_dict()) == shared


def test_canonical_order_streams_experts_one_tensor_at_a_time(tmp_path: Path) -> None:
    model = open_model(make_checkpoint("qwen3moe-mixed", tmp_path / "q"))
    names = model.tensor_names()
    assert names == list(model.spec.tensor_shapes())  # the writers' order is the spec's
    assert names.index("layers.0.router") < names.index("layers.0.experts.0.gate") < names.index("layers.1.gate")
    assert all(model.tensor(n).shape == model.spec.tensor_shapes()[n] for n in names if ".experts.0." in n)


def test_expert_count_under_either_name() -> None:
    """transformers aliases num_experts and num_local_experts and saves Qwen3-MoE's as num_local_experts."""
    saved_by_v5 = {k: v for k, v in QWEN3_MOE.items() if k != "num_experts"} | {"num_local_experts": 8}
    assert spec_for("Qwen3MoeForCausalLM", **saved_by_v5) == spec_for("Qwen3MoeForCausalLM", **QWEN3_MOE)
    assert spec_for("MixtralForCausalLM", num_experts=4).moe == spec_for("MixtralForCausalLM", num_local_experts=4).moe
    refused("Qwen3MoeForCausalLM", "'num_local_experts' \\(4\\) and 'num_experts' \\(8\\) disagree",
            **QWEN3_MOE, num_local_experts=4)
