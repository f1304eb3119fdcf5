"""The onnx target on mixture-of-experts families (Qwen3-MoE, Mixtral, gpt-oss), on real onnxruntime and genai.

Routed experts run as onnxruntime's own ``com.microsoft.MoE`` (fp32, fp16) or ``QMoE`` (int8, int4) node; the
tests check parity against the numpy reference through both runtimes, that the graph really uses the operator
(no dense fallback) with the attributes each family's routing needs, that the external data holds the stacked,
interleaved experts byte for byte, that the quantized experts compute exactly their stored RTN weights, and that
writing streams one expert at a time.
"""

from __future__ import annotations

import dataclasses
import json
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from fixtures.generate import make_checkpoint
from fixtures.variants import REALISTIC_NUMERICS, VARIANTS
from sovpack._io import no_progress
from sovpack.artifact import ArtifactMetadata
from sovpack.convert import ConvertResult, convert
from sovpack.errors import ConversionError
from sovpack.parity import thresholds_for
from sovpack.reference import ReferenceModel
from sovpack.source.model import open_model
from sovpack.targets import TARGETS, load_targets
from sovpack.targets.onnx import GENAI_CONFIG, GenaiRunner, OnnxRunner
from sovpack.targets.onnx.external_data import DATA_FILE
from sovpack.targets.onnx.graph import MODEL_FILE, DecoderBuilder
from sovpack.targets.onnx.moe import moe_plan, rtn_quantize
from sovpack.targets.onnx.precisions import F16, F32, min_onnxruntime
from tests.targets.shared import prompts, reference_on
from tests.targets.test_onnx_quant import stored_linears

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

# gpt-oss as bf16 (fused experts) and as published (MXFP4 experts): the same weights, read two ways.
MOE_VARIANTS = [v for v in ("qwen3moe", "qwen3moe-mixed", "mixtral", "gptoss", "gptoss-mxfp4", "gptoss-clamp")
                if v in VARIANTS]
GENAI_TYPES = {"qwen3_moe": "decoder", "mixtral": "decoder", "gpt_oss": "gptoss"}
# Quantized experts judged by the default thresholds on realistic-numerics checkpoints (hidden 256). Not listed:
# qwen3moe int8 (WARNED: max_rel 0.32 in one position) and gptoss int4/int8 (FAILED/WARNED) -- with the experts
# kept float32 and only the attention/dense layers quantized the metrics are the same, so those deviations are the
# int8/int4 attention moving hidden states across router near-ties, not the QMoE experts.
JUDGED_QUANTIZED = [("mixtral", "int8"), ("qwen3moe", "int4"), ("mixtral", "int4")]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx-moe-checkpoints")
    return {name: make_checkpoint(name, root / name) for name in MOE_VARIANTS}


