"""Gemma 3, text: Gemma 2's layout with per-head q/k norms, a local:global pattern (5:1 by default), a separate
rope base for sliding layers (never scaled) and rope scaling on global layers only, and no attention soft-capping.

Also the language model inside ``Gemma3ForConditionalGeneration`` checkpoints, which users have far more often:
its config sits under ``text_config`` and its tensors under ``model.language_model.`` (``language_model.model.``
as saved before transformers 4.52); the vision tower and projector are not read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sovpack._protocols import TensorSource
from sovpack.converters.base import (
    ConfigReader,
    DecoderFamily,
    common_spec_fields,
    refuse_partial_rotary,
    register_family,
    standard_tensor_map,
)
from sovpack.converters.gemma2 import NORM_OFFSET, capping, gemma_sandwich_features
from sovpack.source.spec import ModelSpec

CONDITIONAL = "Gemma3ForConditionalGeneration"
# Gemma3TextConfig.default_theta and its default pattern (every sixth layer global).
DEFAULT_GLOBAL_THETA = 1_000_000.0
DEFAULT_LOCAL_THETA = 10_000.0
DEFAULT_PATTERN = 6
ROPE_LAYER_TYPES = ("full_attention", "sliding_attention")


@register_family
class Gemma3Family(DecoderFamily):
    name = "gemma3"
    architectures = ("Gemma3ForCausalLM", CONDITIONAL)

    def build_spec(self, config: Mapping[str, Any], where: str) -> ModelSpec:
        top = ConfigReader(config, where)
        if CONDITIONAL not in top.strings("architectures"):
            return super().build_spec(config, where)
        if top.get("text_config") is None:
            raise top.fail("missing required key 'text_config' (the language model's config)")
        text = top.child("text_config", top.get("text_config"))
        common = {**common_spec_fields(text), "architecture": CONDITIONAL}
        # NOTE: Gemma3Config itself (not its text_config) decides the head's tying; its special token ids and
        # dtype are the model's, the text_config's only stand in when the top level has none.
        vocab = common["vocab_size"]
        common["tie_word_embeddings"] = top.flag("tie_word_embeddings", True)
        for key, single in (("bos_token_id", True), ("eos_token_id", False), ("pad_token_id", True)):
            if top.get(key) is not None:
                ids = top.token_ids(key, vocab)
                if single:
                    common[key] = ids[0] if ids else None
                else:
                    common["eos_token_ids"] = ids
        if top.get("dtype") is not None or top.get("torch_dtype") is not None:
            common["source_dtype"] = top.source_dtype()
        common.update(self.rope_fields(text, common))
        features = self.features(text, common)
        features["tie_word_embeddings"] = common["tie_word_embeddings"]
        return ModelSpec(**{"family": self.name, **common, **features})

    def rope_fields(self, cfg: ConfigReader, common: dict[str, Any]) -> dict[str, Any]:
        """Global layers: rope_theta with any scaling; sliding layers: their own base, never scaled. Either
        transformers 5's per-layer-type ``rope_parameters`` or transformers 4's ``rope_theta``,
        ``rope_local_base_freq`` and ``rope_scaling`` (which applied to global layers only)."""
        refuse_partial_rotary(cfg)
        params = cfg.get("rope_parameters")
        if params is None:
            theta = cfg.number("rope_theta", DEFAULT_GLOBAL_THETA, above=0.0)
            raw = cfg.get("rope_scaling")
            return {
                "rope_theta": theta,
                "rope_scaling": cfg.scaling(None if raw is None else cfg.child("rope_scaling", raw), theta),
                "rope_local_theta": cfg.number("rope_local_base_freq", DEFAULT_LOCAL_THETA, above=0.0),
            }
        sub = cfg.child("rope_parameters", params)  # refuses anything but an object
        if not set(params) <= set(ROPE_LAYER_TYPES):
            raise cfg.fail(
                f"{cfg.name('rope_parameters')} must hold only per-layer-type objects "
                f"({', '.join(ROPE_LAYER_TYPES)}) for Gemma 3"
            )
        full = sub.child("full_attention", sub.get("full_attention", {}))
        local = sub.child("sliding_attention", sub.get("sliding_attention", {}))
        for part in (full, local):
            if part.number("partial_rotary_factor", 1.0) != 1.0:
                raise cfg.fail(f"partial rotary embeddings ({part.name('partial_rotary_factor')}) are not supported")
        if local.rope_type() != "default":
            raise cfg.fail(f"rope scaling on sliding-window layers ({local.name('rope_type')} "
                           f"{local.rope_type()!r}) is not supported")
        theta = full.number("rope_theta", cfg.number("rope_theta", DEFAULT_GLOBAL_THETA), above=0.0)
        return {
            "rope_theta": theta,
            "rope_scaling": cfg.scaling(full, theta),
            "rope_local_theta": local.number(
                "rope_theta", cfg.number("rope_local_base_freq", DEFAULT_LOCAL_THETA), above=0.0
            ),
        }

    def features(self, cfg: ConfigReader, common: dict[str, Any]) -> dict[str, Any]:
        if capping(cfg, "attn_logit_softcapping", None) is not None:
            raise cfg.fail(
                f"{cfg.name('attn_logit_softcapping')} is set, but transformers' Gemma 3 attention ignores it; "
                "refusing rather than guessing which one the checkpoint was trained with"
            )
        final = capping(cfg, "final_logit_softcapping", None)
        if final is not None and common["architecture"] == CONDITIONAL:
            raise cfg.fail(
                f"{cfg.name('final_logit_softcapping')} is set, but transformers' Gemma3ForConditionalGeneration "
                "ignores it (only Gemma3ForCausalLM applies it); refusing rather than guessing"
            )
        sandwich = gemma_sandwich_features(
            cfg,
            common,
            pattern=cfg.positive("sliding_window_pattern", DEFAULT_PATTERN),
            attn_softcap=None,
            final_softcap=final,
        )
        return {**sandwich, "qk_norm": True}

    def tensor_map(self, spec: ModelSpec) -> dict[str, TensorSource]:
        prefix = "model.language_model." if spec.architecture == CONDITIONAL else "model."
        return standard_tensor_map(spec, prefix=prefix, norm_offset=NORM_OFFSET)
