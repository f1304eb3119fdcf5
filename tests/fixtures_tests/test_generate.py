"""Tests for the tiny-checkpoint generator (fixtures.generate): files, determinism, layout, configs and its CLI.

The checkpoints are the ground truth other tests convert and compare against, so these tests pin down that
they are reproducible and laid out like real checkpoints; their weights are checked in test_generate_weights.py,
their tokenizers in test_generate_tokenizers.py, that transformers loads them in test_generate_oracle.py.
"""

from __future__ import annotations

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

from fixtures.generate import main, make_checkpoint
from fixtures.variants import VARIANTS, FixtureVariant
from tests.fixtures_tests.shared import ROOT, generated_tensors

DEMO_DIR = ROOT / "fixtures" / "checkpoints" / "llama3"
MAX_CHECKPOINT_BYTES = 1_000_000


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


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
        t = generated_tensors(d)
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
    t = generated_tensors(d)
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
    v5 = generated_tensors(generated["gemma3-vlm"])
    assert "model.vision_tower.encoder.layers.3.mlp.fc2.weight" in v5
    assert "model.multi_modal_projector.mm_input_projection_weight" in v5
    legacy = generated_tensors(
        make_checkpoint("gemma3-vlm", tmp_path / "legacy", layout="vlm_legacy", config_dialect="v4"))
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


def test_overrides(tmp_path: Path) -> None:
    d = make_checkpoint("mistral", tmp_path / "m", sliding_window=8, dtype="bfloat16", config_dialect="v4", seed=1)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["sliding_window"] == 8 and cfg["torch_dtype"] == "bfloat16" and cfg["rope_theta"] == 1000000.0
    assert "rope_parameters" not in cfg
    default = make_checkpoint("mistral", tmp_path / "m_default")
    a = generated_tensors(d)["model.embed_tokens.weight"].astype(np.float32)
    b = generated_tensors(default)["model.embed_tokens.weight"].astype(np.float32)
    assert not np.allclose(a, b)  # a different seed gives different weights
    d2 = make_checkpoint("llama3", tmp_path / "l", config_dialect="v5", shards=3)
    cfg2 = json.loads((d2 / "config.json").read_text())
    assert cfg2["rope_parameters"]["rope_type"] == "llama3" and cfg2["rope_parameters"]["rope_theta"] == 500000.0
    assert len(list(d2.glob("model-*-of-00003.safetensors"))) == 3


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


# ----------------------------------------------------------------------------------------------------------------
# The command line, and the committed demo checkpoint


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