@pytest.fixture(scope="module")
def artifact(ckpts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[..., ConvertResult]:
    """convert(variant, precision) with parity for fp32/fp16 (int8/int4 unjudged: sharp fixtures), cached."""
    root = tmp_path_factory.mktemp("onnx-moe-artifacts")
    cache: dict[tuple[str, str], ConvertResult] = {}

    def make(variant: str, precision: str) -> ConvertResult:
        key = (variant, precision)
        if key not in cache:
            cache[key] = convert(ckpts[variant], f"onnx:{precision}", root / f"{variant}-{precision}",
                                 parity=precision in ("fp32", "fp16"))
        return cache[key]

    return make


def _proto(out: Path, *, weights: bool = False) -> Any:
    return onnx.load(str(out / MODEL_FILE), load_external_data=weights)


def _external(out: Path, name: str) -> np.ndarray:
    """Initializer ``name`` read straight from the data file at its recorded offset."""
    init = next(t for t in _proto(out).graph.initializer if t.name == name)
    info = {e.key: e.value for e in init.external_data}
    dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
    raw = (out / info["location"]).read_bytes()[int(info["offset"]) : int(info["offset"]) + int(info["length"])]
    return np.frombuffer(raw, dtype=dtype).reshape(tuple(init.dims))


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_moe_families_pass_parity(artifact: Callable[..., ConvertResult], variant: str, precision: str) -> None:
    result = artifact(variant, precision)
    report = result.parity
    assert report is not None
    assert report.status == "PASSED", report.reasons
    m = report.metrics
    assert m.max_abs_error is not None and m.max_abs_error < 1e-4  # fp16 too: the fixtures' bf16 weights fit
    assert m.top1_agreement == 1.0 and m.greedy_agreement == 1.0
    assert m.greedy_identical + m.greedy_near_ties == m.prompts
    if precision == "fp32":
        assert m.mean_kl is not None and m.mean_kl < 1e-9 and m.greedy_identical == m.prompts
    assert report.thresholds == thresholds_for(precision)
    assert report.runtime["target"]["onnxruntime"] == ort.__version__


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_genai_runs_the_moe_artifacts(artifact: Callable[..., ConvertResult], ckpts: dict[str, Path],
                                      variant: str, precision: str) -> None:
    pytest.importorskip("onnxruntime_genai")
    out = artifact(variant, precision).out_dir
    config = json.loads((out / GENAI_CONFIG).read_text())
    spec = open_model(ckpts[variant]).spec
    assert config["model"]["type"] == GENAI_TYPES[spec.family]
    genai = GenaiRunner(out)
    ref = ReferenceModel(open_model(ckpts[variant]))
    stop = spec.eos_token_ids
    for ids in prompts(ckpts[variant]):
        assert genai.greedy(ids, 8, stop) == ref.greedy(ids, 8, stop)
    ids = prompts(ckpts[variant])[0]
    np.testing.assert_allclose(genai.prefill_logits(ids), ref.prefill_logits(ids), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------ graph and data


@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_graph_routes_with_the_moe_operator(artifact: Callable[..., ConvertResult], ckpts: dict[str, Path],
                                            variant: str) -> None:
    out = artifact(variant, "fp32").out_dir
    spec = open_model(ckpts[variant]).spec
    moe = spec.moe
    assert moe is not None
    nodes = list(_proto(out).graph.node)
    moe_nodes = [n for n in nodes if n.op_type == "MoE"]
    assert [n.name for n in moe_nodes] == [f"layers.{i}.moe/moe" for i in moe.sparse_layers]
    assert all(n.domain == "com.microsoft" for n in moe_nodes)
    # No dense fallback: no per-expert node anywhere, no gate/up Gemm in a sparse layer (dense layers keep theirs).
    names = [n.name for n in nodes]
    assert not [n for n in names if "experts." in n]
    for i in range(spec.num_layers):
        assert (f"layers.{i}.gate/gemm" in names) == (i not in moe.sparse_layers)
    clamped = moe.swiglu_limit is not None
    for node in moe_nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["k"] == moe.experts_per_token
        assert (attrs["activation_type"], attrs["swiglu_fusion"]) == (b"swiglu", 1)
        assert attrs["normalize_routing_weights"] == int(moe.router_softmax == "after_topk" or moe.norm_topk_prob)
        assert attrs["activation_alpha"] == pytest.approx(moe.swiglu_alpha if clamped else 1.0)
        assert attrs["activation_beta"] == pytest.approx(moe.swiglu_up_offset if clamped else 0.0)
        assert attrs["swiglu_limit"] == (pytest.approx(moe.swiglu_limit) if clamped else float("inf"))
        inputs = [*node.input, "", ""]
        assert inputs[1].endswith("router/gemm/out")  # router logits, not probabilities, feed the op
        assert bool(inputs[3]) == bool(inputs[5]) == moe.expert_bias  # fc1/fc2 biases
    # Attention sinks and the o bias (gpt-oss): a sink column per layer, dropped after the softmax.
    assert sum(n == f"layers.{i}.attn/with_sinks" for n in names for i in range(spec.num_layers)) == (
        spec.num_layers if spec.attention_sinks else 0)
    gemm_inputs = {n.name: list(n.input) for n in nodes if n.op_type == "Gemm"}
    assert (len(gemm_inputs["layers.0.o/gemm"]) == 3) == spec.o_bias
    meta = ArtifactMetadata.load(out).format_metadata
    assert meta["moe"]["op"] == "com.microsoft.MoE" and meta["moe"]["sparse_layers"] == list(moe.sparse_layers)
    assert meta["genai_model_type"] == GENAI_TYPES[spec.family]
    assert meta["min_onnxruntime"] == "1.23.1"
    assert "com.microsoft.MoE needs onnxruntime >= 1.23.1" in meta["min_onnxruntime_reasons"]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_external_data_holds_the_stacked_experts(artifact: Callable[..., ConvertResult], ckpts: dict[str, Path],
                                                 variant: str, precision: str) -> None:
    out = artifact(variant, precision).out_dir
    model = open_model(ckpts[variant])
    moe = model.spec.moe
    assert moe is not None
    dtype = F32 if precision == "fp32" else F16
    for i in moe.sparse_layers:
        p = f"layers.{i}."
        experts = range(moe.num_experts)
        fc1 = _external(out, f"{p}moe.fc1")
        fc2 = _external(out, f"{p}moe.fc2")
        assert fc1.dtype == dtype and fc2.dtype == dtype
        assert fc1.shape == (moe.num_experts, 2 * moe.expert_intermediate_size, model.spec.hidden_size)
        gate = np.stack([model.tensor(f"{p}experts.{e}.gate") for e in experts])
        up = np.stack([model.tensor(f"{p}experts.{e}.up") for e in experts])
        np.testing.assert_array_equal(fc1[:, 0::2], gate.astype(dtype))  # gate row j at 2j, up row j at 2j+1
        np.testing.assert_array_equal(fc1[:, 1::2], up.astype(dtype))
        down = np.stack([model.tensor(f"{p}experts.{e}.down") for e in experts])
        np.testing.assert_array_equal(fc2, down.astype(dtype))
        np.testing.assert_array_equal(_external(out, f"{p}router"), model.tensor(f"{p}router"))  # float32 always
        if moe.expert_bias:
            bias1 = _external(out, f"{p}moe.fc1_bias")
            np.testing.assert_array_equal(bias1[:, 0::2], np.stack([model.tensor(f"{p}experts.{e}.gate_bias")
                                                                    for e in experts]))
            np.testing.assert_array_equal(bias1[:, 1::2], np.stack([model.tensor(f"{p}experts.{e}.up_bias")
                                                                    for e in experts]))
    casts = [n for n in _proto(out).graph.node if n.op_type == "Cast" and "moe.fc" in n.input[0]]
    assert len(casts) == (0 if precision == "fp32" else 2 * len(moe.sparse_layers))


def test_sinks_matter_for_gpt_oss(artifact: Callable[..., ConvertResult], ckpts: dict[str, Path]) -> None:
    """The fixture's sinks change the logits, so gpt-oss parity PASSED means the graph applies them."""
    if "gptoss" not in ckpts:
        pytest.skip("the gptoss fixture is not in fixtures.variants.VARIANTS yet")
    model = open_model(ckpts["gptoss"])
    no_sinks = SimpleNamespace(spec=dataclasses.replace(model.spec, attention_sinks=False), tensor=model.tensor)
    ids = prompts(ckpts["gptoss"])[0]
    logits = OnnxRunner(artifact("gptoss", "fp32").out_dir).prefill_logits(ids)
    np.testing.assert_allclose(logits, ReferenceModel(model).prefill_logits(ids), atol=1e-4, rtol=0)
    assert np.abs(logits - ReferenceModel(no_sinks).prefill_logits(ids)).max() > 1e-2  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- quantized experts


def _same_greedy_up_to_near_ties(ids: list[int], ours: list[int], theirs: list[int],
                                 logits_of: Callable[[list[int]], np.ndarray]) -> None:
    """Two greedy runs agree, except from a step where ``theirs`` had a top-2 gap below 1e-4: the sharp int4/int8
    fixtures have a few such near ties, which float summation order (threads, kernels) may resolve either way."""
    if ours == theirs:
        return
    step = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b)
    top2 = np.sort(logits_of(ids + theirs[:step])[-1])[-2:]
    assert top2[1] - top2[0] < 1e-4, (ours, theirs)


def _dequantized_experts(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, k: int, bits: int,
                         block: int | None) -> np.ndarray:
    """The float [E, N, K] weights a QMoE node computes with (uint8 zero points; 4-bit low nibble first)."""
    experts, n = packed.shape[:2]
    size = block or k
    if bits == 4:
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(experts, n, k)
        zp = np.stack([zero_points & 0x0F, zero_points >> 4], axis=-1).reshape(experts, n, -1)[..., : k // size]
    else:
        q, zp = packed, zero_points.reshape(experts, n, k // size)
    blocks = q.reshape(experts, n, k // size, size).astype(np.float32) - zp[..., None].astype(np.float32)
    return (blocks * scales.reshape(experts, n, k // size, 1)).reshape(experts, n, k)


def _stored_reference(out: Path, ckpt: Path) -> ReferenceModel:
    proto = _proto(out, weights=True)  # tiny model: external data included
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    model = open_model(ckpt)
    overrides: dict[str, np.ndarray] = {}
    for node in proto.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "QMoE":
            p = node.name.split("moe/")[0]
            bits, block = attrs["expert_weight_bits"], attrs.get("block_size")
            fc1 = _dequantized_experts(inits[node.input[2]], inits[node.input[3]], inits[node.input[11]],
                                       model.spec.hidden_size, bits, block)
            fc2 = _dequantized_experts(inits[node.input[5]], inits[node.input[6]], inits[node.input[12]],
                                       fc1.shape[1] // 2, bits, block)
            for e in range(fc1.shape[0]):
                overrides[f"{p}experts.{e}.gate"] = fc1[e, 0::2]
                overrides[f"{p}experts.{e}.up"] = fc1[e, 1::2]
                overrides[f"{p}experts.{e}.down"] = fc2[e]
    # dense layers, and an untied head (8-bit)
    overrides.update({name: linear.weight() for name, linear in stored_linears(proto).items()})
    overrides["embed"] = model.tensor("embed").astype(np.float16).astype(np.float32)  # a float16 Gather table
    return reference_on(ckpt, overrides)


@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_quantized_experts_run_as_qmoe_on_their_stored_weights(
    artifact: Callable[..., ConvertResult], ckpts: dict[str, Path], variant: str, precision: str
) -> None:
    """QMoE computes exactly the RTN weights it stores: fp32-level parity with the reference run on them."""
    out = artifact(variant, precision).out_dir
    spec = open_model(ckpts[variant]).spec
    assert spec.moe is not None
    nodes = list(_proto(out).graph.node)
    qmoe = [n for n in nodes if n.op_type == "QMoE"]
    assert len(qmoe) == len(spec.moe.sparse_layers) and not [n for n in nodes if n.op_type == "MoE"]
    bits = int(precision[3:])
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in qmoe[0].attribute}
    assert attrs["expert_weight_bits"] == bits
    assert ("block_size" in attrs) == (bits == 4)  # int4 per block, int8 per output row (float32 kernel)
    meta = ArtifactMetadata.load(out).format_metadata
    assert meta["moe"]["quantization"]["bits"] == bits and meta["min_onnxruntime"] == "1.24"
    runner = OnnxRunner(out)
    stored = _stored_reference(out, ckpts[variant])
    for ids in prompts(ckpts[variant])[:3]:
        np.testing.assert_allclose(runner.prefill_logits(ids), stored.prefill_logits(ids), atol=2e-4, rtol=0)
        _same_greedy_up_to_near_ties(ids, runner.greedy(ids, 6), stored.greedy(ids, 6), stored.prefill_logits)


@pytest.mark.parametrize("variant", ["qwen3moe", "gptoss"])
def test_genai_runs_quantized_experts_like_plain_onnxruntime(artifact: Callable[..., ConvertResult],
                                                             ckpts: dict[str, Path], variant: str) -> None:
    pytest.importorskip("onnxruntime_genai")
    if variant not in ckpts:
        pytest.skip(f"the {variant} fixture is not in fixtures.variants.VARIANTS yet")
    out = artifact(variant, "int4").out_dir
    genai, plain = GenaiRunner(out), OnnxRunner(out)
    for ids in prompts(ckpts[variant])[:4]:
        np.testing.assert_allclose(genai.prefill_logits(ids), plain.prefill_logits(ids), atol=1e-4, rtol=0)
        _same_greedy_up_to_near_ties(ids, genai.greedy(ids, 8), plain.greedy(ids, 8), plain.prefill_logits)


@pytest.mark.parametrize(("variant", "precision"), JUDGED_QUANTIZED)
def test_quantized_moe_meets_default_thresholds(tmp_path: Path, variant: str, precision: str) -> None:
    ckpt = make_checkpoint(variant, tmp_path / "ckpt", **REALISTIC_NUMERICS)
    report = convert(ckpt, f"onnx:{precision}", tmp_path / "out").parity
    assert report is not None
    assert report.status == "PASSED", report.reasons
    assert report.thresholds == thresholds_for(precision) and report.metrics.greedy_agreement == 1.0


def test_rtn_quantize_round_trips_within_half_a_step() -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((6, 64)).astype(np.float32)
    for bits, block in ((4, 32), (4, 16), (8, None)):
        packed, scales, zero_points = rtn_quantize(weight, bits, block)
        assert packed.dtype == np.uint8 and packed.shape == (6, 64 * bits // 8)
        back = _dequantized_experts(packed[None], scales[None], zero_points[None], 64, bits, block)[0]
        step = np.repeat(scales.reshape(6, -1), block or 64, axis=1)
        assert (np.abs(back - weight) <= step / 2 + 1e-6).all()


# ---------------------------------------------------------------------------------- refusals and streaming


def test_what_the_moe_operator_cannot_compute_is_refused(ckpts: dict[str, Path], tmp_path: Path) -> None:
    load_targets()
    target = TARGETS.get("onnx")
    assert {"qwen3_moe", "mixtral", "gpt_oss"} <= target.families
    spec = open_model(ckpts["qwen3moe"]).spec
    assert spec.moe is not None
    shared = dataclasses.replace(spec, moe=dataclasses.replace(spec.moe, shared_expert_intermediate_size=32))
    gelu = dataclasses.replace(spec, activation="gelu")
    odd = dataclasses.replace(spec, moe=dataclasses.replace(spec.moe, expert_intermediate_size=40))
    for bad, precision, message in ((shared, "fp32", "shared expert"), (gelu, "fp16", "'gelu'"),
                                    (odd, "int4", "multiples of one block size")):
        with pytest.raises(ConversionError, match=message):
            target.write(SimpleNamespace(spec=bad), precision, tmp_path, no_progress)  # type: ignore[arg-type]
        assert not any(tmp_path.iterdir())  # refused before anything is written
    assert moe_plan(odd, F32, 8).block_size is None  # int8 is per row: any width
    assert min_onnxruntime(17, 8, [("MoE", {}), ("QMoE", {"expert_weight_bits": 4})])[0] == "1.24"
    with pytest.raises(ConversionError, match="no known onnxruntime release"):
        min_onnxruntime(17, 8, [("QMoE", {"expert_weight_bits": 2})])


def test_experts_stream_one_at_a_time(tmp_path: Path) -> None:
    """Writing a 16-expert layer never holds the layer's stack: peak memory stays a few experts."""
    ckpt = make_checkpoint("mixtral", tmp_path / "wide", num_experts=16, intermediate_size=512)
    model = open_model(ckpt)
    spec = model.spec
    assert spec.moe is not None and spec.moe.num_experts == 16
    expert_fc1 = 2 * spec.moe.expert_intermediate_size * spec.hidden_size * 4  # float32 bytes
    out = tmp_path / "out"
    out.mkdir()
    tracemalloc.start()  # numpy's buffers are traced; onnx is imported already (module level)
    try:
        built = DecoderBuilder(model, "fp32", out, no_progress).build()  # weights stream here (not the file copies)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    fc1 = next(t for t in built.proto.graph.initializer if t.name == "layers.0.moe.fc1")
    assert {e.key: e.value for e in fc1.external_data}["length"] == str(16 * expert_fc1)
    assert peak < 4 * expert_fc1, (peak, expert_fc1)  # the stack is 16 experts; at most a few are alive
    assert (out / DATA_FILE).stat().st_size > 3 * 16 * (expert_fc1 + expert_fc1 // 2)  # every layer's fc1 + fc2
