"""The onnx target end to end on real onnxruntime, against the numpy reference.

Every fixture family is converted through ``sovpack.convert.convert`` (parity included) and the artifacts are
then opened again: by the ONNX checker, by plain onnxruntime with left-padded batches and by the CLI (the same
artifacts on onnxruntime-genai: test_onnx_genai.py). Checkpoints and artifacts are made once per session
(tests/targets/conftest.py's ``ckpts`` and ``onnx_artifact``), shared with test_onnx_genai.py.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from fixtures.generate import make_checkpoint
from sovpack._io import no_progress
from sovpack._protocols import RunnerTraits
from sovpack.artifact import ArtifactMetadata
from sovpack.convert import ConvertResult, convert
from sovpack.errors import ConversionError, MissingDependencyError, ParityError, SourceError
from sovpack.parity import check_parity, thresholds_for
from sovpack.parity.thresholds import Thresholds
from sovpack.reference import ReferenceModel
from sovpack.source.model import open_model
from sovpack.targets import TARGETS, TargetRef, load_targets
from sovpack.targets.onnx import GENAI_CONFIG, GENAI_MODEL_TYPES, OnnxRunner, genai_config
from sovpack.targets.onnx.external_data import DATA_FILE, converted_chunks
from sovpack.targets.onnx.graph import MODEL_FILE
from sovpack.targets.onnx.precisions import PLANS, min_onnxruntime
from sovpack.targets.onnx.quantize import QUANT_BLOCK_SIZE
from tests.targets.shared import FAMILIES, NEW_FAMILIES, WINDOW, prompts, reference, reference_on
from tests.targets.test_onnx_quant import stored_linears

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


# ------------------------------------------------------------------------------------------- registration


def test_import_is_cheap_and_target_is_registered() -> None:
    code = (
        "import sys, sovpack.targets.onnx as m\n"
        "heavy = [n for n in ('onnx', 'onnxruntime', 'onnxruntime_genai') if n in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from sovpack.targets import TARGETS\n"
        "assert tuple(TARGETS.get('onnx').precisions) == ('fp32', 'fp16', 'int8', 'int4')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr
    load_targets()
    assert TARGETS.get("onnx").default_precision == "fp32"


def test_precision_table_is_consistent() -> None:
    load_targets()
    target = TARGETS.get("onnx")
    assert target.default_precision in target.precisions
    assert target.runtime_packages == ("onnx", "onnxruntime", "onnxruntime-genai")
    for name, row in target.precisions.items():
        assert row.name == name and name in PLANS
        assert isinstance(row.thresholds, Thresholds) and row.thresholds == thresholds_for(name)
        assert row.quantized == (PLANS[name].bits is not None)
        if row.quantized:
            assert row.weights.startswith("int") and row.weights == f"int{PLANS[name].bits}"
        else:
            assert row.weights == {"fp32": "float32", "fp16": "float16"}[name]
        assert row.runtime_floor is not None


def test_a_family_without_a_genai_type_is_refused_by_name(ckpts: dict[str, Path], tmp_path: Path) -> None:
    load_targets()
    target = TARGETS.get("onnx")
    assert target.families == frozenset(GENAI_MODEL_TYPES) | {"bert", "xlm_roberta", "modernbert"}
    spec = dataclasses.replace(open_model(ckpts["llama3"]).spec, family="falcon")
    with pytest.raises(ConversionError, match="'falcon'"):
        TargetRef.parse("onnx:fp32").check_family(spec)
    with pytest.raises(ConversionError, match="'falcon'"):  # never written as a llama
        genai_config(spec, MODEL_FILE)
    model = SimpleNamespace(spec=spec)  # the writer refuses before it reads a tensor
    with pytest.raises(ConversionError, match="'falcon'"):
        target.write(model, "fp32", tmp_path, no_progress)  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())


def test_missing_onnxruntime_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an uninstalled package looks like to import
    with pytest.raises(MissingDependencyError, match=r"onnxruntime.*sovpack\[onnx\]"):
        OnnxRunner(tmp_path)


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_passes_parity(onnx_artifact: Callable[..., ConvertResult], family: str, precision: str) -> None:
    result = onnx_artifact(family, precision)
    report = result.parity
    assert report is not None
    assert report.status == "PASSED", report.reasons
    m = report.metrics
    limit = thresholds_for(precision)
    assert m.max_abs_error is not None and limit.max_abs is not None and m.max_abs_error <= limit.max_abs
    assert m.top1_agreement == 1.0
    assert m.greedy_agreement == 1.0  # greedy decoding through the model's own KV cache in onnxruntime
    if precision == "fp32":
        assert m.max_abs_error < 1e-4 and m.mean_kl is not None and m.mean_kl < 1e-9
        assert m.greedy_identical == m.prompts
    else:  # fp16 rounding may flip a reference near-tie, which the harness excuses
        assert m.greedy_identical + m.greedy_near_ties == m.prompts
    assert report.runtime["target"]["runtime"] == "onnxruntime"
    assert report.runtime["target"]["onnxruntime"] == ort.__version__
    assert "CPUExecutionProvider" in report.runtime["target"]["providers"]
    saved = json.loads((result.out_dir / "parity.json").read_text())
    assert saved["status"] == "PASSED"


def test_sliding_window_is_applied(onnx_artifact: Callable[..., ConvertResult], ckpts: dict[str, Path]) -> None:
    windowed = onnx_artifact(WINDOW, "fp32")
    assert windowed.parity is not None
    assert windowed.parity.status == "PASSED", windowed.parity.reasons
    # The window matters for these prompts: without it the same weights give other logits.
    ids = prompts(ckpts[WINDOW])[0]
    assert len(ids) > 5
    plain = OnnxRunner(onnx_artifact("mistral", "fp32").out_dir).prefill_logits(ids)  # mistral fixture: window 4096
    assert np.abs(OnnxRunner(windowed.out_dir).prefill_logits(ids) - plain).max() > 1e-2


# ----------------------------------------------------------------------------- the newer dense families

# What each new fixture variant must show in its graph: the feature nodes the writer emits for its spec fields.
_NEW_FAMILY_TYPES = {
    "gemma2": "gemma2", "gemma3": "gemma3_text", "gemma3-vlm": "gemma3_text", "granite": "granite",
    "olmo2": "decoder", "phi3.5": "phi3", "phi4-mini": "phi3", "smollm3": "smollm3",
}


def _nodes(out: Path) -> list[Any]:
    return list(onnx.load(str(out / MODEL_FILE), load_external_data=False).graph.node)


@pytest.mark.parametrize("variant", NEW_FAMILIES)
def test_new_family_metadata_and_genai_type(onnx_artifact: Callable[..., ConvertResult], ckpts: dict[str, Path],
                                            variant: str) -> None:
    out = onnx_artifact(variant, "fp32").out_dir
    spec = open_model(ckpts[variant]).spec
    meta = ArtifactMetadata.load(out)
    fmt = meta.format_metadata
    config = json.loads((out / GENAI_CONFIG).read_text())
    assert config["model"]["type"] == fmt["genai_model_type"] == _NEW_FAMILY_TYPES[variant]
    assert meta.spec.family == spec.family and meta.traits == RunnerTraits()
    notes = " ".join(fmt["notes"])
    windowed = any(spec.layer_window(i) is not None for i in range(spec.num_layers))
    assert ("sliding windows are applied by the graph" in notes) == windowed
    assert ("longrope" in notes) == (spec.rope_scaling.kind == "longrope")
    assert ("generic decoder-only type" in notes) == (variant == "olmo2")


def test_new_family_features_are_in_the_graph(onnx_artifact: Callable[..., ConvertResult],
                                              ckpts: dict[str, Path]) -> None:
    def ops(variant: str, op_type: str, contains: str = "") -> list[str]:
        return [n.name for n in _nodes(onnx_artifact(variant, "fp32").out_dir) if n.op_type == op_type and
                contains in n.name]

    # Gemma 2: attention soft-cap in every layer plus the final one; one bias per window (sliding and full).
    gemma2 = open_model(ckpts["gemma2"]).spec
    assert len(ops("gemma2", "Tanh", "attn/tanh")) == gemma2.num_layers
    assert ops("gemma2", "Tanh", "lm_head/tanh") == ["lm_head/tanh"]
    assert sorted(ops("gemma2", "Where", "mask/")) == ["mask/full/bias", f"mask/window{gemma2.sliding_window}/bias"]
    assert len(ops("gemma2", "Mul", "post_norm/scale")) == 2 * gemma2.num_layers  # sandwich norms
    # Gemma 3: local and global rope tables; q/k norms per head.
    assert {n.split("/")[1] for n in ops("gemma3", "Cos")} == {"local", "global"}
    # SmolLM3: no rope nodes in its NoPE layer.
    smol = open_model(ckpts["smollm3"]).spec
    roped = {n.split(".")[1] for n in ops("smollm3", "Add", "_rope/rope")}
    assert roped == {str(i) for i in range(smol.num_layers)} - {str(i) for i in smol.no_rope_layers}
    # OLMo 2: no pre norms, post norms, q/k norms over the whole projection (before the head split).
    assert not ops("olmo2", "Mul", "attn_norm/scale") and len(ops("olmo2", "Mul", "post_norm/scale")) == 4
    # Granite: residual multiplier per sublayer and the logits divisor.
    assert len(ops("granite", "Mul", "residual_scale")) == 4 and ops("granite", "Div", "lm_head/divide")
    # Phi-3.5 / Phi-4-mini: longrope's per-pass table selection; Phi-4-mini rotates 12 of 16 dims.
    assert ops("phi3.5", "Where", "rope/global/inv_freq") and ops("phi3.5", "ReduceMax")
    assert len(ops("phi4-mini", "Split", "split_rotary")) == 2 * open_model(ckpts["phi4-mini"]).spec.num_layers
    assert not ops("phi3.5", "Split", "split_rotary")


@pytest.mark.parametrize("variant", ["gemma2", "gemma3"])
def test_new_family_windows_matter(onnx_artifact: Callable[..., ConvertResult], ckpts: dict[str, Path],
                                   tmp_path: Path, variant: str) -> None:
    """The 8-token windows change these prompts' logits: parity PASSED means the artifact applies them."""
    wide = make_checkpoint(variant, tmp_path / "wide", sliding_window=512)
    unwindowed = convert(wide, "onnx:fp32", tmp_path / "wide-out", parity=False).out_dir
    ids = prompts(ckpts[variant])[0]
    assert len(ids) > 8
    windowed = OnnxRunner(onnx_artifact(variant, "fp32").out_dir).prefill_logits(ids)
    np.testing.assert_allclose(windowed, reference(ckpts[variant]).prefill_logits(ids), atol=1e-4, rtol=0)
    assert np.abs(windowed - OnnxRunner(unwindowed).prefill_logits(ids)).max() > 1e-2


