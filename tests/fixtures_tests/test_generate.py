"""Tests for the tiny-checkpoint generator (fixtures.generate) and its tokenizers (fixtures.tokenizers_gen).

The checkpoints are the ground truth other tests convert and compare against, so these tests pin down that
they are reproducible, laid out like real checkpoints, and loadable by transformers (the independent oracle).
"""

# Multilingual samples deliberately contain full-width CJK punctuation.
# ruff: noqa: RUF001

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from fixtures.generate import REALISTIC_NUMERICS, REALISTIC_OUTLIERS, VARIANTS, FixtureVariant, main, make_checkpoint
from fixtures.gpt_oss import decode_mxfp4, encode_mxfp4
from fixtures.tokenizers_gen import KINDS, build_tokenizer, tokenizer_spec

ROOT = Path(__file__).resolve().parents[2]
DEMO_DIR = ROOT / "fixtures" / "checkpoints" / "llama3"
MAX_CHECKPOINT_BYTES = 1_000_000

MULTILINGUAL = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Le café est très chaud, n'est-ce pas ?",
    "Größe und Übersicht: straße",
    "¿Dónde está la biblioteca?",
    "Привет, мир! Как дела?",
    "你好，世界！我们正在测试。",
    "こんにちは、世界！東京の駅。",
    "مرحبا بالعالم",
    "def f(x):\n    return x + 1\n\n\tprint(12345, 3.14159)",
    '{"a": [1, 2, 3], "b": null}',
    "spaces   inside  and trailing   ",
    "emoji 🚀 and a clef 𝄞 and CJK ext 𠀀",
]


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _tensors(d: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("gen_a")
    return {name: make_checkpoint(name, base / name) for name in VARIANTS}


# ----------------------------------------------------------------------------------------------------------------
# Generator: files, determinism, layout


FIRST_SEVEN = {"llama3", "llama2", "mistral", "qwen2", "qwen3", "phi3", "gemma"}
NEWER = {"gemma2", "gemma3", "gemma3-vlm", "phi3.5", "phi4-mini", "smollm3", "olmo2", "granite"}
MOE = {"qwen3moe", "qwen3moe-mixed", "mixtral", "gptoss", "gptoss-mxfp4", "gptoss-clamp"}


def test_variants_table() -> None:
    assert set(VARIANTS) == FIRST_SEVEN | NEWER | MOE
    for name, v in VARIANTS.items():
        assert isinstance(v, FixtureVariant)
        assert v.hidden_size == 64
        assert v.num_hidden_layers == 2 or name in NEWER | MOE
    assert {VARIANTS[n].chat_template_in for n in ("llama3", "qwen3")} == {"jinja_file"}
    hash(VARIANTS["llama3"])  # frozen and hashable despite the rope_scaling dict
    hash(VARIANTS["granite"])  # and the extra_config dict
    # Windowed layers are exercised: every window is shorter than the parity and oracle prompts (20-48 tokens).
    assert all(v.sliding_window is None or v.sliding_window < 20 for n, v in VARIANTS.items() if n in NEWER)


def _text_config(config: dict) -> dict:
    """The language model's config: the config itself, or text_config of a vision-language checkpoint."""
    return config.get("text_config", config)


def _prefix(v: FixtureVariant) -> str:
    return {"causal_lm": "model.", "vlm": "model.language_model.", "vlm_legacy": "language_model.model."}[v.layout]


def test_every_variant_writes_expected_files(generated: dict[str, Path]) -> None:
    for name, d in generated.items():
        v = VARIANTS[name]
        names = set(_files(d))
        expected = {
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
        }
        if v.shards == 1:
            expected.add("model.safetensors")
        else:
            expected.add("model.safetensors.index.json")
            expected |= {f"model-{k:05d}-of-{v.shards:05d}.safetensors" for k in range(1, v.shards + 1)}
        if v.chat_template_in == "jinja_file":
            expected.add("chat_template.jinja")
        assert names == expected, name
        total = sum(len(b) for b in _files(d).values())
        assert total < MAX_CHECKPOINT_BYTES, (name, total)


def test_generation_is_byte_identical(generated: dict[str, Path], tmp_path: Path) -> None:
    for name, d in generated.items():
        again = make_checkpoint(name, tmp_path / name)
        assert _files(again) == _files(d), name


def test_json_files_are_canonical(generated: dict[str, Path]) -> None:
    for name, d in generated.items():
        for f in d.glob("*.json"):
            if f.name == "tokenizer.json":
                continue
            text = f.read_text(encoding="utf-8")
            assert text == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n", (
                name,
                f.name,
            )


