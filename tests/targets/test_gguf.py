"""The gguf target end to end: write with gguf-py, quantize with llama.cpp, check parity in llama.cpp.

Everything runs on the real runtime (llama-cpp-python); nothing is mocked. Fixture checkpoints come from the
session-wide ``checkpoints`` fixture; each (variant, precision) artifact is converted once per module and
shared by the tests that read it: parity, the file's metadata and the runner. How architectures map onto
llama.cpp's is in test_gguf_arch.py; the precision table, refusals, errors and the CLI in test_gguf_contract.py.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fixtures.variants import VARIANTS
from sovpack import __version__
from sovpack._protocols import RunnerTraits
from sovpack.artifact import ArtifactMetadata
from sovpack.convert import ConvertResult, convert
from sovpack.errors import ParityError, SourceError, UsageError
from sovpack.parity.prompts import encode_prompts
from sovpack.reference import ReferenceModel
from sovpack.rope import rope_inv_freq
from sovpack.source.model import SourceModel, open_model
from sovpack.targets import gguf as gguf_target
from sovpack.targets.gguf.writer import read_tensor_types
from tests.targets.shared import fields, gguf_path, mean_kl, tensors

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
    assert types == read_tensor_types(result.out_dir / metadata.format_metadata["gguf_file"])  # what the file holds
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


# --------------------------------------------------------------------------------------------------------------
# the runner: generation through the artifact, runtime record, context, traits, lifecycle and errors


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
