"""The canonical decoder spec: one description of a model that every target and the reference read.

Families (``sovpack.converters``) build it from a Hugging Face config; nothing downstream looks at the HF
config again. Canonical tensor names are listed here too, so every target agrees on them.

NOTE: canonical norm weights are *effective* weights: a family whose norm computes ``x * (offset + w)``
(Gemma) folds the offset in when it maps tensors, so every consumer applies a plain ``x * w``.
``norm_weight_offset`` records what the source did, for provenance and for targets that want to know.

NOTE: fields added for newer families (Gemma 2/3, Phi-3.5/4-mini, SmolLM3, OLMo 2, Granite) come after
``source_dtype`` and default to what the first seven families do, so their specs keep their meaning.

NOTE: a mixture-of-experts feed-forward (Qwen3-MoE, Mixtral) is one optional ``moe`` field (:class:`MoESpec`);
None keeps every dense family's spec, tensor names and meaning unchanged. Each expert's gate/up/down is its own
canonical tensor (``layers.<i>.experts.<e>.gate``), so streaming writers still handle one tensor at a time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

RopeKind = Literal["none", "linear", "llama3", "yarn", "longrope"]
Activation = Literal["silu", "gelu_tanh", "gelu"]
# "full": a layer attends to every earlier position; "sliding": only to the last ``sliding_window`` ones.
LayerType = Literal["full", "sliding"]
# Which sublayer norms exist: "pre" normalises each sublayer's input (Llama); "post" its output, before the
# residual add (OLMo 2); "sandwich" both (Gemma 2/3).
NormPlacement = Literal["pre", "sandwich", "post"]
# q/k RMSNorm over each head's head_dim values (Qwen3, Gemma 3) or over the whole projection (OLMo 2).
QKNormScope = Literal["head", "projection"]
# Where a mixture-of-experts router takes its softmax: over all experts, then the top-k of those probabilities
# (Qwen3-MoE, Mixtral); or over the top-k router logits only (gpt-oss).
RouterSoftmax = Literal["before_topk", "after_topk"]


@dataclass(frozen=True, kw_only=True, slots=True)
class RopeScaling:
    """Rotary-embedding frequency scaling, normalised from both HF config dialects."""

    kind: RopeKind = "none"
    factor: float = 1.0
    # llama3
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None  # llama3, yarn; longrope: where the long factors start
    # yarn
    beta_fast: float | None = None
    beta_slow: float | None = None
    attention_factor: float | None = None  # cos/sin multiplier (yarn: None = its default; longrope: resolved)
    truncate: bool | None = None
    # longrope: per-frequency divisors [rotary_dim / 2]; ``short_factor`` while a forward pass sees at most
    # original_max_position_embeddings positions, ``long_factor`` once it sees more (see sovpack.reference)
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if v is not None}
        for key in ("short_factor", "long_factor"):
            if key in data:
                data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RopeScaling:
        values = dict(data)
        for key in ("short_factor", "long_factor"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)


@dataclass(frozen=True, kw_only=True, slots=True)
class MoESpec:
    """A sparse mixture-of-experts feed-forward, as every target must route it.

    A token's router logits (``layers.<i>.router`` [num_experts, hidden], plus ``router_bias`` when set) pick
    ``experts_per_token`` experts; each chosen expert is a gated MLP (``experts.<e>.gate/up/down``, width
    ``expert_intermediate_size``, the spec's ``activation``) and their outputs are summed, weighted by the
    routing weights (float32). Layers outside ``sparse_layers`` keep the dense ``gate/up/down`` MLP of width
    ``intermediate_size`` (Qwen3-MoE's ``mlp_only_layers`` / ``decoder_sparse_step``).
    """

    num_experts: int
    experts_per_token: int
    expert_intermediate_size: int
    sparse_layers: tuple[int, ...]
    router_softmax: RouterSoftmax = "before_topk"
    # Routing weights of the chosen experts are divided by their sum (before_topk only; after_topk sums to 1).
    norm_topk_prob: bool = True
    router_bias: bool = False
    # A shared expert every token passes through (``shared_expert.gate/up/down``), added to the routed sum;
    # None: no shared expert. ``shared_expert_gate``: its output is scaled by sigmoid(x . shared_expert_gate).
    shared_expert_intermediate_size: int | None = None
    shared_expert_gate: bool = False
    # Each expert's gate/up/down carries a bias (``experts.<e>.gate_bias`` [I], ``up_bias`` [I], ``down_bias`` [H]).
    expert_bias: bool = False
    # Clamped SwiGLU (gpt-oss) when swiglu_limit is set: gate = min(gate, limit), up = clip(up, -limit, limit),
    # act = gate * sigmoid(swiglu_alpha * gate) * (up + swiglu_up_offset). None: the spec's activation(gate) * up.
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.0
    swiglu_up_offset: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["sparse_layers"] = list(self.sparse_layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoESpec:
        return cls(**{**data, "sparse_layers": tuple(data.get("sparse_layers", ()))})


# sentence-transformers pooling modes (1_Pooling/config.json): mean of the real tokens, the first ([CLS]) token,
# element-wise max, mean scaled by sqrt(length) instead of length, or the last real token.
PoolingMode = Literal["mean", "cls", "max", "mean_sqrt_len", "last_token"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Pooling:
    """How token states become one sentence embedding (sentence-transformers' Pooling and Normalize modules).

    Part of the artifact's meaning: the same hidden states pooled another way are a different embedding space.
    """

    mode: PoolingMode = "mean"
    normalize: bool = False  # a ``Normalize`` module follows: embeddings are L2-normalised
    max_seq_length: int | None = None  # sentence_bert_config.json: longer inputs are truncated to this
    include_prompt: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Pooling:
        return cls(**data)


# How an encoder layer places its LayerNorms, where positions come from, and its MLP (see EncoderSpec).
EncoderLayout = Literal["post_ln", "pre_ln"]
EncoderPosition = Literal["absolute", "rope"]
EncoderMLP = Literal["plain", "geglu"]


@dataclass(frozen=True, kw_only=True, slots=True)
class EncoderSpec:
    """What a bidirectional BERT-style encoder adds to the shared fields of ModelSpec.

    Embeddings are word + absolute position (+ token type) embeddings, LayerNorm'd; each layer is post-LN
    (``x = LN(x + attn(x))``, ``x = LN(x + down(act(up(x))))``), attention bidirectional under the padding mask,
    every projection and LayerNorm with a bias. Canonical tensors: ``pos_embed`` [P, H], ``type_embed``
    [types, H], ``embed_norm``/``embed_norm_bias``; per layer q/k/v/o with ``*_bias``, ``attn_output_norm``
    (+ ``_bias``), ``up``/``up_bias`` [I, H], ``down``/``down_bias`` [H, I], ``output_norm`` (+ ``_bias``).
    """

    type_vocab_size: int = 0  # 0: no token-type embedding
    # Position ids start here (XLM-RoBERTa: padding_idx + 1) and count only real tokens there.
    position_offset: int = 0
    pooling: Pooling = field(default_factory=Pooling)
    # Every field below defaults to BERT's meaning; ModernBERT sets them all.
    # "post_ln": x = LN(x + sublayer(x)) (BERT). "pre_ln": x = x + sublayer(LN(x)) with ``attn_norm`` /
    # ``mlp_norm`` on the sublayer inputs, no ``attn_norm`` on layer 0 (ModernBERT's is an Identity) and a
    # ``final_norm`` after the last layer.
    layout: EncoderLayout = "post_ln"
    # q/k/v/o and the MLP projections carry ``*_bias`` tensors (ModernBERT: attention_bias / mlp_bias).
    linear_bias: bool = True
    # Every LayerNorm carries a ``*_bias`` tensor (ModernBERT: norm_bias).
    norm_bias: bool = True
    # "absolute": a learned ``pos_embed`` table added to the word embeddings. "rope": no table; q and k rotate
    # (rotate-half over the whole head) by rope_theta on global layers and rope_local_theta on local ones.
    position: EncoderPosition = "absolute"
    rope_theta: float = 10000.0
    rope_local_theta: float = 10000.0
    # "plain": down(act(up(x))). "geglu": down(act(up(x)) * gate(x)); up / gate are the two halves of
    # ModernBERT's Wi [2I, H], the first half the activated input.
    mlp: EncoderMLP = "plain"
    # Layers whose attention is local: a token sees keys within local_window positions on either side
    # (|i - j| <= local_window; ModernBERT's local_attention // 2). The other layers attend to everything.
    local_layers: tuple[int, ...] = ()
    local_window: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "pooling": self.pooling.to_dict(), "local_layers": list(self.local_layers)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderSpec:
        return cls(**{**data, "pooling": Pooling.from_dict(data.get("pooling", {})),
                      "local_layers": tuple(data.get("local_layers", ()))})


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
    # Per layer: "sliding" layers attend within sliding_window, "full" ones to everything; () means every
    # layer is "sliding" when sliding_window is set and "full" otherwise.
    layer_types: tuple[LayerType, ...] = ()
    # Rope base of "sliding" layers, which are never frequency-scaled (Gemma 3); None: they rotate like full ones.
    rope_local_theta: float | None = None
    # Layers that apply no rotary embedding at all (SmolLM3's NoPE layers).
    no_rope_layers: tuple[int, ...] = ()
    # Leading dims of each q/k head that rotate (rotate-half among them); the rest pass through. None: head_dim.
    rotary_dim: int | None = None
    # Multiplier of q.k in attention scores; None: 1/sqrt(head_dim).
    attention_scale: float | None = None
    # Attention scores become cap * tanh(scores / cap) after scaling, before the mask (Gemma 2).
    attn_logit_softcap: float | None = None
    # Which sublayer RMSNorms exist and where (NormPlacement): pre, post or sandwich.
    norm_placement: NormPlacement = "pre"
    # q/k norms (when qk_norm) per head or over the whole projection (QKNormScope).
    qk_norm_scope: QKNormScope = "head"
    # Each sublayer's output is multiplied by this before the residual add (Granite).
    residual_multiplier: float = 1.0
    # The output head's logits are divided by this (Granite's logits_scaling), before any final soft-capping.
    logits_divisor: float = 1.0
    # Logits become cap * tanh(logits / cap) (Gemma 2).
    final_logit_softcap: float | None = None
    # Mixture-of-experts feed-forward (MoESpec); None: every layer has the dense gate/up/down MLP.
    moe: MoESpec | None = None
    # A learned per-head "sink" logit (``layers.<i>.sinks`` [num_heads]) joins each attention softmax's
    # denominator and attends to nothing (gpt-oss).
    attention_sinks: bool = False
    # The attention output projection carries a bias (``layers.<i>.o_bias`` [hidden]; gpt-oss).
    o_bias: bool = False
    # A bidirectional encoder (BERT, XLM-RoBERTa; EncoderSpec) that produces embeddings, not a decoder.
    encoder: EncoderSpec | None = None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def rotary_size(self) -> int:
        """How many leading dims of each head rotate."""
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    def layer_type(self, layer: int) -> LayerType:
        if self.layer_types:
            return self.layer_types[layer]
        return "sliding" if self.sliding_window is not None else "full"

    def layer_window(self, layer: int) -> int | None:
        """The attention window of one layer (None: unlimited)."""
        return self.sliding_window if self.layer_type(layer) == "sliding" else None

    def layer_rope(self, layer: int) -> Literal["none", "local", "global"]:
        """Which rotary embedding a layer applies: none, the local one (rope_local_theta) or the global one."""
        if layer in self.no_rope_layers:
            return "none"
        if self.rope_local_theta is not None and self.layer_type(layer) == "sliding":
            return "local"
        return "global"

    @property
    def pre_norms(self) -> bool:
        """attn_norm / mlp_norm normalise each sublayer's input."""
        return self.norm_placement in ("pre", "sandwich")

    @property
    def post_norms(self) -> bool:
        """post_attn_norm / post_mlp_norm normalise each sublayer's output before the residual add."""
        return self.norm_placement in ("post", "sandwich")

    def max_input_tokens(self) -> int:
        """Tokens one input of an encoder may have: its pipeline's max_seq_length, capped by the positions left
        after the position offset (the whole position table for a decoder)."""
        if self.encoder is None:
            return self.max_position_embeddings
        positions = self.max_position_embeddings - self.encoder.position_offset
        return min(self.encoder.pooling.max_seq_length or positions, positions)

    def is_sparse(self, layer: int) -> bool:
        """The layer's feed-forward is the mixture of experts (else the dense MLP)."""
        return self.moe is not None and layer in self.moe.sparse_layers

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["rope_scaling"] = self.rope_scaling.to_dict()
        data["moe"] = None if self.moe is None else self.moe.to_dict()
        data["encoder"] = None if self.encoder is None else self.encoder.to_dict()
        for key in ("eos_token_ids", "layer_types", "no_rope_layers"):
            data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        values = dict(data)
        values["rope_scaling"] = RopeScaling.from_dict(values.get("rope_scaling", {}))
        moe = values.get("moe")
        values["moe"] = None if moe is None else MoESpec.from_dict(moe)
        encoder = values.get("encoder")
        values["encoder"] = None if encoder is None else EncoderSpec.from_dict(encoder)
        for key in ("eos_token_ids", "layer_types", "no_rope_layers"):
            values[key] = tuple(values.get(key, ()))
        return cls(**values)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical tensor name -> shape, in HF ``Linear`` layout ([out_features, in_features])."""
        if self.encoder is not None:
            return self._encoder_shapes(self.encoder)
        h, kv, q = self.hidden_size, self.kv_size, self.q_size
        qk_norm = (self.head_dim, self.head_dim) if self.qk_norm_scope == "head" else (q, kv)
        shapes: dict[str, tuple[int, ...]] = {"embed": (self.vocab_size, h)}
        for i in range(self.num_layers):
            p = f"layers.{i}."
            if self.pre_norms:
                shapes[p + "attn_norm"] = (h,)
            shapes[p + "q"] = (q, h)
            shapes[p + "k"] = (kv, h)
            shapes[p + "v"] = (kv, h)
            shapes[p + "o"] = (h, q)
            if self.qkv_bias:
                shapes[p + "q_bias"] = (q,)
                shapes[p + "k_bias"] = (kv,)
                shapes[p + "v_bias"] = (kv,)
            if self.o_bias:
                shapes[p + "o_bias"] = (h,)
            if self.attention_sinks:
                shapes[p + "sinks"] = (self.num_heads,)
            if self.qk_norm:
                shapes[p + "q_norm"] = (qk_norm[0],)
                shapes[p + "k_norm"] = (qk_norm[1],)
            if self.post_norms:
                shapes[p + "post_attn_norm"] = (h,)
            if self.pre_norms:
                shapes[p + "mlp_norm"] = (h,)
            if self.moe is not None and i in self.moe.sparse_layers:
                shapes.update(self._moe_shapes(p, self.moe))
            else:
                shapes[p + "gate"] = (self.intermediate_size, h)
                shapes[p + "up"] = (self.intermediate_size, h)
                shapes[p + "down"] = (h, self.intermediate_size)
            if self.post_norms:
                shapes[p + "post_mlp_norm"] = (h,)
        shapes["final_norm"] = (h,)
        if not self.tie_word_embeddings:
            shapes["lm_head"] = (self.vocab_size, h)
        return shapes

    def _moe_shapes(self, p: str, moe: MoESpec) -> dict[str, tuple[int, ...]]:
        """One sparse layer's router, experts (one canonical tensor each) and shared expert, in HF order."""
        h, inter = self.hidden_size, moe.expert_intermediate_size
        shapes: dict[str, tuple[int, ...]] = {p + "router": (moe.num_experts, h)}
        if moe.router_bias:
            shapes[p + "router_bias"] = (moe.num_experts,)
        for e in range(moe.num_experts):
            x = f"{p}experts.{e}."
            shapes[x + "gate"] = (inter, h)
            shapes[x + "up"] = (inter, h)
            shapes[x + "down"] = (h, inter)
            if moe.expert_bias:
                shapes[x + "gate_bias"] = (inter,)
                shapes[x + "up_bias"] = (inter,)
                shapes[x + "down_bias"] = (h,)
        if moe.shared_expert_intermediate_size is not None:
            shared = moe.shared_expert_intermediate_size
            shapes[p + "shared_expert.gate"] = (shared, h)
            shapes[p + "shared_expert.up"] = (shared, h)
            shapes[p + "shared_expert.down"] = (h, shared)
            if moe.shared_expert_gate:
                shapes[p + "shared_expert_gate"] = (1, h)
        return shapes

    def _encoder_shapes(self, enc: EncoderSpec) -> dict[str, tuple[int, ...]]:
        """An encoder's canonical tensors (see EncoderSpec), in HF order."""
        h, inter = self.hidden_size, self.intermediate_size
        shapes: dict[str, tuple[int, ...]] = {"embed": (self.vocab_size, h)}

        def norm(name: str) -> None:
            shapes[name] = (h,)
            if enc.norm_bias:
                shapes[name + "_bias"] = (h,)

        def linear(name: str, out_f: int, in_f: int) -> None:
            shapes[name] = (out_f, in_f)
            if enc.linear_bias:
                shapes[name + "_bias"] = (out_f,)

        if enc.position == "absolute":
            shapes["pos_embed"] = (self.max_position_embeddings, h)
        if enc.type_vocab_size:
            shapes["type_embed"] = (enc.type_vocab_size, h)
        norm("embed_norm")
        pre = enc.layout == "pre_ln"
        for i in range(self.num_layers):
            p = f"layers.{i}."
            if pre and i > 0:
                norm(p + "attn_norm")
            for proj in ("q", "k", "v"):
                linear(p + proj, self.q_size, h)
            linear(p + "o", h, self.q_size)
            if pre:
                norm(p + "mlp_norm")
            else:
                norm(p + "attn_output_norm")
            linear(p + "up", inter, h)
            if enc.mlp == "geglu":
                linear(p + "gate", inter, h)
            linear(p + "down", h, inter)
            if not pre:
                norm(p + "output_norm")
        if pre:
            norm("final_norm")
        return shapes

    def parameter_count(self) -> int:
        return sum(math.prod(s) for s in self.tensor_shapes().values())
