"""gpt-oss: attention with biases on q/k/v/o and a learned per-head sink logit, sliding-window and full layers
alternating, YaRN rope, and a mixture of experts in every layer (router with a bias, softmax over the top-k
logits, experts with biases and a clamped SwiGLU).

Experts are stored fused, as published: bfloat16 ``mlp.experts.gate_up_proj`` [E, H, 2I] ("in x out", gate and
up interleaved column by column) and ``down_proj`` [E, I, H], or MXFP4 ``*_blocks``/``*_scales`` ("out x in");
each expert is read on its own (sovpack.source.fused).
"""

from __future__ import annotations

from typing import Any

from sovpack._io import shorten
from sovpack._protocols import TensorSource
from sovpack.converters.base import (
    ConfigReader,
    DecoderFamily,
    layer_types,
    refuse_partial_rotary,
    register_family,
    standard_tensor_map,
)
from sovpack.converters.moe import expert_count, experts_per_token, sparse_layers
from sovpack.source.spec import LayerType, ModelSpec, MoESpec, RopeScaling

# GptOssConfig's rope when a config names none (gpt-oss-20b/120b publish exactly this): YaRN, 4k -> 128k.
DEFAULT_ROPE = RopeScaling(
    kind="yarn", factor=32.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0, truncate=False
)
MXFP4_GROUP = 32  # values per MXFP4 scale; 16 bytes of blocks per group


@register_family
class GptOssFamily(DecoderFamily):
    name = "gpt_oss"
    architectures = ("GptOssForCausalLM",)
    default_rope_theta = 150000.0  # GptOssConfig.default_theta

    def rope_fields(self, cfg: ConfigReader, common: dict[str, Any]) -> dict[str, Any]:
        refuse_partial_rotary(cfg)
        if cfg.get("rope_parameters") is None and cfg.get("rope_scaling") is None:
            # NOTE: GptOssConfig fills in its YaRN rope, not plain rope, when a config has neither key
            return {"rope_theta": cfg.number("rope_theta", self.default_rope_theta, above=0.0),
                    "rope_scaling": DEFAULT_ROPE}
        theta, scaling = cfg.rope(default_theta=self.default_rope_theta)
        return {"rope_theta": theta, "rope_scaling": scaling}

    def features(self, cfg: ConfigReader, common: dict[str, Any]) -> dict[str, Any]:
        _check_quantization(cfg)
        # NOTE: GptOssConfig's own defaults where a key is absent (the shared reader assumes Llama's)
        heads = common["num_heads"]
        kv_heads = cfg.positive("num_key_value_heads", 8)
        if heads % kv_heads:
            raise cfg.fail(f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})")
        head_dim = cfg.positive("head_dim", 64)
        if head_dim % 2:
            raise cfg.fail(f"'head_dim' ({head_dim}) must be even for rotary embeddings")
        layers = common["num_layers"]
        experts = expert_count(cfg, 128)
        limit = cfg.number("swiglu_limit", 7.0, above=0.0)
        moe = MoESpec(
            num_experts=experts,
            experts_per_token=experts_per_token(cfg, experts, 4),
            # NOTE: gpt-oss's intermediate_size is each expert's width (it has no dense layers)
            expert_intermediate_size=common["intermediate_size"],
            sparse_layers=sparse_layers(cfg, layers, step=1, dense_only=()),
            router_softmax="after_topk",
            router_bias=True,
            expert_bias=True,
            swiglu_limit=limit,
            swiglu_alpha=cfg.number("swiglu_alpha", 1.702, above=0.0),
            swiglu_up_offset=1.0,
        )
        biased = cfg.flag("attention_bias", True)

        def alternating(i: int) -> LayerType:
            return "sliding" if (i + 1) % 2 else "full"  # GptOssConfig: even layers slide, odd ones see all

        types = layer_types(cfg, layers, alternating)
        window: int | None = cfg.positive("sliding_window", 128)
        if "sliding_window" in cfg.config and cfg.config["sliding_window"] is None:
            # NOTE: GptOssConfig keeps a null window; transformers then cannot build the sliding layers' cache
            if "sliding" in types:
                raise cfg.fail("'sliding_window' is null but 'layer_types' has sliding_attention layers")
            window = None
        return {
            "activation": "silu",  # unused: every layer's experts apply the clamped SwiGLU of ``moe``
            "num_kv_heads": kv_heads,
            "head_dim": head_dim,
            "max_position_embeddings": cfg.positive("max_position_embeddings", 131072),
            "norm_eps": cfg.number("rms_norm_eps", 1e-5, above=0.0),
            "qkv_bias": biased,
            "o_bias": biased,
            "attention_sinks": True,
            "sliding_window": window,
            "layer_types": types,
            "moe": moe,
        }

    def tensor_map(self, spec: ModelSpec) -> dict[str, TensorSource]:
        """Canonical names -> the published names, in the spec's order; experts come out of the fused tensors."""
        base = standard_tensor_map(spec)
        if spec.moe is None:
            return base
        m: dict[str, TensorSource] = {}
        for name in spec.tensor_shapes():
            if name in base:
                m[name] = base[name]
                continue
            layer, _, rest = name.removeprefix("layers.").partition(".")
            hf = f"model.layers.{layer}."
            if rest == "o_bias":
                m[name] = TensorSource(name=hf + "self_attn.o_proj.bias")
            elif rest == "sinks":
                m[name] = TensorSource(name=hf + "self_attn.sinks")
            elif rest in ("router", "router_bias"):
                m[name] = TensorSource(name=hf + ("mlp.router.weight" if rest == "router" else "mlp.router.bias"))
            else:
                _, e, part = rest.split(".")  # experts.<e>.<part>
                m[name] = expert_source(spec, spec.moe, hf + "mlp.experts.", int(e), part)
        return m


