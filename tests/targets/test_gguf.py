"""The gguf target end to end: write with gguf-py, quantize with llama.cpp, check parity in llama.cpp.

Everything runs on the real runtime (llama-cpp-python); nothing is mocked. Fixture checkpoints come from the
session-wide ``checkpoints`` fixture; each (variant, precision) artifact is converted once per module and
shared by the tests that read it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fixtures.generate import VARIANTS, make_checkpoint
from sovpack import __version__
from sovpack._protocols import RunnerTraits
from sovpack.artifact import ArtifactMetadata
from sovpack.convert import ConvertResult, convert
from sovpack.errors import ConversionError, MissingDependencyError, ParityError, SourceError, UsageError
from sovpack.parity.prompts import encode_prompts
from sovpack.parity.thresholds import DEFAULT_THRESHOLDS, Thresholds
from sovpack.reference import ReferenceModel, rope_inv_freq, rotate_half
from sovpack.source.model import SourceModel, open_model
from sovpack.source.spec import ModelSpec
from sovpack.targets import gguf as gguf_target
from sovpack.targets.base import TargetRef
from tests.targets.shared import mean_kl

gguf = pytest.importorskip("gguf")
# Only check that llama_cpp is there: importing it here would load llama.cpp before the target sets its OpenMP
# wait policy (see sovpack.targets.gguf.runtime.import_llama_cpp), and busy-waiting threads crawl on a loaded machine.
if importlib.util.find_spec("llama_cpp") is None:
    pytest.skip("llama-cpp-python is not installed", allow_module_level=True)

# Variants of the families this target writes (tests/test_contract.py checks that it refuses the rest by name).
FAMILIES = ["gemma", "llama2", "llama3", "mistral", "phi3", "qwen2", "qwen3"]
PRECISIONS = ("f32", "f16", "q8_0")
BYTE_LEVEL = ("llama3", "qwen2", "qwen3")
GGUF_TYPE_OF = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}
# q8_0 on the fixtures: llama.cpp rounds weights *and* activations to 8 bits in every matmul, worth 0.005-0.008
# nats of mean KL on these sharp-logit fixtures, within the 8-bit default (0.015, calibrated on real weights:
# tests/parity/test_int8_limits.py). test_q8_0_error_is_quantization_error shows the error is the quantization
# itself: the reference run on the artifact's own dequantized weights reproduces llama.cpp far more closely.

Converter = Callable[[str, str], ConvertResult]


@pytest.fixture(scope="module")
def converted(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Converter:
    """convert(checkpoint, "gguf:<precision>") once per (variant, precision), with parity."""
    root = tmp_path_factory.mktemp("gguf")
    cache: dict[tuple[str, str], ConvertResult] = {}

    def get(variant: str, precision: str) -> ConvertResult:
        key = (variant, precision)
        if key not in cache:
            ckpt = checkpoints[variant]
            # Limits llama.cpp's kernels cannot meet (Gemma's f16 GELU table at f32): the target publishes them.
            overrides = dict(gguf_target.parity_limits(open_model(ckpt).spec, precision))
            out = root / f"{variant}-{precision}"
            cache[key] = convert(ckpt, f"gguf:{precision}", out, threshold_overrides=overrides or None)
        return cache[key]

    return get


def fields(path: Path) -> dict[str, object]:
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()}


def tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def gguf_path(result: ConvertResult) -> Path:
    return result.out_dir / ArtifactMetadata.load(result.out_dir).format_metadata["gguf_file"]


# --------------------------------------------------------------------------------------------------------------
# parity: every family at f32, f16 and q8_0, tokenizer included


@pytest.mark.slow
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("variant", FAMILIES)
def test_family_parity(converted: Converter, variant: str, precision: str) -> None:
    result = converted(variant, precision)
    report = result.parity
    assert report is not None
    assert report.status == "PASSED", report.reasons
    assert (result.out_dir / f"{variant}-{precision}.gguf").is_file()
    assert (result.out_dir / "parity.json").is_file()

    # The tokenizer was checked in llama.cpp; every difference was predicted by a documented rule.
    tok = report.tokenizer
    assert tok.status == "checked"
    assert tok.mismatched == 0
    metadata = ArtifactMetadata.load(result.out_dir)
    known = metadata.traits.known_tokenizer_divergences
    assert tok.known_divergent == len(known)
    assert tok.matched + tok.known_divergent == tok.total
    if variant in BYTE_LEVEL:
        assert known == () and tok.matched == tok.total

    types = metadata.format_metadata["tensor_types"]
    assert GGUF_TYPE_OF[precision] in types
    assert set(types) <= {"F32", GGUF_TYPE_OF[precision], "F16"}


# The newer dense families this target writes, each checked at f32 and at the default precision (f16).
NEW_FAMILIES = ["granite", "olmo2", "smollm3", "gemma2", "gemma3", "gemma3-vlm"]
NEW_BYTE_LEVEL = ("granite", "olmo2", "smollm3")
NEW_ARCH = {
    "granite": "granite",
    "olmo2": "olmo2",
    "smollm3": "smollm3",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "gemma3-vlm": "gemma3",
}


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["f32", "f16"])
@pytest.mark.parametrize("variant", NEW_FAMILIES)
def test_new_family_parity(converted: Converter, variant: str, precision: str) -> None:
    """PASSED on llama.cpp with no override beyond the target's published limits (GELU at f32); parity prompts
    are longer than the fixtures' 8-token windows, so gemma2/gemma3's sliding layers really drop context."""
    result = converted(variant, precision)
    report = result.parity
    assert report is not None and report.status == "PASSED", report.reasons
    metrics = report.metrics
    assert metrics.greedy_agreement == 1.0 and metrics.top1_agreement == 1.0
    if precision == "f32":
        assert metrics.max_abs_error < (0.05 if variant.startswith("gemma") else 1e-4)
    else:
        assert metrics.mean_kl < 1e-4
    tok = report.tokenizer
    assert tok.status == "checked" and tok.mismatched == 0
    if variant in NEW_BYTE_LEVEL:
        assert tok.matched == tok.total
    metadata = ArtifactMetadata.load(result.out_dir)
    assert metadata.format_metadata["architecture"] == NEW_ARCH[variant]
    assert tok.known_divergent == len(metadata.traits.known_tokenizer_divergences)


def llama_cpp_generate(path: Path, ids: list[int], max_new_tokens: int, kv_f32: bool) -> list[int]:
    """llama.cpp's own generation loop (llama-cpp-python's Llama.generate, greedy sampler): the format's pipeline."""
    llama_cpp = gguf_target.import_llama_cpp()
    kv = llama_cpp.GGML_TYPE_F32 if kv_f32 else llama_cpp.GGML_TYPE_F16
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False, type_k=kv, type_v=kv)
    try:
        out: list[int] = []
        for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            out.append(int(token))
            if len(out) == max_new_tokens:
                break
        return out
    finally:
        llm.close()


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["f32", "f16"])
@pytest.mark.parametrize("variant", NEW_FAMILIES)
def test_new_family_pipeline(converted: Converter, checkpoints: dict[str, Path], variant: str, precision: str) -> None:
    """llama.cpp's generation loop continues a prompt longer than the sliding window exactly as the reference
    does (greedy, through llama.cpp's KV cache, past the window)."""
    result = converted(variant, precision)
    model = open_model(checkpoints[variant])
    prompt = max(encode_prompts(model.checkpoint.tokenizer_json), key=len)
    assert len(prompt) > 8 * 2  # beyond the fixtures' windows
    expected = ReferenceModel(model).greedy(prompt, 12)
    assert llama_cpp_generate(gguf_path(result), prompt, 12, precision == "f32") == expected


