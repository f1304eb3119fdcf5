"""What a model family provides, the family registry, and config-reading helpers shared by families."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar, cast

from sovpack._plugins import Plugins, import_submodules
from sovpack._protocols import Family, TensorSource
from sovpack.errors import SourceError
from sovpack.source.spec import Activation, ModelSpec, RopeScaling


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
    """Base for Llama-like families: common config fields plus what ``features`` adds or overrides."""

    name: str = ""
    architectures: tuple[str, ...] = ()

    def features(self, cfg: ConfigReader, common: dict[str, Any]) -> dict[str, Any]:
        """Family-specific spec fields (activation, biases, norms, ...); may override ``common`` entries."""
        return {"activation": cfg.activation("hidden_act", default="silu")}

    def build_spec(self, config: Mapping[str, Any], where: str) -> ModelSpec:
        cfg = ConfigReader(config, where)
        common = common_spec_fields(cfg)
        return ModelSpec(family=self.name, **{**common, **self.features(cfg, common)})

    def tensor_map(self, spec: ModelSpec) -> dict[str, TensorSource]:
        return standard_tensor_map(spec)


def family_for_config(config: Mapping[str, Any], where: str) -> Family:
    """Pick the family from ``architectures`` (or ``model_type``); the error lists what is supported."""
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    for _, family in FAMILIES:
        if any(a in family.architectures for a in archs) or (not archs and model_type == family.name):
            return family
    supported = ", ".join(a for _, f in FAMILIES for a in f.architectures)
    found = ", ".join(archs) if archs else f"model_type {model_type!r}"
    raise SourceError(f"{where}: unsupported architecture {found}; supported: {supported}")


class ConfigReader:
    """Typed access to a HF config with errors that name the file and key."""

    def __init__(self, config: Mapping[str, Any], where: str) -> None:
        self.config = config
        self.where = where

    def fail(self, problem: str) -> SourceError:
        return SourceError(f"{self.where}: {problem}")

    def integer(self, key: str, default: int | None = None) -> int:
        value = self.config.get(key, default)
        if value is None:
            raise self.fail(f"missing required key {key!r}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.fail(f"{key!r} must be a non-negative integer, got {value!r}")
        return value

    def positive(self, key: str, default: int | None = None) -> int:
        value = self.integer(key, default)
        if value == 0:
            raise self.fail(f"{key!r} must be positive")
        return value

    def number(self, key: str, default: float | None = None) -> float:
        value = self.config.get(key, default)
        if value is None:
            raise self.fail(f"missing required key {key!r}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(f"{key!r} must be a number, got {value!r}")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.config.get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(f"{key!r} must be true or false, got {value!r}")
        return value

    def optional_int(self, key: str) -> int | None:
        return None if self.config.get(key) is None else self.integer(key)

    def token_ids(self, key: str) -> tuple[int, ...]:
        value = self.config.get(key)
        if value is None:
            return ()
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise self.fail(f"{key!r} must be a token id or a list of them, got {value!r}")
        return tuple(values)

    def rope(self) -> tuple[float, RopeScaling]:
        """rope theta and scaling from either dialect: transformers 4 (``rope_theta`` + ``rope_scaling``) or
        transformers 5 (``rope_parameters``)."""
        params = self.config.get("rope_parameters")
        if params is not None:
            if not isinstance(params, dict):
                raise self.fail(f"'rope_parameters' must be an object, got {params!r}")
            if params and all(isinstance(v, dict) for v in params.values()):
                raise self.fail("per-layer-type 'rope_parameters' are not supported for this family")
            theta = params.get("rope_theta", self.config.get("rope_theta", 10000.0))
            scaling: Mapping[str, Any] | None = params
        else:
            theta = self.config.get("rope_theta", 10000.0)
            scaling = self.config.get("rope_scaling")
        if isinstance(theta, bool) or not isinstance(theta, int | float) or theta <= 0:
            raise self.fail(f"rope theta must be a positive number, got {theta!r}")
        return float(theta), self._scaling(scaling)

    def _scaling(self, raw: Mapping[str, Any] | None) -> RopeScaling:
        if raw is None:
            return RopeScaling()
        if not isinstance(raw, Mapping):
            raise self.fail(f"rope scaling must be an object, got {raw!r}")
        kind = raw.get("rope_type", raw.get("type", "default"))
        if kind == "default":
            return RopeScaling()

        def num(key: str, default: float | None = None) -> float:
            value = raw.get(key, default)
            if value is None or isinstance(value, bool) or not isinstance(value, int | float):
                raise self.fail(f"rope scaling {kind!r} needs a number {key!r}, got {value!r}")
            return float(value)

        if kind == "linear":
            return RopeScaling(kind="linear", factor=num("factor"))
        if kind == "llama3":
            return RopeScaling(
                kind="llama3",
                factor=num("factor"),
                low_freq_factor=num("low_freq_factor"),
                high_freq_factor=num("high_freq_factor"),
                original_max_position_embeddings=int(num("original_max_position_embeddings")),
            )
        if kind == "yarn":
            original = raw.get("original_max_position_embeddings") or self.config.get(
                "max_position_embeddings"
            )
            if raw.get("mscale") not in (None, 1, 1.0) or raw.get("mscale_all_dim") not in (None, 0, 0.0):
                raise self.fail("yarn rope scaling with 'mscale'/'mscale_all_dim' (DeepSeek style) is not supported")
            if raw.get("factor") is None and original:
                factor = float(self.config.get("max_position_embeddings", 0)) / float(original)
            else:
                factor = num("factor")
            attention = raw.get("attention_factor")
            return RopeScaling(
                kind="yarn",
                factor=factor,
                original_max_position_embeddings=int(original) if original else None,
                beta_fast=num("beta_fast", 32.0),
                beta_slow=num("beta_slow", 1.0),
                attention_factor=float(attention) if attention is not None else None,
                truncate=None if raw.get("truncate") is None else bool(raw.get("truncate")),
            )
        if kind in ("longrope", "su"):
            raise self.fail(
                f"rope scaling {kind!r} (Phi-3 long-context) is not supported yet; "
                "use a short-context checkpoint (rope_scaling null)"
            )
        raise self.fail(f"rope scaling {kind!r} is not supported; supported: default, linear, llama3, yarn")

    def activation(self, *keys: str, default: str) -> Activation:
        raw = next((self.config[k] for k in keys if self.config.get(k) is not None), default)
        mapping: dict[str, Activation] = {
            "silu": "silu",
            "swish": "silu",
            "gelu_pytorch_tanh": "gelu_tanh",
            "gelu_new": "gelu_tanh",
            "gelu_fast": "gelu_tanh",
            "gelu": "gelu",
        }
        if raw not in mapping:
            raise self.fail(f"activation {raw!r} is not supported; supported: {', '.join(mapping)}")
        return mapping[raw]

    def source_dtype(self) -> str:
        value = self.config.get("dtype", self.config.get("torch_dtype", "float32"))
        return str(value) if value else "float32"


def standard_tensor_map(
    spec: ModelSpec, *, prefix: str = "model.", norm_offset: float = 0.0
) -> dict[str, TensorSource]:
    """The Llama-style HF tensor layout most families share."""
    m: dict[str, TensorSource] = {"embed": TensorSource(name=f"{prefix}embed_tokens.weight")}
    for i in range(spec.num_layers):
        hf = f"{prefix}layers.{i}."
        c = f"layers.{i}."
        m[c + "attn_norm"] = TensorSource(name=hf + "input_layernorm.weight", add=norm_offset)
        for proj in ("q", "k", "v", "o"):
            m[c + proj] = TensorSource(name=f"{hf}self_attn.{proj}_proj.weight")
        if spec.qkv_bias:
            for proj in ("q", "k", "v"):
                m[c + proj + "_bias"] = TensorSource(name=f"{hf}self_attn.{proj}_proj.bias")
        if spec.qk_norm:
            m[c + "q_norm"] = TensorSource(name=hf + "self_attn.q_norm.weight", add=norm_offset)
            m[c + "k_norm"] = TensorSource(name=hf + "self_attn.k_norm.weight", add=norm_offset)
        m[c + "mlp_norm"] = TensorSource(name=hf + "post_attention_layernorm.weight", add=norm_offset)
        for proj in ("gate", "up", "down"):
            m[c + proj] = TensorSource(name=f"{hf}mlp.{proj}_proj.weight")
    m["final_norm"] = TensorSource(name=f"{prefix}norm.weight", add=norm_offset)
    if not spec.tie_word_embeddings:
        m["lm_head"] = TensorSource(name="lm_head.weight")
    return m


def common_spec_fields(cfg: ConfigReader) -> dict[str, Any]:
    """Fields read the same way by every Llama-like family."""
    hidden = cfg.positive("hidden_size")
    heads = cfg.positive("num_attention_heads")
    kv_heads = cfg.positive("num_key_value_heads", heads)
    if heads % kv_heads:
        raise cfg.fail(f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})")
    head_dim = cfg.config.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise cfg.fail(f"hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads})")
        head_dim = hidden // heads
    else:
        head_dim = cfg.positive("head_dim")
    if head_dim % 2:
        raise cfg.fail(f"head_dim ({head_dim}) must be even for rotary embeddings")
    theta, scaling = cfg.rope()
    if cfg.config.get("partial_rotary_factor", 1.0) not in (1, 1.0):
        raise cfg.fail("partial rotary embeddings (partial_rotary_factor < 1) are not supported")
    eos = cfg.token_ids("eos_token_id")
    bos = cfg.token_ids("bos_token_id")
    pad = cfg.token_ids("pad_token_id")
    return {
        "architecture": (cfg.config.get("architectures") or ["?"])[0],
        "vocab_size": cfg.positive("vocab_size"),
        "hidden_size": hidden,
        "num_layers": cfg.positive("num_hidden_layers"),
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "intermediate_size": cfg.positive("intermediate_size"),
        "max_position_embeddings": cfg.positive("max_position_embeddings", 2048),
        "norm_eps": cfg.number("rms_norm_eps", 1e-6),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": cfg.flag("tie_word_embeddings", False),
        "bos_token_id": bos[0] if bos else None,
        "eos_token_ids": eos,
        "pad_token_id": pad[0] if pad else None,
        "source_dtype": cfg.source_dtype(),
    }