@pytest.mark.parametrize("variant", ["phi3.5", "phi4-mini"])
def test_longrope_switches_per_forward_pass(onnx_artifact: Callable[..., ConvertResult], ckpts: dict[str, Path],
                                            variant: str) -> None:
    """Short factors up to original_max_position_embeddings positions, long ones beyond; cached keys keep their
    rotation, so a decode crossing the switch follows the reference token for token."""
    runner = OnnxRunner(onnx_artifact(variant, "fp32").out_dir)
    ref = reference(ckpts[variant])
    switch = ref.spec.rope_scaling.original_max_position_embeddings
    assert switch is not None
    ids = [i for p in prompts(ckpts[variant]) for i in p][: switch + 1]
    for n in (switch, switch + 1):  # the last pass with short factors, the first with long ones
        np.testing.assert_allclose(runner.prefill_logits(ids[:n]), ref.prefill_logits(ids[:n]), atol=1e-4, rtol=0)
    start = ids[: switch - 3]
    assert runner.greedy(start, 8) == ref.greedy(start, 8)  # crosses the switch while decoding
    shorter = runner.prefill_logits(ids[: switch + 1])[:switch]
    assert np.abs(shorter - runner.prefill_logits(ids[:switch])).max() > 1e-3  # the factors differ


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_passes_its_default_thresholds(onnx_artifact: Callable[..., ConvertResult], family: str) -> None:
    report = onnx_artifact(family, "int8").parity
    assert report is not None
    assert report.status == "PASSED", report.reasons
    assert report.thresholds == thresholds_for("int8")
    assert report.metrics.top1_agreement == 1.0


