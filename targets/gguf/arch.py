"""Which llama.cpp architecture runs each source family, and what that architecture assumes of the model.

llama and mistral -> ``llama``; qwen2, qwen3, phi3 (and phi3_longrope), gemma, gemma2, gemma3, olmo2, granite,
smollm3 -> llama.cpp's architectures of those names. llama.cpp's ``llama``, ``granite`` and ``smollm3``
architectures apply RoPE to interleaved pairs (x[2i], x[2i+1]) while Hugging Face rotates halves (x[i],
x[i + d/2]), so q and k rows are permuted for them (``tensors.permute_rope_rows``); the others use NEOX-style
RoPE (halves) and need no permutation. Phi-3 stores ``attn_qkv`` = [q; k; v] and ``ffn_up`` = [gate; up].
Gemma's canonical norm weights already include its +1 offset, which is what llama.cpp's gemma architectures
expect; they scale embeddings by sqrt(hidden) themselves.

Mixture-of-experts families (``experts``): qwen3_moe -> ``qwen3moe``, mixtral -> ``llama`` with expert_count
and stacked ``ffn_*_exps`` (as llama.cpp's own converter writes it), gpt_oss -> ``gpt-oss`` (attention sinks,
q/k/v/o biases, router and expert biases, an explicit sliding-window layer pattern, its pre-MLP norm stored as
``post_attention_norm``).

Much of what llama.cpp computes is fixed per architecture rather than read from the file (the attention scale of
gemma2/gemma3, smollm3's NoPE interval, gemma2/gemma3's default sliding-window pattern, which norms exist, how
experts are routed, gpt-oss's SwiGLU clamp, YaRN's correction range rounded to whole dims): ``arch_plan``
refuses a spec that differs from what the architecture will compute, naming the difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from sovpack.errors import ConversionError
from sovpack.source.spec import ModelSpec
from sovpack.targets.gguf.experts import MoEPlan, check_moe


@dataclass(frozen=True, kw_only=True, slots=True)
class ArchPlan:
    """How one source family maps onto a llama.cpp architecture."""

    arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool = False  # llama.cpp's arch uses interleaved-pair RoPE
    fused_qkv: bool = False
    fused_gate_up: bool = False
    rope_freqs: bool = False  # reads rope_freqs.weight (Llama 3 scaling)
    q_is_hidden: bool = False  # the arch sizes attn_q / attn_output as hidden x hidden
    always_tied: bool = False
    never_tied: bool = False  # the arch requires output.weight
    activation: str = "silu"
    embedding_scale: str | None = None  # "sqrt_hidden": the arch scales embeddings by sqrt(hidden) itself
    norm_placement: Literal["pre", "sandwich", "post"] = "pre"
    qk_norm: Literal["head", "projection"] | None = None
    # The arch applies sliding windows, with this default layer pattern period (llama.cpp's set_swa_pattern:
    # layer i slides when i % period < period - 1); None: the arch ignores windows (context capped instead).
    swa_period: int | None = None
    swa_required: bool = False  # the arch always runs a window (gemma2: 4096 when the file names none)
    local_rope: bool = False  # sliding layers rotate with rope.freq_base_swa, unscaled (gemma3)
    multipliers: bool = False  # granite: embedding / residual / attention / logit scale keys
    no_rope_step: int | None = None  # smollm3: layer i has no rope when (i + 1) % step == 0
    attn_softcap: bool = False  # gemma2: attention logits always soft-capped (required)
    final_softcap: Literal["required", "optional"] | None = None
    longrope: bool = False  # rope_factors_long / rope_factors_short tensors (phi3)
    partial_rotary: bool = False  # rope.dimension_count may be below head_dim
    moe: MoEPlan | None = None  # the arch's mixture-of-experts feed-forward (see experts)
    mlp_norm_tensor: str | None = None  # gguf.MODEL_TENSOR of the pre-MLP norm; None: ffn_norm
    qkv_bias: bool = False  # the arch loads q/k/v biases (checked in parity)
    o_bias: bool = False  # the arch requires attn_output.bias
    sinks: bool = False  # the arch requires per-head attention sinks (attn_sinks)
    swa_pattern_key: bool = False  # the arch reads an explicit per-layer sliding_window_pattern array

    @property
    def name(self) -> str:
        """llama.cpp's name of the architecture (general.architecture): gguf.MODEL_ARCH_NAMES spelling."""
        return self.arch.lower().replace("_", "-")