@pytest.fixture(scope="module")
def gemma256(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer Gemma whose matrices all have rows of 256 (K-quant super-blocks): nothing falls back."""
    root = tmp_path_factory.mktemp("gemma256")
    return make_checkpoint(
        "gemma", root / "gemma256", hidden_size=256, intermediate_size=256, head_dim=64, num_hidden_layers=1
    )


# The 4-bit precisions keep the plan's most sensitive tensors (up to 12.5% of the linear weights) at Q8_0;
# test_gguf_quant checks which.
K_TYPES = {"q4_k_m": {"Q4_K", "Q6_K", "Q8_0"}, "q5_k_m": {"Q5_K", "Q6_K"}, "q6_k": {"Q6_K"}}
OTHER_TYPES = {"q4_0": {"Q4_0", "Q8_0"}, "bf16": {"BF16"}}


@pytest.mark.slow
@pytest.mark.parametrize("precision", [*K_TYPES, *OTHER_TYPES])
def test_other_precisions(gemma256: Path, tmp_path: Path, precision: str) -> None:
    """llama.cpp's k-quant mixes and q4_0 (with sovpack's importance matrix) and gguf-py's bf16, judged by the
    default thresholds."""
    out = tmp_path / "out"
    result = convert(gemma256, f"gguf:{precision}", out)
    assert result.parity is not None and result.parity.status == "PASSED", result.parity.reasons
    meta = ArtifactMetadata.load(out).format_metadata
    weights = set(meta["tensor_types"]) - {"F32"}
    assert weights == {**K_TYPES, **OTHER_TYPES}[precision], "a weight fell back to another type"
    if precision in K_TYPES:
        assert meta["quantizer"].startswith("llama.cpp") and "importance matrix" in meta["quantizer"]
        main = {"q4_k_m": "Q4_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K"}[precision]
        assert meta["tensor_types"][main] >= 4  # the bulk of the weights, not just a few
    ftype = {
        "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
        "q5_k_m": gguf.LlamaFileType.MOSTLY_Q5_K_M,
        "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    }[precision]
    assert fields(out / f"gemma256-{precision}.gguf")["general.file_type"] == int(ftype)
    # The intermediate file and temporaries are gone.
    assert [p.name for p in out.iterdir() if p.name.startswith(".") or "intermediate" in p.name] == []


class DequantizedReference(ReferenceModel):
    """The numpy reference computing with the weights stored in a GGUF file (dequantized by gguf-py)."""

    def __init__(self, model: SourceModel, path: Path) -> None:
        super().__init__(model)
        spec = model.spec
        stored = {
            t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
            for t in gguf.GGUFReader(path).tensors
        }
        names = {"embed": "token_embd", "final_norm": "output_norm", "lm_head": "output"}
        per_layer = {"attn_norm": "attn_norm", "q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output"}
        per_layer |= {"mlp_norm": "ffn_norm", "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}
        self.stored: dict[str, np.ndarray] = {}
        for canonical, gguf_name in names.items():
            if f"{gguf_name}.weight" in stored:
                self.stored[canonical] = stored[f"{gguf_name}.weight"]
        for i in range(spec.num_layers):
            for canonical, gguf_name in per_layer.items():
                w = stored[f"blk.{i}.{gguf_name}.weight"]
                if canonical in ("q", "k"):  # undo the interleaved-RoPE row permutation
                    heads = spec.num_heads if canonical == "q" else spec.num_kv_heads
                    d = spec.head_dim
                    w = w.reshape(heads, d // 2, 2, -1).swapaxes(1, 2).reshape(heads * d, -1)
                self.stored[f"layers.{i}.{canonical}"] = w

    def _w(self, name: str) -> np.ndarray:
        return self.stored[name].astype(np.float32)


def test_q8_0_error_is_quantization_error(converted: Converter, checkpoints: dict[str, Path]) -> None:
    """llama.cpp computes what the stored q8_0 weights imply: its distance to a reference running on the very
    same dequantized weights is only llama.cpp's 8-bit activation rounding."""
    result = converted("llama3", "q8_0")
    model = open_model(checkpoints["llama3"])
    reference = ReferenceModel(model)
    dequantized = DequantizedReference(model, gguf_path(result))
    runner = gguf_target.GgufTarget().open_runner(result.out_dir, ArtifactMetadata.load(result.out_dir))
    ref_llama, ref_deq, deq_llama = [], [], []
    try:
        for ids in encode_prompts(model.checkpoint.tokenizer_json):
            ref, deq, llama = reference.prefill_logits(ids), dequantized.prefill_logits(ids), runner.prefill_logits(ids)
            ref_llama.append(mean_kl(ref, llama))
            ref_deq.append(mean_kl(ref, deq))
            deq_llama.append(mean_kl(deq, llama))
    finally:
        runner.close()
    weights_alone, total, runtime = np.mean(ref_deq), np.mean(ref_llama), np.mean(deq_llama)
    assert weights_alone > 0.4 * total  # the stored weights explain a large part of the error ...
    assert runtime < 0.005  # ... and the rest (activation rounding) is a third of the default q8_0 limit