def dequantized_reference(out: Path, ckpt: Path, precision: str) -> ReferenceModel:
    """The numpy reference over exactly the weights a quantized artifact stores (MatMulNBits unpacked)."""
    bits = PLANS[precision].bits
    assert bits is not None
    model = open_model(ckpt)
    stored = stored_linears(onnx.load(str(out / MODEL_FILE)))  # external data included: tiny model
    untied = not model.spec.tie_word_embeddings
    assert len(stored) == 7 * model.spec.num_layers + untied  # q, k, v, o, gate, up, down (+ an untied head)
    assert untied == ("lm_head" in stored) and (not untied or stored["lm_head"].bits == 8)  # the head: 8-bit
    # int4's plan keeps its most sensitive tensors (and those no block size fits) at 8 bits
    assert {linear.bits for linear in stored.values()} <= ({4, 8} if bits == 4 else {bits})
    overrides: dict[str, np.ndarray] = {name: linear.weight() for name, linear in stored.items()}
    overrides["embed"] = model.tensor("embed").astype(np.float16).astype(np.float32)  # a float16 Gather table
    return reference_on(ckpt, overrides)


@pytest.mark.parametrize(("family", "precision"), [("llama3", "int4"), ("qwen2", "int4"), ("phi3", "int8")])
def test_quantized_artifact_computes_its_stored_weights(onnx_artifact: Callable[..., ConvertResult],
                                                        ckpts: dict[str, Path], family: str, precision: str) -> None:
    """The reference run on the artifact's own dequantized weights matches it at fp32 parity."""
    out = onnx_artifact(family, precision).out_dir
    ideal = dequantized_reference(out, ckpts[family], precision)
    report = check_parity(ideal, OnnxRunner(out), target=f"onnx:{precision}", precision="fp32",
                          prompts=prompts(ckpts[family]))
    assert report.status == "PASSED", report.reasons
    assert report.metrics.max_abs_error is not None and report.metrics.max_abs_error < 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_int4_deviation_from_the_source_is_its_stored_weights(onnx_artifact: Callable[..., ConvertResult],
                                                       ckpts: dict[str, Path], family: str) -> None:
    out = onnx_artifact(family, "int4").out_dir
    source, ids = reference(ckpts[family]), prompts(ckpts[family])
    ideal = dequantized_reference(out, ckpts[family], "int4")
    # Logit metrics only (greedy through the KV cache is covered at fp32/fp16 and by the exactness test).
    judged = check_parity(source, OnnxRunner(out), target="onnx:int4", precision="int4", prompts=ids,
                          max_new_tokens=0)
    expected = check_parity(source, ideal, target="numpy-int4", precision="int4", prompts=ids,
                            max_new_tokens=0)
    got, want = judged.metrics, expected.metrics
    assert got.mean_kl == pytest.approx(want.mean_kl, rel=0.02)
    assert got.max_rel_error == pytest.approx(want.max_rel_error, rel=0.02)
    assert got.top1_agreement == pytest.approx(want.top1_agreement, abs=0.02)
    assert got.mean_kl is not None and got.mean_kl < 1.0  # sanity: far from unrelated weights (KL > 1)