ARCHES: dict[str, ArchPlan] = {
    "llama": ArchPlan(arch="LLAMA", permute_qk=True, rope_freqs=True),
    "mistral": ArchPlan(arch="LLAMA", permute_qk=True, rope_freqs=True),
    "qwen2": ArchPlan(arch="QWEN2", q_is_hidden=True, qkv_bias=True),
    "qwen3": ArchPlan(arch="QWEN3", qk_norm="head"),
    "phi3": ArchPlan(arch="PHI3", fused_qkv=True, fused_gate_up=True, q_is_hidden=True, qkv_bias=True),
    "phi3_longrope": ArchPlan(
        arch="PHI3",
        fused_qkv=True,
        fused_gate_up=True,
        q_is_hidden=True,
        qkv_bias=True,
        longrope=True,
        partial_rotary=True,
    ),
    "gemma": ArchPlan(arch="GEMMA", always_tied=True, activation="gelu_tanh", embedding_scale="sqrt_hidden"),
    "gemma2": ArchPlan(
        arch="GEMMA2",
        always_tied=True,
        activation="gelu_tanh",
        embedding_scale="sqrt_hidden",
        norm_placement="sandwich",
        swa_period=2,
        swa_required=True,
        attn_softcap=True,
        final_softcap="required",
    ),
    "gemma3": ArchPlan(
        arch="GEMMA3",
        activation="gelu_tanh",
        embedding_scale="sqrt_hidden",
        norm_placement="sandwich",
        qk_norm="head",
        swa_period=6,
        local_rope=True,
        final_softcap="optional",
    ),
    "olmo2": ArchPlan(arch="OLMO2", q_is_hidden=True, never_tied=True, norm_placement="post", qk_norm="projection"),
    "granite": ArchPlan(arch="GRANITE", permute_qk=True, multipliers=True),
    "smollm3": ArchPlan(arch="SMOLLM3", permute_qk=True, no_rope_step=4),
    # Mixture of experts (see experts): softmax over all experts, top-k, always renormalised.
    "qwen3_moe": ArchPlan(
        arch="QWEN3MOE",
        qk_norm="head",
        moe=MoEPlan(
            router_softmax="before_topk",
            norm_topk=True,
            biases=False,
            swiglu_oai=False,
            width_key="expert_feed_forward_length",
        ),
    ),
    # llama.cpp's own converter writes Mixtral as ``llama`` with expert_count and ffn_*_exps.
    "mixtral": ArchPlan(
        arch="LLAMA",
        permute_qk=True,
        rope_freqs=True,
        moe=MoEPlan(
            router_softmax="before_topk",
            norm_topk=True,
            biases=False,
            swiglu_oai=False,
            width_key="feed_forward_length",
        ),
    ),
    # gpt-oss: top-k of the biased router logits then a softmax over those k, the clamped SwiGLU, attention
    # sinks, q/k/v/o biases, sliding and full layers (an explicit per-layer pattern), and the pre-MLP norm
    # stored as post_attention_norm.
    "gpt_oss": ArchPlan(
        arch="GPT_OSS",
        never_tied=True,
        swa_period=2,
        swa_pattern_key=True,
        swa_required=True,
        mlp_norm_tensor="ATTN_POST_NORM",
        qkv_bias=True,
        o_bias=True,
        sinks=True,
        moe=MoEPlan(
            router_softmax="after_topk",
            norm_topk=False,
            biases=True,
            swiglu_oai=True,
            width_key="expert_feed_forward_length",
        ),
    ),
}