def expert_source(spec: ModelSpec, moe: MoESpec, experts: str, e: int, part: str) -> TensorSource:
    """Expert ``e``'s ``part`` (gate, up, down or their biases) from the fused tensors under ``experts``.

    bfloat16 (primary): ``gate_up_proj`` [E, H, 2I] is "in x out" with gate in columns 0::2 and up in 1::2, so a
    gate is rows 0::2 of the expert's transpose; ``down_proj`` [E, I, H] transposed. MXFP4 (the alternative, as
    gpt-oss is published): ``*_blocks`` [E, out, in/32, 16] are "out x in", no transpose. Biases are never
    quantized: ``gate_up_proj_bias`` [E, 2I] interleaved the same way, ``down_proj_bias`` [E, H].
    """
    h, inter, n = spec.hidden_size, moe.expert_intermediate_size, moe.num_experts
    half = {"gate": (0, 2 * inter), "up": (1, 2 * inter), "gate_bias": (0, 2 * inter), "up_bias": (1, 2 * inter)}
    if part == "down_bias":
        return TensorSource(name=experts + "down_proj_bias", expert=e, stored_shape=(n, h))
    if part in ("gate_bias", "up_bias"):
        return TensorSource(
            name=experts + "gate_up_proj_bias", expert=e, rows=half[part], row_step=2, stored_shape=(n, 2 * inter)
        )
    fused, rows, step = ("down_proj", None, 1) if part == "down" else ("gate_up_proj", half[part], 2)
    out_in = (h, inter) if part == "down" else (2 * inter, h)
    mxfp4 = None
    if out_in[1] % MXFP4_GROUP == 0:
        mxfp4 = TensorSource(
            name=f"{experts}{fused}_blocks", mxfp4_scales=f"{experts}{fused}_scales", expert=e, rows=rows,
            row_step=step, stored_shape=(n, out_in[0], out_in[1] // MXFP4_GROUP, MXFP4_GROUP // 2),
        )
    return TensorSource(
        name=experts + fused, expert=e, transpose=True, rows=rows, row_step=step,
        stored_shape=(n, out_in[1], out_in[0]), alternative=mxfp4,
    )


def _check_quantization(cfg: ConfigReader) -> None:
    """Only MXFP4 experts (how gpt-oss is published) are read; any other quantization is refused by name."""
    raw = cfg.get("quantization_config")
    if raw is None:
        return
    sub = cfg.child("quantization_config", raw)
    method = sub.string("quant_method", None)
    if method != "mxfp4":
        raise cfg.fail(
            f"{sub.name('quant_method')} {shorten(method)} is not supported for gpt-oss; supported: mxfp4 (experts "
            "as *_blocks/*_scales, as published) or no quantization_config (bfloat16 experts)"
        )
    modules = sub.get("modules_to_not_convert", [])
    if not isinstance(modules, list) or not all(isinstance(x, str) for x in modules):
        raise cfg.fail(f"{sub.name('modules_to_not_convert')} must be a list of strings, got {shorten(modules)}")

