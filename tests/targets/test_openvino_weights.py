"""How the openvino target stores weights: quantized codes decompress exactly in the IR, int4 low nibble first."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

ov = pytest.importorskip("openvino")
pytest.importorskip("openvino_genai")
pytest.importorskip("openvino_tokenizers")

from sovpack.targets.openvino import PARITY_CONFIG  # noqa: E402
from sovpack.targets.openvino.weights import SCHEMES, WeightFactory, pack_int4, quantize  # noqa: E402


@pytest.mark.parametrize("precision", ["int8", "int8_sym", "int4", "int4_sym"])
def test_quantized_weights_decompress_exactly(precision: str, tmp_path: Path) -> None:
    """What the IR computes is (codes - zero point) * scale: checks packing, layouts and the decompression ops."""
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((48, 64)).astype(np.float32)

    class Spec:
        hidden_size = 64

        @staticmethod
        def tensor_shapes() -> dict[str, tuple[int, ...]]:
            return {"w": (48, 64)}

    released: list[str] = []

    class Model:
        spec = Spec()
        path = tmp_path

        @staticmethod
        def tensor(name: str, dtype: Any) -> np.ndarray:
            return weight

        @staticmethod
        def rows(name: str, index: Any) -> np.ndarray:
            return weight[index]

        @staticmethod
        def release_pages(name: str) -> None:
            released.append(name)

    factory = WeightFactory(Model(), SCHEMES[precision])  # type: ignore[arg-type]
    x = ov.opset13.parameter([-1, 64], np.float32, name="x")
    graph = ov.Model([ov.opset13.matmul(x, factory.matrix("w"), False, True)], [x])
    ov.save_model(graph, tmp_path / "m.xml", compress_to_fp16=False)
    assert released == ["w"]  # the checkpoint pages go once the weight is quantized (codes, scales: one read)
    compiled = ov.Core().compile_model(tmp_path / "m.xml", "CPU", PARITY_CONFIG)
    bits = 4 if precision.startswith("int4") else 8
    q = quantize(weight, bits=bits, symmetric=precision.endswith("sym"), group_size=16 if bits == 4 else None)
    xs = rng.standard_normal((5, 64)).astype(np.float32)
    np.testing.assert_allclose(compiled([xs])[0], xs @ q.dequantize().T, atol=1e-4)
    step = np.abs(q.scale.astype(np.float32)).max()
    symmetric = precision.endswith("sym")  # the side opposite the extreme value may clip by one step
    assert np.abs(q.dequantize() - weight).max() <= step * (1.0 if symmetric else 0.51) + 1e-6


def test_int4_packing_is_low_nibble_first() -> None:
    assert pack_int4(np.array([1, 2, 3, 4], dtype=np.uint8)).tolist() == [0x21, 0x43]
    assert pack_int4(np.array([-1, 7, -8, 0], dtype=np.int8)).tolist() == [0x7F, 0x08]
