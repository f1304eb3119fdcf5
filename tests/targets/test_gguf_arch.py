"""How the gguf target maps architectures onto llama.cpp's: RoPE layouts and scaling, windows, LongRoPE."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from fixtures.generate import make_checkpoint
from sovpack.artifact import ArtifactMetadata
from sovpack.convert import convert
from sovpack.errors import ConversionError, UsageError
from sovpack.parity.prompts import encode_prompts
from sovpack.reference import ReferenceModel, rotate_half
from sovpack.source.model import open_model
from sovpack.source.spec import ModelSpec
from sovpack.targets import gguf as gguf_target
from tests.targets.shared import fields, gguf_path, tensors

pytest.importorskip("gguf")
# Only check that llama_cpp is there: importing it here would load llama.cpp before the target sets its OpenMP
# wait policy (see sovpack.targets.gguf.runtime.import_llama_cpp), and busy-waiting threads crawl on a loaded machine.
if importlib.util.find_spec("llama_cpp") is None:
    pytest.skip("llama-cpp-python is not installed", allow_module_level=True)


# --------------------------------------------------------------------------------------------------------------
# the llama-architecture RoPE permutation


def interleaved_rope(x: np.ndarray, inv_freq: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """RoPE on pairs (x[2i], x[2i+1]), as llama.cpp's non-NEOX mode does; x: [T, head_dim]."""
    angle = positions[:, None] * inv_freq[None, :]
    cos, sin = np.cos(angle), np.sin(angle)
    even, odd = x[:, 0::2], x[:, 1::2]
    out = np.empty_like(x)
    out[:, 0::2] = even * cos - odd * sin
    out[:, 1::2] = even * sin + odd * cos
    return out


def test_permutation_turns_rotate_half_into_interleaved_pairs() -> None:
    rng = np.random.default_rng(0)
    heads, head_dim, hidden, steps = 3, 8, 12, 5
    w = rng.standard_normal((heads * head_dim, hidden))
    h = rng.standard_normal((steps, hidden))
    inv_freq = 1.0 / 10000 ** (np.arange(0, head_dim, 2) / head_dim)
    positions = np.arange(steps, dtype=np.float64)
    angle = np.concatenate([positions[:, None] * inv_freq] * 2, axis=-1)
    permuted = gguf_target.permute_rope_rows(w, heads)
    for head in range(heads):
        rows = slice(head * head_dim, (head + 1) * head_dim)
        x = h @ w[rows].T  # HF layout
        hf = x * np.cos(angle) + rotate_half(x) * np.sin(angle)
        ours = interleaved_rope(h @ permuted[rows].T, inv_freq, positions)
        # Same rotated vector, in the permuted order: dot products between q and k are unchanged.
        order = gguf_target.permute_rope_rows(np.arange(head_dim), 1)
        np.testing.assert_allclose(ours, hf[:, order], atol=1e-12)
    bias = rng.standard_normal(heads * head_dim)
    expected = np.concatenate([bias[i * head_dim : (i + 1) * head_dim][order] for i in range(heads)])
    np.testing.assert_array_equal(gguf_target.permute_rope_rows(bias, heads), expected)


# --------------------------------------------------------------------------------------------------------------
# RoPE scaling and sliding windows as llama.cpp's keys


def test_yarn_attention_factor_and_betas(tmp_path: Path) -> None:
    """An explicit YaRN attention factor and non-default betas reach llama.cpp (key + runner arguments)."""
    scaling = {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 128,
        "attention_factor": 1.0,
        # With head_dim 16 these move the ramp from dims (0, 2) to (1, 3): without them logits are off by ~10.
        "beta_fast": 2.0,
        "beta_slow": 0.25,
    }
    ckpt = make_checkpoint("qwen2", tmp_path / "qwen2-yarn", rope_scaling=scaling)
    result = convert(ckpt, "gguf:f32", tmp_path / "out")
    assert result.parity is not None and result.parity.status == "PASSED", result.parity.reasons
    assert result.parity.metrics.max_rel_error < 1e-4
    f = fields(gguf_path(result))
    assert f["qwen2.rope.scaling.attn_factor"] == pytest.approx(1.0 / (1.0 + 0.1 * np.log(4.0)))
    assert f["qwen2.rope.scaling.yarn_beta_fast"] == pytest.approx(2.0)
    assert f["qwen2.rope.scaling.yarn_beta_slow"] == pytest.approx(0.25)


def test_short_sliding_window(tmp_path: Path) -> None:
    """llama.cpp's llama graph has no sliding window: the file advertises only the window as its context, and
    parity prompts longer than the window are refused rather than silently compared."""
    ckpt = make_checkpoint("mistral", tmp_path / "mistral-window", sliding_window=16)
    result = convert(ckpt, "gguf:f16", tmp_path / "out", parity=False)
    assert fields(gguf_path(result))["llama.context_length"] == 16
    notes = ArtifactMetadata.load(result.out_dir).format_metadata["notes"]
    assert any("sliding window" in n for n in notes)
    with pytest.raises(UsageError, match="sliding window"):
        convert(ckpt, "gguf:f16", tmp_path / "checked")


# --------------------------------------------------------------------------------------------------------------
# what llama.cpp's architectures derive instead of reading


def spec_of(checkpoints: dict[str, Path], variant: str, **changes: object) -> ModelSpec:
    return dataclasses.replace(open_model(checkpoints[variant]).spec, **changes)  # type: ignore[arg-type]