def test_weights_match_config(generated: dict[str, Path]) -> None:
    np_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
    for name, d in generated.items():
        v = VARIANTS[name]
        cfg = _text_config(json.loads((d / "config.json").read_text()))
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        t = _tensors(d)
        vocab = tok.get_vocab_size(with_added_tokens=True)
        prefix = _prefix(v)
        assert cfg["vocab_size"] == vocab == t[prefix + "embed_tokens.weight"].shape[0], name
        assert ("lm_head.weight" in t) == (not v.tie_word_embeddings), name
        floats = {a.dtype for a in t.values() if a.dtype != np.uint8}
        assert floats == {np.dtype(np_dtype[v.dtype])}, name
        packed = {k for k, a in t.items() if a.dtype == np.uint8}  # MXFP4 blocks and scales, nothing else
        assert all(k.endswith(("_blocks", "_scales")) for k in packed) and bool(packed) == v.mxfp4, name
        for a in t.values():
            assert np.isfinite(a.astype(np.float32)).all()
        q = v.num_attention_heads * v.head_dim
        kv = v.num_key_value_heads * v.head_dim
        for i in range(v.num_hidden_layers):
            p = f"{prefix}layers.{i}."
            assert (p + "input_layernorm.weight" in t) == (v.family != "olmo2")
            assert (p + "post_feedforward_layernorm.weight" in t) == (v.family in ("gemma2", "gemma3", "olmo2"))
            assert (p + "pre_feedforward_layernorm.weight" in t) == (v.family in ("gemma2", "gemma3"))
            if v.family in ("phi3", "phi3_longrope"):
                assert t[p + "self_attn.qkv_proj.weight"].shape == (q + 2 * kv, v.hidden_size)
                assert t[p + "mlp.gate_up_proj.weight"].shape == (2 * v.intermediate_size, v.hidden_size)
                assert p + "self_attn.q_proj.weight" not in t
            else:
                assert t[p + "self_attn.q_proj.weight"].shape == (q, v.hidden_size)
                assert t[p + "self_attn.k_proj.weight"].shape == (kv, v.hidden_size)
                dense = v.num_experts is None or i in v.mlp_only_layers
                assert (p + "mlp.down_proj.weight" in t) == dense, (name, i)
                if dense:
                    assert t[p + "mlp.down_proj.weight"].shape == (v.hidden_size, v.intermediate_size)
            assert t[p + "self_attn.o_proj.weight"].shape == (v.hidden_size, q)
            assert (p + "self_attn.q_proj.bias" in t) == (v.family in ("qwen2", "gpt_oss"))
            assert (p + "self_attn.o_proj.bias" in t) == (p + "self_attn.sinks" in t) == (v.family == "gpt_oss")
            assert (p + "self_attn.q_norm.weight" in t) == (v.family in ("qwen3", "qwen3_moe", "gemma3", "olmo2"))
            if v.family in ("qwen3", "qwen3_moe", "gemma3"):
                assert t[p + "self_attn.k_norm.weight"].shape == (v.head_dim,)
            elif v.family == "olmo2":  # over the whole projection
                assert t[p + "self_attn.q_norm.weight"].shape == (q,)
                assert t[p + "self_attn.k_norm.weight"].shape == (kv,)
        norm = t[prefix + "norm.weight"].astype(np.float32)
        if v.family in ("gemma", "gemma2", "gemma3"):
            assert abs(float(norm.mean())) < 0.1  # stored as offsets around 0: Gemma computes x * (1 + w)
        else:
            assert abs(float(norm.mean()) - 1.0) < 0.1


def test_sharded_index(generated: dict[str, Path]) -> None:
    d = generated["llama2"]
    index = json.loads((d / "model.safetensors.index.json").read_text())
    t = _tensors(d)
    assert set(index["weight_map"]) == set(t)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in t.values())
    for name, fname in index["weight_map"].items():
        assert name in load_file(str(d / fname))
    assert len(set(index["weight_map"].values())) == 2


