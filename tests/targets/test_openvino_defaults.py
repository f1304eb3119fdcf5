"""openvino-genai at its DEFAULT settings on sovpack's decoder IRs (issue 16): what a user types, no properties.

The IR records the runtime options its parity was measured with in rt_info ``runtime_options`` (KV cache f32,
no dynamic quantization of activations), which the CPU plugin applies when the caller passes none. The one
parity setting OpenVINO reads from no model is ``INFERENCE_PRECISION_HINT``: on AMX / AVX512-BF16 CPUs the
defaults compute in bf16. So the tests check three things:

- the rt_info carries the options, and a model compiled with no properties reports them as effective;
- ``LLMPipeline(dir, "CPU", INFERENCE_PRECISION_HINT="f32")`` -- the compute precision and nothing else --
  reproduces the reference's greedy tokens for every family and precision here (the rest comes from rt_info;
  before this change it took ``KV_CACHE_PRECISION=f32`` as well);
- ``LLMPipeline(dir, "CPU")`` with no arguments reproduces them fully where the device computes f32 by default,
  and on an AMX device at least where measured (gemma/qwen3 fp32); elsewhere bf16 arithmetic moves near-tied
  greedy choices on these random-weight fixtures, and the test bounds how far (the measured counts are in
  :data:`MEASURED_AT_DEFAULTS`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sovpack.convert import ConvertResult, convert
from sovpack.parity.prompts import encode_prompts
from sovpack.reference import ReferenceModel
from tests.targets.shared import reference_cache

ov = pytest.importorskip("openvino")
og = pytest.importorskip("openvino_genai")
pytest.importorskip("openvino_tokenizers")

from sovpack.targets.openvino import MODEL_XML, RUNTIME_OPTIONS  # noqa: E402

FAMILIES = ["llama3", "gemma", "qwen3", "qwen3moe"]
PRECISIONS = ["fp32", "fp16"]
MAX_NEW = 12
# Greedy tokens agreeing with the reference (matched prefix per prompt, summed over the 8 parity prompts x 12
# tokens) with LLMPipeline(dir, "CPU") and no arguments, on a Xeon with AMX (bf16 compute at the defaults):
# before (no runtime_options in the IR: u8 KV cache) -> after (this IR). INFERENCE_PRECISION_HINT=f32: 96/96.
MEASURED_AT_DEFAULTS: dict[tuple[str, str], tuple[int, int]] = {
    ("llama3", "fp32"): (79, 78), ("llama3", "fp16"): (79, 78),
    ("gemma", "fp32"): (85, 96), ("gemma", "fp16"): (78, 90),
    ("qwen3", "fp32"): (82, 96), ("qwen3", "fp16"): (66, 79),
    ("qwen3moe", "fp32"): (96, 92), ("qwen3moe", "fp16"): (91, 93),
}
# Marking the decoder IR ``precise`` (as the encoder IRs are; see the NOTE in targets/openvino/runtime.py) was
# measured on the same Xeon (OpenVINO 2026.4) and not adopted. This IR -> every node marked, RMSNorm/rope/MLP shaped
# to keep the marks, SDPA kept (the CPU plugin's rewrite of SDPA drops them); llama3, gemma, qwen3, qwen3moe:
#   fp32 78 -> 85, 96 -> 82, 96 -> 76, 92 -> 93        fp16 78 -> 78, 90 -> 93, 79 -> 87, 93 -> 93
#   int8 67 -> 67, 75 -> 73, 78 -> 86, 60 -> 60        int4 15 -> 15, 24 -> 24, 13 -> 13,  8 ->  6
#   (int8 / int4 with INFERENCE_PRECISION_HINT=f32: 67, 73, 83, 65 / 15, 24, 13, 12)
# With attention spelled out as well (MatMul, Softmax, MatMul: no SDPA, so no genai paged attention):
#   fp32 96/96, 93, 84, 92                             fp16 89, 93, 89     int8 67, 72, 60
# Where the rt_info alone brings the defaults to the reference's tokens on an AMX device. bf16 arithmetic is the
# CPU's own: on an AMD EPYC with AVX512-BF16 and no AMX (OpenVINO 2026.4) the same IRs gave llama3 78 / 78,
# gemma 85 / 90, qwen3 96 / 79, qwen3moe 92 / 93 (fp32 / fp16): gemma fp32 stays at its count before this IR.
EXACT_ON_AMX = {("gemma", "fp32"), ("qwen3", "fp32")}
# On a bf16 device the rest must still agree on at least this share of tokens (measured minimum: 0.81).
BF16_FLOOR = 0.75


@pytest.fixture(scope="module")
def artifact(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
             ) -> Callable[[str, str], ConvertResult]:
    """convert(variant, precision) with parity, once per module."""
    root = tmp_path_factory.mktemp("ov-defaults")
    cache: dict[tuple[str, str], ConvertResult] = {}

    def make(variant: str, precision: str) -> ConvertResult:
        if (variant, precision) not in cache:
            cache[variant, precision] = convert(checkpoints[variant], f"openvino:{precision}",
                                                root / f"{variant}-{precision}")
        return cache[variant, precision]

    return make


@pytest.fixture(scope="module")
def references(checkpoints: dict[str, Path]) -> Callable[[str], ReferenceModel]:
    return reference_cache(checkpoints)


def _has_amx() -> bool:
    """Whether the CPU has AMX tiles for bf16 (Linux's cpuinfo flags; elsewhere: not known, so no)."""
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        return False


def _default_precision() -> str:
    """The CPU plugin's inference precision when nobody asks: bf16 on AMX / AVX512-BF16 CPUs, else f32."""
    value = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
    return str(getattr(value, "get_type_name", lambda: value)())


def _agreement(out: Path, ref: ReferenceModel, prompts: list[list[int]], **config: Any) -> tuple[int, int]:
    """(tokens of the reference's greedy answers matched as a prefix, tokens in them) over ``prompts``."""
    pipe = og.LLMPipeline(str(out), "CPU", **config)
    stops = ref.spec.eos_token_ids
    generation = og.GenerationConfig(max_new_tokens=MAX_NEW, do_sample=False)
    generation.stop_token_ids = set(stops)
    matched = total = 0
    for ids in prompts:
        expected = ref.greedy(ids, MAX_NEW, stops)
        got = list(pipe.generate(ov.Tensor(np.array([ids], dtype=np.int64)), generation).tokens[0])
        total += len(expected)
        for a, b in zip(got, expected, strict=False):
            if a != b:
                break
            matched += 1
    return matched, total


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_rt_info_carries_the_runtime_options(artifact: Callable[[str, str], ConvertResult], family: str,
                                             precision: str) -> None:
    result = artifact(family, precision)
    xml = result.out_dir / MODEL_XML
    model = ov.Core().read_model(xml)
    for key, value in RUNTIME_OPTIONS.items():
        assert model.get_rt_info(["runtime_options", key]).astype(str) == value
    assert RUNTIME_OPTIONS == {"KV_CACHE_PRECISION": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
    # the CPU plugin applies them with no properties passed
    compiled = ov.Core().compile_model(xml, "CPU")
    assert compiled.get_property("KV_CACHE_PRECISION") == ov.Type.f32
    assert int(compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE")) == 0
    # a property the caller passes still wins over the rt_info
    overridden = ov.Core().compile_model(xml, "CPU", {"KV_CACHE_PRECISION": "u8"})
    assert overridden.get_property("KV_CACHE_PRECISION") == ov.Type.u8
    # and the artifact metadata says the same
    metadata = result.metadata.format_metadata
    assert metadata["runtime_options"] == RUNTIME_OPTIONS
    assert "bf16" in metadata["compute_precision_at_defaults"]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_llm_pipeline_needs_only_the_compute_precision(artifact: Callable[[str, str], ConvertResult],
                                                        checkpoints: dict[str, Path],
                                                        references: Callable[[str], ReferenceModel],
                                                        family: str, precision: str) -> None:
    """Everything parity compiled with except INFERENCE_PRECISION_HINT comes from the IR itself."""
    out = artifact(family, precision).out_dir
    prompts = encode_prompts(checkpoints[family] / "tokenizer.json")
    matched, total = _agreement(out, references(family), prompts, INFERENCE_PRECISION_HINT="f32")
    assert matched == total


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_llm_pipeline_at_its_defaults(artifact: Callable[[str, str], ConvertResult], checkpoints: dict[str, Path],
                                      references: Callable[[str], ReferenceModel], family: str, precision: str,
                                      record_property: Callable[[str, object], None]) -> None:
    """``LLMPipeline(dir, "CPU")`` with no arguments: the reference's greedy tokens (bounded on bf16 devices)."""
    out = artifact(family, precision).out_dir
    prompts = encode_prompts(checkpoints[family] / "tokenizer.json")
    matched, total = _agreement(out, references(family), prompts)
    record_property("greedy_agreement_at_defaults", f"{matched}/{total}")
    if _default_precision() == "f32" or ((family, precision) in EXACT_ON_AMX and _has_amx()):
        assert matched == total
    else:
        assert matched >= BF16_FLOOR * total, f"{matched}/{total} greedy tokens at the defaults"