# --------------------------------------------------------------------------------- the artifact's files


@pytest.mark.parametrize(("family", "precision"), [("llama3", "fp32"), ("gemma", "fp16"), ("qwen3", "int4"),
                                                   ("phi3", "int8")])
def test_checker_and_external_data(onnx_artifact: Callable[..., ConvertResult], ckpts: dict[str, Path],
                                   family: str, precision: str) -> None:
    out = onnx_artifact(family, precision).out_dir
    onnx.checker.check_model(str(out / MODEL_FILE), full_check=True)  # by path: external data is used
    proto = onnx.load(str(out / MODEL_FILE), load_external_data=False)
    data_size = (out / DATA_FILE).stat().st_size
    assert (out / MODEL_FILE).stat().st_size < 200_000  # the graph only
    names = set(open_model(ckpts[family]).tensor_names())
    external = 0
    for tensor in proto.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            assert not tensor.name.startswith(("layers.", "embed", "lm_head", "final_norm")), tensor.name
            assert len(tensor.raw_data) <= 4096  # shape constants, eps, rope inverse frequencies
            continue
        info = {e.key: e.value for e in tensor.external_data}
        assert info["location"] == DATA_FILE
        offset, length = int(info["offset"]), int(info["length"])
        assert offset % 64 == 0 and offset + length <= data_size
        external += 1
    parts = (".q4", ".scales", ".zero_points", ".zero_residual")
    stored = {t.name.rsplit(".", 1)[0].removesuffix(".high").removesuffix(".low") if t.name.endswith(parts)
              else t.name
              for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert stored == names  # every canonical tensor is stored once, externally
    assert external >= len(names)
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".data")) == [DATA_FILE]


