"""BERT and XLM-RoBERTa configs -> the canonical encoder spec, and the configs they refuse by name."""

from __future__ import annotations

from typing import Any

import pytest

from sovpack.converters.bert import BertFamily, XlmRobertaFamily
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
