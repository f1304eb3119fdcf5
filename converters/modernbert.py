"""ModernBERT embedding encoders (``ModernBertModel`` at the checkpoint root, as sentence-transformers saves it).

ModernBERT differs from BERT in everything but the embedding norm: pre-LN layers with a final norm, no biases
(by default), rotary positions with separate global and local bases, local layers that attend within a
bidirectional window, a GeGLU MLP and fused q/k/v. EncoderSpec's layout fields carry all of it; pooling comes
from the sentence-transformers files, as for BERT.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sovpack._protocols import TensorSource
from sovpack.converters.base import ConfigReader, register_family
from sovpack.source.spec import EncoderSpec, ModelSpec

DEFAULT_GLOBAL_THETA = 160_000.0  # ModernBertConfig.default_theta
DEFAULT_LOCAL_THETA = 10_000.0
LAYER_TYPES = {"full_attention", "sliding_attention"}


@register_family
class ModernBertFamily:
    name = "modernbert"
    architectures = ("ModernBertModel",)

    def _layer_types(self, cfg: ConfigReader, layers: int) -> tuple[str, ...]:
        """transformers 5's ``layer_types``, or the older ``global_attn_every_n_layers`` (default 3)."""
        if cfg.get("layer_types") is not None:
            types = cfg.strings("layer_types")
            if len(types) != layers or not set(types) <= LAYER_TYPES:
                raise cfg.fail(f"{cfg.name('layer_types')} must list {layers} of {sorted(LAYER_TYPES)}")
            return types
        every = cfg.positive("global_attn_every_n_layers", 3)
        return tuple("sliding_attention" if i % every else "full_attention" for i in range(layers))

    def _thetas(self, cfg: ConfigReader) -> tuple[float, float]:
        """(global, local) rope bases: transformers 5's per-layer-type ``rope_parameters`` or the older
        ``global_rope_theta`` / ``local_rope_theta``. Scaled rope is refused by name."""
        params = cfg.get("rope_parameters")
        if cfg.get("rope_scaling") is not None:
            raise cfg.fail(f"{cfg.name('rope_scaling')} is not supported (only default rope)")
        glob = cfg.number("global_rope_theta", DEFAULT_GLOBAL_THETA, above=0.0)
        local = cfg.number("local_rope_theta", DEFAULT_LOCAL_THETA, above=0.0)
        if params is None:
            return glob, local
        sub = cfg.child("rope_parameters", params)
        if not set(params) <= LAYER_TYPES:
            raise cfg.fail(f"{cfg.name('rope_parameters')} must hold only {sorted(LAYER_TYPES)} objects")
        out = []
        for key, default in (("full_attention", glob), ("sliding_attention", local)):
            part = sub.child(key, sub.get(key, {}))
            if part.rope_type() != "default":
                raise cfg.fail(f"{part.name('rope_type')} {part.rope_type()!r} is not supported (only 'default')")
            if part.number("partial_rotary_factor", 1.0) != 1.0:
                raise cfg.fail(f"partial rotary embeddings ({part.name('partial_rotary_factor')}) are not supported")
            out.append(part.number("rope_theta", default, above=0.0))
        return out[0], out[1]

    def build_spec(self, config: Mapping[str, Any], where: str) -> ModelSpec:
        cfg = ConfigReader(config, where)
        hidden = cfg.positive("hidden_size")
        heads = cfg.positive("num_attention_heads")
        if hidden % heads:
            raise cfg.fail(f"hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads})")
        if (hidden // heads) % 2:
            raise cfg.fail(f"head size {hidden // heads} is odd; rotary embeddings need an even one")
        if cfg.get("head_dim") not in (None, hidden // heads):
            raise cfg.fail(f"{cfg.name('head_dim')} must be hidden_size // num_attention_heads")
        if cfg.flag("attention_bias", False) != cfg.flag("mlp_bias", False):
            raise cfg.fail("'attention_bias' and 'mlp_bias' differ; only both or neither are supported")
        layers = cfg.positive("num_hidden_layers")
        types = self._layer_types(cfg, layers)
        local_attention = cfg.positive("local_attention", 128)
        if local_attention < 2:
            raise cfg.fail(f"{cfg.name('local_attention')} must be at least 2 (a window of local_attention // 2 "
                           "on either side)")
        theta, local_theta = self._thetas(cfg)
        vocab = cfg.positive("vocab_size")
        pad_ids = cfg.token_ids("pad_token_id", vocab)
        archs = cfg.strings("architectures")
        return ModelSpec(
            family=self.name,
            architecture=archs[0] if archs else "?",
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            intermediate_size=cfg.positive("intermediate_size"),
            max_position_embeddings=cfg.positive("max_position_embeddings", 8192),
            norm_eps=cfg.number("norm_eps", 1e-5, above=0.0),
            activation=cfg.activation("hidden_activation", default="gelu"),
            pad_token_id=pad_ids[0] if pad_ids else None,
            source_dtype=cfg.source_dtype(),
            encoder=EncoderSpec(
                type_vocab_size=0, position_offset=0, layout="pre_ln",
                linear_bias=cfg.flag("attention_bias", False), norm_bias=cfg.flag("norm_bias", False),
                position="rope", rope_theta=theta, rope_local_theta=local_theta, mlp="geglu",
                local_layers=tuple(i for i, t in enumerate(types) if t == "sliding_attention"),
                # NOTE: transformers' mask is |q - k| <= local_attention // 2 (config.sliding_window).
                local_window=local_attention // 2,
            ),
        )

    def tensor_map(self, spec: ModelSpec) -> dict[str, TensorSource]:
        """Canonical name -> ModernBertModel's tensor; q/k/v are row ranges of Wqkv, up/gate halves of Wi."""
        q, inter, h = spec.q_size, spec.intermediate_size, spec.hidden_size
        m: dict[str, TensorSource] = {
            "embed": TensorSource(name="embeddings.tok_embeddings.weight"),
            "embed_norm": TensorSource(name="embeddings.norm.weight"),
            "embed_norm_bias": TensorSource(name="embeddings.norm.bias"),
            "final_norm": TensorSource(name="final_norm.weight"),
            "final_norm_bias": TensorSource(name="final_norm.bias"),
        }
        for i in range(spec.num_layers):
            p = x = f"layers.{i}."
            for suffix, kind in (("", "weight"), ("_bias", "bias")):
                wqkv, wi = f"{x}attn.Wqkv.{kind}", f"{x}mlp.Wi.{kind}"
                fused_qkv = (3 * q, h) if kind == "weight" else (3 * q,)
                fused_wi = (2 * inter, h) if kind == "weight" else (2 * inter,)
                for j, proj in enumerate(("q", "k", "v")):
                    m[p + proj + suffix] = TensorSource(name=wqkv, rows=(j * q, (j + 1) * q), stored_shape=fused_qkv)
                m[p + "o" + suffix] = TensorSource(name=f"{x}attn.Wo.{kind}")
                m[p + "up" + suffix] = TensorSource(name=wi, rows=(0, inter), stored_shape=fused_wi)
                m[p + "gate" + suffix] = TensorSource(name=wi, rows=(inter, 2 * inter), stored_shape=fused_wi)
                m[p + "down" + suffix] = TensorSource(name=f"{x}mlp.Wo.{kind}")
                m[p + "attn_norm" + suffix] = TensorSource(name=f"{x}attn_norm.{kind}")
                m[p + "mlp_norm" + suffix] = TensorSource(name=f"{x}mlp_norm.{kind}")
        return {name: m[name] for name in spec.tensor_shapes()}