@pytest.mark.parametrize(("precision", "min_ort", "weight_dtype"),
                         [("fp32", "1.12", "float32"), ("fp16", "1.12", "float16"), ("int4", "1.17", "int4"),
                          ("int8", "1.17", "int8")])
def test_metadata_records_versions(onnx_artifact: Callable[..., ConvertResult], precision: str, min_ort: str,
                                   weight_dtype: str) -> None:
    out = onnx_artifact("qwen2", precision).out_dir
    meta = ArtifactMetadata.load(out)
    fmt = meta.format_metadata
    proto = onnx.load(str(out / MODEL_FILE), load_external_data=False)
    assert fmt["opset"] == 17 == {o.domain: o.version for o in proto.opset_import}[""]
    assert fmt["ir_version"] == proto.ir_version == 8
    assert fmt["min_onnxruntime"] == min_ort
    assert any(min_ort in reason for reason in fmt["min_onnxruntime_reasons"])
    assert fmt["weight_dtype"] == weight_dtype and fmt["compute_dtype"] == "float32"
    assert list(meta.files) == sorted(meta.files) and {MODEL_FILE, DATA_FILE, GENAI_CONFIG} <= set(meta.files)
    assert TARGETS.get("onnx").precisions[precision].runtime_floor == min_ort  # the table agrees with the rule
    assert meta.traits == RunnerTraits()
    if precision in ("int4", "int8"):
        quant = fmt["quantization"]
        assert quant["bits"] == int(precision[3:]) and quant["block_size"] == QUANT_BLOCK_SIZE
        assert "com.microsoft" in fmt["opset_imports"]
    else:
        assert fmt["quantization"] is None and "com.microsoft" not in fmt["opset_imports"]


def test_min_onnxruntime_rule_and_fp16_range() -> None:
    assert min_onnxruntime(17, 8, [])[0] == "1.12"
    assert min_onnxruntime(17, 8, [("MatMulNBits", {"bits": 4})] * 3)[0] == "1.17"
    assert min_onnxruntime(17, 8, [("MatMulNBits", {"bits": 4}), ("MatMulNBits", {"bits": 8})])[0] == "1.23"
    float_zero = ("MatMulNBits", {"bits": 4, "float_zero_points": True})
    assert min_onnxruntime(17, 8, [float_zero, ("MatMulNBits", {"bits": 4})])[0] == "1.18"
    assert min_onnxruntime(17, 8, [float_zero, ("MatMulNBits", {"bits": 8})])[0] == "1.23"
    unknown: list[tuple[int, int, list[tuple[str, dict[str, Any]]]]] = [
        (99, 8, []), (17, 99, []), (17, 8, [("GroupQueryAttention", {})]), (17, 8, [("MatMulNBits", {"bits": 3})]),
        (17, 8, [("MatMulNBits", {"bits": 8, "float_zero_points": True})])]
    for bad in unknown:
        with pytest.raises(ConversionError, match="no known onnxruntime"):
            min_onnxruntime(*bad)
    big = np.array([[1.0, 7e4]], dtype=np.float32)
    with pytest.raises(ConversionError, match="beyond the float16 range"):
        list(converted_chunks("layers.0.q", big, np.dtype(np.float16)))


