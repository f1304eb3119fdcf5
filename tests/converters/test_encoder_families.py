"""BERT, XLM-RoBERTa and ModernBERT configs -> the canonical encoder spec, and the configs they refuse by name."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sovpack._schemas import validate
from sovpack.converters.bert import BertFamily, XlmRobertaFamily
from sovpack.converters.modernbert import ModernBertFamily
from sovpack.errors import SourceError
from sovpack.source.spec import ModelSpec

MINILM_CONFIG: dict[str, Any] = {  # all-MiniLM-L6-v2's config.json, as published
    "architectures": ["BertModel"], "hidden_act": "gelu", "hidden_size": 384, "intermediate_size": 1536,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
    "num_hidden_layers": 6, "pad_token_id": 0, "position_embedding_type": "absolute", "type_vocab_size": 2,
    "vocab_size": 30522,
}
XLMR_CONFIG: dict[str, Any] = {  # shaped like multilingual-e5-small's XLMRobertaModel config
    "architectures": ["XLMRobertaModel"], "hidden_act": "gelu", "hidden_size": 384, "intermediate_size": 1536,
    "layer_norm_eps": 1e-5, "max_position_embeddings": 514, "model_type": "xlm-roberta", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 1, "type_vocab_size": 1, "vocab_size": 250037,
}


def test_minilm_config_gives_the_encoder_spec() -> None:
    spec = BertFamily().build_spec(MINILM_CONFIG, "config.json")
    assert spec.encoder is not None
    assert (spec.family, spec.head_dim, spec.num_kv_heads, spec.activation, spec.norm_eps) == (
        "bert", 32, 12, "gelu", 1e-12)
    assert (spec.encoder.type_vocab_size, spec.encoder.position_offset) == (2, 0)
    shapes = spec.tensor_shapes()
    assert shapes["pos_embed"] == (512, 384) and shapes["type_embed"] == (2, 384)
    assert shapes["layers.5.up"] == (1536, 384) and shapes["layers.5.output_norm_bias"] == (384,)
    assert "lm_head" not in shapes and "final_norm" not in shapes
    assert ModelSpec.from_dict(spec.to_dict()) == spec


def test_xlmr_positions_start_after_the_padding_id() -> None:
    spec = XlmRobertaFamily().build_spec(XLMR_CONFIG, "config.json")
    assert spec.encoder is not None and spec.encoder.position_offset == 2
    assert spec.encoder.type_vocab_size == 1


def test_tensor_map_names_the_bare_model_tensors() -> None:
    family = BertFamily()
    m = family.tensor_map(family.build_spec(MINILM_CONFIG, "config.json"))
    assert m["layers.0.q"].name == "encoder.layer.0.attention.self.query.weight"
    assert m["layers.3.attn_output_norm_bias"].name == "encoder.layer.3.attention.output.LayerNorm.bias"
    assert m["embed_norm"].name == "embeddings.LayerNorm.weight"


@pytest.mark.parametrize(("change", "message"), [
    ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ({"is_decoder": True}, "decoder"),
    ({"hidden_size": 385}, "multiple of num_attention_heads"),
    ({"hidden_act": "relu6"}, "activation"),
    ({"type_vocab_size": 10**6}, "type_vocab_size"),
])
def test_bert_refusals_name_the_key(change: dict[str, Any], message: str) -> None:
    with pytest.raises(SourceError, match=message):
        BertFamily().build_spec({**MINILM_CONFIG, **change}, "config.json")


def test_xlmr_needs_a_padding_id_inside_its_positions() -> None:
    with pytest.raises(SourceError, match="pad_token_id"):
        XlmRobertaFamily().build_spec({**XLMR_CONFIG, "pad_token_id": None}, "config.json")
    with pytest.raises(SourceError, match="max_position_embeddings"):
        XlmRobertaFamily().build_spec({**XLMR_CONFIG, "max_position_embeddings": 2}, "config.json")


MODERNBERT_CONFIG: dict[str, Any] = {  # ModernBERT-base's config.json as transformers 4 published it
    "architectures": ["ModernBertModel"], "attention_bias": False, "global_attn_every_n_layers": 3,
    "global_rope_theta": 160000.0, "hidden_activation": "gelu", "hidden_size": 768, "intermediate_size": 1152,
    "local_attention": 128, "local_rope_theta": 10000.0, "max_position_embeddings": 8192, "mlp_bias": False,
    "model_type": "modernbert", "norm_bias": False, "norm_eps": 1e-05, "num_attention_heads": 12,
    "num_hidden_layers": 22, "pad_token_id": 50283, "vocab_size": 50368,
}


def test_modernbert_config_gives_the_pre_ln_rope_geglu_spec() -> None:
    spec = ModernBertFamily().build_spec(MODERNBERT_CONFIG, "config.json")
    enc = spec.encoder
    assert enc is not None
    assert (enc.layout, enc.position, enc.mlp, enc.linear_bias, enc.norm_bias) == (
        "pre_ln", "rope", "geglu", False, False)
    assert (enc.rope_theta, enc.rope_local_theta, enc.local_window) == (160000.0, 10000.0, 64)
    assert enc.local_layers == tuple(i for i in range(22) if i % 3)
    assert (spec.head_dim, spec.activation, spec.norm_eps, enc.type_vocab_size) == (64, "gelu", 1e-5, 0)
    shapes = spec.tensor_shapes()
    assert "pos_embed" not in shapes and "layers.0.attn_norm" not in shapes and "layers.0.q_bias" not in shapes
    assert shapes["layers.1.attn_norm"] == (768,) and shapes["final_norm"] == (768,)
    assert shapes["layers.3.gate"] == (1152, 768) and shapes["layers.3.down"] == (768, 1152)
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    validate(json.loads(json.dumps(spec.to_dict())), "model-spec")


def test_modernbert_transformers5_layer_types_and_rope_parameters() -> None:
    config = {k: v for k, v in MODERNBERT_CONFIG.items()
              if k not in ("global_attn_every_n_layers", "global_rope_theta", "local_rope_theta")}
    config.update(num_hidden_layers=4, layer_types=["full_attention", "sliding_attention"] * 2,
                  rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 5e4},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 1e3}})
    enc = ModernBertFamily().build_spec(config, "config.json").encoder
    assert enc is not None and enc.local_layers == (1, 3) and (enc.rope_theta, enc.rope_local_theta) == (5e4, 1e3)


def test_modernbert_tensor_map_splits_the_fused_weights() -> None:
    family = ModernBertFamily()
    m = family.tensor_map(family.build_spec(MODERNBERT_CONFIG, "config.json"))
    assert (m["layers.2.k"].name, m["layers.2.k"].rows) == ("layers.2.attn.Wqkv.weight", (768, 1536))
    assert (m["layers.2.up"].rows, m["layers.2.gate"].rows) == ((0, 1152), (1152, 2304))
    assert m["layers.2.gate"].name == "layers.2.mlp.Wi.weight" and m["layers.2.down"].name == "layers.2.mlp.Wo.weight"
    assert m["embed"].name == "embeddings.tok_embeddings.weight" and m["final_norm"].name == "final_norm.weight"
    assert m["layers.1.attn_norm"].name == "layers.1.attn_norm.weight"


@pytest.mark.parametrize(("change", "message"), [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 2.0}}}, "rope_type"),
    ({"attention_bias": True}, "mlp_bias"),
    ({"hidden_size": 770}, "multiple of num_attention_heads"),
    ({"hidden_activation": "relu6"}, "activation"),
    ({"layer_types": ["full_attention"]}, "layer_types"),
    ({"local_attention": 1}, "local_attention"),
])
def test_modernbert_refusals_name_the_key(change: dict[str, Any], message: str) -> None:
    with pytest.raises(SourceError, match=message):
        ModernBertFamily().build_spec({**MODERNBERT_CONFIG, **change}, "config.json")
