"""What the generated weights hold: MoE experts (per expert, fused, MXFP4) and the numerics overrides."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fixtures.generate import make_checkpoint
from fixtures.gpt_oss import decode_mxfp4, encode_mxfp4
from fixtures.variants import REALISTIC_NUMERICS, REALISTIC_OUTLIERS, VARIANTS
from tests.fixtures_tests.shared import generated_tensors

# ----------------------------------------------------------------------------------------------------------------
# Mixture-of-experts layouts and MXFP4


def test_moe_weights_are_stored_per_expert(generated: dict[str, Path]) -> None:
    """Router and experts under the published names (what transformers 5 saves), one tensor per expert."""
    for name, block, (gate, up, down) in (
        ("qwen3moe", "mlp", ("gate_proj", "up_proj", "down_proj")),
        ("qwen3moe-mixed", "mlp", ("gate_proj", "up_proj", "down_proj")),
        ("mixtral", "block_sparse_moe", ("w1", "w3", "w2")),
    ):
        v = VARIANTS[name]
        t = generated_tensors(generated[name])
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
    bf, mx = generated_tensors(generated["gptoss"]), generated_tensors(generated["gptoss-mxfp4"])
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


# ----------------------------------------------------------------------------------------------------------------
# Numerics overrides: gains, outlier channels, realistic statistics


def test_numerics_overrides_scale_exactly_what_they_name(tmp_path: Path, generated: dict[str, Path]) -> None:
    """logit_gain scales the head (or the tied table), residual_gain sets o_proj/down_proj; nothing else moves.

    Gains are powers of two here, so the scaled float32 weights are exact multiples of the defaults.
    """
    assert (VARIANTS["llama3"].logit_gain, VARIANTS["llama3"].residual_gain) == (1.0, None)
    scaled_names = (".o_proj.weight", ".down_proj.weight")
    # untied: lm_head x 0.5; residual gain 1.0 instead of the untied default 2.0
    default = generated_tensors(generated["llama3"])
    soft = generated_tensors(make_checkpoint("llama3", tmp_path / "llama3", logit_gain=0.5, residual_gain=1.0))
    assert set(soft) == set(default)
    for name, a in soft.items():
        factor = 0.5 if name == "lm_head.weight" or name.endswith(scaled_names) else 1.0
        np.testing.assert_array_equal(a, default[name] * np.float32(factor), err_msg=name)
    # tied: the embedding table (input and head) x 0.5; residual gain 4.0 instead of the tied default 8.0
    default = generated_tensors(generated["qwen2"])
    soft = generated_tensors(make_checkpoint("qwen2", tmp_path / "qwen2", logit_gain=0.5, residual_gain=4.0))
    assert set(soft) == set(default) and "lm_head.weight" not in soft
    for name, a in soft.items():
        factor = 0.5 if name == "model.embed_tokens.weight" or name.endswith(scaled_names) else 1.0
        np.testing.assert_array_equal(a, default[name] * np.float32(factor), err_msg=name)


def test_outlier_channels_scale_only_the_pre_projection_norms(tmp_path: Path) -> None:
    """REALISTIC_OUTLIERS: the same draws as REALISTIC_NUMERICS, 4 channels of the two pre-projection norms 8x."""
    plain = generated_tensors(make_checkpoint("llama3", tmp_path / "plain", **REALISTIC_NUMERICS))
    loud = generated_tensors(make_checkpoint("llama3", tmp_path / "loud", **REALISTIC_OUTLIERS))
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
    t = generated_tensors(d)
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