# The model families (ModelSpec.family) the gguf target writes: those whose artifacts pass parity in llama.cpp
# at f32 and at the default precision on their fixtures (tests/targets/test_gguf.py). A family mapped above but
# not listed here is refused by name.
FAMILIES: frozenset[str] = frozenset(
    {
        *("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "granite", "olmo2", "smollm3", "gemma2", "gemma3"),
        *("qwen3_moe", "mixtral", "gpt_oss"),
    }
)


def plan_for(family: str) -> ArchPlan:
    """The llama.cpp architecture of a family, or a ConversionError naming the family."""
    plan = ARCHES.get(family) if family in FAMILIES else None
    if plan is None:
        raise ConversionError(f"family {family!r} has no GGUF mapping; supported: {', '.join(sorted(FAMILIES))}")
    return plan


def derived_attention_scale(spec: ModelSpec, plan: ArchPlan) -> float:
    """The q.k multiplier llama.cpp computes for this arch when the file carries no attention scale."""
    if plan.arch in ("GEMMA2", "GEMMA3") and spec.num_layers == (46 if plan.arch == "GEMMA2" else 62):
        # llama.cpp's gemma2/gemma3 treat the 27B layer count as the 27B model: 1/sqrt(hidden / heads)
        return 1.0 / math.sqrt(spec.hidden_size / spec.num_heads)
    return 1.0 / math.sqrt(spec.head_dim)


def swa_layers(spec: ModelSpec, period: int) -> tuple[bool, ...]:
    """llama.cpp's default sliding-window pattern for ``period`` (layer i slides when i % period < period - 1)."""
    return tuple(i % period < period - 1 for i in range(spec.num_layers))


def yarn_correction_range(spec: ModelSpec) -> tuple[float, float]:
    """YaRN's unrounded correction range (low, high) in rotary dims, from beta_fast / beta_slow."""
    s = spec.rope_scaling
    dim = spec.rotary_size
    original = s.original_max_position_embeddings or spec.max_position_embeddings

    def corr(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(spec.rope_theta))

    return corr(s.beta_fast or 32.0), corr(s.beta_slow or 1.0)


def arch_plan(spec: ModelSpec) -> ArchPlan:
    """The llama.cpp architecture for a spec, or a ConversionError naming what llama.cpp cannot run."""
    plan = plan_for(spec.family)
    _check_layout(spec, plan)
    _check_scalars(spec, plan)
    _check_attention(spec, plan)
    _check_rope(spec, plan)
    check_moe(spec, plan.moe, plan.name)
    return plan


def _where(spec: ModelSpec, plan: ArchPlan) -> tuple[str, str]:
    return f"{spec.family} ({spec.architecture})", plan.name


def _check_layout(spec: ModelSpec, plan: ArchPlan) -> None:
    where, arch = _where(spec, plan)
    if spec.activation != plan.activation:
        raise ConversionError(f"{where}: activation {spec.activation!r}; llama.cpp's {arch} computes {plan.activation}")
    if spec.norm_kind != "rms":
        raise ConversionError(f"{where}: norm {spec.norm_kind!r} is not supported")
    if spec.norm_placement != plan.norm_placement:
        raise ConversionError(
            f"{where}: {spec.norm_placement!r} sublayer norms; llama.cpp's {arch} has {plan.norm_placement!r} norms"
        )
    if plan.q_is_hidden and spec.q_size != spec.hidden_size:
        raise ConversionError(
            f"{where}: heads x head_dim = {spec.q_size} differs from hidden_size {spec.hidden_size}, which "
            f"llama.cpp's {arch} architecture assumes"
        )
    if plan.always_tied and not spec.tie_word_embeddings:
        raise ConversionError(f"{where}: an untied output head; llama.cpp's {arch} always ties it")
    if plan.never_tied and spec.tie_word_embeddings:
        raise ConversionError(f"{where}: a tied output head; llama.cpp's {arch} requires output.weight")
    scope = spec.qk_norm_scope if spec.qk_norm else None
    if scope != plan.qk_norm:
        raise ConversionError(f"{where}: q/k norm {scope or 'absent'}; llama.cpp's {arch} has {plan.qk_norm or 'none'}")
    if spec.qkv_bias and not plan.qkv_bias:
        raise ConversionError(f"{where}: q/k/v biases; llama.cpp's {arch} is not checked with them")
    if spec.o_bias != plan.o_bias:
        raise ConversionError(
            f"{where}: {'an' if spec.o_bias else 'no'} attention output bias; llama.cpp's {arch} "
            f"{'requires' if plan.o_bias else 'is not checked with'} one"
        )
    if spec.attention_sinks != plan.sinks:
        raise ConversionError(
            f"{where}: {'' if spec.attention_sinks else 'no '}attention sinks; llama.cpp's {arch} "
            f"{'requires them' if plan.sinks else 'has none'}"
        )


def _check_scalars(spec: ModelSpec, plan: ArchPlan) -> None:
    where, arch = _where(spec, plan)
    expected_scale = math.sqrt(spec.hidden_size) if plan.embedding_scale == "sqrt_hidden" else 1.0
    if not plan.multipliers:
        if not math.isclose(spec.embedding_multiplier, expected_scale, rel_tol=1e-6):
            raise ConversionError(
                f"{where}: embedding multiplier {spec.embedding_multiplier}; llama.cpp's {arch} uses {expected_scale}"
            )
        for name, value in (("residual multiplier", spec.residual_multiplier), ("logits divisor", spec.logits_divisor)):
            if value != 1.0:
                raise ConversionError(f"{where}: {name} {value}; llama.cpp's {arch} has none")
    if spec.attn_logit_softcap is not None and not plan.attn_softcap:
        raise ConversionError(f"{where}: attention logit soft-capping; llama.cpp's {arch} does not apply it")
    if plan.attn_softcap and spec.attn_logit_softcap is None:
        raise ConversionError(f"{where}: no attention logit soft-capping; llama.cpp's {arch} always applies it")
    if spec.final_logit_softcap is not None and plan.final_softcap is None:
        raise ConversionError(f"{where}: final logit soft-capping; llama.cpp's {arch} does not apply it")
    if plan.final_softcap == "required" and spec.final_logit_softcap is None:
        raise ConversionError(f"{where}: no final logit soft-capping; llama.cpp's {arch} always applies it")


def _check_attention(spec: ModelSpec, plan: ArchPlan) -> None:
    where, arch = _where(spec, plan)
    if spec.attention_scale is not None and not plan.multipliers:
        derived = derived_attention_scale(spec, plan)
        if not math.isclose(spec.attention_scale, derived, rel_tol=1e-6):
            raise ConversionError(
                f"{where}: attention scale {spec.attention_scale:.6g} (query_pre_attn_scalar / attention "
                f"multiplier); llama.cpp's {arch} derives {derived:.6g} and reads no key for it"
            )
    sliding = tuple(spec.layer_window(i) is not None for i in range(spec.num_layers))
    if plan.swa_period is None:
        return  # the window is not applied: the writer caps the context at it (see writer.context_length)
    if plan.swa_required and not any(sliding):
        raise ConversionError(f"{where}: no sliding-window layers; llama.cpp's {arch} always runs its window pattern")
    if any(sliding) and not plan.swa_pattern_key and sliding != swa_layers(spec, plan.swa_period):
        pattern = "".join("S" if s else "F" for s in sliding)
        raise ConversionError(
            f"{where}: sliding/full layer pattern {pattern}; llama.cpp's {arch} assumes every "
            f"{plan.swa_period}th layer full and the others sliding"
        )


def _check_rope(spec: ModelSpec, plan: ArchPlan) -> None:
    where, arch = _where(spec, plan)
    scaling = spec.rope_scaling
    if scaling.kind == "llama3" and not plan.rope_freqs:
        raise ConversionError(f"{where}: Llama 3 RoPE scaling needs rope_freqs, which {arch} lacks")
    if scaling.kind == "longrope" and not plan.longrope:
        raise ConversionError(f"{where}: LongRoPE scaling; llama.cpp's {arch} has no rope factor tensors for it")
    # NOTE: YaRN with truncate=false (every gpt-oss) is written although llama.cpp cannot compute it exactly:
    # no key or tensor moves llama.cpp's ramp ends off whole dims (ggml_rope_yarn_corr_dims floors and ceils them;
    # gpt-oss's graph takes no rope factors), so the frequencies inside the ramp differ slightly from the
    # source's and the angle error grows with the position. llama.cpp's own converter writes these models the
    # same way; the target publishes the parity limits this costs (target.parity_limits) and says so in the notes.
    if spec.rotary_size != spec.head_dim and not plan.partial_rotary:
        raise ConversionError(
            f"{where}: partial rotary ({spec.rotary_size} of {spec.head_dim}); llama.cpp's {arch} rotates whole heads"
        )
    expected_nope = (
        tuple(i for i in range(spec.num_layers) if (i + 1) % plan.no_rope_step == 0) if plan.no_rope_step else ()
    )
    if tuple(sorted(spec.no_rope_layers)) != expected_nope:
        raise ConversionError(
            f"{where}: layers without rope {list(spec.no_rope_layers)}; llama.cpp's {arch} has "
            f"{list(expected_nope) or 'none'}"
        )
    sliding = any(spec.layer_type(i) == "sliding" for i in range(spec.num_layers))
    if spec.rope_local_theta is not None and not plan.local_rope:
        raise ConversionError(f"{where}: a separate rope base for sliding layers; llama.cpp's {arch} has none")
    if plan.local_rope and sliding and spec.rope_local_theta is None and scaling.kind != "none":
        raise ConversionError(
            f"{where}: sliding layers with scaled rope; llama.cpp's {arch} never scales its sliding layers' rope"
        )
    if plan.local_rope and sliding and scaling.kind not in ("none", "linear"):
        # NOTE: llama.cpp's gemma3 unscales only the frequencies of sliding layers; a YaRN attention factor
        # would still reach them, where the source rotates them plainly.
        raise ConversionError(
            f"{where}: {scaling.kind} rope scaling with sliding layers; llama.cpp's {arch} "
            "would apply its attention factor to the sliding layers too"
        )