def test_what_the_architectures_fix_is_refused(checkpoints: dict[str, Path]) -> None:
    """What llama.cpp derives instead of reading (gemma attention scale, window pattern, NoPE interval, norms)
    must be what the source computes: anything else is refused, naming the difference."""
    arch_plan = gguf_target.arch_plan
    gemma2 = open_model(checkpoints["gemma2"]).spec
    arch_plan(gemma2)
    with pytest.raises(ConversionError, match=r"attention scale .* derives"):
        arch_plan(dataclasses.replace(gemma2, attention_scale=1 / 12))  # query_pre_attn_scalar 144
    with pytest.raises(ConversionError, match="always applies it"):
        arch_plan(dataclasses.replace(gemma2, final_logit_softcap=None))
    gemma3 = open_model(checkpoints["gemma3"]).spec
    arch_plan(gemma3)
    with pytest.raises(ConversionError, match=r"layer pattern SSFSSF; llama\.cpp.s gemma3 assumes every 6th"):
        arch_plan(dataclasses.replace(gemma3, layer_types=("sliding", "sliding", "full") * 2))
    with pytest.raises(ConversionError, match="attention logit soft-capping"):
        arch_plan(dataclasses.replace(gemma3, attn_logit_softcap=50.0))
    smollm3 = open_model(checkpoints["smollm3"]).spec
    with pytest.raises(ConversionError, match=r"layers without rope \[1, 3\]"):
        arch_plan(dataclasses.replace(smollm3, no_rope_layers=(1, 3)))
    olmo2 = open_model(checkpoints["olmo2"]).spec
    with pytest.raises(ConversionError, match="q/k norm head"):
        arch_plan(dataclasses.replace(olmo2, qk_norm_scope="head"))
    granite = open_model(checkpoints["granite"]).spec
    with pytest.raises(ConversionError, match="residual multiplier"):
        arch_plan(dataclasses.replace(open_model(checkpoints["llama3"]).spec, residual_multiplier=0.5))
    with pytest.raises(ConversionError, match="partial rotary"):
        arch_plan(dataclasses.replace(granite, rotary_dim=8))


# --------------------------------------------------------------------------------------------------------------
# phi3_longrope: written, but refused by the target (llama.cpp picks LongRoPE factors by its context size)


def test_phi3_longrope_is_refused_by_name(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """On the fixtures the switch is at 24 positions, below llama.cpp's smallest (256-padded) context, so
    llama.cpp rotates every pass with the long factors where the source uses the short ones up to 24."""
    target = gguf_target.GgufTarget()
    assert "phi3_longrope" not in target.families
    model = open_model(checkpoints["phi3.5"])
    with pytest.raises(ConversionError, match="'phi3_longrope'"):
        convert(checkpoints["phi3.5"], "gguf:f16", tmp_path / "out", parity=False)
    with pytest.raises(ConversionError, match="'phi3_longrope'"):
        target.write(model, "f16", tmp_path, lambda *_: None)


@pytest.fixture
def longrope_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer and runner with phi3_longrope allowed, to measure what keeps it refused."""
    from sovpack.targets.gguf import arch

    families = arch.FAMILIES | {"phi3_longrope"}
    monkeypatch.setattr(arch, "FAMILIES", families)
    monkeypatch.setattr(gguf_target.GgufTarget, "families", families)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["phi3.5", "phi4-mini"])
def test_phi3_longrope_short_and_long_regimes(
    longrope_enabled: None, checkpoints: dict[str, Path], tmp_path: Path, variant: str
) -> None:
    """The file is right in each regime: with the switch at 512 (an override) parity PASSES at f32 and f16 in the
    short regime; on the fixture (switch at 24) llama.cpp's long factors match the reference's for prompts past
    the switch, and the runner refuses to compare where the two pick different factors."""
    ckpt = make_checkpoint(
        variant, tmp_path / "ckpt", original_max_position_embeddings=512, max_position_embeddings=4096
    )
    for precision in ("f32", "f16"):
        result = convert(ckpt, f"gguf:{precision}", tmp_path / precision)
        assert result.parity is not None and result.parity.status == "PASSED", result.parity.reasons
    f = fields(gguf_path(result))
    spec = open_model(ckpt).spec
    assert f["phi3.rope.dimension_count"] == spec.rotary_size
    assert f["phi3.rope.scaling.original_context_length"] == 512
    assert f["phi3.rope.scaling.attn_factor"] == pytest.approx(spec.rope_scaling.attention_factor)
    stored = tensors(gguf_path(result))
    np.testing.assert_array_equal(stored["rope_factors_long.weight"].data, np.float32(spec.rope_scaling.long_factor))
    np.testing.assert_array_equal(stored["rope_factors_short.weight"].data, np.float32(spec.rope_scaling.short_factor))

    fixture = convert(checkpoints[variant], "gguf:f32", tmp_path / "fixture", parity=False)
    model = open_model(checkpoints[variant])
    prompt = max(encode_prompts(model.checkpoint.tokenizer_json), key=len)
    assert len(prompt) > 24
    plain = gguf_target.LlamaCppRunner(gguf_path(fixture), kv_cache="f32")  # no spec: llama.cpp's own choice
    try:
        np.testing.assert_allclose(
            plain.prefill_logits(prompt), ReferenceModel(model).prefill_logits(prompt), atol=1e-4
        )
    finally:
        plain.close()
    runner = gguf_target.GgufTarget().open_runner(fixture.out_dir, ArtifactMetadata.load(fixture.out_dir))
    try:
        with pytest.raises(UsageError, match="LongRoPE"):
            runner.prefill_logits(prompt[:10])
    finally:
        runner.close()
