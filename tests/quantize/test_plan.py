"""Calibration through the numpy reference and the mixed-precision plan built from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sovpack.errors import UsageError
from sovpack.quantize.calibration import HEAD, MAX_CALIBRATION_FILE_BYTES, calibrate
from sovpack.quantize.options import QuantOptions
from sovpack.quantize.plan import linear_tensors, plan_quantization
from sovpack.source.model import open_model


def _group32(bits: int, k: int) -> int | None:
    return 32 if k % 32 == 0 else None


def test_calibration_records_every_linear_input_and_shares_common_inputs(checkpoints: dict[str, Path]) -> None:
    model = open_model(checkpoints["llama3"])
    calib = calibrate(model, hessians=True)
    assert set(linear_tensors(model)) | {HEAD} <= set(calib.stats)
    assert calib.stats["layers.0.q"] is calib.stats["layers.0.k"] is calib.stats["layers.0.v"]
    assert calib.stats["layers.0.gate"] is calib.stats["layers.0.up"]
    assert calib.stats["layers.0.o"] is not calib.stats["layers.0.q"]
    importance = calib.importance("layers.1.down")
    hessian = calib.hessian("layers.1.down")
    assert importance is not None and hessian is not None
    assert importance.shape == (model.spec.intermediate_size,) and np.all(importance > 0)
    np.testing.assert_allclose(np.diag(hessian), importance, rtol=1e-4, atol=1e-9)  # both are E[x^2]
    assert calib.tokens > 100 and len(calib.text_sha256) == 64 and calib.source == "built-in"


def test_calibration_is_deterministic(checkpoints: dict[str, Path]) -> None:
    model = open_model(checkpoints["qwen2"])
    a, b = calibrate(model), calibrate(model)
    assert all(np.array_equal(a.stats[n].squares, b.stats[n].squares) for n in a.stats)


def test_a_user_calibration_file_is_used_and_bad_ones_are_refused(checkpoints: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    model = open_model(checkpoints["llama3"])
    text = tmp_path / "domain.txt"
    text.write_text("Tariff codes for imported machinery are listed in annex four of the regulation.\n" * 4)
    calib = calibrate(model, text_file=text)
    assert calib.source == "domain.txt" and calib.tokens < 200
    for content, message in ((b"", "empty"), (b"\xff\xfe\x00bad", "not UTF-8")):
        bad = tmp_path / "bad.txt"
        bad.write_bytes(content)
        with pytest.raises(UsageError, match=rf"bad\.txt.*{message}"):
            calibrate(model, text_file=bad)
    with pytest.raises(UsageError, match=r"missing\.txt"):
        calibrate(model, text_file=tmp_path / "missing.txt")
    huge = tmp_path / "huge.txt"
    huge.write_bytes(b"a" * (MAX_CALIBRATION_FILE_BYTES + 1))  # bounded: read no further than the limit
    with pytest.raises(UsageError, match=r"huge\.txt.*larger than"):
        calibrate(model, text_file=huge)
    with pytest.raises(UsageError, match="cannot read the calibration file"):
        calibrate(model, text_file=tmp_path)  # a directory, not a file


def test_the_plan_keeps_the_most_sensitive_tensors_at_8_bits_within_the_share(checkpoints: dict[str, Path]) -> None:
    model = open_model(checkpoints["llama3"])
    shapes = linear_tensors(model)
    total = sum(r * c for r, c in shapes.values())
    plan = plan_quantization(model, QuantOptions(method="weighted", int8_share=0.2), _group32)
    eight = [n for n, t in plan.tensors.items() if t.bits == 8]
    assert eight and sum(shapes[n][0] * shapes[n][1] for n in eight) <= 0.2 * total
    # greedy by sensitivity: the most sensitive tensor is kept, and a 4-bit tensor more sensitive than a kept
    # one is there only because it no longer fitted in the share
    ranked = sorted(plan.tensors, key=lambda n: -(plan.tensors[n].sensitivity or 0.0))
    assert plan.tensors[ranked[0]].bits == 8
    worst_kept = min(plan.tensors[n].sensitivity or 0.0 for n in eight)
    spent = sum(shapes[n][0] * shapes[n][1] for n in eight)
    for name in ranked:
        if plan.tensors[name].bits == 4 and (plan.tensors[name].sensitivity or 0.0) > worst_kept:
            assert spent + shapes[name][0] * shapes[name][1] > 0.2 * total
    none = plan_quantization(model, QuantOptions(method="weighted", int8_share=0.0), _group32)
    assert all(t.bits == 4 and t.group_size == 32 for t in none.tensors.values())
    recorded = plan.to_dict()
    assert recorded["method"] == "weighted" and recorded["int8_tensors"] == sorted(eight)
    assert recorded["options"]["int8_share"] == 0.2 and recorded["calibration"]["source"] == "built-in"


def test_a_tensor_no_group_divides_stays_8_bit_instead_of_failing(checkpoints: dict[str, Path]) -> None:
    model = open_model(checkpoints["llama3"])
    down = model.spec.intermediate_size

    def no_group_for_down(bits: int, k: int) -> int | None:
        return None if bits == 4 and k == down else 32

    plan = plan_quantization(model, QuantOptions(method="rtn", int8_share=0.0), no_group_for_down)
    downs = [n for n in plan.tensors if n.endswith(".down")]
    assert downs and all(plan.tensors[n].bits == 8 for n in downs)
    assert all(t.bits == 4 for n, t in plan.tensors.items() if not n.endswith(".down"))
    assert plan.calibration is None  # rtn needs no calibration


def test_auto_resolves_to_a_concrete_method_and_codes_match_the_plan(checkpoints: dict[str, Path]) -> None:
    model = open_model(checkpoints["llama3"])
    plan = plan_quantization(model, QuantOptions(), _group32, integer_zero=False)
    assert plan.method in ("gptq", "weighted")
    name = "layers.0.up"
    codes = plan.quantize(name, model.tensor(name, np.float32))
    assert codes.bits == plan.tensors[name].bits and codes.group_size == plan.tensors[name].group_size
    assert codes.zero.dtype == np.float32  # float zero points were asked for


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"method": "awq2"}, "unknown quantization method"),
    ({"group_size": 48}, "power of two"),
    ({"int8_share": 1.5}, "within 0..1"),
])
def test_bad_options_are_usage_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        QuantOptions(**kwargs)  # type: ignore[arg-type]
