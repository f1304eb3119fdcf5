"""Model families: HF configs in both dialects map to the canonical spec; unsupported features are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sovpack._plugins import Plugins
from sovpack.converters import FAMILIES, family_for_config
from sovpack.errors import SourceError, UsageError
from sovpack.source.model import open_model

BASE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "max_position_embeddings": 256,
}


def spec_for(arch: str, **extra: object):  # type: ignore[no-untyped-def]
    config = {**BASE, "architectures": [arch], **extra}
    return family_for_config(config, "config.json").build_spec(config, "config.json")


def test_every_required_family_is_registered() -> None:
    # NOTE: a subset, so families added elsewhere (encoders) do not have to edit this list at the same time
    assert {
        "gemma", "gemma2", "gemma3", "gpt_oss", "granite", "llama", "mistral", "mixtral", "olmo2", "phi3",
        "phi3_longrope", "qwen2", "qwen3", "qwen3_moe", "smollm3",
    } <= set(FAMILIES.names())  # fmt: skip
    assert FAMILIES.names() == sorted(FAMILIES.names())


def test_registry_refuses_duplicates_and_lists_known_names() -> None:
    registry: Plugins[int] = Plugins("thing")
    registry.add("a", 1, "alias")
    with pytest.raises(ValueError, match="registered twice"):
        registry.add("alias", 2)
    assert registry.get("alias") == 1
    with pytest.raises(UsageError, match="unknown thing 'b'; known: a"):
        registry.get("b")


def test_v4_and_v5_rope_dialects_agree() -> None:
    llama3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    v4 = spec_for("LlamaForCausalLM", rope_theta=500000.0, rope_scaling={"rope_type": "llama3", **llama3})
    v5 = spec_for("LlamaForCausalLM", rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **llama3})
    legacy = spec_for("LlamaForCausalLM", rope_theta=500000.0, rope_scaling={"type": "llama3", **llama3})
    assert v4 == v5 == legacy
    assert v4.rope_theta == 500000.0 and v4.rope_scaling.kind == "llama3" and v4.rope_scaling.factor == 8.0


def test_default_rope_in_v5_dialect() -> None:
    spec = spec_for("MistralForCausalLM", rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    assert spec.rope_theta == 1e6 and spec.rope_scaling.kind == "none"


@pytest.mark.parametrize(
    ("arch", "scaling", "message"),
    [
        ("LlamaForCausalLM", {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]},
         "rope scaling 'longrope' is only supported for Phi-3 (Phi3ForCausalLM) checkpoints"),
        ("MistralForCausalLM", {"type": "su"}, "rope scaling 'su' is only supported for Phi-3"),
        ("LlamaForCausalLM", {"rope_type": "dynamic", "factor": 2.0}, "rope scaling 'dynamic' is not supported"),
        ("Phi3ForCausalLM", {"rope_type": "dynamic", "factor": 2.0}, "rope type 'dynamic' is not supported for Phi-3"),
        ("Phi3ForCausalLM", {"rope_type": "linear", "factor": 2.0}, "rope type 'linear' is not supported for Phi-3"),
    ],
)  # fmt: skip
def test_unsupported_rope_is_refused(arch: str, scaling: dict, message: str) -> None:
    with pytest.raises(SourceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        spec_for(arch, rope_scaling=scaling)


def test_family_features() -> None:
    assert spec_for("Qwen2ForCausalLM").qkv_bias
    qwen3 = spec_for("Qwen3ForCausalLM", head_dim=32)
    assert qwen3.qk_norm and qwen3.head_dim == 32 and not qwen3.qkv_bias
    phi3 = spec_for("Phi3ForCausalLM")
    assert phi3.fused_qkv and phi3.fused_gate_up
    gemma = spec_for("GemmaForCausalLM", head_dim=32, hidden_act="gelu")
    assert gemma.activation == "gelu_tanh"  # transformers ignores the legacy hidden_act for Gemma
    assert gemma.norm_weight_offset == 1.0 and gemma.embedding_multiplier == 8.0 and gemma.tie_word_embeddings
    assert spec_for("MistralForCausalLM", sliding_window=4096).sliding_window == 4096
    assert spec_for("Qwen2ForCausalLM", sliding_window=4096, use_sliding_window=False).sliding_window is None


def test_bad_config_values_name_the_key() -> None:
    cfg = {**BASE, "architectures": ["LlamaForCausalLM"]}
    del cfg["hidden_size"]
    with pytest.raises(SourceError, match=r"config\.json: missing required key 'hidden_size'"):
        family_for_config(cfg, "config.json").build_spec(cfg, "config.json")
    with pytest.raises(SourceError, match="not a multiple of num_key_value_heads"):
        spec_for("LlamaForCausalLM", num_key_value_heads=3)
    with pytest.raises(SourceError, match="partial rotary"):
        spec_for("LlamaForCausalLM", partial_rotary_factor=0.5)
    with pytest.raises(SourceError, match=r"partial rotary embeddings \('rope_parameters.partial_rotary_factor'"):
        spec_for("Qwen3ForCausalLM", rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.5})


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "GemmaForCausalLM", "Qwen3ForCausalLM"])
def test_attention_bias_with_an_o_bias_is_refused(arch: str) -> None:
    """These families' attention_bias also biases o_proj, which the spec does not model: refused, not dropped."""
    with pytest.raises(SourceError, match="'attention_bias': true"):
        spec_for(arch, attention_bias=True)
    assert not spec_for(arch, attention_bias=False).qkv_bias


def test_fixture_specs(checkpoints: dict[str, Path]) -> None:
    for name, path in checkpoints.items():
        model = open_model(path)
        config = json.loads((path / "config.json").read_text())
        assert model.spec.vocab_size == config.get("text_config", config)["vocab_size"], name
        assert set(model.tensor_names()) == set(model.spec.tensor_shapes()), name
        for tensor in model.tensor_names():
            assert model.tensor(tensor).shape == model.spec.tensor_shapes()[tensor], (name, tensor)
