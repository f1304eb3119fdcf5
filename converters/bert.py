"""BERT-style embedding encoders: BERT (incl. MiniLM checkpoints) and XLM-RoBERTa, as sentence-transformers
publishes them (the bare ``BertModel`` / ``XLMRobertaModel`` at the checkpoint root).

The spec's ``encoder`` field (EncoderSpec) carries what an encoder adds; its pooling comes from the
sentence-transformers files beside config.json (sovpack.source.sentence_transformers), not from the config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sovpack._protocols import TensorSource
from sovpack.converters.base import ConfigReader, register_family
from sovpack.source.spec import EncoderSpec, ModelSpec

# Upper bound for type_vocab_size: BERT has 2, some checkpoints 16; the table is [types, hidden] floats.
MAX_TOKEN_TYPES = 1024


class EncoderFamily:
    """Base for post-LN absolute-position encoders; subclasses say where positions start."""

    name: str = ""
    architectures: tuple[str, ...] = ()

    def position_offset(self, cfg: ConfigReader, pad: int | None) -> int:
        return 0

    def build_spec(self, config: Mapping[str, Any], where: str) -> ModelSpec:
        cfg = ConfigReader(config, where)
        hidden = cfg.positive("hidden_size")
        heads = cfg.positive("num_attention_heads")
        if hidden % heads:
            raise cfg.fail(f"hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads})")
        kind = cfg.string("position_embedding_type", "absolute")
        if kind != "absolute":
            raise cfg.fail(f"'position_embedding_type' {kind!r} is not supported (only 'absolute')")
        if cfg.flag("is_decoder", False) or cfg.flag("add_cross_attention", False):
            raise cfg.fail("a BERT decoder (is_decoder / add_cross_attention) is not an embedding encoder")
        vocab = cfg.positive("vocab_size")
        pad_ids = cfg.token_ids("pad_token_id", vocab)
        pad = pad_ids[0] if pad_ids else None
        positions = cfg.positive("max_position_embeddings", 512)
        offset = self.position_offset(cfg, pad)
        if offset >= positions:
            raise cfg.fail(f"positions start at {offset} but 'max_position_embeddings' is only {positions}")
        types = cfg.integer("type_vocab_size", 2, minimum=0, maximum=MAX_TOKEN_TYPES)
        archs = cfg.strings("architectures")
        return ModelSpec(
            family=self.name,
            architecture=archs[0] if archs else "?",
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=cfg.positive("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            intermediate_size=cfg.positive("intermediate_size"),
            max_position_embeddings=positions,
            norm_eps=cfg.number("layer_norm_eps", 1e-12, above=0.0),
            activation=cfg.activation("hidden_act", default="gelu"),
            pad_token_id=pad,
            source_dtype=cfg.source_dtype(),
            encoder=EncoderSpec(type_vocab_size=types, position_offset=offset),
        )

    def tensor_map(self, spec: ModelSpec) -> dict[str, TensorSource]:
        """Canonical name -> the bare model's tensor (``embeddings.*``, ``encoder.layer.<i>.*``)."""
        m = {
            "embed": "embeddings.word_embeddings.weight",
            "pos_embed": "embeddings.position_embeddings.weight",
            "embed_norm": "embeddings.LayerNorm.weight",
            "embed_norm_bias": "embeddings.LayerNorm.bias",
        }
        if spec.encoder is not None and spec.encoder.type_vocab_size:
            m["type_embed"] = "embeddings.token_type_embeddings.weight"
        parts = {
            "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
            "o": "attention.output.dense", "attn_output_norm": "attention.output.LayerNorm",
            "up": "intermediate.dense", "down": "output.dense", "output_norm": "output.LayerNorm",
        }
        for i in range(spec.num_layers):
            for canonical, hf in parts.items():
                m[f"layers.{i}.{canonical}"] = f"encoder.layer.{i}.{hf}.weight"
                m[f"layers.{i}.{canonical}_bias"] = f"encoder.layer.{i}.{hf}.bias"
        order = list(spec.tensor_shapes())
        return {name: TensorSource(name=m[name]) for name in order}


@register_family
class BertFamily(EncoderFamily):
    name = "bert"
    architectures = ("BertModel",)


@register_family
class XlmRobertaFamily(EncoderFamily):
    name = "xlm_roberta"
    architectures = ("XLMRobertaModel",)

    def position_offset(self, cfg: ConfigReader, pad: int | None) -> int:
        # NOTE: RoBERTa numbers real tokens from padding_idx + 1 (create_position_ids_from_input_ids); the
        # padding index is the config's pad_token_id (1 in every published XLM-R).
        if pad is None:
            raise cfg.fail("'pad_token_id' is needed: XLM-RoBERTa's positions start after it")
        return pad + 1