# --------------------------------------------------------------------------------------------------------------
# metadata


def test_metadata_llama3(converted: Converter, checkpoints: dict[str, Path]) -> None:
    result = converted("llama3", "q8_0")
    path = gguf_path(result)
    f = fields(path)
    model = open_model(checkpoints["llama3"])
    spec = model.spec
    assert f["general.architecture"] == "llama"
    assert f["general.type"] == "model"
    assert f["general.name"] == "llama3"
    assert f["general.quantized_by"] == f"sovpack {__version__}"
    assert f["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert f["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    sources = model.checkpoint.source_files
    assert f["general.source.file.count"] == len(sources)
    for i, src in enumerate(sources):
        assert f[f"general.source.file.{i}.path"] == src.path
        assert f[f"general.source.file.{i}.sha256"] == src.sha256
        assert f[f"general.source.file.{i}.size"] == src.size
    assert f["llama.context_length"] == spec.max_position_embeddings
    assert f["llama.embedding_length"] == spec.hidden_size
    assert f["llama.block_count"] == spec.num_layers
    assert f["llama.feed_forward_length"] == spec.intermediate_size
    assert f["llama.attention.head_count"] == spec.num_heads
    assert f["llama.attention.head_count_kv"] == spec.num_kv_heads
    assert f["llama.attention.key_length"] == spec.head_dim
    assert f["llama.rope.dimension_count"] == spec.head_dim
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(spec.norm_eps)
    assert f["llama.rope.freq_base"] == pytest.approx(spec.rope_theta)
    assert f["llama.vocab_size"] == spec.vocab_size
    # Llama 3 scaling as llama.cpp expects it: per-frequency divisors in rope_freqs.weight.
    assert f["llama.rope.scaling.type"] == "none"
    factors = np.asarray(tensors(path)["rope_freqs.weight"].data, dtype=np.float64)
    scaled, _ = rope_inv_freq(spec)
    base = 1.0 / spec.rope_theta ** (np.arange(0, spec.head_dim, 2) / spec.head_dim)
    np.testing.assert_allclose(base / factors, scaled, rtol=1e-5)
    # The tokenizer.
    tok_json = json.loads(model.checkpoint.tokenizer_json.read_text(encoding="utf-8"))
    assert f["tokenizer.ggml.model"] == "gpt2"
    assert f["tokenizer.ggml.pre"] == "llama-bpe"
    assert len(f["tokenizer.ggml.tokens"]) == spec.vocab_size
    assert len(f["tokenizer.ggml.token_type"]) == spec.vocab_size
    assert len(f["tokenizer.ggml.merges"]) == len(tok_json["model"]["merges"])
    assert f["tokenizer.ggml.bos_token_id"] == spec.bos_token_id
    assert f["tokenizer.ggml.eos_token_id"] == 602  # tokenizer_config's eos_token, <|eot_id|>
    assert f["tokenizer.ggml.add_bos_token"] is True
    assert f["tokenizer.ggml.add_eos_token"] is False
    assert f["tokenizer.chat_template"] == model.checkpoint.chat_template
    control = [i for i, t in enumerate(f["tokenizer.ggml.token_type"]) if t == gguf.TokenType.CONTROL]
    assert control == [a["id"] for a in tok_json["added_tokens"]]


def test_metadata_rope_scaling_and_layouts(converted: Converter) -> None:
    qwen2 = fields(gguf_path(converted("qwen2", "f16")))
    assert qwen2["general.architecture"] == "qwen2"
    assert qwen2["qwen2.rope.scaling.type"] == "yarn"
    assert qwen2["qwen2.rope.scaling.factor"] == pytest.approx(4.0)
    assert qwen2["qwen2.rope.scaling.original_context_length"] == 128
    assert "qwen2.rope.scaling.attn_factor" not in qwen2  # HF's default attention factor is llama.cpp's too
    assert qwen2["tokenizer.ggml.pre"] == "qwen2"
    assert qwen2["tokenizer.ggml.add_bos_token"] is False
    assert "output.weight" not in tensors(gguf_path(converted("qwen2", "f16")))  # tied

    qwen3 = fields(gguf_path(converted("qwen3", "f16")))
    assert qwen3["qwen3.rope.scaling.type"] == "linear"
    assert qwen3["qwen3.rope.scaling.factor"] == pytest.approx(2.0)
    assert "blk.0.attn_q_norm.weight" in tensors(gguf_path(converted("qwen3", "f16")))

    phi3 = tensors(gguf_path(converted("phi3", "f16")))
    spec = VARIANTS["phi3"]
    h, ff, kv = spec.hidden_size, spec.intermediate_size, spec.num_key_value_heads * spec.head_dim
    assert [int(d) for d in phi3["blk.0.attn_qkv.weight"].shape] == [h, h + 2 * kv]  # GGUF lists dims inner-first
    assert [int(d) for d in phi3["blk.0.ffn_up.weight"].shape] == [h, 2 * ff]
    assert "blk.0.ffn_gate.weight" not in phi3 and "blk.0.attn_q.weight" not in phi3

    gemma = tensors(gguf_path(converted("gemma", "f16")))
    assert "output.weight" not in gemma

    llama2 = fields(gguf_path(converted("llama2", "f16")))
    assert llama2["tokenizer.ggml.model"] == "llama"
    assert "tokenizer.ggml.pre" not in llama2
    assert llama2["tokenizer.ggml.add_space_prefix"] is True
    assert len(llama2["tokenizer.ggml.scores"]) == len(llama2["tokenizer.ggml.tokens"])
    types = llama2["tokenizer.ggml.token_type"]
    assert sum(t == gguf.TokenType.BYTE for t in types) == 256
    assert types[0] == gguf.TokenType.UNKNOWN and llama2["tokenizer.ggml.unknown_token_id"] == 0


def test_metadata_new_families(converted: Converter, checkpoints: dict[str, Path]) -> None:
    """llama.cpp's own keys and tensors for every spec field the newer families use."""
    granite = fields(gguf_path(converted("granite", "f16")))
    extra = VARIANTS["granite"].extra_config or {}
    assert granite["general.architecture"] == "granite"
    assert granite["granite.embedding_scale"] == pytest.approx(extra["embedding_multiplier"])
    assert granite["granite.residual_scale"] == pytest.approx(extra["residual_multiplier"])
    assert granite["granite.attention.scale"] == pytest.approx(extra["attention_multiplier"])
    assert granite["granite.logit_scale"] == pytest.approx(extra["logits_scaling"])

    olmo2_path = gguf_path(converted("olmo2", "f16"))
    olmo2 = tensors(olmo2_path)
    spec = open_model(checkpoints["olmo2"]).spec
    assert [int(d) for d in olmo2["blk.0.attn_q_norm.weight"].shape] == [spec.q_size]  # over the projection
    assert [int(d) for d in olmo2["blk.0.attn_k_norm.weight"].shape] == [spec.kv_size]
    assert {"blk.0.post_attention_norm.weight", "blk.0.post_ffw_norm.weight"} <= set(olmo2)
    assert "blk.0.attn_norm.weight" not in olmo2 and "blk.0.ffn_norm.weight" not in olmo2

    smollm3 = fields(gguf_path(converted("smollm3", "f16")))
    assert smollm3["general.architecture"] == "smollm3"  # NoPE every 4th layer: llama.cpp's fixed interval
    assert open_model(checkpoints["smollm3"]).spec.no_rope_layers == (3,)

    gemma2_path = gguf_path(converted("gemma2", "f16"))
    gemma2 = fields(gemma2_path)
    extra = VARIANTS["gemma2"].extra_config or {}
    assert gemma2["gemma2.attn_logit_softcapping"] == pytest.approx(extra["attn_logit_softcapping"])
    assert gemma2["gemma2.final_logit_softcapping"] == pytest.approx(extra["final_logit_softcapping"])
    assert gemma2["gemma2.attention.sliding_window"] == 8
    assert gemma2["gemma2.context_length"] == open_model(checkpoints["gemma2"]).spec.max_position_embeddings
    assert "gemma2.attention.sliding_window_pattern" not in gemma2  # llama.cpp's default pattern is the source's
    assert {"blk.0.post_attention_norm.weight", "blk.0.ffn_norm.weight", "blk.0.post_ffw_norm.weight"} <= set(
        tensors(gemma2_path)
    )

    gemma3 = fields(gguf_path(converted("gemma3", "f16")))
    spec = open_model(checkpoints["gemma3"]).spec
    assert gemma3["gemma3.rope.freq_base"] == pytest.approx(spec.rope_theta)
    assert gemma3["gemma3.rope.freq_base_swa"] == pytest.approx(spec.rope_local_theta)
    assert gemma3["gemma3.rope.scaling.type"] == "linear"  # global layers only: llama.cpp never scales the local
    assert gemma3["gemma3.attention.sliding_window"] == 8
    assert "gemma3.final_logit_softcapping" not in gemma3
    notes = ArtifactMetadata.load(converted("gemma3", "f16").out_dir).format_metadata["notes"]
    assert any("applies the 8-token sliding window" in n for n in notes)


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


def test_license_from_readme(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    ckpt = tmp_path / "licensed"
    shutil.copytree(checkpoints["qwen3"], ckpt)
    (ckpt / "README.md").write_text("---\nlicense: apache-2.0\ntags: [test]\n---\n# A model\n", encoding="utf-8")
    result = convert(ckpt, "gguf:f16", tmp_path / "out", parity=False)
    assert fields(gguf_path(result))["general.license"] == "apache-2.0"
    no_license = fields(gguf_path(convert(checkpoints["qwen3"], "gguf:f16", tmp_path / "plain", parity=False)))
    assert "general.license" not in no_license


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
# errors, streaming, runner


def test_unsupported_pre_tokenizer_is_a_conversion_error(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    ckpt = tmp_path / "odd-tokenizer"
    shutil.copytree(checkpoints["llama3"], ckpt)
    path = ckpt / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+|\s+"
    path.write_text(json.dumps(data), encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=r"llama\.cpp cannot express this tokenizer"):
        convert(ckpt, "gguf:f16", out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != "odd-tokenizer"] == []


def test_failed_write_leaves_nothing(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tensor that cannot be read half-way through: the temporary file is removed, nothing is renamed."""
    model = open_model(checkpoints["llama2"])
    original = SourceModel.stored

    def failing(self: SourceModel, name: str) -> np.ndarray:
        if name == "layers.1.down":
            raise ConversionError("simulated read failure")
        return original(self, name)

    monkeypatch.setattr(SourceModel, "stored", failing)
    with pytest.raises(ConversionError, match="simulated"):
        gguf_target.GgufTarget().write(model, "q8_0", tmp_path, lambda *_: None)
    assert [p.name for p in tmp_path.iterdir() if p.suffix in (".gguf", ".tmp")] == []


def test_run_through_the_artifact(converted: Converter, checkpoints: dict[str, Path]) -> None:
    from sovpack.run import run

    result = run(converted("llama3", "f16").out_dir, prompt="The quick brown fox", max_new_tokens=5)
    reference = ReferenceModel(open_model(checkpoints["llama3"]))
    expected = reference.greedy(result.prompt_ids, 5, open_model(checkpoints["llama3"]).spec.eos_token_ids)
    assert result.runtime == "llama.cpp"
    assert result.generated_ids == expected
    assert isinstance(result.text, str)


def test_runner_records_its_runtime(converted: Converter) -> None:
    result = converted("qwen3", "f32")
    runner = gguf_target.GgufTarget().open_runner(result.out_dir, ArtifactMetadata.load(result.out_dir))
    try:
        runner.prefill_logits([1, 2, 3])
        info = runner.runtime_info()
    finally:
        runner.close()
    assert info["runtime"] == "llama.cpp"
    assert info["kv_cache_type"] == "f32"  # f32 artifacts run with an f32 KV cache
    assert info["n_threads"] == "2"
    assert len(info["gguf_sha256"]) == 64


def test_sliding_window_caps_the_context(converted: Converter) -> None:
    result = converted("mistral", "f16")
    spec = dataclasses.replace(ArtifactMetadata.load(result.out_dir).spec, sliding_window=8)
    runner = gguf_target.LlamaCppRunner(gguf_path(result), spec=spec)
    try:
        assert runner.context_limit == 8
        assert len(runner.greedy([1, 2, 3], 5)) == 5
        with pytest.raises(UsageError, match="sliding window"):
            runner.greedy([1, 2, 3, 4, 5, 6], 5)
    finally:
        runner.close()


def test_missing_packages_name_their_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(MissingDependencyError, match=r"sovpack\[llama\]"):
        gguf_target.import_llama_cpp()
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(MissingDependencyError, match=r"sovpack\[gguf\]"):
        gguf_target.import_gguf()


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


def test_cli_convert_run_inspect(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from sovpack.cli import cli

    out = tmp_path / "cli-gguf"
    args = ["convert", str(checkpoints["qwen3"]), "-t", "gguf:q8_0", "-o", str(out), "--json"]
    result = CliRunner().invoke(cli, args)  # at the default limits
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["target"] == "gguf:q8_0" and summary["parity"] == "PASSED"
    assert {"qwen3-q8_0.gguf", "tokenizer.json"} <= set(summary["files"])
    assert (out / "parity.json").is_file()

    ran = CliRunner().invoke(cli, ["run", str(out), "--prompt", "Hello world", "--max-new-tokens", "5", "--json"])
    assert ran.exit_code == 0, ran.output
    info = json.loads(ran.stdout)
    assert info["runtime"] == "llama.cpp" and isinstance(info["text"], str)
    model = open_model(checkpoints["qwen3"])
    assert info["generated_ids"] == ReferenceModel(model).greedy(info["prompt_ids"], 5, model.spec.eos_token_ids)

    shown = CliRunner().invoke(cli, ["inspect", str(out), "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["kind"] == "artifact"


# --------------------------------------------------------------------------------------------------------------
# the target's contracts: precision table, families, runner traits and lifecycle, errors


def test_precision_table_rows_are_consistent() -> None:
    target = gguf_target.GgufTarget()
    assert tuple(target.precisions) == ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "int4", "q5_k_m", "q6_k")
    assert target.default_precision == "f16"
    assert target.runtime_packages == ("gguf", "llama-cpp-python")
    for name, row in target.precisions.items():
        assert row.name == name
        assert isinstance(row.thresholds, Thresholds)
        assert row.thresholds == DEFAULT_THRESHOLDS[name]
        if row.quantized:
            assert row.weights.startswith("int"), row
        else:
            assert row.weights in ("float32", "float16", "bfloat16"), row
        assert TargetRef.parse(f"gguf:{name}").info == row
    assert {n for n, row in target.precisions.items() if row.quantized} == {"q8_0", "q4_0", "q4_k_m", "int4", "q5_k_m",
                                                                                   "q6_k"}


def test_a_family_outside_families_is_refused_by_name(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    target = gguf_target.GgufTarget()
    assert target.families == {
        *("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma"),
        *("granite", "olmo2", "smollm3", "gemma2", "gemma3"),
        *("qwen3_moe", "mixtral", "gpt_oss"),  # tests/targets/test_gguf_moe.py
        *("bert", "xlm_roberta", "modernbert"),  # tests/targets/test_gguf_encoder.py
    }
    model = open_model(checkpoints["llama3"])
    falcon = dataclasses.replace(model, spec=dataclasses.replace(model.spec, family="falcon"))
    with pytest.raises(ConversionError, match="'falcon'"):
        TargetRef.parse("gguf:f16").check_family(falcon.spec)
    with pytest.raises(ConversionError, match="'falcon'"):
        convert(falcon, "gguf:f16", tmp_path / "out", parity=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConversionError, match="'falcon'"):
        target.write(falcon, "f16", tmp_path, lambda *_: None)
    with pytest.raises(ConversionError, match="'falcon'"):  # no silent fallback to another family's limits
        gguf_target.parity_limits(falcon.spec, "f32")


def test_runner_traits_come_from_the_artifact(converted: Converter, checkpoints: dict[str, Path]) -> None:
    """Gemma at f32: the writer publishes llama.cpp's GELU limits as traits, and the runner carries them."""
    result = converted("gemma", "f32")
    metadata = ArtifactMetadata.load(result.out_dir)
    limits = gguf_target.parity_limits(open_model(checkpoints["gemma"]).spec, "f32")
    assert limits and dict(metadata.traits.parity_limits) == limits
    assert not {"parity_threshold_overrides", "known_tokenizer_divergences"} & set(metadata.format_metadata)
    runner = gguf_target.GgufTarget().open_runner(result.out_dir, metadata)
    try:
        assert runner.traits == metadata.traits
    finally:
        runner.close()
    plain = gguf_target.LlamaCppRunner(gguf_path(result))
    assert plain.traits == RunnerTraits()
    plain.close()


def test_runner_close_is_idempotent(converted: Converter) -> None:
    result = converted("qwen3", "f32")
    runner = gguf_target.GgufTarget().open_runner(result.out_dir, ArtifactMetadata.load(result.out_dir))
    runner.close()  # nothing opened yet
    runner.prefill_logits([1, 2, 3])
    assert runner.tokenize("Hello world")
    runner.close()
    assert runner._llm is None and runner._vocab is None  # model, context and vocabulary released
    runner.close()


def test_runtime_and_artifact_errors(converted: Converter, tmp_path: Path) -> None:
    """llama.cpp refusing a file is a ParityError; an artifact directory without its .gguf is a SourceError."""
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF but not really")
    runner = gguf_target.LlamaCppRunner(bad)
    try:
        with pytest.raises(ParityError, match="cannot load"):
            runner.tokenize("Hello")
    finally:
        runner.close()
    result = converted("qwen3", "f32")
    broken = tmp_path / "broken"
    shutil.copytree(result.out_dir, broken)
    (broken / ArtifactMetadata.load(broken).format_metadata["gguf_file"]).unlink()
    with pytest.raises(SourceError, match=r"expected one \.gguf file"):
        gguf_target.GgufTarget().open_runner(broken, ArtifactMetadata.load(broken))
