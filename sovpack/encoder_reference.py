"""The numpy reference for embedding encoders: an fp32 forward pass of a BERT-style spec, then pooling.

It is the oracle every encoder artifact is checked against, and is itself checked against transformers' models
and sentence-transformers' pooled embeddings (tests/test_encoder_reference_oracle.py). Inputs are batched and
right-padded: padded keys are masked out of attention and padded tokens out of pooling, so a text's embedding
does not depend on what it is batched with.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sovpack._protocols import Embeddings, RunnerTraits
from sovpack.errors import UsageError
from sovpack.reference import activation
from sovpack.source.model import SourceModel
from sovpack.source.spec import EncoderSpec, Pooling


@dataclass(frozen=True, kw_only=True, slots=True)
class EncoderOutput:
    """One batch: token states [B, T, hidden], which of them are real [B, T], pooled embeddings [B, hidden]."""

    hidden: np.ndarray
    mask: np.ndarray
    embeddings: np.ndarray


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True, dtype=np.float32)
    centred = x - mean
    variance = np.mean(np.square(centred), axis=-1, keepdims=True, dtype=np.float32)
    return (centred / np.sqrt(variance + np.float32(eps)) * weight + bias).astype(np.float32)


def pool(hidden: np.ndarray, mask: np.ndarray, pooling: Pooling) -> np.ndarray:
    """Sentence embeddings [B, hidden] from token states, as sentence-transformers' Pooling (+ Normalize) does."""
    real = mask.astype(np.float32)[..., None]
    lengths = np.maximum(real.sum(axis=1), np.float32(1e-9))
    if pooling.mode == "cls":
        out = hidden[:, 0]
    elif pooling.mode == "last_token":
        last = np.maximum(mask.sum(axis=1) - 1, 0)
        out = hidden[np.arange(hidden.shape[0]), last]
    elif pooling.mode == "max":
        out = np.where(mask[..., None], hidden, np.float32(-1e9)).max(axis=1)
    else:
        summed = (hidden * real).sum(axis=1, dtype=np.float32)
        out = summed / (np.sqrt(lengths) if pooling.mode == "mean_sqrt_len" else lengths)
    out = out.astype(np.float32)
    if pooling.normalize:
        norm = np.sqrt(np.square(out).sum(axis=-1, keepdims=True, dtype=np.float32))
        out = out / np.maximum(norm, np.float32(1e-12))
    return out.astype(np.float32)