def test_artifact_carries_genai_config_and_tokenizer(onnx_artifact: Callable[..., ConvertResult],
                                                     ckpts: dict[str, Path]) -> None:
    out = onnx_artifact("llama3", "fp32").out_dir
    spec = open_model(ckpts["llama3"]).spec
    config = json.loads((out / GENAI_CONFIG).read_text())
    model, decoder = config["model"], config["model"]["decoder"]
    assert model["type"] == "llama" and model["vocab_size"] == spec.vocab_size
    assert model["context_length"] == spec.max_position_embeddings
    assert model["bos_token_id"] == spec.bos_token_id and model["eos_token_id"] == list(spec.eos_token_ids)
    assert decoder["filename"] == MODEL_FILE and decoder["head_size"] == spec.head_dim
    assert (decoder["num_hidden_layers"], decoder["num_attention_heads"], decoder["num_key_value_heads"]) == (
        spec.num_layers, spec.num_heads, spec.num_kv_heads)
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert decoder["outputs"]["present_value_names"] == "present.%d.value"
    assert "session_options" in decoder
    assert config["search"]["do_sample"] is False and config["search"]["num_beams"] == 1
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (ckpts["llama3"] / name).read_bytes()
    assert {GENAI_MODEL_TYPES[open_model(ckpts[f]).spec.family] for f in FAMILIES} == {
        "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text", "granite", "decoder",
        "smollm3"}


def test_io_signature_is_the_optimum_genai_one(onnx_artifact: Callable[..., ConvertResult],
                                               ckpts: dict[str, Path]) -> None:
    spec = open_model(ckpts["qwen3"]).spec
    runner = OnnxRunner(onnx_artifact("qwen3", "fp32").out_dir)
    inputs = {i.name: i for i in runner.session.get_inputs()}
    outputs = {o.name: o for o in runner.session.get_outputs()}
    assert inputs["input_ids"].shape == inputs["position_ids"].shape == ["batch_size", "sequence_length"]
    assert inputs["attention_mask"].shape == ["batch_size", "total_sequence_length"]
    for name in ("input_ids", "attention_mask", "position_ids"):
        assert inputs[name].type == "tensor(int64)"
    kv, dim = spec.num_kv_heads, spec.head_dim
    assert inputs["past_key_values.0.key"].shape == ["batch_size", kv, "past_sequence_length", dim]
    assert outputs["present.1.value"].shape == ["batch_size", kv, "total_sequence_length", dim]
    assert outputs["logits"].shape == ["batch_size", "sequence_length", spec.vocab_size]
    assert outputs["logits"].type == inputs["past_key_values.0.value"].type == "tensor(float)"
    layers = range(spec.num_layers)
    assert list(inputs) == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kind}" for i in layers for kind in ("key", "value")]
    assert list(outputs) == ["logits"] + [f"present.{i}.{kind}" for i in layers for kind in ("key", "value")]


def test_open_runner_reads_the_metadata_and_close_is_idempotent(onnx_artifact: Callable[..., ConvertResult],
                                                                ckpts: dict[str, Path]) -> None:
    out = onnx_artifact("qwen2", "fp32").out_dir
    meta = ArtifactMetadata.load(out)
    runner = TARGETS.get("onnx").open_runner(out, meta)
    assert isinstance(runner, OnnxRunner) and runner.traits == meta.traits
    assert runner.path == out / meta.format_metadata["model_file"]
    ids = prompts(ckpts["qwen2"])[0]
    assert runner.greedy(ids, 2) == reference(ckpts["qwen2"]).greedy(ids, 2)
    runner.close()
    runner.close()
    with pytest.raises(ParityError, match="closed"):
        runner.prefill_logits(ids)
    for bad in ("../model.onnx", "/etc/passwd", ""):
        tampered = dataclasses.replace(meta, format_metadata={**meta.format_metadata, "model_file": bad})
        with pytest.raises(SourceError, match="model_file"):
            TARGETS.get("onnx").open_runner(out, tampered)


# ------------------------------------------------------------------------------------ batching and padding


