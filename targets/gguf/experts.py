"""Mixture-of-experts feed-forwards in llama.cpp: what each architecture computes, and its stacked tensors.

llama.cpp stores a sparse layer as a router ``blk.N.ffn_gate_inp`` [E, H] and one stacked tensor per projection,
``ffn_gate_exps`` / ``ffn_up_exps`` [E, I, H] and ``ffn_down_exps`` [E, H, I] (numpy order; ggml's ne is the
reverse), plus [E, I] / [E, H] expert biases for gpt-oss. Each stacked tensor is produced here from the
canonical per-expert tensors (``layers.<i>.experts.<e>.gate``), one expert at a time, so the writer streams
it with about one expert in memory however the source stores the experts (per expert, fused, MXFP4).

What llama.cpp computes is fixed in each architecture's graph (``build_moe_ffn`` arguments), not read from
the file: ``qwen3moe`` and ``llama`` take a softmax over every expert, the top-k and *always* renormalise them
(norm_w = true, no expert_weights_norm key is read); ``gpt-oss`` takes the top-k of the biased logits and a
softmax over those k (SOFTMAX_WEIGHT) with its clamped SwiGLU (``swiglu_oai``: alpha 1.702, limit 7, up + 1,
compiled in). No architecture here has shared experts or dense layers beside sparse ones. ``check_moe``
refuses a spec that would compute something else, naming the difference.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np

from sovpack.errors import ConversionError
from sovpack.source.model import SourceModel
from sovpack.source.spec import ModelSpec, RouterSoftmax

# llama.cpp's compiled-in gpt-oss activation (llama-graph.cpp, LLM_FFN_SWIGLU_OAI_MOE; ggml_swiglu_oai adds 1 to up).
SWIGLU_OAI_ALPHA = 1.702
SWIGLU_OAI_LIMIT = 7.0
SWIGLU_OAI_UP_OFFSET = 1.0
# llama-hparams.h: LLAMA_MAX_EXPERTS
MAX_EXPERTS = 1024


@dataclass(frozen=True, kw_only=True, slots=True)
class MoEPlan:
    """The mixture-of-experts feed-forward a llama.cpp architecture's graph computes (fixed, not read)."""

    router_softmax: RouterSoftmax  # SOFTMAX: "before_topk"; SOFTMAX_WEIGHT: "after_topk"
    norm_topk: bool  # build_moe_ffn's norm_w: the chosen weights are divided by their sum
    biases: bool  # the arch requires router and expert biases (ffn_gate_inp.bias, ffn_*_exps.bias)
    swiglu_oai: bool  # the clamped SwiGLU with llama.cpp's constants
    # Where the arch reads each expert's width: feed_forward_length (llama) or expert_feed_forward_length.
    width_key: Literal["feed_forward_length", "expert_feed_forward_length"]


