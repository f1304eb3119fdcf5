"""Mixture-of-experts helpers shared by the MoE families: which layers are sparse, top-k checks, and the tensor
map with one canonical tensor per expert."""

from __future__ import annotations

from sovpack._protocols import TensorSource
from sovpack.converters.base import MAX_DERIVED_LAYERS, ConfigReader, standard_tensor_map
from sovpack.source.spec import ModelSpec, MoESpec


def moe_tensor_map(
    spec: ModelSpec, block: str, *, router: str, expert: dict[str, str], prefix: str = "model."
) -> dict[str, TensorSource]:
    """``standard_tensor_map`` with each sparse layer's dense MLP replaced by its router and per-expert
    projections, in HF order: ``{prefix}layers.<i>.{block}.{router}.weight`` and
    ``{prefix}layers.<i>.{block}.experts.<e>.{expert[canonical]}.weight`` for canonical gate/up/down.

    NOTE: this is the per-expert layout transformers 5 writes by default (``save_original_format``), one source
    tensor per canonical tensor. Its fused in-memory layout (``experts.gate_up_proj`` [E, 2I, H]) would need an
    expert index in TensorSource and is refused by name when the checkpoint is opened (sovpack.source.model).
    """
    dense = standard_tensor_map(spec, prefix=prefix)
    if spec.moe is None:
        return dense
    moe: MoESpec = spec.moe
    m: dict[str, TensorSource] = {}
    for name, source in dense.items():
        layer, _, rest = name.removeprefix("layers.").partition(".")
        if not name.startswith("layers.") or rest not in ("gate", "up", "down") or not spec.is_sparse(int(layer)):
            m[name] = source
            continue
        if rest != "gate":
            continue  # the whole block is emitted once, where the dense gate was
        hf, c = f"{prefix}layers.{layer}.{block}.", f"layers.{layer}."
        m[c + "router"] = TensorSource(name=f"{hf}{router}.weight")
        if moe.router_bias:
            m[c + "router_bias"] = TensorSource(name=f"{hf}{router}.bias")
        for e in range(moe.num_experts):
            for canonical in ("gate", "up", "down"):
                m[f"{c}experts.{e}.{canonical}"] = TensorSource(name=f"{hf}experts.{e}.{expert[canonical]}.weight")
    return m


def sparse_layers(cfg: ConfigReader, num_layers: int, *, step: int, dense_only: tuple[int, ...]) -> tuple[int, ...]:
    """Layers whose feed-forward is the mixture of experts: every ``step``-th one (1-based) outside
    ``dense_only`` (Qwen-MoE's ``decoder_sparse_step`` and ``mlp_only_layers``)."""
    if num_layers > MAX_DERIVED_LAYERS:
        raise cfg.fail(f"'num_hidden_layers' ({num_layers}) is beyond any real model (at most "
                       f"{MAX_DERIVED_LAYERS} layers)")
    outside = sorted({i for i in dense_only if i >= num_layers})
    if outside:
        raise cfg.fail(f"'mlp_only_layers' names layer {outside[0]} but 'num_hidden_layers' is {num_layers}")
    return tuple(i for i in range(num_layers) if i not in dense_only and (i + 1) % step == 0)


def experts_per_token(cfg: ConfigReader, num_experts: int, default: int) -> int:
    """``num_experts_per_tok`` (``default``: the config class's), at most the number of experts."""
    k = cfg.positive("num_experts_per_tok", default)
    if k > num_experts:
        raise cfg.fail(f"'num_experts_per_tok' ({k}) is more than the number of experts ({num_experts})")
    return k