def test_config_dialects_and_family_keys(generated: dict[str, Path]) -> None:
    cfg = {n: json.loads((d / "config.json").read_text()) for n, d in generated.items()}
    llama3 = cfg["llama3"]
    assert llama3["rope_theta"] == 500000.0 and llama3["torch_dtype"] == "float32"
    assert llama3["rope_scaling"]["rope_type"] == "llama3" and "rope_parameters" not in llama3
    assert llama3["architectures"] == ["LlamaForCausalLM"]
    mistral = cfg["mistral"]
    assert mistral["rope_parameters"] == {"rope_type": "default", "rope_theta": 1000000.0}
    assert "rope_theta" not in mistral and "torch_dtype" not in mistral and mistral["dtype"] == "float16"
    assert mistral["sliding_window"] == 4096
    qwen2 = cfg["qwen2"]
    assert qwen2["rope_parameters"]["rope_type"] == "yarn" and qwen2["use_sliding_window"] is False
    assert qwen2["tie_word_embeddings"] is True
    assert cfg["qwen3"]["head_dim"] == 32 != cfg["qwen3"]["hidden_size"] // cfg["qwen3"]["num_attention_heads"]
    assert cfg["qwen3"]["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    phi3 = cfg["phi3"]
    assert phi3["partial_rotary_factor"] == 1.0 and phi3["rope_scaling"] is None
    assert 0 <= phi3["pad_token_id"] < phi3["vocab_size"]
    gemma = cfg["gemma"]
    assert gemma["hidden_activation"] == gemma["hidden_act"] == "gelu_pytorch_tanh"
    assert (gemma["bos_token_id"], gemma["eos_token_id"], gemma["pad_token_id"]) == (2, 1, 0)
    assert gemma["num_key_value_heads"] == 1 and gemma["head_dim"] == 32
    for name, c in cfg.items():
        c = _text_config(c)
        ids = [c["bos_token_id"], c["pad_token_id"]]
        ids += c["eos_token_id"] if isinstance(c["eos_token_id"], list) else [c["eos_token_id"]]
        assert all(i is None or 0 <= i < c["vocab_size"] for i in ids), name


def test_newer_family_configs(generated: dict[str, Path], tmp_path: Path) -> None:
    """Each newer family's config carries its own keys, in the dialect transformers writes them."""
    cfg = {n: json.loads((generated[n] / "config.json").read_text()) for n in NEWER}
    gemma2 = cfg["gemma2"]
    assert gemma2["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert (gemma2["sliding_window"], gemma2["query_pre_attn_scalar"]) == (8, gemma2["head_dim"])
    assert (gemma2["attn_logit_softcapping"], gemma2["final_logit_softcapping"]) == (8.0, 20.0)
    gemma3 = cfg["gemma3"]
    assert gemma3["model_type"] == "gemma3_text" and gemma3["dtype"] == "bfloat16"
    assert gemma3["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]  # Gemma 3's 5:1
    assert gemma3["rope_parameters"] == {
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    }
    vlm = cfg["gemma3-vlm"]
    assert vlm["architectures"] == ["Gemma3ForConditionalGeneration"] and vlm["model_type"] == "gemma3"
    assert vlm["text_config"]["model_type"] == "gemma3_text" and "architectures" not in vlm["text_config"]
    assert vlm["vision_config"]["num_hidden_layers"] == 8 > vlm["text_config"]["num_hidden_layers"]
    assert min(vlm["boi_token_index"], vlm["image_token_index"]) >= vlm["text_config"]["vocab_size"]
    phi35 = cfg["phi3.5"]
    rope = phi35["rope_parameters"]
    assert rope["rope_type"] == "longrope" and len(rope["short_factor"]) == len(rope["long_factor"]) == 8
    assert rope["original_max_position_embeddings"] == phi35["original_max_position_embeddings"] == 24
    phi4 = cfg["phi4-mini"]  # transformers 4 dialect, as on the hub
    assert phi4["rope_scaling"]["type"] == "longrope" and len(phi4["rope_scaling"]["short_factor"]) == 6
    assert phi4["partial_rotary_factor"] == 0.75 and phi4["tie_word_embeddings"] is True
    smol = cfg["smollm3"]
    assert smol["no_rope_layers"] == [1, 1, 1, 0] and smol["use_sliding_window"] is False
    assert smol["layer_types"] == ["full_attention"] * 4
    assert cfg["olmo2"]["attention_bias"] is False
    granite = cfg["granite"]
    assert (granite["embedding_multiplier"], granite["residual_multiplier"]) == (4.0, 0.5)
    assert (granite["attention_multiplier"], granite["logits_scaling"]) == (0.125, 2.0)
    # The transformers 4 dialect of each: rope_theta (+ Gemma 3's local base and pattern), no layer_types.
    g3v4 = json.loads((make_checkpoint("gemma3", tmp_path / "g3v4", config_dialect="v4") / "config.json").read_text())
    assert (g3v4["rope_theta"], g3v4["rope_local_base_freq"], g3v4["sliding_window_pattern"]) == (1e6, 1e4, 6)
    assert g3v4["rope_scaling"] == {"rope_type": "linear", "factor": 2.0} and "layer_types" not in g3v4
    smol_window = make_checkpoint("smollm3", tmp_path / "smol", sliding_window=8)
    smol_cfg = json.loads((smol_window / "config.json").read_text())
    assert smol_cfg["use_sliding_window"] is True
    assert smol_cfg["layer_types"] == ["full_attention"] * 3 + ["sliding_attention"]  # the NoPE layer slides


def test_vision_language_layouts(generated: dict[str, Path], tmp_path: Path) -> None:
    """A Gemma 3 vision-language checkpoint stores a vision tower and projector beside the language model, under
    transformers 5's names or the hub's pre-4.52 ones; the language model's weights are the same either way."""
    v5 = _tensors(generated["gemma3-vlm"])
    assert "model.vision_tower.encoder.layers.3.mlp.fc2.weight" in v5
    assert "model.multi_modal_projector.mm_input_projection_weight" in v5
    legacy = _tensors(make_checkpoint("gemma3-vlm", tmp_path / "legacy", layout="vlm_legacy", config_dialect="v4"))
    assert "vision_tower.vision_model.encoder.layers.3.mlp.fc2.weight" in legacy
    assert "multi_modal_projector.mm_input_projection_weight" in legacy
    renamed = {
        k.replace("language_model.model.", "model.language_model.")
        .replace("vision_tower.vision_model.", "model.vision_tower.")
        .replace("multi_modal_projector.", "model.multi_modal_projector."): a
        for k, a in legacy.items()
    }
    assert renamed.keys() == v5.keys()
    for k, a in v5.items():
        np.testing.assert_array_equal(a, renamed[k], err_msg=k)


@pytest.mark.parametrize(
    ("variant", "overrides", "message"),
    [
        ("llama3", {"global_every": 2}, "global_every is only supported for gemma2, gemma3"),
        ("gemma2", {"rope_local_theta": 1e4}, "rope_local_theta is only supported for gemma3"),
        ("gemma2", {"config_dialect": "v4", "global_every": 3}, "gemma2 v4 configs carry no layer_types"),
        ("gemma3", {"global_every": None}, "gemma3 fixtures need global_every"),
        ("phi3", {"partial_rotary_factor": 0.5}, "partial_rotary_factor is only supported for phi3_longrope"),
        ("phi3.5", {"rope_scaling": None}, "phi3_longrope fixtures need longrope scaling"),
        ("phi4-mini", {"partial_rotary_factor": 0.0}, "partial_rotary_factor must be in"),
        ("smollm3", {"no_rope_every": 0}, "smollm3 fixtures need no_rope_every"),
        ("qwen2", {"layout": "vlm"}, "layout is only supported for gemma3"),
        ("gemma3", {"layout": "vlm2"}, "layout must be one of"),
        ("olmo2", {"sliding_window": 8}, "sliding_window is only supported for"),
        ("llama3", {"num_experts": 4}, "num_experts is only supported for qwen3_moe, mixtral"),
        ("mixtral", {"mlp_only_layers": (1,)}, "mlp_only_layers is only supported for qwen3_moe"),
        ("mixtral", {"norm_topk_prob": False}, "norm_topk_prob is only supported for qwen3_moe"),
        ("qwen3moe", {"experts_per_token": 9}, "need num_experts >= experts_per_token >= 1"),
        ("qwen3moe", {"mlp_only_layers": (3,)}, "mlp_only_layers must name layers"),
        ("mixtral", {"mxfp4": True}, "mxfp4 is only supported for gpt_oss"),
        ("gptoss", {"intermediate_size": 48}, "multiples of 32"),
        ("gptoss", {"sliding_window": None}, "gpt_oss fixtures need a sliding_window"),
    ],
)
def test_family_fields_stay_with_their_family(
    tmp_path: Path, variant: str, overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make_checkpoint(variant, tmp_path / "x", **overrides)
    assert not (tmp_path / "x").exists()


def test_moe_weights_are_stored_per_expert(generated: dict[str, Path]) -> None:
    """Router and experts under the published names (what transformers 5 saves), one tensor per expert."""
    for name, block, (gate, up, down) in (
        ("qwen3moe", "mlp", ("gate_proj", "up_proj", "down_proj")),
        ("qwen3moe-mixed", "mlp", ("gate_proj", "up_proj", "down_proj")),
        ("mixtral", "block_sparse_moe", ("w1", "w3", "w2")),
    ):
        v = VARIANTS[name]
        t = _tensors(generated[name])
        cfg = json.loads((generated[name] / "config.json").read_text())
        experts = cfg["num_experts"] if name.startswith("qwen3moe") else cfg["num_local_experts"]
        width = cfg.get("moe_intermediate_size", cfg["intermediate_size"])
        assert experts == v.num_experts and cfg["num_experts_per_tok"] == v.experts_per_token == 2
        sparse = [i for i in range(v.num_hidden_layers) if i not in v.mlp_only_layers]
        assert sparse == ([0, 2] if name == "qwen3moe-mixed" else [0, 1, 2])
        for i in sparse:
            p = f"model.layers.{i}.{block}."
            assert t[p + "gate.weight"].shape == (experts, v.hidden_size)
            for e in range(experts):
                assert t[f"{p}experts.{e}.{gate}.weight"].shape == (width, v.hidden_size)
                assert t[f"{p}experts.{e}.{up}.weight"].shape == (width, v.hidden_size)
                assert t[f"{p}experts.{e}.{down}.weight"].shape == (v.hidden_size, width)
            assert not any(k.startswith(p + f"experts.{experts}.") for k in t)
        assert not any(".experts.gate_up_proj" in k for k in t)  # never transformers' in-memory fused layout


def test_gpt_oss_experts_are_fused_as_published(generated: dict[str, Path]) -> None:
    """gpt-oss stores experts fused: bfloat16 "in x out" [E, H, 2I] / [E, I, H], or MXFP4 blocks and scales in
    "out x in" order with a quantization_config, as gpt-oss-20b's checkpoint does; both hold the same model."""
    bf, mx = _tensors(generated["gptoss"]), _tensors(generated["gptoss-mxfp4"])
    v = VARIANTS["gptoss"]
    e, h, i = v.num_experts, v.hidden_size, v.intermediate_size
    assert e is not None
    x = "model.layers.2.mlp.experts."
    assert bf[x + "gate_up_proj"].shape == (e, h, 2 * i) and bf[x + "down_proj"].shape == (e, i, h)
    assert bf[x + "gate_up_proj_bias"].shape == (e, 2 * i) and bf[x + "down_proj_bias"].shape == (e, h)
    assert mx[x + "gate_up_proj_blocks"].shape == (e, 2 * i, h // 32, 16)
    assert mx[x + "gate_up_proj_scales"].shape == (e, 2 * i, h // 32)
    assert mx[x + "down_proj_blocks"].shape == (e, h, i // 32, 16)
    assert mx[x + "down_proj_scales"].shape == (e, h, i // 32)
    assert x + "gate_up_proj" not in mx and not any(".experts.0." in k for k in bf)
    decoded = decode_mxfp4(mx[x + "gate_up_proj_blocks"], mx[x + "gate_up_proj_scales"])
    np.testing.assert_array_equal(decoded.transpose(0, 2, 1), bf[x + "gate_up_proj"].astype(np.float32))
    shared = set(bf) & set(mx)
    assert all(np.array_equal(bf[k], mx[k]) for k in shared) and len(shared) == len(mx) - 4 * v.num_hidden_layers
    cfg = json.loads((generated["gptoss-mxfp4"] / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "mxfp4"
    assert "quantization_config" not in json.loads((generated["gptoss"] / "config.json").read_text())
    assert cfg["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]


def test_mxfp4_encoder() -> None:
    """Values on the grid round-trip exactly; scales are the smallest power of two fitting each group under 6;
    the even element of a pair is the low nibble."""
    group = np.array([6.0, -0.5, 1.5, 0.0] + [0.5] * 28, np.float32) * np.float32(2.0**-3)
    blocks, scales = encode_mxfp4(group[None])
    assert scales.tolist() == [[124]]  # 2^(124 - 127)
    assert blocks[0, 0, :2].tolist() == [0x9 << 4 | 0x7, 0x0 << 4 | 0x3]  # (6, -0.5) and (1.5, 0)
    np.testing.assert_array_equal(decode_mxfp4(blocks, scales)[0], group)
    rounded = decode_mxfp4(*encode_mxfp4(np.linspace(-5, 5, 64, dtype=np.float32)[None]))
    assert np.abs(rounded - np.linspace(-5, 5, 64)).max() <= 1.0  # nearest grid point of the group's scale 2^0


def test_tokenizer_config_and_chat_template(generated: dict[str, Path]) -> None:
    for name, d in generated.items():
        v = VARIANTS[name]
        tc = json.loads((d / "tokenizer_config.json").read_text())
        spec = tokenizer_spec(v.tokenizer)
        assert tc["eos_token"] == spec.eos_token and tc["add_bos_token"] == spec.add_bos_token
        assert tc["model_max_length"] == v.max_position_embeddings
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        for id_str, entry in tc["added_tokens_decoder"].items():
            assert tok.token_to_id(entry["content"]) == int(id_str)
        if v.chat_template_in == "jinja_file":
            assert "chat_template" not in tc
            assert "{%" in (d / "chat_template.jinja").read_text()
        else:
            assert "{%" in tc["chat_template"]


def test_overrides(tmp_path: Path) -> None:
    d = make_checkpoint("mistral", tmp_path / "m", sliding_window=8, dtype="bfloat16", config_dialect="v4", seed=1)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["sliding_window"] == 8 and cfg["torch_dtype"] == "bfloat16" and cfg["rope_theta"] == 1000000.0
    assert "rope_parameters" not in cfg
    default = make_checkpoint("mistral", tmp_path / "m_default")
    a = _tensors(d)["model.embed_tokens.weight"].astype(np.float32)
    b = _tensors(default)["model.embed_tokens.weight"].astype(np.float32)
    assert not np.allclose(a, b)  # a different seed gives different weights
    d2 = make_checkpoint("llama3", tmp_path / "l", config_dialect="v5", shards=3)
    cfg2 = json.loads((d2 / "config.json").read_text())
    assert cfg2["rope_parameters"]["rope_type"] == "llama3" and cfg2["rope_parameters"]["rope_theta"] == 500000.0
    assert len(list(d2.glob("model-*-of-00003.safetensors"))) == 3


def test_numerics_overrides_scale_exactly_what_they_name(tmp_path: Path, generated: dict[str, Path]) -> None:
    """logit_gain scales the head (or the tied table), residual_gain sets o_proj/down_proj; nothing else moves.

    Gains are powers of two here, so the scaled float32 weights are exact multiples of the defaults.
    """
    assert (VARIANTS["llama3"].logit_gain, VARIANTS["llama3"].residual_gain) == (1.0, None)
    scaled_names = (".o_proj.weight", ".down_proj.weight")
    # untied: lm_head x 0.5; residual gain 1.0 instead of the untied default 2.0
    default = _tensors(generated["llama3"])
    soft = _tensors(make_checkpoint("llama3", tmp_path / "llama3", logit_gain=0.5, residual_gain=1.0))
    assert set(soft) == set(default)
    for name, a in soft.items():
        factor = 0.5 if name == "lm_head.weight" or name.endswith(scaled_names) else 1.0
        np.testing.assert_array_equal(a, default[name] * np.float32(factor), err_msg=name)
    # tied: the embedding table (input and head) x 0.5; residual gain 4.0 instead of the tied default 8.0
    default = _tensors(generated["qwen2"])
    soft = _tensors(make_checkpoint("qwen2", tmp_path / "qwen2", logit_gain=0.5, residual_gain=4.0))
    assert set(soft) == set(default) and "lm_head.weight" not in soft
    for name, a in soft.items():
        factor = 0.5 if name == "model.embed_tokens.weight" or name.endswith(scaled_names) else 1.0
        np.testing.assert_array_equal(a, default[name] * np.float32(factor), err_msg=name)


def test_outlier_channels_scale_only_the_pre_projection_norms(tmp_path: Path) -> None:
    """REALISTIC_OUTLIERS: the same draws as REALISTIC_NUMERICS, 4 channels of the two pre-projection norms 8x."""
    plain = _tensors(make_checkpoint("llama3", tmp_path / "plain", **REALISTIC_NUMERICS))
    loud = _tensors(make_checkpoint("llama3", tmp_path / "loud", **REALISTIC_OUTLIERS))
    assert set(plain) == set(loud)
    channels = np.array([1, 65, 129, 193])  # 4 evenly spaced of 256
    for name, a in loud.items():
        expected = plain[name].copy()
        if name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
            expected[channels] *= np.float32(8.0)
        np.testing.assert_array_equal(a, expected, err_msg=name)
    with pytest.raises(ValueError, match="outlier channels"):
        make_checkpoint("gemma", tmp_path / "g", outlier_channels=2, outlier_gain=4.0)


@pytest.mark.parametrize("name", ["llama3", "qwen2"])
def test_realistic_numerics_checkpoint(name: str, tmp_path: Path) -> None:
    """REALISTIC_NUMERICS: 7B-like next-token statistics, driven by the layers, greedy not degenerate."""
    from sovpack.parity.prompts import encode_prompts
    from sovpack.reference import ReferenceModel, rms_norm
    from sovpack.source.model import open_model

    d = make_checkpoint(name, tmp_path / name, **REALISTIC_NUMERICS)
    cfg = json.loads((d / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["tie_word_embeddings"]) == (256, 512, False)
    t = _tensors(d)
    assert t["model.layers.0.self_attn.q_proj.weight"].shape == (256, 256)  # 4 heads x head_dim 64 = hidden
    for a in t.values():  # every matrix's input size is a multiple of 256 (int4 blocks, k-quant super-blocks)
        assert a.ndim == 1 or a.shape[1] % 256 == 0
    model = open_model(d)
    ref = ReferenceModel(model)
    ids = encode_prompts(d / "tokenizer.json")
    logits = np.concatenate([ref.prefill_logits(p) for p in ids]).astype(np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    entropy = float(-(p * np.log(p + 1e-300)).sum(-1).mean())
    top2 = np.sort(logits, axis=-1)[:, -2:]
    clear = float((top2[:, 1] - top2[:, 0] >= 2.0).mean())  # the int4 thresholds' clear_margin
    assert 3.0 < float(logits.std(-1).mean()) < 5.0
    assert 1.5 < entropy < 3.0 and 0.35 < float(p.max(-1).mean()) < 0.6, entropy
    assert 0.1 < clear < 0.35, clear
    # The layers, not the token embedding alone, decide most predictions.
    spec = model.spec
    head = model.tensor("lm_head")
    layerless = np.concatenate(
        [rms_norm(model.tensor("embed")[np.array(q)], model.tensor("final_norm"), spec.norm_eps) @ head.T for q in ids]
    )
    assert float((layerless.argmax(-1) == logits.argmax(-1)).mean()) < 0.35
    for q in ids[:4]:  # greedy decoding does not fall into one-token loops
        assert len(set(ref.greedy(q, 8))) >= 6


def test_invalid_requests(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError):
        make_checkpoint("llama3", tmp_path / "full")
    with pytest.raises(TypeError):
        make_checkpoint("llama3", tmp_path / "a", no_such_field=1)
    with pytest.raises(ValueError):
        make_checkpoint("llama3", tmp_path / "b", sliding_window=8)
    with pytest.raises(ValueError):
        make_checkpoint("llama3", tmp_path / "c", dtype="int8")
    with pytest.raises(KeyError):
        make_checkpoint("nope", tmp_path / "d")
    for bad in (
        {"logit_gain": 0.0},
        {"logit_gain": -1.0},
        {"logit_gain": float("nan")},
        {"residual_gain": 0},
        {"residual_gain": float("inf")},
    ):
        with pytest.raises(ValueError, match="gain must be a finite number"):
            make_checkpoint("llama3", tmp_path / "e", **bad)
    assert not (tmp_path / "e").exists()  # rejected before anything is written
    empty = tmp_path / "empty"
    empty.mkdir()
    assert make_checkpoint("gemma", empty) == empty  # an existing empty directory is fine


def test_cli_writes_all_variants(tmp_path: Path, generated: dict[str, Path]) -> None:
    assert main([str(tmp_path / "all")]) == 0
    for name, d in generated.items():
        assert _files(tmp_path / "all" / name) == _files(d), name


def test_cli_subprocess_is_deterministic_across_processes(tmp_path: Path, generated: dict[str, Path]) -> None:
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "fixtures.generate", str(out), "--variant", "llama3", "--variant", "phi3"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["llama3", "phi3"]
    for name in ("llama3", "phi3"):
        assert _files(out / name) == _files(generated[name]), name


def test_committed_demo_matches_generator(generated: dict[str, Path]) -> None:
    if not DEMO_DIR.exists():
        pytest.skip("demo checkpoint not present")
    assert _files(DEMO_DIR) == _files(generated["llama3"]), (
        "fixtures/checkpoints/llama3 is stale: regenerate with "
        "`rm -rf fixtures/checkpoints/llama3 && python -m fixtures.generate fixtures/checkpoints --variant llama3`"
    )


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers


def test_tokenizer_training_is_deterministic() -> None:
    first = {k: build_tokenizer(k).to_str() for k in KINDS}
    assert first == {k: build_tokenizer(k).to_str() for k in KINDS}
    code = (
        "import hashlib, json\n"
        "from fixtures.tokenizers_gen import KINDS, _tokenizer_json\n"
        "print(json.dumps({k: hashlib.sha256(_tokenizer_json(k).encode()).hexdigest() for k in KINDS}))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "987", "RAYON_NUM_THREADS": "4", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    other = json.loads(proc.stdout)
    mine = {k: hashlib.sha256(build_tokenizer(k).to_str(pretty=True).encode()).hexdigest() for k in KINDS}
    assert other == mine


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip(kind: str) -> None:
    tok = build_tokenizer(kind)
    for text in MULTILINGUAL:
        ids = tok.encode(text).ids
        assert tok.decode(ids, skip_special_tokens=True) == text, (kind, text)


@pytest.mark.parametrize("kind", ["llama2-spm", "mistral-spm", "phi3-spm", "gemma-spm"])
def test_sentencepiece_byte_fallback(kind: str) -> None:
    tok = build_tokenizer(kind)
    assert tok.token_to_id("𝄞") is None
    tokens = tok.encode("a𝄞b", add_special_tokens=False).tokens
    assert [t for t in tokens if t.startswith("<0x")] == ["<0xF0>", "<0x9D>", "<0x84>", "<0x9E>"]
    assert tok.encode("line\nbreak", add_special_tokens=False).tokens.count("<0x0A>") == 1
    # SentencePiece pieces never cross a word boundary: "▁" only leads a piece (or forms whitespace pieces).
    for piece in tok.get_vocab():
        body = piece.lstrip("▁")
        assert "▁" not in body, piece


def test_byte_level_layout() -> None:
    for kind, specials in (("llama3-bpe", 5), ("qwen2-bpe", 3)):
        tok = build_tokenizer(kind)
        spec = tokenizer_spec(kind)
        assert tok.get_vocab_size(with_added_tokens=False) == 600
        assert [tok.token_to_id(s) for s in spec.specials] == list(range(600, 600 + specials))
        assert tok.id_to_token(0) == "!" and tok.id_to_token(255) is not None
        for text in MULTILINGUAL:  # byte-level: never an unknown token
            assert None not in tok.encode(text).ids
    j3 = json.loads(build_tokenizer("llama3-bpe").to_str())
    assert j3["normalizer"] is None and j3["model"]["ignore_merges"] is True
    assert [p["type"] for p in j3["pre_tokenizer"]["pretokenizers"]] == ["Split", "ByteLevel"]
    assert j3["pre_tokenizer"]["pretokenizers"][1]["use_regex"] is False
    llama3, qwen2 = build_tokenizer("llama3-bpe"), build_tokenizer("qwen2-bpe")
    assert llama3.encode("Hi").tokens[0] == "<|begin_of_text|>"
    assert qwen2.encode("Hi").tokens[0] != "<|endoftext|>"
    # Llama 3 pre-splits numbers into groups of up to three digits, Qwen2 into single digits.
    assert [w for w, _ in llama3.pre_tokenizer.pre_tokenize_str("12345")] == ["123", "45"]
    assert qwen2.encode("12345").tokens == ["1", "2", "3", "4", "5"]
    assert json.loads(qwen2.to_str())["normalizer"]["type"] == "NFC"


def test_sentencepiece_layout() -> None:
    llama2 = build_tokenizer("llama2-spm")
    assert [llama2.id_to_token(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert llama2.id_to_token(258) == "<0xFF>"
    assert llama2.encode("Hello").tokens[0] == "<s>"
    j2 = json.loads(llama2.to_str())
    assert [n["type"] for n in j2["normalizer"]["normalizers"]] == ["Prepend", "Replace"]
    assert j2["pre_tokenizer"] is None and j2["model"]["byte_fallback"] is True
    jm = json.loads(build_tokenizer("mistral-spm").to_str())
    assert jm["normalizer"] is None
    assert (jm["pre_tokenizer"]["type"], jm["pre_tokenizer"]["prepend_scheme"], jm["pre_tokenizer"]["split"]) == (
        "Metaspace",
        "first",
        False,
    )
    # Same vocabulary, two HF pipeline forms: identical ids.
    for text in MULTILINGUAL:
        assert build_tokenizer("mistral-spm").encode(text).ids == llama2.encode(text).ids, text
    phi3 = build_tokenizer("phi3-spm")
    n = llama2.get_vocab_size()
    assert [phi3.id_to_token(n + i) for i in range(5)] == [
        "<|endoftext|>",
        "<|assistant|>",
        "<|user|>",
        "<|system|>",
        "<|end|>",
    ]
    gemma = build_tokenizer("gemma-spm")
    assert [gemma.id_to_token(i) for i in range(7)] == [
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
        "<start_of_turn>",
        "<end_of_turn>",
        "<0x00>",
    ]
    assert gemma.encode("Hello world").tokens[:3] == ["<bos>", "Hello", "▁world"]  # no dummy prefix


# ----------------------------------------------------------------------------------------------------------------
# transformers as the oracle


@pytest.mark.oracle
@pytest.mark.parametrize("name", list(VARIANTS))
def test_transformers_loads_model_and_tokenizer(name: str, generated: dict[str, Path]) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    d = generated[name]
    # MXFP4 experts: transformers dequantizes them on CPU when asked to (no kernels or accelerate needed)
    load = {"quantization_config": transformers.Mxfp4Config(dequantize=True)} if VARIANTS[name].mxfp4 else {}
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        d, dtype=torch.float32, output_loading_info=True, **load
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info.get("mismatched_keys"), info
    assert type(model).__name__ == json.loads((d / "config.json").read_text())["architectures"][0]

    raw = Tokenizer.from_file(str(d / "tokenizer.json"))
    hf = transformers.AutoTokenizer.from_pretrained(d)
    assert hf.encode("Hello world") == raw.encode("Hello world").ids
    for text in MULTILINGUAL:
        assert hf.encode(text) == raw.encode(text).ids, text

    ids = raw.encode("The quick brown fox jumps over the lazy dog. Привет, 你好! def f(x): return 42").ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    assert logits.shape == (len(ids), raw.get_vocab_size())
    assert torch.isfinite(logits).all()
    top2 = logits.topk(2, dim=-1).values
    gap = top2[:, 0] - top2[:, 1]
    spread = logits.max(dim=-1).values - logits.min(dim=-1).values
    assert float(spread.min()) > 5.0, spread
    assert float(gap.mean()) > 0.5 and float(gap.median()) > 0.2, gap
    # The layers, not the input token, decide the prediction (tied random embeddings tend to echo the input).
    echo = (logits.argmax(-1) == torch.tensor(ids)).float().mean()
    assert float(echo) < 0.5

    chat = hf.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False, add_generation_prompt=True)
    assert "Hi there" in chat
    gen = transformers.GenerationConfig.from_pretrained(d)
    assert gen.eos_token_id is not None


@pytest.mark.oracle
def test_phi3_fused_weights_split_into_llama(generated: dict[str, Path]) -> None:
    """Splitting qkv_proj as [q; k; v] and gate_up_proj as [gate; up] gives an equivalent Llama model."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    d = generated["phi3"]
    v = VARIANTS["phi3"]
    phi3 = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    cfg = json.loads((d / "config.json").read_text())
    llama_cfg = transformers.LlamaConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads,
        num_key_value_heads=v.num_key_value_heads,
        head_dim=v.head_dim,
        rms_norm_eps=v.rms_norm_eps,
        rope_theta=v.rope_theta,
        max_position_embeddings=v.max_position_embeddings,
        tie_word_embeddings=False,
    )
    llama = transformers.LlamaForCausalLM(llama_cfg).eval()
    q = v.num_attention_heads * v.head_dim
    kv = v.num_key_value_heads * v.head_dim
    state = {}
    for k, w in _tensors(d).items():
        w = torch.from_numpy(w.astype(np.float32))
        if k.endswith("qkv_proj.weight"):
            p = k.removesuffix("qkv_proj.weight")
            state[p + "q_proj.weight"], state[p + "k_proj.weight"], state[p + "v_proj.weight"] = w.split([q, kv, kv])
        elif k.endswith("gate_up_proj.weight"):
            p = k.removesuffix("gate_up_proj.weight")
            state[p + "gate_proj.weight"], state[p + "up_proj.weight"] = w.chunk(2)
        else:
            state[k] = w
    missing, unexpected = llama.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    ids = torch.tensor([Tokenizer.from_file(str(d / "tokenizer.json")).encode("Hello world, again").ids])
    with torch.no_grad():
        torch.testing.assert_close(llama(ids).logits, phi3(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.oracle
def test_mistral_sliding_window_override_takes_effect(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    full = make_checkpoint("mistral", tmp_path / "full", dtype="float32")
    windowed = make_checkpoint("mistral", tmp_path / "sw", dtype="float32", sliding_window=8)
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        a = transformers.AutoModelForCausalLM.from_pretrained(full, dtype=torch.float32)(ids).logits[0]
        b = transformers.AutoModelForCausalLM.from_pretrained(windowed, dtype=torch.float32)(ids).logits[0]
    torch.testing.assert_close(a[:8], b[:8])  # identical while the context fits in the window
    assert float((a[8:] - b[8:]).abs().max()) > 1e-2