def check_moe(spec: ModelSpec, plan: MoEPlan | None, arch: str) -> None:
    """Refuse, naming the difference, a spec whose feed-forward llama.cpp's ``arch`` would compute differently."""
    where = f"{spec.family} ({spec.architecture})"
    moe = spec.moe
    if plan is None:
        if moe is not None:
            raise ConversionError(f"{where}: a mixture-of-experts feed-forward; llama.cpp's {arch} has none")
        return
    if moe is None:
        raise ConversionError(f"{where}: no mixture-of-experts layers; llama.cpp's {arch} requires experts")
    dense = [i for i in range(spec.num_layers) if i not in moe.sparse_layers]
    if dense:
        # NOTE: llama.cpp's qwen3moe and llama (with experts) create ffn_*_exps for every layer; neither
        # builds a dense MLP beside sparse ones (Qwen3-MoE's mlp_only_layers / decoder_sparse_step > 1).
        raise ConversionError(
            f"{where}: dense feed-forward layers {dense} beside sparse ones (mlp_only_layers / "
            f"decoder_sparse_step); llama.cpp's {arch} makes every layer a mixture of experts"
        )
    if not 0 < moe.experts_per_token <= moe.num_experts <= MAX_EXPERTS:
        raise ConversionError(
            f"{where}: {moe.experts_per_token} of {moe.num_experts} experts per token; llama.cpp supports up to "
            f"{MAX_EXPERTS} experts"
        )
    if moe.router_softmax != plan.router_softmax:
        raise ConversionError(
            f"{where}: router softmax {moe.router_softmax}; llama.cpp's {arch} takes it {plan.router_softmax}"
        )
    if plan.router_softmax == "before_topk" and moe.norm_topk_prob != plan.norm_topk:
        state = "renormalised" if moe.norm_topk_prob else "not renormalised"
        raise ConversionError(
            f"{where}: top-k routing weights {state} (norm_topk_prob={moe.norm_topk_prob}); llama.cpp's {arch} "
            f"{'always' if plan.norm_topk else 'never'} renormalises them"
        )
    if moe.shared_expert_intermediate_size is not None:
        raise ConversionError(f"{where}: a shared expert; llama.cpp's {arch} has none")
    for name, has in (("router bias", moe.router_bias), ("expert biases", moe.expert_bias)):
        if has and not plan.biases:
            raise ConversionError(f"{where}: {name}; llama.cpp's {arch} has none")
    _check_swiglu(spec, plan, where, arch)


def _check_swiglu(spec: ModelSpec, plan: MoEPlan, where: str, arch: str) -> None:
    moe = spec.moe
    assert moe is not None
    if not plan.swiglu_oai:
        if moe.swiglu_limit is not None:
            raise ConversionError(f"{where}: a clamped SwiGLU; llama.cpp's {arch} computes a plain one")
        return
    ours = (moe.swiglu_alpha, moe.swiglu_limit, moe.swiglu_up_offset)
    theirs = (SWIGLU_OAI_ALPHA, SWIGLU_OAI_LIMIT, SWIGLU_OAI_UP_OFFSET)
    if not all(a is not None and math.isclose(a, b, rel_tol=1e-6) for a, b in zip(ours, theirs, strict=True)):
        raise ConversionError(
            f"{where}: SwiGLU alpha / limit / up offset {ours}; llama.cpp's {arch} compiles in {theirs}"
        )


def expert_blocks(model: SourceModel, layer: int, proj: str) -> Iterator[np.ndarray]:
    """A stacked [E, rows, cols] tensor as E float32 blocks of [rows, cols], one expert read at a time."""
    moe = model.spec.moe
    assert moe is not None
    names = [f"layers.{layer}.experts.{e}.{proj}" for e in range(moe.num_experts)]
    for name in names:
        # NOTE: SourceModel.tensor, not the row-block reader: an expert may be a slice of a fused (or MXFP4)
        # source tensor, which only the source layer knows how to produce.
        yield model.tensor(name, np.float32)
    # NOTE: the stacked tensor is written: its experts' mapped pages need not stay resident (as the other targets
    # do per tensor). Once per stacked tensor, not per expert: each release drops the whole shard's mapping, and
    # pages dropped between neighbouring experts would be faulted in again.
    for name in names:
        model.release_pages(name)


def expert_bias_blocks(model: SourceModel, layer: int, proj: str, width: int) -> Iterator[np.ndarray]:
    """A stacked [E, width] bias as one [E, width] block (zeros when the spec has no expert biases)."""
    moe = model.spec.moe
    assert moe is not None
    if not moe.expert_bias:
        yield np.zeros((moe.num_experts, width), dtype=np.float32)
        return
    yield np.stack([model.tensor(f"layers.{layer}.experts.{e}.{proj}_bias") for e in range(moe.num_experts)])


def router_bias_block(model: SourceModel, layer: int) -> Iterator[np.ndarray]:
    """The router bias [E] (zeros when the spec has none: the arch requires the tensor)."""
    moe = model.spec.moe
    assert moe is not None
    if moe.router_bias:
        yield model.tensor(f"layers.{layer}.router_bias")
    else:
        yield np.zeros((moe.num_experts,), dtype=np.float32)
