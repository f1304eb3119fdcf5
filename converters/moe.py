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

    NOTE: this is the published layout, which transformers 5 also writes by default (``save_original_format``).
    Each entry's ``alternative`` is transformers 5's in-memory layout, which ``save_original_format=False``
    writes: ``mlp.gate.weight`` and every expert fused (``fused_expert_sources``); a checkpoint in that layout is
    read from it (``converters.base.stored_layout``).
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
        hf, c, fused = f"{prefix}layers.{layer}.{block}.", f"layers.{layer}.", f"{prefix}layers.{layer}.mlp."
        moved = None if block == "mlp" else TensorSource(name=f"{fused}{router}.weight")
        m[c + "router"] = TensorSource(name=f"{hf}{router}.weight", alternative=moved)
        if moe.router_bias:
            moved = None if block == "mlp" else TensorSource(name=f"{fused}{router}.bias")
            m[c + "router_bias"] = TensorSource(name=f"{hf}{router}.bias", alternative=moved)
        for e in range(moe.num_experts):
            alternatives = fused_expert_sources(spec, moe, f"{fused}experts.", e)
            for canonical in ("gate", "up", "down"):
                m[f"{c}experts.{e}.{canonical}"] = TensorSource(
                    name=f"{hf}experts.{e}.{expert[canonical]}.weight", alternative=alternatives[canonical]
                )
    return m


def fused_expert_sources(spec: ModelSpec, moe: MoESpec, experts: str, e: int) -> dict[str, TensorSource]:
    """Expert ``e`` in transformers 5's fused layout (Qwen3-MoE, Mixtral, ...): ``{experts}gate_up_proj``
    [E, 2I, H] with every gate row before every up row, and ``{experts}down_proj`` [E, H, I]; "out x in" as
    ``nn.Linear`` stores weights, so nothing is transposed."""
    h, inter, n = spec.hidden_size, moe.expert_intermediate_size, moe.num_experts
    gate_up = experts + "gate_up_proj"
    fused = (n, 2 * inter, h)
    return {
        "gate": TensorSource(name=gate_up, expert=e, rows=(0, inter), stored_shape=fused),
        "up": TensorSource(name=gate_up, expert=e, rows=(inter, 2 * inter), stored_shape=fused),
        "down": TensorSource(name=experts + "down_proj", expert=e, stored_shape=(n, h, inter)),
    }


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


def expert_count(cfg: ConfigReader, default: int, *, minimum: int = 1) -> int:
    """The number of experts: ``num_local_experts`` or ``num_experts`` (``default``: the config class's).

    NOTE: transformers' MoE configs alias the two (``attribute_map``) and save whichever name the class keeps:
    Qwen3-30B-A3B's hub config says num_experts, transformers 5 writes num_local_experts for the same model.
    """
    local = cfg.integer("num_local_experts", default, minimum=minimum)
    other = cfg.integer("num_experts", default, minimum=minimum)
    if cfg.get("num_local_experts") is not None and cfg.get("num_experts") is not None and local != other:
        raise cfg.fail(f"'num_local_experts' ({local}) and 'num_experts' ({other}) disagree")
    return local if cfg.get("num_local_experts") is not None else other


def experts_per_token(cfg: ConfigReader, num_experts: int, default: int) -> int:
    """``num_experts_per_tok`` (``default``: the config class's), at most the number of experts."""
    k = cfg.positive("num_experts_per_tok", default)
    if k > num_experts:
        raise cfg.fail(f"'num_experts_per_tok' ({k}) is more than the number of experts ({num_experts})")
    return k
