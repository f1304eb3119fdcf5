"""The numpy reference: an fp32 forward pass of the canonical spec with a KV cache.

It is the oracle every target is checked against, and is itself checked against Hugging Face transformers
(see tests/test_reference_oracle.py). It follows transformers' arithmetic: float32 everywhere, rotate-half
rotary embeddings, softmax in float32.

Rotary embeddings (LongRoPE's switch included) are ``sovpack.rope``'s.

Weights are read lazily from the memory-mapped checkpoint. Small models keep their float32 copies (fast
decode); models whose float32 weights exceed ``cache_budget_bytes`` (default: an eighth of the machine's memory)
re-read each tensor per forward pass, so memory stays bounded by the largest tensor whatever the model size.

A mixture-of-experts layer (``spec.moe``) routes each token as transformers does (see ``route``) and runs each
expert only on the tokens routed to it, so unrouted experts are never read.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from sovpack._io import machine_memory
from sovpack._protocols import PromptRun, RunnerTraits
from sovpack.errors import UsageError
from sovpack.rope import RopeTable
from sovpack.source.model import SourceModel
from sovpack.source.spec import MoESpec

CACHE_MEMORY_SHARE = 0.125  # of the machine's memory: float32 weights kept across passes up to this


def soft_cap(x: np.ndarray, cap: float | None) -> np.ndarray:
    """cap * tanh(x / cap) in float32 (Gemma 2's attention and final-logit soft-capping); x unchanged if None."""
    if cap is None:
        return x
    return (np.tanh(x / np.float32(cap)) * np.float32(cap)).astype(np.float32)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    variance = np.mean(np.square(x), axis=-1, keepdims=True, dtype=np.float32)
    return (x / np.sqrt(variance + np.float32(eps))).astype(np.float32) * weight


def activation(kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "silu":
        with np.errstate(over="ignore"):  # exp(-x) overflows to inf for x < -88: x / inf is the exact -0.0
            return x / (np.float32(1.0) + np.exp(-x))
    if kind == "gelu_tanh":
        c = np.float32(math.sqrt(2.0 / math.pi))
        return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(c * (x + np.float32(0.044715) * x**3)))
    if kind == "gelu":
        return (np.float32(0.5) * x * (np.float32(1.0) + erf(x / np.float32(math.sqrt(2.0))))).astype(np.float32)
    raise ValueError(f"unknown activation {kind!r}")


def erf(x: np.ndarray) -> np.ndarray:
    """erf to ~1e-7 absolute (Abramowitz & Stegun 7.1.26, in float64): numpy has none and scipy is no dependency."""
    z = np.abs(x.astype(np.float64))
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return (np.sign(x) * (1.0 - poly * np.exp(-z * z))).astype(np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in float32."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def route(logits: np.ndarray, moe: MoESpec) -> tuple[np.ndarray, np.ndarray]:
    """Chosen experts [tokens, k] (best first) and their routing weights [tokens, k] from router logits
    [tokens, num_experts], as transformers routes: softmax over all experts, top-k of those probabilities,
    renormalised when ``norm_topk_prob`` (Qwen3-MoE, Mixtral); or top-k logits, softmax over them (gpt-oss)."""
    k = moe.experts_per_token
    scores = logits if moe.router_softmax == "after_topk" else softmax(logits)
    # NOTE: ties keep the lower expert index first (stable sort); exact ties do not occur with real-valued logits
    chosen = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
    top = np.take_along_axis(scores, chosen, axis=-1)
    if moe.router_softmax == "after_topk":
        return chosen, softmax(top)
    if moe.norm_topk_prob:
        top = top / top.sum(axis=-1, keepdims=True)
    return chosen, top.astype(np.float32)


def router_gap(logits: np.ndarray, moe: MoESpec) -> np.ndarray:
    """Per token, how near its routing came to a flip: k-th minus (k+1)-th largest logit over the largest |logit|."""
    # NOTE: on logits for both router kinds (softmax is monotone; a target's rounding moves logits), relative to
    # the token's scale like parity's max_rel (its near-tie margin derives from it). At most 2; 2 if all route.
    k = moe.experts_per_token
    if k >= logits.shape[-1]:
        return np.full(logits.shape[:-1], 2.0, dtype=np.float32)
    ranked = -np.partition(-logits, (k - 1, k), axis=-1)
    scale = np.maximum(np.abs(logits).max(axis=-1), np.finfo(np.float32).tiny)
    return ((ranked[..., k - 1] - ranked[..., k]) / scale).astype(np.float32)


def rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _pack(x: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    """x [B, T, H] as the [rows, H] of its real tokens (flat indices ``rows``; None: every slot is real)."""
    return x if rows is None else x.reshape(-1, x.shape[-1])[rows]


def _unpack(y: np.ndarray, rows: np.ndarray | None, like: np.ndarray) -> np.ndarray:
    """``_pack``'s inverse for a product's output: [B, T, out] with zeros in the padding slots."""
    if rows is None:
        return y
    out = np.zeros((like.size // like.shape[-1], y.shape[-1]), dtype=y.dtype)
    out[rows] = y
    return out.reshape(*like.shape[:-1], y.shape[-1])


@dataclass
class KVCache:
    """Per-layer keys and values [batch, kv_heads, slots, head_dim], and each slot's position ([batch, slots]).

    A slot's position is -1 where a shorter sequence of a batch has padding: such slots are never attended.
    """

    keys: list[np.ndarray] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)
    positions: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))

    @property
    def length(self) -> int:
        return int(self.positions.shape[1])


class ReferenceModel:
    """fp32 numpy forward pass over a SourceModel; a parity Runner without a tokenizer.

    ``forward_batch`` runs several sequences at once (right-padded, each at its own positions), so one pass
    over the weights serves every parity prompt: each layer's weights are read once per step for the batch.
    """

    name = "numpy-reference"
    traits = RunnerTraits()
    router_gaps: np.ndarray | None = None  # the last forward pass's smallest router_gap per token [B, T] (MoE)
    # Called with (tensor name, input) before every linear layer ("lm_head" for the head): calibration.
    observer: Callable[[str, np.ndarray], None] | None = None

    def __init__(
        self,
        model: SourceModel,
        *,
        weight_dtype: np.dtype | type | None = None,
        cache_budget_bytes: int | None = None,
    ) -> None:
        if model.spec.encoder is not None:
            raise UsageError(f"{model.path}: {model.spec.family} is an embedding encoder, not a decoder")
        self.model = model
        self.spec = model.spec
        self.weight_dtype = np.dtype(weight_dtype) if weight_dtype is not None else None
        fp32_bytes = 4 * self.spec.parameter_count()
        budget = int(CACHE_MEMORY_SHARE * machine_memory()) if cache_budget_bytes is None else cache_budget_bytes
        self._cache_weights = fp32_bytes <= budget
        self._weights: dict[str, np.ndarray] = {}
        self._all_cast = False
        self.rope_tables = {kind: RopeTable.of(self.spec, local=kind == "local") for kind in ("global", "local")}

    def runtime_info(self) -> dict[str, str]:
        info = {"runtime": self.name, "numpy": np.__version__, "python": platform.python_version()}
        if self.weight_dtype is not None:
            info["weight_dtype"] = str(self.weight_dtype)
        return info

    def tokenize(self, text: str) -> list[int] | None:
        """The reference compares token ids; it carries no tokenizer of its own."""
        return None

    def close(self) -> None:
        self._weights.clear()
        self._all_cast = False

    def _cast_all(self) -> None:
        """Every weight's float32 copy made at once, before the first pass, when they are kept.

        NOTE: cast lazily, each on both cores between the matrix products of the first pass, they competed with
        OpenBLAS's threads (which spin between products): the 0.6B reference took 7.0-10.0 s, 5.8-6.4 s this way."""
        if self._cache_weights and not self._all_cast:
            for name in self.spec.tensor_shapes():
                self._w(name)
            self._all_cast = True

    def _w(self, name: str) -> np.ndarray:
        cached = self._weights.get(name)
        if cached is not None:
            return cached
        array = self.model.tensor(name, np.float32)
        if self.weight_dtype is not None:
            array = array.astype(self.weight_dtype).astype(np.float32)
        if self._cache_weights:
            self._weights[name] = array
        return array

    def _linear(self, x: np.ndarray, name: str, bias: str | None = None) -> np.ndarray:
        if self.observer is not None:
            self.observer(name, x)
        # One matrix product over every row: numpy would run a [B, T, H] input as B separate products
        y = (x.reshape(-1, x.shape[-1]) @ self._w(name).T).reshape(*x.shape[:-1], -1)
        if bias is not None:
            y = y + self._w(bias)
        return y.astype(np.float32, copy=False)  # the product is already a new float32 array

    def _gated(self, h: np.ndarray, p: str, expert: MoESpec | None = None) -> np.ndarray:
        """The gated MLP ``down(act(gate(h)) * up(h))`` whose gate/up/down tensors are named ``p`` + gate etc.

        ``expert``: the layer's MoESpec when this is a routed expert (its biases and clamped SwiGLU apply)."""
        biased = expert is not None and expert.expert_bias
        gate = self._linear(h, p + "gate", p + "gate_bias" if biased else None)
        up = self._linear(h, p + "up", p + "up_bias" if biased else None)
        if expert is not None and expert.swiglu_limit is not None:
            limit = np.float32(expert.swiglu_limit)
            gate = np.minimum(gate, limit)
            up = np.clip(up, -limit, limit)
            with np.errstate(over="ignore"):
                glu = gate / (np.float32(1.0) + np.exp(-gate * np.float32(expert.swiglu_alpha)))
            gated = glu * (up + np.float32(expert.swiglu_up_offset))
        else:
            gated = activation(self.spec.activation, gate) * up
        return self._linear(gated.astype(np.float32), p + "down", p + "down_bias" if biased else None)

    def _experts(self, h: np.ndarray, p: str) -> np.ndarray:
        """The mixture of experts on h [..., hidden]: each expert runs on the tokens routed to it only, its
        output weighted by their routing weights (transformers' order: act(gate) * up, down, then the weight)."""
        moe = self.spec.moe
        if moe is None:
            raise ValueError("the spec has no mixture of experts")
        flat = h.reshape(-1, h.shape[-1])
        logits = self._linear(flat, p + "router", p + "router_bias" if moe.router_bias else None)
        chosen, weights = route(logits, moe)
        gaps = router_gap(logits, moe).reshape(h.shape[:-1])
        self.router_gaps = gaps if self.router_gaps is None else np.minimum(self.router_gaps, gaps)
        out = np.zeros_like(flat)
        for expert in np.unique(chosen):
            rows, slot = np.nonzero(chosen == expert)  # a token picks an expert at most once: rows are unique
            out[rows] += self._gated(flat[rows], f"{p}experts.{int(expert)}.", moe) * weights[rows, slot, None]
        if moe.shared_expert_intermediate_size is not None:
            shared = self._gated(flat, p + "shared_expert.")
            if moe.shared_expert_gate:
                score = self._linear(flat, p + "shared_expert_gate")
                shared = shared * (np.float32(1.0) / (np.float32(1.0) + np.exp(-score)))
            out = out + shared
        return out.reshape(h.shape).astype(np.float32)

    def _rotate(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """Rotate-half rope on the leading ``cos.shape[-1]`` dims of x [batch, heads, T, head_dim]."""
        rotary = cos.shape[-1]
        if rotary == x.shape[-1]:
            return (x * cos + rotate_half(x) * sin).astype(np.float32)
        turned, kept = x[..., :rotary], x[..., rotary:]
        return np.concatenate([turned * cos + rotate_half(turned) * sin, kept], axis=-1).astype(np.float32)

    def _residual(self, x: np.ndarray, out: np.ndarray, post_norm: str) -> np.ndarray:
        """x plus a sublayer's output, after its post norm and residual multiplier where the spec has them."""
        s = self.spec
        if s.post_norms:
            out = rms_norm(out, self._w(post_norm), s.norm_eps)
        if s.residual_multiplier != 1.0:
            out = (out * np.float32(s.residual_multiplier)).astype(np.float32)
        return (x + out).astype(np.float32)

    def _attention_weights(self, scores: np.ndarray, p: str) -> np.ndarray:
        """Softmax of scores [B, heads, T, S] over keys; with attention sinks, each head's sink logit joins the
        denominator (and the max taken for stability) and its column is dropped, as transformers' gpt-oss does."""
        if self.spec.attention_sinks:
            sinks = np.broadcast_to(self._w(p + "sinks")[None, :, None, None], (*scores.shape[:3], 1))
            scores = np.concatenate([scores, sinks.astype(np.float32)], axis=-1)
        scores = scores - scores.max(axis=-1, keepdims=True)
        weights = np.exp(scores)
        weights = weights / weights.sum(axis=-1, keepdims=True)
        return weights[..., :-1] if self.spec.attention_sinks else weights

    def _check_ids(self, ids: np.ndarray) -> None:
        if ids.size == 0:
            raise UsageError("forward takes a non-empty sequence of token ids")
        if ids.min() < 0 or ids.max() >= self.spec.vocab_size:
            raise UsageError(f"token ids must be in [0, {self.spec.vocab_size}), got {ids.min()}..{ids.max()}")

    def forward(self, ids: Sequence[int], cache: KVCache) -> np.ndarray:
        """Logits [T, vocab] for ``ids`` appended after what ``cache`` holds (one sequence); the cache is extended."""
        ids_array = np.asarray(ids, dtype=np.int64)
        if ids_array.ndim != 1:
            raise UsageError("forward takes a 1-D sequence of token ids")
        self._check_ids(ids_array)
        start = int(cache.positions.max()) + 1 if cache.length else 0
        positions = np.arange(start, start + ids_array.size, dtype=np.int64)[None]
        return self.forward_batch(ids_array[None], positions, cache)[0]

    def forward_batch(self, ids: np.ndarray, positions: np.ndarray, cache: KVCache) -> np.ndarray:
        """Logits [B, T, vocab] for ids [B, T] at ``positions`` [B, T] (-1 marks padding), after ``cache``."""
        s = self.spec
        self._check_ids(ids[positions >= 0])
        self._cast_all()
        self.router_gaps = None
        batch, steps = ids.shape
        safe_ids = np.where(positions >= 0, ids, 0)
        # A large model's table is not kept as float32: only the looked-up rows are converted.
        x = self._w("embed")[safe_ids] if self._cache_weights else self.model.rows("embed", safe_ids)
        if s.embedding_multiplier != 1.0:
            x = x * np.float32(s.embedding_multiplier)
        first_pass = not cache.keys
        key_pos = positions if first_pass else np.concatenate([cache.positions, positions], axis=1)
        q_pos = positions[:, :, None]
        k_pos = key_pos[:, None, :]
        causal = (k_pos >= 0) & (k_pos <= q_pos)
        # A padding query attends to nothing real; let it see its own slot so its (discarded) row stays finite.
        own = np.zeros_like(causal)
        own[:, np.arange(steps), key_pos.shape[1] - steps + np.arange(steps)] = True
        own &= (positions < 0)[:, :, None]
        masks: dict[int | None, np.ndarray] = {}
        rope_pos = np.maximum(positions, 0)
        seen = positions.max(axis=1) + 1
        kinds = {s.layer_rope(i) for i in range(s.num_layers)} - {"none"}
        rotations = {kind: self.rope_tables[kind].cos_sin(rope_pos, seen) for kind in kinds}
        group = s.num_heads // s.num_kv_heads
        # Padding slots skip the matrix products (zeros there): a batch of uneven prompts costs its real tokens
        real = np.flatnonzero(positions.reshape(-1) >= 0) if (positions < 0).any() else None
        scale = np.float32(1.0 / math.sqrt(s.head_dim) if s.attention_scale is None else s.attention_scale)
        for i in range(s.num_layers):
            p = f"layers.{i}."
            window = s.layer_window(i)
            if window not in masks:
                allowed = causal if window is None else causal & ((q_pos - k_pos) < window)
                masks[window] = np.where(allowed | own, np.float32(0.0), np.float32(-np.inf))[:, None]
            h = rms_norm(x, self._w(p + "attn_norm"), s.norm_eps) if s.pre_norms else x
            bias = s.qkv_bias
            packed = _pack(h, real)
            q = _unpack(self._linear(packed, p + "q", p + "q_bias" if bias else None), real, h)
            k = _unpack(self._linear(packed, p + "k", p + "k_bias" if bias else None), real, h)
            v = _unpack(self._linear(packed, p + "v", p + "v_bias" if bias else None), real, h)
            if s.qk_norm and s.qk_norm_scope == "projection":
                q = rms_norm(q, self._w(p + "q_norm"), s.norm_eps)
                k = rms_norm(k, self._w(p + "k_norm"), s.norm_eps)
            q = q.reshape(batch, steps, s.num_heads, s.head_dim)
            k = k.reshape(batch, steps, s.num_kv_heads, s.head_dim)
            v = v.reshape(batch, steps, s.num_kv_heads, s.head_dim)
            if s.qk_norm and s.qk_norm_scope == "head":
                q = rms_norm(q, self._w(p + "q_norm"), s.norm_eps)
                k = rms_norm(k, self._w(p + "k_norm"), s.norm_eps)
            q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
            rope = s.layer_rope(i)
            if rope != "none":
                q = self._rotate(q, *rotations[rope])
                k = self._rotate(k, *rotations[rope])
            if first_pass:
                cache.keys.append(k)
                cache.values.append(v)
            else:
                cache.keys[i] = np.concatenate([cache.keys[i], k], axis=2)
                cache.values[i] = np.concatenate([cache.values[i], v], axis=2)
            keys = np.repeat(cache.keys[i], group, axis=1)
            values = np.repeat(cache.values[i], group, axis=1)
            scores = soft_cap((q @ keys.transpose(0, 1, 3, 2)) * scale, s.attn_logit_softcap) + masks[window]
            weights = self._attention_weights(scores, p)
            attn = (weights @ values).transpose(0, 2, 1, 3).reshape(batch, steps, s.q_size)
            out = _unpack(self._linear(_pack(attn, real), p + "o", p + "o_bias" if s.o_bias else None), real, attn)
            x = self._residual(x, out, p + "post_attn_norm")
            h = rms_norm(x, self._w(p + "mlp_norm"), s.norm_eps) if s.pre_norms else x
            mlp = self._experts(h, p) if s.is_sparse(i) else _unpack(self._gated(_pack(h, real), p), real, h)
            x = self._residual(x, mlp, p + "post_mlp_norm")
        cache.positions = key_pos
        x = rms_norm(x, self._w("final_norm"), s.norm_eps)
        head = "embed" if s.tie_word_embeddings else "lm_head"
        packed = _pack(x, real)
        if self.observer is not None:
            self.observer("lm_head", packed)
        logits = _unpack((packed @ self._w(head).T).astype(np.float32), real, x)
        if s.logits_divisor != 1.0:
            logits = (logits / np.float32(s.logits_divisor)).astype(np.float32)
        return soft_cap(logits, s.final_logit_softcap)

    def prefill_logits(self, ids: Sequence[int]) -> np.ndarray:
        return self.forward(ids, KVCache())

    def greedy(self, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
        """Greedy continuation through the KV cache; the stop token, if produced, is included."""
        return self.greedy_batch([ids], max_new_tokens, stop_ids)[0].tokens

    def run_prompts(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int] = ()
    ) -> list[PromptRun]:
        """Every prompt decoded in lockstep (:meth:`greedy_batch`); the prefill logits are its first rows."""
        traces = self.greedy_batch(prompts, max_new_tokens, stop_ids)
        return [PromptRun(logits=t.logits[: len(ids)], tokens=t.tokens) for ids, t in zip(prompts, traces, strict=True)]

    def greedy_batch(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int] = ()
    ) -> list[GreedyTrace]:
        """Greedy continuations of several prompts decoded in lockstep (one batched step per token).

        Each trace holds the generated tokens (a produced stop token included) and the logits rows of the
        prompt followed by the rows that chose tokens 2..n (and their router gaps): what parity records.
        """
        if not (n := len(prompts)):
            return []
        lengths = [len(p) for p in prompts]
        ids, positions = np.zeros((n, max(lengths)), dtype=np.int64), np.full((n, max(lengths)), -1, dtype=np.int64)
        for b, prompt in enumerate(prompts):
            ids[b, : lengths[b]] = np.asarray(prompt, dtype=np.int64)
            positions[b, : lengths[b]] = np.arange(lengths[b])
        logits = self.forward_batch(ids, positions, cache := KVCache())
        rows: list[list[np.ndarray]] = [[logits[b, : lengths[b]]] for b in range(n)]
        gaps = None if (g := self.router_gaps) is None else [[g[b, : lengths[b]]] for b in range(n)]
        last = np.stack([logits[b, lengths[b] - 1] for b in range(n)])
        tokens: list[list[int]] = [[] for _ in prompts]
        active, stop = [max_new_tokens > 0] * n, {int(t) for t in stop_ids}
        for step in range(max_new_tokens):
            for b in (b for b in range(n) if active[b]):
                tokens[b].append(int(np.argmax(last[b])))
                active[b] = tokens[b][-1] not in stop and len(tokens[b]) < max_new_tokens
            if not any(active):
                break
            step_ids = np.array([[tokens[b][-1] if active[b] else 0] for b in range(n)], dtype=np.int64)
            step_pos = np.array([[lengths[b] + step if active[b] else -1] for b in range(n)], dtype=np.int64)
            logits = self.forward_batch(step_ids, step_pos, cache)
            for b in (b for b in range(n) if active[b]):
                rows[b].append(logits[b])
                if gaps is not None and (g := self.router_gaps) is not None:
                    gaps[b].append(g[b])
            last = logits[:, -1]
        return [
            GreedyTrace(tokens=tokens[b], logits=np.concatenate(rows[b], axis=0).astype(np.float32),
                        router_gaps=None if gaps is None else np.concatenate(gaps[b]).astype(np.float32))
            for b in range(n)
        ]


@dataclass(frozen=True, kw_only=True, slots=True)
class GreedyTrace:
    """One prompt's greedy run: generated tokens and the logits rows that produced them (see greedy_batch)."""

    tokens: list[int]
    logits: np.ndarray
    router_gaps: np.ndarray | None = None  # [rows] per logits row, the smallest router_gap; None if dense
