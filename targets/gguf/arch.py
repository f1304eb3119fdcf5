"""Which llama.cpp architecture runs each source family, and what that architecture assumes of the model.

llama and mistral -> ``llama``; qwen2, qwen3, phi3, gemma -> their own llama.cpp architectures. llama.cpp's
``llama`` architecture applies RoPE to interleaved pairs (x[2i], x[2i+1]) while Hugging Face rotates halves
(x[i], x[i + d/2]), so q and k rows are permuted for it (``tensors.permute_rope_rows``); the other four use
NEOX-style RoPE (halves) and need no permutation. Phi-3 stores ``attn_qkv`` = [q; k; v] and ``ffn_up`` =
[gate; up]. Gemma's canonical norm weights already include its +1 offset, which is what llama.cpp's gemma
expects; it scales embeddings by sqrt(hidden) itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sovpack.errors import ConversionError
from sovpack.source.spec import ModelSpec


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
    activation: str = "silu"
    embedding_scale: str | None = None  # "sqrt_hidden": the arch scales embeddings by sqrt(hidden) itself


ARCHES: dict[str, ArchPlan] = {
    "llama": ArchPlan(arch="LLAMA", permute_qk=True, rope_freqs=True),
    "mistral": ArchPlan(arch="LLAMA", permute_qk=True, rope_freqs=True),
    "qwen2": ArchPlan(arch="QWEN2", q_is_hidden=True),
    "qwen3": ArchPlan(arch="QWEN3"),
    "phi3": ArchPlan(arch="PHI3", fused_qkv=True, fused_gate_up=True, q_is_hidden=True),
    "gemma": ArchPlan(arch="GEMMA", always_tied=True, activation="gelu_tanh", embedding_scale="sqrt_hidden"),
}

# The model families (ModelSpec.family) the gguf target can write: exactly those with an architecture above.
FAMILIES: frozenset[str] = frozenset(ARCHES)


def plan_for(family: str) -> ArchPlan:
    """The llama.cpp architecture of a family, or a ConversionError naming the family."""
    plan = ARCHES.get(family)
    if plan is None:
        raise ConversionError(f"family {family!r} has no GGUF mapping; supported: {', '.join(ARCHES)}")
    return plan


def arch_plan(spec: ModelSpec) -> ArchPlan:
    """The llama.cpp architecture for a spec, or a ConversionError naming what llama.cpp cannot run."""
    plan = plan_for(spec.family)
    where = f"{spec.family} ({spec.architecture})"
    if spec.activation != plan.activation:
        raise ConversionError(
            f"{where}: activation {spec.activation!r}; llama.cpp's {plan.arch.lower()} computes {plan.activation}"
        )
    if spec.norm_kind != "rms":
        raise ConversionError(f"{where}: norm {spec.norm_kind!r} is not supported")
    if plan.q_is_hidden and spec.q_size != spec.hidden_size:
        raise ConversionError(
            f"{where}: heads x head_dim = {spec.q_size} differs from hidden_size {spec.hidden_size}, which "
            f"llama.cpp's {plan.arch.lower()} architecture assumes"
        )
    if plan.always_tied and not spec.tie_word_embeddings:
        raise ConversionError(f"{where}: an untied output head; llama.cpp's {plan.arch.lower()} always ties it")
    expected_scale = math.sqrt(spec.hidden_size) if plan.embedding_scale == "sqrt_hidden" else 1.0
    if not math.isclose(spec.embedding_multiplier, expected_scale, rel_tol=1e-6):
        raise ConversionError(
            f"{where}: embedding multiplier {spec.embedding_multiplier}; llama.cpp's {plan.arch.lower()} uses "
            f"{expected_scale}"
        )
    if spec.qk_norm != (plan.arch == "QWEN3"):
        raise ConversionError(f"{where}: q/k norm = {spec.qk_norm} does not fit llama.cpp's {plan.arch.lower()}")
    scaling = spec.rope_scaling
    if scaling.kind == "llama3" and not plan.rope_freqs:
        raise ConversionError(f"{where}: Llama 3 RoPE scaling needs rope_freqs, which {plan.arch.lower()} lacks")
    if scaling.kind == "yarn" and scaling.truncate is False:
        raise ConversionError(
            f"{where}: YaRN with truncate=false; llama.cpp always rounds the correction range to whole dims"
        )
    return plan
