"""Rotary position embeddings as transformers computes them: frequencies per scaling kind, cos/sin tables.

Shared by the numpy reference and the graph builders that bake frequencies into an artifact.

NOTE: LongRoPE (Phi-3.5 / Phi-4-mini) switches exactly as transformers' ``dynamic_rope_update`` does: each forward
pass rotates all of its positions with the long factors when the largest position it sees is at or beyond
``original_max_position_embeddings`` (it "sees" that many positions), else with the short ones -- per sequence
here, as if each sequence of a batch ran alone. Keys already in the KV cache keep the rotation they were stored
with (transformers' cache does not re-rotate them), so a decode that crosses the switch attends from long-rotated
queries to short-rotated keys of the prompt, exactly as transformers generates; a runtime that instead picks the
factors from its context size (llama.cpp) matches only while prompt and generation stay on one side of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sovpack.source.spec import ModelSpec


def _default_inv_freq(dim: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """base ** (2i / dim) and its inverse, [dim/2], in float32 as transformers computes them."""
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    pos_freqs = np.power(np.float32(base), exponents, dtype=np.float32)
    return pos_freqs, (np.float32(1.0) / pos_freqs).astype(np.float32)


def rope_inv_freq(spec: ModelSpec, *, local: bool = False, long: bool = False) -> tuple[np.ndarray, float]:
    """Inverse frequencies [rotary_size/2] and the cos/sin scale of one rotary embedding of the spec.

    ``local``: the sliding layers' embedding (``rope_local_theta``, never scaled) where the spec has one.
    ``long``: longrope's long-context factors instead of the short ones (see the module docstring).
    """
    dim = spec.rotary_size
    if local and spec.rope_local_theta is not None:
        return _default_inv_freq(dim, spec.rope_local_theta)[1], 1.0
    base = spec.rope_theta
    pos_freqs, inv_freq = _default_inv_freq(dim, base)
    scaling = spec.rope_scaling
    if scaling.kind == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32), 1.0
    if scaling.kind == "llama3":
        if not (scaling.low_freq_factor and scaling.high_freq_factor and scaling.original_max_position_embeddings):
            raise ValueError("llama3 rope scaling needs low/high_freq_factor and original_max_position_embeddings")
        factor = scaling.factor
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = (2 * math.pi / inv_freq).astype(np.float32)
        scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq).astype(np.float32)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    if scaling.kind == "yarn":
        factor = scaling.factor
        original = scaling.original_max_position_embeddings or spec.max_position_embeddings
        attention = scaling.attention_factor
        if attention is None:
            attention = 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low = correction_dim(scaling.beta_fast or 32.0)
        high = correction_dim(scaling.beta_slow or 1.0)
        if scaling.truncate is not False:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
        extrapolation_factor = 1 - ramp
        interpolation = (np.float32(1.0) / (np.float32(factor) * pos_freqs)).astype(np.float32)
        blended = interpolation * (1 - extrapolation_factor) + inv_freq * extrapolation_factor
        return blended.astype(np.float32), float(attention)
    if scaling.kind == "longrope":
        factors = scaling.long_factor if long else scaling.short_factor
        if factors is None or len(factors) != dim // 2 or scaling.attention_factor is None:
            raise ValueError(f"longrope needs {dim // 2} short and long factors and a resolved attention factor")
        ext = np.asarray(factors, dtype=np.float32)
        return (np.float32(1.0) / (ext * pos_freqs)).astype(np.float32), scaling.attention_factor
    return inv_freq, 1.0


@dataclass(frozen=True, kw_only=True, slots=True)
class RopeTable:
    """One rotary embedding as the forward pass applies it: frequencies and cos/sin scale, plus longrope's
    long-context frequencies, used by a pass that sees more than ``long_after`` positions."""

    inv_freq: np.ndarray
    scale: float
    long_inv_freq: np.ndarray | None = None
    long_after: int | None = None

    @classmethod
    def of(cls, spec: ModelSpec, *, local: bool) -> RopeTable:
        inv_freq, scale = rope_inv_freq(spec, local=local)
        if spec.rope_scaling.kind != "longrope" or (local and spec.rope_local_theta is not None):
            return cls(inv_freq=inv_freq, scale=scale)
        return cls(
            inv_freq=inv_freq,
            scale=scale,
            long_inv_freq=rope_inv_freq(spec, local=local, long=True)[0],
            long_after=spec.rope_scaling.original_max_position_embeddings,
        )

    def cos_sin(self, positions: np.ndarray, seen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin [batch, 1, T, rotary] at ``positions`` [batch, T]; ``seen`` [batch]: how many positions
        each sequence's forward pass sees (its largest position + 1), which picks longrope's factors."""
        inv = self.inv_freq[None]
        if self.long_inv_freq is not None and self.long_after is not None:
            inv = np.where((seen > self.long_after)[:, None], self.long_inv_freq[None], inv)
        freqs = positions.astype(np.float32)[..., None] * inv[:, None, :]
        emb = np.concatenate([freqs, freqs], axis=-1)
        cos = (np.cos(emb) * np.float32(self.scale)).astype(np.float32)[:, None]
        sin = (np.sin(emb) * np.float32(self.scale)).astype(np.float32)[:, None]
        return cos, sin
