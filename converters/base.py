"""What a model family provides, the family registry, and config-reading helpers shared by families."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, TypeVar, cast

from sovpack._io import shorten
from sovpack._plugins import Plugins, import_submodules
from sovpack._protocols import Family, TensorSource
from sovpack.errors import SourceError
from sovpack.source.spec import Activation, LayerType, ModelSpec, RopeScaling


def _discover_families() -> None:
    import_submodules("sovpack.converters", skip=("base",))


FAMILIES: Plugins[Family] = Plugins("model family", _discover_families)

F = TypeVar("F")


def register_family(cls: type[F]) -> type[F]:
    """Class decorator: instantiate a family and register it under its ``name``."""
    instance = cast(Family, cls())
    FAMILIES.add(instance.name, instance)
    return cls


def load_families() -> None:
    """Import every family module now (reading ``FAMILIES`` does it on first use)."""
    FAMILIES.discover()


class DecoderFamily:
    """Base for Llama-like families: common config fields, rope fields, plus what ``features`` adds or overrides."""

    name: str = ""
    architectures: tuple[str, ...] = ()
    default_rope_theta: float = 10000.0  # the family config class's default when a config names no rope base

    def features(self, cfg: ConfigReader, common: dict[str, Any]) -> dict[str, Any]:
        """Family-specific spec fields (activation, biases, norms, ...); may override ``common`` entries, and
        ``family`` where one architecture maps to two spec families (Phi-3 short / long context)."""
        return {"activation": cfg.activation("hidden_act", default="silu")}

    def rope_fields(self, cfg: ConfigReader, common: dict[str, Any]) -> dict[str, Any]:
        """rope_theta and rope_scaling (and for some families more rope fields) from either config dialect."""
        theta, scaling = cfg.rope(default_theta=self.default_rope_theta)
        refuse_partial_rotary(cfg)
        return {"rope_theta": theta, "rope_scaling": scaling}

    def build_spec(self, config: Mapping[str, Any], where: str) -> ModelSpec:
        cfg = ConfigReader(config, where)
        common = common_spec_fields(cfg)
        common.update(self.rope_fields(cfg, common))
        return ModelSpec(**{"family": self.name, **common, **self.features(cfg, common)})

    def tensor_map(self, spec: ModelSpec) -> dict[str, TensorSource]:
        return standard_tensor_map(spec)


def family_for_config(config: Mapping[str, Any], where: str) -> Family:
    """Pick the family from ``architectures`` (or ``model_type``); the error lists what is supported."""
    cfg = ConfigReader(config, where)
    archs = cfg.strings("architectures")
    model_type = cfg.string("model_type", None)
    for _, family in FAMILIES:
        if any(a in family.architectures for a in archs) or (not archs and model_type == family.name):
            return family
    supported = ", ".join(dict.fromkeys(a for _, f in FAMILIES for a in f.architectures))
    shown = [a if len(a) <= 80 else a[:77] + "..." for a in archs[:3]] + (["..."] if len(archs) > 3 else [])
    found = ", ".join(shown) if archs else f"model_type {shorten(model_type)}"
    raise SourceError(f"{where}: unsupported architecture {found}; supported: {supported}")


# NOTE: bounds for config values. No real model comes near 2**31 in any dimension, position count or window,
# and every runtime stores these as 32-bit (GGUF) or 64-bit (ONNX) integers. Values are checked against the
# stored weights later (open_model); these bounds only keep arithmetic on them cheap and exact.
MAX_CONFIG_INT = 2**31 - 1
# Floats feed float32 arithmetic (reference, ONNX, OpenVINO): anything past float32's range is infinity there.
FLOAT32_MAX = 3.4028234663852886e38


class ConfigReader:
    """Typed, range-checked access to a HF config, with errors that name the file and key.

    Every check on config values lives here, so each family reads values the same way: integers are real
    integers (not booleans, floats or strings) within bounds, numbers are finite and within float32's range,
    token ids lie inside the vocabulary. A JSON ``null`` counts as absent. ``prefix`` names a nested object
    (``rope_scaling.``) in messages.
    """

    def __init__(self, config: Mapping[str, Any], where: str, prefix: str = "") -> None:
        if not isinstance(config, Mapping):
            what = repr(prefix.rstrip(".")) if prefix else "the config"
            raise SourceError(f"{where}: {what} must be a JSON object, got {shorten(config)}")
        self.config = config
        self.where = where
        self.prefix = prefix

    def fail(self, problem: str) -> SourceError:
        return SourceError(f"{self.where}: {problem}")

    def child(self, key: str, value: Any) -> ConfigReader:
        """A reader for a nested object (its keys named ``key.name`` in messages)."""
        return ConfigReader(value, self.where, f"{self.prefix}{key}.")

    def name(self, key: str) -> str:
        return repr(self.prefix + key)

    def get(self, key: str, default: Any = None) -> Any:
        value = self.config.get(key)
        return default if value is None else value

    def integer(
        self, key: str, default: int | None = None, *, minimum: int = 0, maximum: int = MAX_CONFIG_INT,
        integral_float: bool = False,
    ) -> int:
        value = self.get(key, default)
        if value is None:
            raise self.fail(f"missing required key {self.name(key)}")
        if integral_float and isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"{self.name(key)} must be an integer, got {shorten(value)}")
        if not minimum <= value <= maximum:
            raise self.fail(f"{self.name(key)} must be an integer from {minimum} to {maximum}, got {shorten(value)}")
        return value

    def positive(self, key: str, default: int | None = None, *, integral_float: bool = False) -> int:
        return self.integer(key, default, minimum=1, integral_float=integral_float)

    def optional_positive(self, key: str) -> int | None:
        return None if self.get(key) is None else self.positive(key)

    def number(self, key: str, default: float | None = None, *, above: float | None = None) -> float:
        """A finite number (within float32's range), greater than ``above`` when given."""
        value = self.get(key, default)
        if value is None:
            raise self.fail(f"missing required key {self.name(key)}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(f"{self.name(key)} must be a number, got {shorten(value)}")
        # NOTE: compared as given: float() of a huge int would raise OverflowError
        if abs(value) > FLOAT32_MAX or not math.isfinite(value):
            raise self.fail(f"{self.name(key)} must be a finite number within float32's range, got {shorten(value)}")
        if above is not None and not value > above:
            raise self.fail(f"{self.name(key)} must be greater than {above:g}, got {shorten(value)}")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(f"{self.name(key)} must be true or false, got {shorten(value)}")
        return value

    def string(self, key: str, default: str | None) -> str | None:
        value = self.get(key, default)
        if value is not None and not isinstance(value, str):
            raise self.fail(f"{self.name(key)} must be a string, got {shorten(value)}")
        return value

    def strings(self, key: str) -> tuple[str, ...]:
        value = self.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(f"{self.name(key)} must be a list of strings, got {shorten(value)}")
        return tuple(value)

    def integers(self, key: str, *, maximum: int = MAX_CONFIG_INT) -> tuple[int, ...]:
        """A list of integers from 0 to ``maximum`` (absent or null: empty)."""
        value = self.get(key, [])
        if not isinstance(value, list):
            raise self.fail(f"{self.name(key)} must be a list of integers, got {shorten(value)}")
        items = self.child(key, {str(i): v for i, v in enumerate(value)})
        return tuple(items.integer(str(i), maximum=maximum) for i in range(len(value)))

    def numbers(self, key: str, length: int, *, above: float) -> tuple[float, ...]:
        """A list of exactly ``length`` finite numbers, each greater than ``above``."""
        value = self.get(key)
        if value is None:
            raise self.fail(f"missing required key {self.name(key)}")
        if not isinstance(value, list) or len(value) != length:
            raise self.fail(f"{self.name(key)} must be a list of {length} numbers, got {shorten(value)}")
        items = self.child(key, {str(i): v for i, v in enumerate(value)})
        return tuple(items.number(str(i), above=above) for i in range(length))

    def token_ids(self, key: str, vocab_size: int) -> tuple[int, ...]:
        """A token id or a list of them (``key`` absent or null: none), each inside the vocabulary."""
        value = self.get(key)
        if value is None:
            return ()
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise self.fail(f"{self.name(key)} must be a token id or a list of them, got {shorten(value)}")
        outside = [v for v in values if not 0 <= v < vocab_size]
        if outside:
            raise self.fail(
                f"{self.name(key)}: token id {shorten(outside[0])} is outside the vocabulary (0 to {vocab_size - 1})"
            )
        return tuple(values)

    def rope(self, *, default_theta: float = 10000.0) -> tuple[float, RopeScaling]:
        """rope theta and scaling from either dialect: transformers 4 (``rope_theta`` + ``rope_scaling``) or
        transformers 5 (``rope_parameters``)."""
        theta, sub = self.rope_section(default_theta=default_theta)
        return theta, self.scaling(sub, theta)

    def rope_section(self, *, default_theta: float) -> tuple[float, ConfigReader | None]:
        """The rope base and the object holding the rope type and scaling keys (None: no scaling)."""
        params = self.get("rope_parameters")
        if params is not None:
            sub = self.child("rope_parameters", params)
            if params and all(isinstance(v, Mapping) for v in params.values()):
                raise self.fail("per-layer-type 'rope_parameters' are not supported for this family")
            return sub.number("rope_theta", self.number("rope_theta", default_theta), above=0.0), sub
        theta = self.number("rope_theta", default_theta, above=0.0)
        raw = self.get("rope_scaling")
        return theta, None if raw is None else self.child("rope_scaling", raw)

    def rope_type(self) -> str:
        """The rope type (``rope_type``, or the legacy ``type``) of a rope scaling object."""
        return self.string("rope_type", self.string("type", "default")) or "default"

    def scaling(self, sub: ConfigReader | None, theta: float) -> RopeScaling:
        """Rope scaling from a ``rope_scaling`` / ``rope_parameters`` object (None: no scaling)."""
        if sub is None:
            return RopeScaling()
        kind = sub.rope_type()
        if kind == "default":
            return RopeScaling()
        if kind == "linear":
            return RopeScaling(kind="linear", factor=sub.number("factor", above=0.0))
        if kind == "llama3":
            low = sub.number("low_freq_factor", above=0.0)
            high = sub.number("high_freq_factor", above=0.0)
            if not high > low:
                raise self.fail(
                    f"{sub.name('high_freq_factor')} ({high:g}) must be greater than {sub.name('low_freq_factor')} "
                    f"({low:g}) for llama3 rope scaling"
                )
            return RopeScaling(
                kind="llama3",
                factor=sub.number("factor", above=0.0),
                low_freq_factor=low,
                high_freq_factor=high,
                original_max_position_embeddings=sub.positive("original_max_position_embeddings", integral_float=True),
            )
        if kind == "yarn":
            return self._yarn(sub, theta)
        if kind in ("longrope", "su"):
            raise self.fail(f"rope scaling {kind!r} is only supported for Phi-3 (Phi3ForCausalLM) checkpoints")
        raise self.fail(
            f"rope scaling {shorten(kind)} is not supported; supported: default, linear, llama3, yarn"
        )

    def _yarn(self, sub: ConfigReader, theta: float) -> RopeScaling:
        if sub.get("mscale") not in (None, 1, 1.0) or sub.get("mscale_all_dim") not in (None, 0, 0.0):
            raise self.fail("yarn rope scaling with 'mscale'/'mscale_all_dim' (DeepSeek style) is not supported")
        if not theta > 1.0:
            # YaRN's correction ranges divide by log(theta)
            raise self.fail(f"yarn rope scaling needs a rope theta greater than 1, got {theta:g}")
        max_positions = self.positive("max_position_embeddings", 2048)
        original = (
            None if sub.get("original_max_position_embeddings") is None
            else sub.positive("original_max_position_embeddings", integral_float=True)
        )
        # NOTE: without a factor, YaRN's is the context extension itself
        factor = max_positions / original if sub.get("factor") is None and original else sub.number("factor", above=0.0)
        attention = None if sub.get("attention_factor") is None else sub.number("attention_factor", above=0.0)
        truncate = None if sub.get("truncate") is None else sub.flag("truncate", True)
        return RopeScaling(
            kind="yarn",
            factor=factor,
            original_max_position_embeddings=original,
            beta_fast=sub.number("beta_fast", 32.0, above=0.0),
            beta_slow=sub.number("beta_slow", 1.0, above=0.0),
            attention_factor=attention,
            truncate=truncate,
        )

    def activation(self, *keys: str, default: str) -> Activation:
        key = next((k for k in keys if self.get(k) is not None), None)
        raw = default if key is None else self.get(key)
        mapping: dict[str, Activation] = {
            "silu": "silu",
            "swish": "silu",
            "gelu_pytorch_tanh": "gelu_tanh",
            "gelu_new": "gelu_tanh",
            "gelu_fast": "gelu_tanh",
            "gelu": "gelu",
        }
        if not isinstance(raw, str) or raw not in mapping:
            name = self.name(key) if key is not None else "activation"
            raise self.fail(f"{name}: activation {shorten(raw)} is not supported; supported: {', '.join(mapping)}")
        return mapping[raw]

    def source_dtype(self) -> str:
        key = "dtype" if self.get("dtype") is not None else "torch_dtype"
        return self.string(key, "float32") or "float32"


def check_generation_config(config: Mapping[str, Any], vocab_size: int, where: str) -> None:
    """generation_config.json's special token ids (runtimes stop on them) lie inside the vocabulary."""
    cfg = ConfigReader(config, where)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        cfg.token_ids(key, vocab_size)


def standard_tensor_map(
    spec: ModelSpec, *, prefix: str = "model.", norm_offset: float = 0.0, head: str = "lm_head.weight"
) -> dict[str, TensorSource]:
    """The Llama-style HF tensor layout most families share, with the sublayer norms ``spec.norm_placement``
    implies: Llama's pre norms (``input_layernorm``, ``post_attention_layernorm``), Gemma 2/3's sandwich
    (``input_layernorm``, ``post_attention_layernorm``, ``pre_feedforward_layernorm``,
    ``post_feedforward_layernorm``) or OLMo 2's post norms (``post_attention_layernorm``,
    ``post_feedforward_layernorm``). In HF order, so streaming writers read the shards front to back."""
    hf_norms = {
        "pre": {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
        "sandwich": {
            "attn_norm": "input_layernorm",
            "post_attn_norm": "post_attention_layernorm",
            "mlp_norm": "pre_feedforward_layernorm",
            "post_mlp_norm": "post_feedforward_layernorm",
        },
        "post": {"post_attn_norm": "post_attention_layernorm", "post_mlp_norm": "post_feedforward_layernorm"},
    }[spec.norm_placement]

    def norm(hf_name: str) -> TensorSource:
        return TensorSource(name=hf_name, add=norm_offset)

    m: dict[str, TensorSource] = {"embed": TensorSource(name=f"{prefix}embed_tokens.weight")}
    for i in range(spec.num_layers):
        hf = f"{prefix}layers.{i}."
        c = f"layers.{i}."
        if "attn_norm" in hf_norms:
            m[c + "attn_norm"] = norm(f"{hf}{hf_norms['attn_norm']}.weight")
        for proj in ("q", "k", "v", "o"):
            m[c + proj] = TensorSource(name=f"{hf}self_attn.{proj}_proj.weight")
        if spec.qkv_bias:
            for proj in ("q", "k", "v"):
                m[c + proj + "_bias"] = TensorSource(name=f"{hf}self_attn.{proj}_proj.bias")
        if spec.qk_norm:
            m[c + "q_norm"] = norm(hf + "self_attn.q_norm.weight")
            m[c + "k_norm"] = norm(hf + "self_attn.k_norm.weight")
        for canonical in ("post_attn_norm", "mlp_norm"):
            if canonical in hf_norms:
                m[c + canonical] = norm(f"{hf}{hf_norms[canonical]}.weight")
        for proj in ("gate", "up", "down"):
            m[c + proj] = TensorSource(name=f"{hf}mlp.{proj}_proj.weight")
        if "post_mlp_norm" in hf_norms:
            m[c + "post_mlp_norm"] = norm(f"{hf}{hf_norms['post_mlp_norm']}.weight")
    m["final_norm"] = norm(f"{prefix}norm.weight")
    if not spec.tie_word_embeddings:
        m["lm_head"] = TensorSource(name=head)
    return m


# transformers renames these checkpoint prefixes of vision-language models saved before 4.52 on load
# (conversion_mapping.py, "llava" style): the language model's tensors and its head.
LEGACY_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)


def stored_layout(tensor_map: dict[str, TensorSource], stored: Mapping[str, Any]) -> dict[str, TensorSource]:
    """The tensor map in the layout the checkpoint stores: as mapped; or, when only the legacy names exist, with
    LEGACY_PREFIXES applied; or each entry's ``alternative`` (e.g. experts fused, or MXFP4 blocks, where the map
    names them per expert or in bfloat16). Every name or none, so one checkpoint never mixes layouts; when no
    layout is complete, the one missing fewest tensors (the mapped one on a tie), so errors name what is missing.
    """

    def missing(layout: dict[str, TensorSource]) -> int:
        return sum(
            name not in stored for source in layout.values() for name in (source.name, source.mxfp4_scales) if name
        )

    if not missing(tensor_map):
        return tensor_map

    def legacy(name: str) -> str:
        for new, old in LEGACY_PREFIXES:
            if name.startswith(new):
                return old + name.removeprefix(new)
        return name

    renamed = {canonical: replace(source, name=legacy(source.name)) for canonical, source in tensor_map.items()}
    changed = any(r.name != s.name for r, s in zip(renamed.values(), tensor_map.values(), strict=True))
    if changed and not missing(renamed):
        return renamed
    if not any(source.alternative for source in tensor_map.values()):
        return tensor_map
    alternative = {canonical: source.alternative or source for canonical, source in tensor_map.items()}
    return alternative if missing(alternative) < missing(tensor_map) else tensor_map


def common_spec_fields(cfg: ConfigReader) -> dict[str, Any]:
    """Fields read the same way by every Llama-like family."""
    hidden = cfg.positive("hidden_size")
    heads = cfg.positive("num_attention_heads")
    kv_heads = cfg.positive("num_key_value_heads", heads)
    if heads % kv_heads:
        raise cfg.fail(f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})")
    if cfg.get("head_dim") is None:
        if hidden % heads:
            raise cfg.fail(f"hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads})")
        head_dim = hidden // heads
    else:
        head_dim = cfg.positive("head_dim")
    if head_dim % 2:
        raise cfg.fail(f"'head_dim' ({head_dim}) must be even for rotary embeddings")
    vocab = cfg.positive("vocab_size")
    eos = cfg.token_ids("eos_token_id", vocab)
    bos = cfg.token_ids("bos_token_id", vocab)
    pad = cfg.token_ids("pad_token_id", vocab)
    archs = cfg.strings("architectures")
    return {
        "architecture": archs[0] if archs else "?",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_layers": cfg.positive("num_hidden_layers"),
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "intermediate_size": cfg.positive("intermediate_size"),
        "max_position_embeddings": cfg.positive("max_position_embeddings", 2048),
        "norm_eps": cfg.number("rms_norm_eps", 1e-6, above=0.0),
        "tie_word_embeddings": cfg.flag("tie_word_embeddings", False),
        "bos_token_id": bos[0] if bos else None,
        "eos_token_ids": eos,
        "pad_token_id": pad[0] if pad else None,
        "source_dtype": cfg.source_dtype(),
    }


def refuse_partial_rotary(cfg: ConfigReader) -> None:
    """Families without partial rotary support refuse a factor below 1, top-level (transformers 4) or inside
    ``rope_parameters`` (transformers 5 moves it there)."""
    params = cfg.get("rope_parameters")
    sub = cfg.child("rope_parameters", params) if isinstance(params, Mapping) else None
    for reader in (cfg, sub):
        if reader is not None and reader.number("partial_rotary_factor", 1.0) != 1.0:
            raise cfg.fail(
                f"partial rotary embeddings ({reader.name('partial_rotary_factor')} < 1) are not supported "
                "for this family"
            )


def refuse_attention_bias(cfg: ConfigReader) -> None:
    """``attention_bias`` puts biases on q, k, v *and* o in these families; an o bias is not modelled."""
    if cfg.flag("attention_bias", False):
        raise cfg.fail("'attention_bias': true (biases on the q, k, v and o projections) is not supported")


# NOTE: a config is a few bytes and may claim billions of layers; per-layer patterns derived from a rule (not
# listed in the config) are only built for layer counts a real model could have. The stored layer count is
# checked against the config later (open_model), so this only keeps building the spec cheap.
MAX_DERIVED_LAYERS = 65536

LAYER_TYPE_NAMES: dict[str, LayerType] = {
    "full_attention": "full",
    "attention": "full",  # transformers' legacy name for full attention
    "sliding_attention": "sliding",
}


def layer_types(cfg: ConfigReader, num_layers: int, derive: Callable[[int], LayerType]) -> tuple[LayerType, ...]:
    """Per-layer attention kinds from ``layer_types`` (one per layer), or from ``derive(layer)`` when absent
    (the config class's own rule, e.g. Gemma 2's alternation)."""
    raw = cfg.get("layer_types")
    if raw is None:
        if num_layers > MAX_DERIVED_LAYERS:
            raise cfg.fail(f"'num_hidden_layers' ({num_layers}) is beyond any real model (at most "
                           f"{MAX_DERIVED_LAYERS} layers)")
        return tuple(derive(i) for i in range(num_layers))
    names = cfg.strings("layer_types")
    unknown = sorted({n for n in names if n not in LAYER_TYPE_NAMES})
    if unknown:
        raise cfg.fail(
            f"{cfg.name('layer_types')}: layer type {shorten(unknown[0])} is not supported; supported: "
            f"{', '.join(LAYER_TYPE_NAMES)}"
        )
    if len(names) != num_layers:
        raise cfg.fail(
            f"{cfg.name('layer_types')} lists {len(names)} layers but 'num_hidden_layers' is {num_layers}"
        )
    return tuple(LAYER_TYPE_NAMES[n] for n in names)