class EncoderReference:
    """fp32 numpy encoder over a SourceModel whose spec has an ``encoder``; weights read once and kept.

    An EmbeddingRunner without a tokenizer of its own (parity hands it token ids)."""

    name = "numpy-reference"
    traits = RunnerTraits()

    def __init__(self, model: SourceModel) -> None:
        if model.spec.encoder is None:
            raise UsageError(f"{model.path}: {model.spec.family} is not an encoder")
        self.model = model
        self.spec = model.spec
        self.encoder: EncoderSpec = model.spec.encoder
        self._weights: dict[str, np.ndarray] = {}

    def runtime_info(self) -> dict[str, str]:
        return {"runtime": self.name, "numpy": np.__version__, "python": platform.python_version()}

    def close(self) -> None:
        self._weights.clear()

    def tokenize(self, text: str) -> list[int] | None:
        return None

    def embed_ids(self, batch: Sequence[Sequence[int]]) -> Embeddings:
        out = self.encode(batch)
        return Embeddings(embeddings=out.embeddings, hidden=out.hidden)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray | None:
        return None

    def _w(self, name: str) -> np.ndarray:
        if name not in self._weights:
            self._weights[name] = self.model.tensor(name, np.float32)
        return self._weights[name]

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        y = x @ self._w(name).T
        return (y + self._w(name + "_bias") if self.encoder.linear_bias else y).astype(np.float32)

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        bias = self._w(name + "_bias") if self.encoder.norm_bias else np.zeros(1, dtype=np.float32)
        return layer_norm(x, self._w(name), bias, self.spec.norm_eps)

    def _rope(self, x: np.ndarray, theta: float) -> np.ndarray:
        """Rotate-half rotary embedding of [B, heads, T, dim] at positions 0..T-1 (angles in fp32, as
        transformers computes them)."""
        dim, width = x.shape[-1], x.shape[-2]
        inv_freq = (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)
        freqs = np.arange(width, dtype=np.float32)[:, None] * inv_freq[None]
        angles = np.concatenate([freqs, freqs], axis=-1)
        cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
        half = dim // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return (x * cos + rotated * sin).astype(np.float32)

    def _attention_bias(self, mask: np.ndarray, window: int | None) -> np.ndarray:
        """Additive scores bias [B, 1, T or 1, T]: -inf on padded keys and keys more than window positions away."""
        allowed = mask[:, None, None, :]
        if window is not None:
            pos = np.arange(mask.shape[1])
            allowed = allowed & (np.abs(pos[:, None] - pos[None, :]) <= window)[None, None]
        return np.where(allowed, np.float32(0.0), np.float32(-np.inf))

    def _attention(self, x: np.ndarray, bias: np.ndarray, layer: int) -> np.ndarray:
        """One layer's self-attention output (after ``o``) for normalised input x [B, T, hidden]."""
        s, enc = self.spec, self.encoder
        batch, width = x.shape[:2]
        heads, dim = s.num_heads, s.head_dim
        p = f"layers.{layer}."
        q, k, v = (self._linear(x, p + n).reshape(batch, width, heads, dim).transpose(0, 2, 1, 3)
                   for n in ("q", "k", "v"))
        if enc.position == "rope":
            theta = enc.rope_local_theta if layer in enc.local_layers else enc.rope_theta
            q, k = self._rope(q, theta), self._rope(k, theta)
        scores = (q @ k.transpose(0, 1, 3, 2)) * np.float32(1.0 / math.sqrt(dim)) + bias
        # NOTE: a padded query far from every real token (local layers) sees no key: its row is all -inf.
        # Its weights become zeros instead of NaN; padded states are never pooled or compared.
        top = scores.max(axis=-1, keepdims=True)
        weights = np.exp(scores - np.where(np.isfinite(top), top, np.float32(0.0)))
        weights = weights / np.maximum(weights.sum(axis=-1, keepdims=True), np.float32(1e-30))
        context = (weights @ v).transpose(0, 2, 1, 3).reshape(batch, width, s.q_size)
        return self._linear(context.astype(np.float32), p + "o")

    def _mlp(self, x: np.ndarray, layer: int) -> np.ndarray:
        p = f"layers.{layer}."
        inner = activation(self.spec.activation, self._linear(x, p + "up")).astype(np.float32)
        if self.encoder.mlp == "geglu":
            inner = (inner * self._linear(x, p + "gate")).astype(np.float32)
        return self._linear(inner, p + "down")

    def encode(self, texts_ids: Sequence[Sequence[int]], token_types: Sequence[Sequence[int]] | None = None
               ) -> EncoderOutput:
        """Token states and pooled embeddings of several token-id sequences, right-padded into one batch."""
        s, enc = self.spec, self.encoder
        if not texts_ids or any(len(ids) == 0 for ids in texts_ids):
            raise UsageError("encode takes one or more non-empty sequences of token ids")
        width = max(len(ids) for ids in texts_ids)
        if enc.position_offset + width > s.max_position_embeddings:
            raise UsageError(f"a sequence of {width} tokens exceeds the model's "
                             f"{s.max_position_embeddings - enc.position_offset} positions")
        batch = len(texts_ids)
        ids = np.zeros((batch, width), dtype=np.int64)
        types = np.zeros((batch, width), dtype=np.int64)
        mask = np.zeros((batch, width), dtype=bool)
        for b, seq in enumerate(texts_ids):
            ids[b, : len(seq)] = np.asarray(seq, dtype=np.int64)
            mask[b, : len(seq)] = True
            if token_types is not None:
                types[b, : len(seq)] = np.asarray(token_types[b], dtype=np.int64)
        if ids.min() < 0 or ids.max() >= s.vocab_size:
            raise UsageError(f"token ids must be in [0, {s.vocab_size}), got {ids.min()}..{ids.max()}")
        if token_types is not None and (types.min() < 0 or types.max() >= max(enc.type_vocab_size, 1)):
            raise UsageError(f"token type ids must be in [0, {enc.type_vocab_size})")
        x = self._w("embed")[ids]
        if enc.position == "absolute":
            x = x + self._w("pos_embed")[enc.position_offset + np.arange(width, dtype=np.int64)][None]
        if enc.type_vocab_size:
            x = x + self._w("type_embed")[types]
        x = self._norm(x.astype(np.float32), "embed_norm")
        # Padded keys are masked: no real token attends to them (a padded query still sees the real keys).
        full_bias = self._attention_bias(mask, None)
        local_bias = self._attention_bias(mask, enc.local_window) if enc.local_layers else full_bias
        for i in range(s.num_layers):
            p = f"layers.{i}."
            bias = local_bias if i in enc.local_layers else full_bias
            if enc.layout == "pre_ln":
                h = x if i == 0 else self._norm(x, p + "attn_norm")  # ModernBERT's layer 0 has no attn_norm
                x = (x + self._attention(h, bias, i)).astype(np.float32)
                x = (x + self._mlp(self._norm(x, p + "mlp_norm"), i)).astype(np.float32)
            else:
                x = self._norm(x + self._attention(x, bias, i), p + "attn_output_norm")
                x = self._norm(x + self._mlp(x, i), p + "output_norm")
        if enc.layout == "pre_ln":
            x = self._norm(x, "final_norm")
        return EncoderOutput(hidden=x, mask=mask, embeddings=pool(x, mask, enc.pooling))
