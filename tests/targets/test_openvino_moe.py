"""Mixture-of-experts models on the openvino target (issue 14), on real OpenVINO and openvino-genai (no mocks).

Qwen3-MoE (all sparse, and with a dense layer between sparse ones), Mixtral and gpt-oss (attention sinks,
alternating sliding and full layers, YaRN, biases, clamped SwiGLU; bf16 and MXFP4 checkpoints) are converted with
parity, run by LLMPipeline on both attention backends, and their IR is checked to be the tiled MoE block that the
CPU plugin rewrites into routed ``GatherMatmul`` kernels (each token multiplied by its top-k experts only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fixtures.generate import make_checkpoint
from fixtures.variants import REALISTIC_NUMERICS
from sovpack.artifact import ArtifactMetadata
from sovpack.convert import ConvertResult, convert
from sovpack.errors import ConversionError
from sovpack.parity import check_parity, thresholds_for
from sovpack.parity.prompts import PROMPTS, TOKENIZER_CORPUS, encode_prompts
from sovpack.reference import ReferenceModel
from sovpack.source.model import open_model
from sovpack.source.spec import ModelSpec
from sovpack.source.tokenizer import SourceTokenizer
from tests.targets.shared import reference_cache

ov = pytest.importorskip("openvino")
og = pytest.importorskip("openvino_genai")
pytest.importorskip("openvino_tokenizers")

from sovpack.targets.openvino import PARITY_CONFIG, OpenvinoRunner, OpenvinoTarget  # noqa: E402
from sovpack.targets.openvino.weights import SCHEMES, WeightFactory, quantization_plan, quantize  # noqa: E402

MOE = ["qwen3moe", "qwen3moe-mixed", "mixtral", "gptoss", "gptoss-mxfp4", "gptoss-clamp"]
MAX_NEW = 8


def gemms(spec: ModelSpec) -> int:
    """GatherMatmuls per sparse layer: gate, up, down; or gate_up and down (gpt-oss's fused clamped SwiGLU)."""
    assert spec.moe is not None
    return 2 if spec.moe.swiglu_limit is not None else 3


@pytest.fixture(scope="module")
def artifact(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
             ) -> Callable[..., ConvertResult]:
    """convert(variant, precision) with parity (or without: ``parity=False``), once per module."""
    root = tmp_path_factory.mktemp("ov-moe")
    cache: dict[tuple[str, str, bool], ConvertResult] = {}

    def make(variant: str, precision: str, parity: bool = True) -> ConvertResult:
        key = (variant, precision, parity)
        if key not in cache:
            out = root / f"{variant}-{precision}-{'p' if parity else 'np'}"
            cache[key] = convert(checkpoints[variant], f"openvino:{precision}", out, parity=parity)
        return cache[key]

    return make


@pytest.fixture(scope="module")
def references(checkpoints: dict[str, Path]) -> Callable[[str], ReferenceModel]:
    return reference_cache(checkpoints)


def runtime_ops(xml: Path) -> list[Any]:
    compiled = ov.Core().compile_model(xml, "CPU", dict(PARITY_CONFIG))
    return list(compiled.get_runtime_model().get_ops())


def layer_type(op: Any) -> str:
    return str(op.get_rt_info()["layerType"].astype(str))


# ----------------------------------------------------------------------------------------------- parity


def test_moe_families_are_written(checkpoints: dict[str, Path]) -> None:
    families = {open_model(checkpoints[v]).spec.family for v in MOE}
    assert families == {"qwen3_moe", "mixtral", "gpt_oss"}
    assert families <= OpenvinoTarget.families


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("variant", MOE)
def test_moe_parity(artifact: Callable[..., ConvertResult], variant: str, precision: str) -> None:
    result = artifact(variant, precision)
    report = result.parity
    assert report is not None
    assert report.status == "PASSED", report.reasons
    m = report.metrics
    limit = thresholds_for(precision).max_abs
    assert m.top1_agreement == 1.0 and m.greedy_agreement == 1.0
    assert m.max_abs_error is not None and limit is not None and m.max_abs_error <= limit
    if precision == "fp32":
        assert m.max_abs_error < 2e-4 and m.mean_kl is not None and m.mean_kl < 1e-9
        assert m.greedy_identical == m.prompts
    tok = report.tokenizer
    assert tok.status == "checked" and tok.matched == tok.total == len(TOKENIZER_CORPUS), tok.examples
    meta = ArtifactMetadata.load(result.out_dir)
    assert meta.spec.moe is not None
    assert any("mixture of experts" in n for n in meta.format_metadata["notes"])


# ------------------------------------------------------------------------------------------- the routing


@pytest.mark.parametrize(("variant", "precision"), [
    ("qwen3moe", "fp32"), ("mixtral", "fp16"), ("gptoss", "fp32"), ("gptoss-mxfp4", "fp16"),
    ("qwen3moe", "int8"), ("gptoss", "int4"), ("qwen3moe-mixed", "fp32"),
])
def test_ir_routes_each_token_to_its_top_k_experts(artifact: Callable[..., ConvertResult], variant: str,
                                                   precision: str) -> None:
    """The saved IR has a router (TopK, scatter) per sparse layer and the dense MLP elsewhere; compiled on CPU,
    every sparse layer's experts become GatherMatmuls over the top-k experts ([k, tokens, out]) and the tiled
    all-experts MatMuls, Tile and Scatter are gone."""
    out = artifact(variant, precision, parity=False).out_dir
    spec = ArtifactMetadata.load(out).spec
    moe = spec.moe
    assert moe is not None
    model = ov.Core().read_model(out / "openvino_model.xml")
    by_name = {op.get_friendly_name(): op for op in model.get_ops()}
    assert sum(op.get_type_name() == "TopK" for op in model.get_ops()) == len(moe.sparse_layers)
    for i in range(spec.num_layers):
        if spec.is_sparse(i):
            assert by_name[f"layers.{i}.router/topk"].get_type_name() == "TopK"
            assert by_name[f"layers.{i}.router/scatter"].get_type_name() == "ScatterElementsUpdate"
            assert f"layers.{i}.gate/matmul" not in by_name
        else:
            assert f"layers.{i}.gate/matmul" in by_name and f"layers.{i}.router/topk" not in by_name
    if variant == "qwen3moe-mixed":
        assert not spec.is_sparse(1)  # the fixture keeps a dense layer (mlp_only_layers)
    ops = runtime_ops(out / "openvino_model.xml")
    gathered = [op for op in ops if layer_type(op) == "GatherMatmul"]
    assert len(gathered) == gemms(spec) * len(moe.sparse_layers)
    assert {op.get_output_partial_shape(0)[0].get_length() for op in gathered} == {moe.experts_per_token}
    assert not [op for op in ops if layer_type(op) in ("Tile", "ScatterElementsUpdate")]
    if spec.attention_sinks:  # gpt-oss: SDPA with the sink input, so genai's paged-attention rewrite applies
        sdpa = [op for op in model.get_ops() if op.get_type_name() == "ScaledDotProductAttention"]
        assert len(sdpa) == spec.num_layers and {op.get_input_size() for op in sdpa} == {6}


# ------------------------------------------------------------------------------------------ openvino-genai


@pytest.mark.parametrize("backend", [None, "PA"])
@pytest.mark.parametrize("variant", ["qwen3moe", "mixtral", "gptoss"])
def test_llm_pipeline_generates_the_reference_tokens(artifact: Callable[..., ConvertResult],
                                                     checkpoints: dict[str, Path],
                                                     references: Callable[[str], ReferenceModel], variant: str,
                                                     backend: str | None) -> None:
    out = artifact(variant, "fp32").out_dir
    ref = references(variant)
    stops = ref.spec.eos_token_ids
    extra = {} if backend is None else {"ATTENTION_BACKEND": backend}
    pipe = og.LLMPipeline(str(out), "CPU", **extra, **PARITY_CONFIG)
    for ids in encode_prompts(checkpoints[variant] / "tokenizer.json")[:4]:
        config = og.GenerationConfig(max_new_tokens=MAX_NEW, do_sample=False)
        config.stop_token_ids = set(stops)
        result = pipe.generate(ov.Tensor(np.array([ids], dtype=np.int64)), config)
        assert list(result.tokens[0]) == ref.greedy(ids, MAX_NEW, stops)


@pytest.mark.parametrize("backend", ["SDPA", "PA"])
@pytest.mark.parametrize("variant", ["qwen3moe", "gptoss"])
def test_llm_pipeline_batched_text(artifact: Callable[..., ConvertResult], checkpoints: dict[str, Path],
                                   references: Callable[[str], ReferenceModel], variant: str, backend: str) -> None:
    """Text through the artifact's tokenizer, one by one and as one batch: routing is per token, so padding
    and batch neighbours must not change a sequence's experts."""
    out = artifact(variant, "fp32").out_dir
    ref = references(variant)
    source = SourceTokenizer(checkpoints[variant] / "tokenizer.json")
    stops = ref.spec.eos_token_ids
    texts = [PROMPTS[0], "Hello world", PROMPTS[2]]
    expected = [source.decode(ref.greedy(source.encode(t), MAX_NEW, stops)) for t in texts]
    pipe = og.LLMPipeline(str(out), "CPU", ATTENTION_BACKEND=backend, **PARITY_CONFIG)
    config = og.GenerationConfig(max_new_tokens=MAX_NEW, do_sample=False, apply_chat_template=False)
    config.stop_token_ids = set(stops)
    assert [pipe.generate(t, config) for t in texts] == expected
    assert list(pipe.generate(texts, config).texts) == expected


# -------------------------------------------------------------------------------------------- quantized


class RTNSource:
    """A source whose quantized matrices are replaced by their round-to-nearest dequantized values."""

    def __init__(self, model: Any, precision: str) -> None:
        self.model = model
        self.spec = model.spec
        self.plan = quantization_plan(model.spec, SCHEMES[precision])

    def tensor(self, name: str, dtype: Any = np.float32) -> np.ndarray:
        weight = self.model.tensor(name, np.float32)
        if name not in self.plan:
            return weight
        bits, symmetric, group = self.plan[name]
        return quantize(weight, bits=bits, symmetric=symmetric, group_size=group).dequantize()


@pytest.mark.parametrize(("variant", "precision"), [
    ("qwen3moe", "int8"), ("mixtral", "int4_sym"), ("gptoss", "int4"), ("gptoss-mxfp4", "int8_sym"),
])
def test_quantized_experts_compute_exactly_rtn(artifact: Callable[..., ConvertResult],
                                               checkpoints: dict[str, Path], variant: str, precision: str) -> None:
    """Against a reference using the same RTN weights (routers stay float), the integer IR meets fp32 thresholds:
    the stacked expert codes, scales, zero points and interleaved gate/up rows are laid out right."""
    result = artifact(variant, precision, parity=False)
    model = open_model(checkpoints[variant])
    reference = ReferenceModel(RTNSource(model, precision))  # type: ignore[arg-type]
    report = check_parity(reference, OpenvinoRunner(result.out_dir), target=f"openvino:{precision}",
                          precision="fp32", prompts=encode_prompts(checkpoints[variant] / "tokenizer.json")[:4])
    assert report.status == "PASSED", report.reasons
    assert report.metrics.max_abs_error is not None and report.metrics.max_abs_error < 1e-3
    plan = quantization_plan(model.spec, SCHEMES[precision])
    assert not [name for name in plan if name.endswith(".router")]
    weights = ArtifactMetadata.load(result.out_dir).format_metadata["weights"]
    assert weights["int4_tensors"] == sum(1 for bits, _, _ in plan.values() if bits == 4)
    assert weights["int8_tensors"] == sum(1 for bits, _, _ in plan.values() if bits == 8)
    assert weights["tensors"] == len(model.spec.tensor_shapes())


@pytest.fixture(scope="module")
def realistic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ov-moe-realistic")
    return {name: make_checkpoint(name, root / name, **REALISTIC_NUMERICS) for name in ("qwen3moe", "mixtral")}


@pytest.mark.parametrize(("variant", "precision"), [("mixtral", "int8"), ("mixtral", "int4"), ("qwen3moe", "int4")])
def test_quantized_moe_passes_default_thresholds(realistic: dict[str, Path], tmp_path: Path, variant: str,
                                                 precision: str) -> None:
    """On realistic-numerics checkpoints (as tests/targets/test_quantized_defaults.py), no overrides."""
    result = convert(realistic[variant], f"openvino:{precision}", tmp_path / "out")
    report = result.parity
    assert report is not None
    assert report.status == "PASSED", report.reasons
    assert report.thresholds == thresholds_for(precision)


# ---------------------------------------------------------------------------------- streaming, refusals


def test_experts_are_read_once_each_while_the_ir_is_written(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """Stacked expert constants are postponed: nothing is read while the graph is built, and saving reads every
    canonical tensor exactly once (one expert at a time into its stacked constant)."""
    from sovpack.targets.openvino.graph import build_model

    model = open_model(checkpoints["qwen3moe"])
    for precision in ("fp16", "int4"):
        read: list[str] = []
        factory = WeightFactory(model, SCHEMES[precision], read.append)
        graph = build_model(model.spec, factory)
        expert_reads = [n for n in read if ".experts." in n]
        assert expert_reads == []  # postponed until ov.save_model asks for the constants
        ov.save_model(graph, tmp_path / f"{precision}.xml", compress_to_fp16=False)
        assert sorted(read) == sorted(model.spec.tensor_shapes())


@pytest.mark.parametrize(("change", "message"), [
    ({"shared_expert_intermediate_size": 32}, "no shared experts"),
    ({"expert_bias": True}, "expert biases only with the clamped SwiGLU"),
])
def test_unsupported_moe_features_are_refused_by_name(checkpoints: dict[str, Path], tmp_path: Path,
                                                      change: dict[str, Any], message: str) -> None:
    model = open_model(checkpoints["mixtral"])
    assert model.spec.moe is not None
    spec = dataclasses.replace(model.spec, moe=dataclasses.replace(model.spec.moe, **change))
    with pytest.raises(ConversionError, match=message):
        OpenvinoTarget().write(dataclasses.replace(model, spec=spec), "fp16", tmp_path, lambda *_: None)