@pytest.mark.parametrize("variant", ["llama3", "qwen2", WINDOW, "gemma2", "phi4-mini"])
def test_left_padded_batch_matches_single_runs(onnx_artifact: Callable[..., ConvertResult], ckpts: dict[str, Path],
                                               variant: str) -> None:
    runner = OnnxRunner(onnx_artifact(variant, "fp32").out_dir)
    rows = [ids[:14] for ids in prompts(ckpts[variant])[:3]]
    rows[1] = rows[1][:6]
    rows[2] = rows[2][:1]
    width = max(len(r) for r in rows)
    pad = 0
    ids = np.array([[pad] * (width - len(r)) + r for r in rows], dtype=np.int64)
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=np.int64)
    positions = np.maximum(mask.cumsum(axis=1) - 1, 0)
    logits, past = runner.forward(ids, mask, positions)
    assert np.isfinite(logits).all()  # fully masked (padding) rows stay finite
    for b, row in enumerate(rows):
        single = runner.prefill_logits(row)
        np.testing.assert_allclose(logits[b, width - len(row):], single, atol=1e-4, rtol=0)
    # Decode four steps as a batch through the cache; each row must follow its own single greedy run.
    generated: list[list[int]] = [[] for _ in rows]
    for _ in range(4):
        tokens = logits[:, -1].argmax(axis=-1)
        for b, token in enumerate(tokens):
            generated[b].append(int(token))
        mask = np.concatenate([mask, np.ones((len(rows), 1), dtype=np.int64)], axis=1)
        positions = positions[:, -1:] + 1
        logits, past = runner.forward(tokens[:, None].astype(np.int64), mask, positions, past)
    last = logits[:, -1]
    ref = reference(ckpts[variant])
    for b, row in enumerate(rows):
        assert generated[b] == runner.greedy(row, 4) == ref.greedy(row, 4)
        np.testing.assert_allclose(last[b], ref.prefill_logits(row + generated[b])[-1], atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------- streaming and CLI


def test_chunked_writing_gives_identical_bytes(ckpts: dict[str, Path], onnx_artifact: Callable[..., ConvertResult],
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sovpack.targets.onnx.external_data as external_data

    monkeypatch.setattr(external_data, "CHUNK_BYTES", 1000)  # a few rows per chunk instead of whole tensors
    out = convert(ckpts["phi3"], "onnx:fp16", tmp_path / "chunked", parity=False).out_dir
    reference_dir = onnx_artifact("phi3", "fp16").out_dir
    assert (out / DATA_FILE).read_bytes() == (reference_dir / DATA_FILE).read_bytes()
    assert (out / MODEL_FILE).read_bytes() == (reference_dir / MODEL_FILE).read_bytes()


def test_cli_convert_and_run(ckpts: dict[str, Path], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from sovpack.cli import cli

    out = tmp_path / "cli-onnx"
    result = CliRunner().invoke(cli, ["convert", str(ckpts["qwen2"]), "-t", "onnx:fp32", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["target"] == "onnx:fp32" and summary["parity"] == "PASSED"
    assert {MODEL_FILE, DATA_FILE, GENAI_CONFIG, "tokenizer.json"} <= set(summary["files"])

    ran = CliRunner().invoke(cli, ["run", str(out), "--prompt", "Hello world", "--max-new-tokens", "5", "--json"])
    assert ran.exit_code == 0, ran.output
    info = json.loads(ran.stdout)
    assert info["runtime"] == "onnxruntime" and isinstance(info["text"], str)
    ref = reference(ckpts["qwen2"])
    assert info["generated_ids"] == ref.greedy(info["prompt_ids"], 5, ref.spec.eos_token_ids)

    shown = CliRunner().invoke(cli, ["inspect", str(out), "--json"])
    assert shown.exit_code == 0, shown.output
    described = json.loads(shown.stdout)
    assert described["kind"] == "artifact" and described["target"] == "onnx:fp32"
    assert described["family"] == "qwen2" and described["parity"]["status"] == "PASSED"
    assert described["format_metadata"]["opset"] == 17
    assert {f["path"] for f in described["files"]} >= {MODEL_FILE, DATA_FILE, GENAI_CONFIG}
