"""The default 8-bit limits, calibrated on real weights (issue 16): a quantizer as good as llama.cpp's q8_0
passes them, and real conversion bugs on the same weights still fail them.

Runners are the numpy reference on the real SmolLM2-135M-Instruct checkpoint (fixtures/real_weights.py), over
its weights as q8_0 stores them, or with one conversion bug reproduced: what a converter gets wrong when it
misreads a config key, an activation, a tensor layout, or drops a tensor. llama.cpp's own q8_0 artifact of the
same checkpoint is judged at these limits in tests/targets/test_gguf_real.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sovpack.parity import DEFAULT_THRESHOLDS, ParityReport, check_parity
from sovpack.parity.prompts import PROMPT_LABELS, encode_prompts
from sovpack.reference import ReferenceModel
from sovpack.source.model import SourceModel, open_model

gguf_quants = pytest.importorskip("gguf.quants")


@pytest.fixture(scope="module")
def model(smollm2: Path) -> SourceModel:
    return open_model(smollm2)


@pytest.fixture(scope="module")
def reference(model: SourceModel) -> ReferenceModel:
    return ReferenceModel(model)


def _judge(model: SourceModel, reference: ReferenceModel, runner: ReferenceModel) -> ParityReport:
    assert model.checkpoint.tokenizer_json is not None
    prompts = encode_prompts(model.checkpoint.tokenizer_json)
    return check_parity(reference, runner, target="test:int8", precision="int8", prompts=prompts,
                        prompt_labels=PROMPT_LABELS)


def _q8_0(weight: np.ndarray) -> np.ndarray:
    """The weight as GGUF's q8_0 stores it (blocks of 32, an int8 code each and one f16 scale)."""
    kind = gguf_quants.GGMLQuantizationType.Q8_0
    return gguf_quants.dequantize(gguf_quants.quantize(weight, kind), kind).astype(np.float32)


def test_q8_0_weights_pass_the_default_int8_limits(model: SourceModel, reference: ReferenceModel) -> None:
    runner = ReferenceModel(model)
    for name, shape in model.spec.tensor_shapes().items():
        if len(shape) == 2:
            runner._weights[name] = _q8_0(model.tensor(name, np.float32))
    report = _judge(model, reference, runner)
    assert report.status == "PASSED", report.reasons
    limit, measured = DEFAULT_THRESHOLDS["int8"].mean_kl, report.metrics.mean_kl
    assert limit is not None and measured is not None and 0 < measured < limit / 2


def _permute_rotary_rows(weight: np.ndarray, head_dim: int) -> np.ndarray:
    """q/k rows in interleaved rotary order where the graph rotates halves (a GGUF-style permutation bug)."""
    heads = weight.shape[0] // head_dim
    return weight.reshape(heads, 2, head_dim // 2, -1).swapaxes(1, 2).reshape(weight.shape)


Bug = Callable[[SourceModel], ReferenceModel]


def _spec_bug(**changes: Any) -> Bug:
    def make(model: SourceModel) -> ReferenceModel:
        return ReferenceModel(dataclasses.replace(model, spec=dataclasses.replace(model.spec, **changes)))
    return make


def _rotary_order_bug(model: SourceModel) -> ReferenceModel:
    runner = ReferenceModel(model)
    for name in ("layers.5.q", "layers.5.k"):
        runner._weights[name] = _permute_rotary_rows(model.tensor(name, np.float32), model.spec.head_dim)
    return runner


def _dropped_tensor_bug(model: SourceModel) -> ReferenceModel:
    runner = ReferenceModel(model)
    runner._weights["layers.10.down"] = np.zeros(model.spec.tensor_shapes()["layers.10.down"], dtype=np.float32)
    return runner


BUGS: dict[str, Bug] = {
    "rope base read as 10000 instead of 100000": _spec_bug(rope_theta=10000.0),
    "gelu instead of silu": _spec_bug(activation="gelu_tanh"),
    "one layer's q/k rows in the wrong rotary order": _rotary_order_bug,
    "one projection dropped": _dropped_tensor_bug,
}


@pytest.mark.parametrize("bug", list(BUGS))
def test_real_conversion_bugs_still_fail_the_int8_limits(model: SourceModel, reference: ReferenceModel,
                                                         bug: str) -> None:
    report = _judge(model, reference, BUGS[bug](model))
    assert report.status == "FAILED", (bug, report.metrics.mean_kl)
    assert any(r.startswith("FAIL: mean_kl") for r in report.reasons)
