"""The canonical decoder spec: one description of a model that every target and the reference read.

Families (``sovpack.converters``) build it from a Hugging Face config; nothing downstream looks at the HF
config again. Canonical tensor names are listed here too, so every target agrees on them.

NOTE: canonical norm weights are *effective* weights: a family whose norm computes ``x * (offset + w)``
(Gemma) folds the offset in when it maps tensors, so every consumer applies a plain ``x * w``.
``norm_weight_offset`` records what the source did, for provenance and for targets that want to know.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

RopeKind = Literal["none", "linear", "llama3", "yarn"]
Activation = Literal["silu", "gelu_tanh", "gelu"]


@dataclass(frozen=True, kw_only=True, slots=True)
class RopeScaling:
    """Rotary-embedding frequency scaling, normalised from both HF config dialects."""

    kind: RopeKind = "none"
    factor: float = 1.0
    # llama3
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    # yarn
    beta_fast: float | None = None
    beta_slow: float | None = None
    attention_factor: float | None = None
    truncate: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RopeScaling:
        return cls(**data)


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelSpec:
    """Everything a target needs to rebuild the forward pass of a decoder-only transformer."""

    family: str
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_kind: Literal["rms"] = "rms"
    norm_eps: float = 1e-6
    norm_weight_offset: float = 0.0
    activation: Activation = "silu"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    embedding_multiplier: float = 1.0
    fused_qkv: bool = False
    fused_gate_up: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    source_dtype: str = "float32"

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["rope_scaling"] = self.rope_scaling.to_dict()
        data["eos_token_ids"] = list(self.eos_token_ids)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        values = dict(data)
        values["rope_scaling"] = RopeScaling.from_dict(values.get("rope_scaling", {}))
        values["eos_token_ids"] = tuple(values.get("eos_token_ids", ()))
        return cls(**values)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical tensor name -> shape, in HF ``Linear`` layout ([out_features, in_features])."""
        h, kv, q = self.hidden_size, self.kv_size, self.q_size
        shapes: dict[str, tuple[int, ...]] = {"embed": (self.vocab_size, h)}
        for i in range(self.num_layers):
            p = f"layers.{i}."
            shapes[p + "attn_norm"] = (h,)
            shapes[p + "q"] = (q, h)
            shapes[p + "k"] = (kv, h)
            shapes[p + "v"] = (kv, h)
            shapes[p + "o"] = (h, q)
            if self.qkv_bias:
                shapes[p + "q_bias"] = (q,)
                shapes[p + "k_bias"] = (kv,)
                shapes[p + "v_bias"] = (kv,)
            if self.qk_norm:
                shapes[p + "q_norm"] = (self.head_dim,)
                shapes[p + "k_norm"] = (self.head_dim,)
            shapes[p + "mlp_norm"] = (h,)
            shapes[p + "gate"] = (self.intermediate_size, h)
            shapes[p + "up"] = (self.intermediate_size, h)
            shapes[p + "down"] = (h, self.intermediate_size)
        shapes["final_norm"] = (h,)
        if not self.tie_word_embeddings:
            shapes["lm_head"] = (self.vocab_size, h)
        return shapes

    def parameter_count(self) -> int:
        return sum(math.prod(s) for s in self.tensor_shapes().values())
